"""`raybench bench curves`: learning curves of the default's search space, recorded as data.

A sweep's early stopping compares trials on a few noisy evals; whether it keeps its winner
can only be judged against what those trials would have done had they trained on. This
trains a fixed set of configs (`CONFIGS`: the default, README's champion, and points spread
over injections, schedule, keep ratio, VET vocabulary, lr and the answer stage's warm-up),
each on several training seeds, exactly as a sweep trial does: Ray Train, 2 FSDP2 workers,
the scene stage run once per seed and shared (`sweep.share_scene_stages`). Every eval
(every `EVAL_EVERY` steps, on `EVAL_SAMPLES` val questions, each question's outcome kept)
is stored, and each finished model's answers are broken down by scene (4-object shape and
position). Replaying schedulers on these curves needs no training.

Each (config, seed) is a unit: one JSON file in the units directory (`--units`, by default
the checkout's `benchmarks/curves/`), written when the unit ends and skipped ever after, so
a recording spans sessions and a crash loses at most the unit in flight (and that one
resumes from its last checkpoint: same Train run name, same storage).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from raybench.bench.common import checkout_commit, write_unit_json
from raybench.bench.seeds import DEFAULT_CONFIG

REPO = Path(__file__).resolve().parents[2]
UNITS_DIR = REPO / "benchmarks" / "curves"
EVAL_EVERY, EVAL_SAMPLES = 50, 1000


def _point(injections: int, schedule: str, keep: float, vocab: int, lr: float) -> dict:
    """A point of the default's sweep space, every axis given, as the overrides a trial applies."""
    fusion = "model.fusion."
    return {fusion + "deepstack.num_injections": injections, fusion + "sparsity.schedule": schedule,
            fusion + "sparsity.final_keep_ratio": keep, fusion + "vet.vocab_size": vocab, "train.lr": lr}


# default.yaml's values before the recording chose trial 1 (issue 29): 3 injections,
# exponential to 0.25, VET 1024, answer-stage lr 1e-3.
FORMER_DEFAULT = _point(3, "exponential", 0.25, 1024, 0.001)

# name -> overrides of jobs/configs/default.yaml (dotted paths, as `--set` and sweep.space);
# every point names all five swept axes, so a name means the same config whatever
# default.yaml holds. README's former champion is the TPE trial that answered 0.990 (issue
# 29); the rest spread over the space's axes. Order matters only for the recording.
CONFIGS: dict[str, dict] = {
    "former-default": FORMER_DEFAULT,
    "readme-champion": _point(2, "step", 0.508, 3429, 0.00126),
    "former-default-stage-warmup": {**FORMER_DEFAULT, "train.stages.1.warmup_steps": 100},
    "late-fusion-linear": _point(0, "linear", 0.5, 2048, 0.0008),
    "dense-1inj-low-lr": _point(1, "constant", 1.0, 512, 0.0005),
    "sparse-3inj-high-lr": _point(3, "step", 0.125, 16384, 0.0015),
    "2inj-linear-min-lr": _point(2, "linear", 0.75, 8192, 0.0003),
    "1inj-exponential-half": _point(1, "exponential", 0.5, 4096, 0.0011),
    "late-fusion-step": _point(0, "step", 0.35, 1024, 0.001),
}
# The recorded config default.yaml now is, the sweep's trial 1 (tests/unit/test_bench_curves.py
# holds the two equal): the best the recording found (BENCHMARKS.md, "Search").
DEFAULT_POINT = "dense-1inj-low-lr"
# Configs trained by the single-process trainer (`raybench train --local`), the whole run
# (it has no shared stage): the former default there against it on Ray, seed by seed.
LOCAL = {"former-default-local": "former-default"}
CONFIGS["former-default-local"] = CONFIGS[LOCAL["former-default-local"]]
# Recorded first, on every seed: the default, the former default (Ray, then in-process),
# README's former champion, the stage warm-up.
FIRST = (DEFAULT_POINT, "former-default", "former-default-local", "readme-champion", "former-default-stage-warmup")


def unit_name(config: str, seed: int) -> str:
    return f"{config}-s{seed}"


def unit_order(configs: list[str], seeds: int) -> list[tuple[str, int]]:
    """(config, seed) in recording order: the FIRST configs on every seed, then the rest
    seed by seed (a partial recording holds the configs that matter most, on all seeds)."""
    first = [(c, s) for c in configs if c in FIRST for s in range(seeds)]
    return first + [(c, s) for s in range(seeds) for c in configs if c not in FIRST]


def base_raw(out: Path, quick: bool) -> dict:
    """default.yaml without its sweep, evaluated every EVAL_EVERY steps on EVAL_SAMPLES val
    questions (every unit's training is the sweep trial's: evals change no weights). --quick:
    the tiny model on a few hundred rows, every step count scaled down."""
    from raybench.config import load_raw

    raw = load_raw(DEFAULT_CONFIG)
    raw.pop("sweep", None)
    raw.update(name="curves", run_dir=str(out / "curves"))
    train = raw["train"] = dict(raw["train"], eval_every=EVAL_EVERY, eval_samples=EVAL_SAMPLES)
    if quick:
        fusion = raw["model"]["fusion"]
        fusion = {**fusion, "deepstack": {**fusion["deepstack"], "num_injections": 2}}  # tiny: 2 ViT layers
        raw["model"] = {**raw["model"], "size": "tiny", "fusion": fusion}
        raw["data"] = {**raw["data"], "num_train": 960, "num_val": 120}
        train.update(steps=24, batch_size=32, warmup_steps=2, eval_every=8, eval_samples=120)
        see = dict(train["stages"][0], steps=8)
        see["data"] = {**see["data"], "num_examples": 320}
        train["stages"] = [see, *train["stages"][1:]]
    return raw


def unit_config(raw: dict, out: Path, config: str, seed: int):
    """A unit's run config: the base, the config's overrides, its seed, its own run
    directory, the base's data (one rendering for every unit, as a sweep's trials share it)."""
    from raybench.config import set_path, validate_config
    from raybench.tune.space import trial_raw

    base = validate_config(raw)
    unit = trial_raw(raw, {**CONFIGS[config], "train.seed": seed})
    unit = {**unit, "name": f"curves-{unit_name(config, seed)}",
            "run_dir": str(out / "curves" / "units" / unit_name(config, seed))}
    unit = set_path(unit, ["data", "path"], str(base.data_path.resolve()))
    for i, st in enumerate(base.train.stages or []):
        if st.data is not None:
            unit = set_path(unit, ["train", "stages", str(i), "data", "path"], str(base.stage_path(st).resolve()))
    return validate_config(unit)


def read_evals(run_path: Path, file: str = "evals.jsonl") -> list[dict]:
    """<run_dir>/logs/evals.jsonl (the Ray trainer's; train_local.jsonl: the local one's), the
    last record of each step (a resumed run repeats some)."""
    by_step: dict[int, dict] = {}
    for line in (run_path / "logs" / file).read_text().splitlines():
        record = json.loads(line)
        by_step[int(record["step"])] = record
    keep = ("step", "stage", "accuracy", "val_loss", "train_loss", "n", "correct")
    return [{k: v for k, v in r.items() if k in keep or k.startswith("acc/")}
            for _, r in sorted(by_step.items())]


def scene_breakdown(cfg, model_dir: Path) -> dict:
    """The finished model's greedy answers to the val questions, by scene (shape and position
    on 4-object scenes are where binding fails)."""
    from raybench.data.loader import read_split
    from raybench.data.processor import VQAProcessor
    from raybench.data.scene_eval import greedy_scene_report
    from raybench.data.tokenizer import load_tokenizer
    from raybench.model.vlm import HybridVLM

    model = HybridVLM.from_pretrained(model_dir).eval()
    proc = VQAProcessor(load_tokenizer(model_dir), model.config.num_image_tokens, model.config.vision.image_size)
    rows = read_split(cfg.data_path, "val", columns=["image", "question", "answer", "qtype"])
    rows = rows.slice(0, cfg.train.eval_samples).to_pydict()
    return greedy_scene_report(model, proc, rows, cfg.data.seed, cfg.image_size, cfg.train.batch_size)




def check_outcomes(evals: list[dict], qtypes: list[str]) -> None:
    """Each eval's per-question outcomes must give back its accuracy per question type, read
    against the val split's types in order: a curve replayed per question relies on it."""
    from raybench.train.loop import unpack_correct

    for e in evals:
        correct = unpack_correct(e["correct"], e["n"])
        if len(correct) != len(qtypes):
            raise RuntimeError(f"step {e['step']}: {len(correct)} outcomes for {len(qtypes)} val questions")
        for q in set(qtypes):
            mine = [c for c, t in zip(correct, qtypes) if t == q]
            if abs(sum(mine) / len(mine) - e[f"acc/{q}"]) > 1e-9:
                raise RuntimeError(f"step {e['step']}: the outcomes give acc/{q} = {sum(mine) / len(mine)}, "
                                   f"the eval reported {e[f'acc/{q}']}: not in the val split's order")


def run_unit(cfg, config: str, seed: int, shared_root: Path, datasets: dict, tokenizer: Path,
             tracking_uri: str, qtypes: list[str]) -> dict:
    """Train one unit as a sweep trial trains (Ray Train, shared scene stage), or a LOCAL one
    with `raybench train --local`'s trainer, and collect it."""
    from raybench.train.checkpoint import SHARED_READY
    from raybench.train.local import train_local
    from raybench.train.trainer import fit
    from raybench.train.shared_stage import shared_stage

    local = config in LOCAL
    shared = None if local else shared_stage(cfg, shared_root)
    reused = shared is not None and (Path(shared["path"]) / SHARED_READY).is_file()
    started = time.time()
    if local:
        # The sweep's tokenizer, not one trained again in the unit's own directory.
        shutil.copytree(tokenizer, cfg.run_path / "tokenizer", dirs_exist_ok=True)
        train_local(cfg)
    else:
        result = fit(cfg, tokenizer=tokenizer, tracking_uri=tracking_uri, datasets=datasets, shared_stage=shared,
                     tags={"raybench.bench": "curves", "raybench.curves.unit": unit_name(config, seed)})
        if result.error:
            raise result.error
    wall = time.time() - started
    evals = read_evals(cfg.run_path, "train_local.jsonl" if local else "evals.jsonl")
    check_outcomes(evals, qtypes)
    return {"unit": unit_name(config, seed), "config": config, "overrides": CONFIGS[config], "seed": seed,
            "trainer": "local" if local else "ray",
            "started_after_shared_stage": reused, "shared_stage_end": shared and shared["end"],
            "steps": cfg.train.steps, "eval_every": cfg.train.eval_every, "eval_samples": cfg.train.eval_samples,
            "wall_s": wall, "date": time.strftime("%Y-%m-%d", time.gmtime(started)), "commit": checkout_commit(),
            "final": {k: v for k, v in evals[-1].items() if k not in ("correct", "stage")},
            "scenes": scene_breakdown(cfg, cfg.run_path / "model"), "evals": evals}


def _summary(record: dict) -> str:
    f, scenes = record["final"], record["scenes"]["qtypes"]
    per_q = " ".join(f"{k[4:]}={v:.2f}" for k, v in sorted(f.items()) if k.startswith("acc/"))
    four = " ".join(f"{q} {scenes[q]['accuracy_by_objects'].get('4', scenes[q]['accuracy_by_objects'].get(4, 0)):.2f}"
                    for q in ("shape", "position") if q in scenes)
    return (f"{record['unit']}: acc {f['accuracy']:.3f} ({per_q}) | 4-object: {four} | "
            f"{record['wall_s'] / 60:.1f} min{' (after the shared scene stage)' if record['started_after_shared_stage'] else ''}")




def main(args) -> int:
    import ray

    from raybench.config import ConfigError, validate_config
    from raybench.data.loader import read_split
    from raybench.data.prepare import ensure_data, ensure_tokenizer, tokenizer_dir
    from raybench.runtime import init_ray
    from raybench.track import tracking_uri
    from raybench.train.trainer import build_datasets

    out, quick = Path(args.out), args.quick
    units = Path(args.units) if args.units else out / "curves" / "units-quick" if quick else UNITS_DIR
    configs = args.configs or ([DEFAULT_POINT, "readme-champion"] if quick else list(CONFIGS))
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ConfigError(f"bench curves --configs: {unknown} unknown; known: {', '.join(CONFIGS)}")
    raw = base_raw(out, quick)
    base = validate_config(raw)
    order = unit_order(configs, args.seeds or (1 if quick else 2))
    todo = [(c, s) for c, s in order if not (units / f"{unit_name(c, s)}.json").exists()]
    print(f"[bench curves] {len(order) - len(todo)} of {len(order)} units already in {units}; "
          f"{len(todo)} to run", flush=True)
    if not todo:
        print(markdown_summary(units))
        return 0
    units.mkdir(parents=True, exist_ok=True)
    ensure_data(base)
    ensure_tokenizer(base)
    qtypes = read_split(base.data_path, "val", columns=["qtype"]).column("qtype").to_pylist()
    qtypes = qtypes[:base.train.eval_samples]
    write_unit_json(units / "meta.json", {"configs": CONFIGS, "base": raw, "val_qtypes": qtypes})
    started_ray = init_ray()
    try:
        datasets = build_datasets(base, tokenizer_dir(base))
        for config, seed in todo:
            cfg = unit_config(raw, out, config, seed)
            record = run_unit(cfg, config, seed, base.run_path, datasets, tokenizer_dir(base).resolve(),
                              tracking_uri(base.run_path), qtypes)
            write_unit_json(units / f"{unit_name(config, seed)}.json", record)
            print(f"[bench curves] {_summary(record)}", flush=True)
    finally:
        if started_ray:
            ray.shutdown()
    print(markdown_summary(units))
    return 0


def summary_rows(units: Path, sweep_eval_samples: int, at: tuple[int, ...] = (750, 1000)) -> list[dict]:
    """One row per recorded unit: accuracy on the sweep's questions at the steps `at`, the
    final accuracy on every recorded question (overall, shape, position), 4-object shape and
    position from the finished model's answers, wall time."""
    from raybench.train.loop import unpack_correct

    rows = []
    for path in sorted(units.glob("*-s*.json")):
        r = json.loads(path.read_text())
        by_step = {e["step"]: e for e in r["evals"]}
        scenes = r["scenes"]["qtypes"]

        def four(q: str) -> str:
            by_n = scenes.get(q, {}).get("accuracy_by_objects", {})
            return f"{by_n['4']:.2f}" if "4" in by_n else ""

        row = {"config": r["config"], "seed": str(r["seed"]), "trainer": r.get("trainer", "ray")}
        for step in at:
            e = by_step.get(step)
            seen = unpack_correct(e["correct"], e["n"])[:sweep_eval_samples] if e else None
            row[f"at_{step}"] = f"{sum(seen) / len(seen):.3f}" if seen else ""
        f = r["final"]
        row.update(final=f"{f['accuracy']:.3f}", shape=f"{f.get('acc/shape', 0):.2f}",
                   position=f"{f.get('acc/position', 0):.2f}", shape4=four("shape"), position4=four("position"),
                   minutes=f"{r['wall_s'] / 60:.1f}")
        rows.append(row)
    return rows


def markdown_summary(units: Path, sweep_eval_samples: int = 512) -> str:
    from raybench.bench.common import markdown_table

    return markdown_table(summary_rows(units, sweep_eval_samples), {
        "config": "config", "seed": "seed", "trainer": "trainer", "at_750": "acc @750 (sweep's questions)",
        "at_1000": "@1000", "final": "final (1000 q)", "shape": "shape", "position": "position",
        "shape4": "shape, 4 objects", "position4": "position, 4 objects", "minutes": "wall min"})
