"""`raybench bench seeds`: the seeds' comparison table with measured numbers.

The research document we started from compares LLaVA, BLIP-2, Ovis VET, Qwen3-VL DeepStack
and dense-sparse fusion in words (cost Low / Medium / High; "best detail capture"; "+15%
OCR"). This trains every preset with the single-process trainer on the same synthetic data
(rendered once per data mix, shared), with the same seed, steps, batch and learning rate,
then measures each trained model's inference cost with `bench fusion`'s `measure`:
parameters, prefill latency, GFLOP/sample. Accuracy is exact match on the validation split,
overall and per question type (`count` and `glyph` are the fine-detail ones). Samples/s is
the trainer's own per-eval-window throughput in the answer stage, after its first window.

Each (preset, seed, mix) is a unit: one JSON file in the units directory (`--units`, by
default the checkout's `benchmarks/seeds/`), written when the unit ends and skipped ever
after, as `bench curves` records its units: a recording spans sessions and a crash loses
only the unit in flight. The table, the claims and their verdicts are rendered from the
stored units alone, so a partial recording shows what it has (the rendering: seeds_report.py).

Presets share their scene stage as a sweep's trials do (`raybench.train.shared_stage`): it
trains only the vision tower, which every preset has alike, so the first preset of a seed and
mix trains it and saves its end state under `<out>/seeds-runs/shared-stages`, and the others
start from it, bit for bit where they would have been (tests/unit/test_shared_stage.py).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from raybench.bench.common import checkout_commit, write_unit_json
# The rendering, re-exported: `bench report` finds each bench's section as
# raybench.bench.<name>.markdown_section, and main writes the row, table and plot.
from raybench.bench.seeds_report import (FINE_DETAIL, claims, plot, markdown_row,  # noqa: F401
                                         markdown_section, markdown_table)
from raybench.model.presets import PRESETS

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "jobs" / "configs" / "default.yaml"
UNITS_DIR = REPO / "benchmarks" / "seeds"

# name -> overrides of jobs/configs/default.yaml (dotted paths, as `--set`): the data a mix
# trains and is scored on. `default` is default.yaml's own data section; a unit's name
# carries its mix, so a mix added here records beside the others.
# The detail mix trains 3000 steps (2400 after the 600-step scene stage): at default.yaml's
# 1500, every preset was still climbing steeply at the end and they spanned 7 points.
MIXES: dict[str, dict] = {"default": {}, "detail": {"data.mix": "detail", "train.steps": 3000}}

# The seed's own variants (docs/architecture.md, "The notes' own variants"), recorded beside
# the presets: a unit named for the variant trains its preset with these overrides.
VARIANTS: dict[str, dict] = {
    "deepstack_interior": {"model.preset": "deepstack", "model.fusion.deepstack.tap_placement": "interior"},
    "hybrid_vet_taps": {"model.preset": "hybrid", "model.fusion.deepstack.through_vet": True},
}
MODELS: tuple[str, ...] = PRESETS + tuple(VARIANTS)  # what a unit can train, in table order

# The research notes' cost table and trade-offs, quoted in docs/architecture.md ("The research
# claims the benchmarks check"). `level` orders the cost words.
SEEDS_CLAIMS = {
    "llava": {"family": "LLaVA (late)", "cost": "Low", "level": 0, "claim": ""},
    "blip2": {"family": "BLIP-2 (mid, Q-Former)", "cost": "Medium", "level": 2, "claim": ""},
    "ovis": {"family": "Ovis 2.5 (VET)", "cost": "Low-Medium", "level": 1,
             "claim": "best alignment, moderate cost"},
    "deepstack": {"family": "Qwen3-VL (DeepStack)", "cost": "Medium-High", "level": 3,
                  "claim": "best detail capture, higher cost"},
    "dense_sparse": {"family": "Hybrid dense-sparse", "cost": "Medium", "level": 2,
                     "claim": "best efficiency-accuracy balance; +15% OCR"},
    "hybrid": {"family": "VET + DeepStack + dense-sparse (ours)", "cost": "-", "level": None,
               "claim": "not in the seeds' table"},
    "deepstack_interior": {"family": "DeepStack, interior taps (Qwen3-VL-like)", "cost": "-", "level": None,
                           "claim": "taps inside the tower, never its last block"},
    "hybrid_vet_taps": {"family": "hybrid, VET on every tapped level (the notes')", "cost": "-", "level": None,
                        "claim": "the notes' hybrid"},
}


def unit_name(preset: str, seed: int, mix: str = "default") -> str:
    return f"{mix}-{preset}-s{seed}"


def unit_order(presets, seeds: int, mixes=("default",)) -> list[tuple[str, int, str]]:
    """(preset, seed, mix) in recording order, seed by seed: every preset on seed 0 before
    any on seed 1, so a partial recording is a whole table first and paired verdicts next."""
    return [(p, s, m) for s in range(seeds) for m in mixes for p in presets]


def unit_path(units: Path, unit: tuple[str, int, str]) -> Path:
    return units / f"{unit_name(*unit)}.json"


def todo_units(order: list[tuple[str, int, str]], units: Path) -> list[tuple[str, int, str]]:
    """The units of `order` with no file yet: a finished unit is never trained again."""
    return [u for u in order if not unit_path(units, u).is_file()]


def _raw_config(out: Path, size: str, quick: bool, steps: int | None, mix: str = "default") -> dict:
    """default.yaml's data and train sections (the pipeline's own settings) and its vision
    tower (every preset shares it), with the mix's overrides, scaled for --quick."""
    from raybench.config import load_raw
    from raybench.tune.space import trial_raw

    # A wheel install has no jobs/: the built-in defaults are default.yaml's values.
    base = trial_raw(load_raw(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else {}, MIXES[mix])
    data = {k: v for k, v in base.get("data", {}).items() if k != "path"}
    train = dict(base.get("train", {}))
    where = "" if mix == "default" else f"-{mix}"  # the default mix keeps its former paths
    model = {"size": size}
    if "vision" in base.get("model", {}):  # the tower (conv stem) default.yaml's runs learn with
        model["vision"] = base["model"]["vision"]
    if quick:
        model["size"], steps = "tiny", steps or 30
        # A third tower block: interior taps (deepstack_interior) leave the last one out.
        model["vision"] = {**model.get("vision", {}), "num_layers": 3}
        data.update(num_train=960, num_val=120)
        train.update(batch_size=32, warmup_steps=3)
    if steps:
        train["steps"] = steps
    if train.get("stages"):
        # The same share of the run in each stage as default.yaml's; each stage's own scenes
        # made once for every preset. The last stage runs to the end (no rounding gap).
        base_steps = base.get("train", {}).get("steps", 600)
        stages = []
        for i, st in enumerate(train["stages"]):
            st = dict(st)
            last = i == len(train["stages"]) - 1
            st["steps"] = None if last else max(1, st["steps"] * train.get("steps", base_steps) // base_steps)
            if st.get("data"):
                st["data"] = {**st["data"], "path": str(out / f"seeds-stage{where}-{st['name']}")}
                if quick:
                    st["data"]["num_examples"] = min(st["data"].get("num_examples", 6000), 320)
            stages.append(st)
        train["stages"] = stages
    # Three eval windows for the throughput median; every val row scored at the end.
    train.update(eval_every=max(1, train.get("steps", 600) // 3), eval_samples=data.get("num_val", 1000))
    return {"name": "bench-seeds", "run_dir": str(out / "seeds-runs"),
            "model": model, "data": {**data, "path": str(out / f"seeds-data{where}")}, "train": train}


def unit_raw(raw: dict, preset: str, seed: int, mix: str = "default") -> dict:
    """A unit's config: the mix's base, the preset, the seed (train.seed: the initial weights
    and the batch order; the data is the mix's, the same for every seed), its own run dir."""
    from raybench.config import set_path

    name = unit_name(preset, seed, mix)
    for path, value in VARIANTS.get(preset, {"model.preset": preset}).items():
        raw = set_path(raw, path.split("."), value)
    raw = set_path(raw, ["train", "seed"], seed)
    raw = set_path(raw, ["name"], f"bench-seeds-{name}")
    return set_path(raw, ["run_dir"], str(Path(raw["run_dir"]) / name))


def _identity(raw: dict) -> str:
    """A unit's config without where it wrote: two recordings of the same unit in different
    --out directories are the same unit."""
    d = json.loads(json.dumps(raw))
    d.pop("name", None)
    d.pop("run_dir", None)
    d.get("data", {}).pop("path", None)
    for st in d.get("train", {}).get("stages") or []:
        (st.get("data") or {}).pop("path", None)
    return json.dumps(d, sort_keys=True)


def check_recorded(units: Path, expected: dict[tuple[str, int, str], dict]) -> None:
    """A unit already on file is skipped only if it trained the config this run would: a
    changed default.yaml (or --steps, --size) must not mix with the units of the old one."""
    from raybench.config import ConfigError

    stale = [unit_name(*u) for u, raw in expected.items() if unit_path(units, u).is_file()
             and _identity(json.loads(unit_path(units, u).read_text())["raw"]) != _identity(raw)]
    if stale:
        raise ConfigError(f"bench seeds: {len(stale)} unit(s) in {units} trained another config than this "
                          f"run's ({', '.join(stale[:4])}{', ...' if len(stale) > 4 else ''}): "
                          f"record into another --units DIR, or delete those files to train them again")


def _throughput(cfg) -> dict:
    """The last stage's eval windows after its first (the first holds warm-up, or the end of
    the scene stage in a unit that trained it): every unit's figure from the same steps."""
    lines = [json.loads(x) for x in (cfg.run_path / "logs" / "train_local.jsonl").read_text().splitlines() if x.strip()]
    windows = [x["samples_per_s"] for x in lines]
    last = [x["samples_per_s"] for x in lines if x["stage"] == lines[-1]["stage"]]
    kept = last[1:] or last
    return {"median": statistics.median(kept), "min": min(kept), "max": max(kept), "samples": windows}


def train_and_measure(cfg, batch: int, repeats: int, measure_cost: bool = True, shared_root: Path | None = None) -> dict:
    from raybench.bench.fusion import measure
    from raybench.bench.keep_curve import keep_curve
    from raybench.model.vlm import HybridVLM
    from raybench.train.checkpoint import SHARED_READY
    from raybench.train.local import train_local
    from raybench.train.shared_stage import shared_stage

    shared = shared_stage(cfg, shared_root) if shared_root is not None else None
    started_after = shared is not None and (Path(shared["path"]) / SHARED_READY).is_file()
    t0 = time.perf_counter()
    tag = f"{cfg.model.preset} seed {cfg.train.seed}"
    metrics = train_local(cfg, log=lambda line: print(f"  [{tag}] {line}", flush=True), shared_root=shared_root)
    train_s = time.perf_counter() - t0
    row = {"preset": cfg.model.preset, "seed": cfg.train.seed, "train_s": train_s,
           "shared_stage": None if shared is None else {"end": shared["end"], "started_after": started_after},
           "train_samples_per_s": _throughput(cfg), "accuracy": metrics["accuracy"], "val_loss": metrics["val_loss"],
           "acc": {k[4:]: v for k, v in metrics.items() if k.startswith("acc/")}}
    if measure_cost:
        model = HybridVLM.from_pretrained(cfg.run_path / "model").requires_grad_(False)
        cost = measure(model, batch, repeats)
        row.update(params_m=cost["params_m"], image_tokens=cost["image_tokens"], prefill_ms=cost["latency_ms"],
                   gflops_per_sample=cost["gflops_per_sample"], peak_rss_growth_mib=cost["peak_rss_growth_mib"])
        if model.config.fusion.sparsity.enabled:  # what pruning costs in accuracy, on these weights
            row["keep_curve"] = keep_curve(model, cfg, batch, repeats)
    return row


def run_unit(raw: dict, unit: tuple[str, int, str], tokenizer: Path, batch: int, repeats: int,
             command: str, quick: bool) -> dict:
    """Train one unit from scratch in its own run dir and measure its model: the unit's record.
    Cost is measured on every unit (seconds beside the training), so any subset renders."""
    from raybench.config import dump_config, validate_config
    from raybench.data.prepare import tokenizer_dir

    preset, seed, mix = unit
    cfg = validate_config(raw)
    shutil.rmtree(cfg.run_path, ignore_errors=True)  # what a crashed attempt left
    shutil.copytree(tokenizer, tokenizer_dir(cfg))  # one tokenizer per mix: only the fusion differs
    started = time.time()
    row = {**train_and_measure(cfg, batch, repeats, shared_root=cfg.run_path.parent), "preset": preset,
           "model_preset": cfg.model.preset}
    return {"unit": unit_name(*unit), "mix": mix, "trainer": "local", **row,
            "wall_s": time.time() - started, "date": time.strftime("%Y-%m-%d", time.gmtime(started)),
            "commit": checkout_commit(), "quick": quick, "command": command, "cost_batch": batch, "cost_repeats": repeats,
            "raw": raw, "config": dump_config(cfg)}


def _render_data(raw: dict, out: Path, mix: str) -> Path:
    """The mix's data, its stages' scenes and its tokenizer, rendered anew (a session that
    resumes renders the same rows: every generator is seeded); the tokenizer's directory."""
    from raybench.config import set_path, validate_config
    from raybench.data.prepare import ensure_tokenizer, tokenizer_dir
    from raybench.data.synthetic import write_curriculum, write_synthetic

    where = out / "seeds-runs" / f"tokenizer-{mix}"
    cfg = validate_config(set_path(raw, ["run_dir"], str(where)))
    d = cfg.data
    for path in (cfg.data_path, where):
        shutil.rmtree(path, ignore_errors=True)
    write_synthetic(cfg.data_path, num_train=d.num_train, num_val=d.num_val, image_size=cfg.image_size,
                    seed=d.seed, qtypes=d.qtypes, questions_per_image=d.questions_per_image, mix=d.mix)
    for st in cfg.train.stages or []:
        if st.data is not None:
            shutil.rmtree(cfg.stage_path(st), ignore_errors=True)
            write_curriculum(cfg.stage_path(st), st.data.num_examples, image_size=cfg.image_size, seed=d.seed,
                             qtypes=cfg.stage_qtypes(st), max_objects=st.data.max_objects,
                             questions_per_image=d.questions_per_image, name=st.name,
                             letter_share=st.data.letter_share)
    ensure_tokenizer(cfg)
    return tokenizer_dir(cfg)


def _command(size: str, quick: bool, steps: int | None) -> str:
    return f"raybench bench seeds --size {size}" + (" --quick" if quick else "") \
        + (f" --steps {steps}" if steps else "")


def record_units(out: Path, units: Path, size: str = "small", quick: bool = False, steps: int | None = None,
                 repeats: int = 7, presets=MODELS, seeds: int = 1, mixes=("default",),
                 max_units: int | None = None) -> list[str]:
    """Train the units of presets x seeds x mixes not yet in `units` (at most `max_units` of
    them, in `unit_order`), each written there as it ends. The names trained."""
    batch = 2 if quick else 8
    if quick:
        repeats = 3
    raws = {mix: _raw_config(out, size, quick, steps, mix) for mix in mixes}
    order = unit_order(presets, seeds, mixes)
    expected = {u: unit_raw(raws[u[2]], *u) for u in order}
    check_recorded(units, expected)
    todo = todo_units(order, units)
    if max_units is not None:
        todo = todo[:max_units]
    print(f"[bench seeds] {len(order) - len(todo_units(order, units))} of {len(order)} units already in "
          f"{units}; {len(todo)} to run now", flush=True)
    if not todo:
        return []
    units.mkdir(parents=True, exist_ok=True)
    write_unit_json(units / "meta.json", {"mixes": {m: MIXES[m] for m in mixes}, "presets": list(presets),
                                      "seeds": seeds, "base": raws})
    command, tokenizers, done = _command(raws[mixes[0]]["model"]["size"], quick, steps), {}, []
    for unit in todo:
        mix = unit[2]
        if mix not in tokenizers:
            tokenizers[mix] = _render_data(raws[mix], out, mix)
        record = run_unit(expected[unit], unit, tokenizers[mix], batch, repeats, command, quick)
        write_unit_json(unit_path(units, unit), record)
        done.append(record["unit"])
        per_q = " ".join(f"{q}={v:.2f}" for q, v in sorted(record["acc"].items()))
        print(f"[bench seeds] {record['unit']}: acc {record['accuracy']:.3f} ({per_q}) | "
              f"{record['wall_s'] / 60:.1f} min", flush=True)
    return done


def load_units(units: Path, mix: str = "default", presets=None, seeds: int | None = None) -> list[dict]:
    """The recorded units of one mix (only the given presets and seeds 0..seeds-1, if given),
    in preset order, then seed."""
    records = [json.loads(p.read_text()) for p in sorted(units.glob("*-s*.json"))]
    records = [r for r in records if r["mix"] == mix and r["preset"] in (presets or MODELS)
               and (seeds is None or r["seed"] < seeds)]
    return sorted(records, key=lambda r: (MODELS.index(r["preset"]), r["seed"]))


def mix_result(records: list[dict]) -> dict:
    """One mix's table from its units: a row per preset (the mean over the seeds it has)."""
    from raybench.data.synthetic import chance_accuracy, mix_qtypes

    mix = records[0]["mix"]
    by_preset: dict[str, list[dict]] = {}
    for r in records:
        by_preset.setdefault(r["preset"], []).append(r)
    rows = [_over_seeds(runs) for runs in by_preset.values()]
    qtypes = [q for q in mix_qtypes(MIXES[mix].get("data.mix", "default")) if any(q in r["acc"] for r in rows)]
    first = records[0]
    return {"mix": first["mix"], "config": first["raw"], "batch": first["cost_batch"],
            "repeats": first["cost_repeats"], "seeds": max(len(r["by_seed"]) for r in rows), "qtypes": qtypes,
            "chance": {q: chance_accuracy(q, MIXES[mix].get("data.mix", "default")) for q in qtypes}, "units": [r["unit"] for r in records], "rows": rows}


def result_from_units(units: Path, mixes=("default",), presets=None, seeds: int | None = None) -> dict | None:
    """`bench seeds`' result, from the stored units alone: the first mix with units at the top
    (the schema `bench report` reads), every other one under `mixes`. None: nothing recorded."""
    results = {m: mix_result(rs) for m in mixes if (rs := load_units(units, m, presets, seeds))}
    if not results:
        return None
    top, *others = results
    r = results[top]
    first = load_units(units, top, presets, seeds)[0]
    default_dir = units == UNITS_DIR or units.name == "units-quick"  # --quick's is OUT/seeds/units-quick
    cmd = first["command"] + ("" if default_dir else f" --units {units}")
    if list(mixes) != ["default"]:
        cmd += " --mixes " + " ".join(mixes)
    if (seeds or r["seeds"]) > 1:
        cmd += f" --seeds {seeds or r['seeds']}"
    for m in results.values():
        m["units_dir"] = str(units)
        m["asked"] = {"presets": list(presets or MODELS), "seeds": seeds or r["seeds"]}
    return {"bench": "seeds", "quick": first["quick"], "command": cmd, **r, "mixes": {m: results[m] for m in others}}


def _over_seeds(runs: list[dict]) -> dict:
    """One preset's row: the lowest seed's cost, the accuracies' mean over seeds (`by_seed`
    keeps each seed's accuracies and its unit's wall time). Timings come from the seed that
    measured fastest: they do not depend on the weights, and another process on the cores
    only ever slows a measurement down."""
    runs = sorted(runs, key=lambda r: r.get("seed", 0))
    row = dict(runs[0])
    for key in ("raw", "config"):  # a unit's own; the result keeps one mix config
        row.pop(key, None)
    row["prefill_ms"] = min((r["prefill_ms"] for r in runs), key=lambda t: t["median"])
    row["train_samples_per_s"] = max((r["train_samples_per_s"] for r in runs), key=lambda t: t["median"])
    qtypes = sorted({q for r in runs for q in r["acc"]})
    row["accuracy"] = statistics.fmean(r["accuracy"] for r in runs)
    row["val_loss"] = statistics.fmean(r["val_loss"] for r in runs)
    row["acc"] = {q: statistics.fmean(r["acc"].get(q, float("nan")) for r in runs) for q in qtypes}
    row["train_s"] = statistics.fmean(r["train_s"] for r in runs)
    row["seeds"] = SEEDS_CLAIMS[row["preset"]]
    row["by_seed"] = [{k: r[k] for k in ("seed", "accuracy", "acc", "val_loss", "wall_s", "date", "commit", "keep_curve")
                       if k in r}
                      for r in runs]
    return row


def main(args) -> int:
    from raybench.bench.common import write_result
    from raybench.config import ConfigError

    out, quick = Path(args.out), args.quick
    units = Path(args.units) if getattr(args, "units", None) else out / "seeds" / "units-quick" if quick else UNITS_DIR
    # --quick checks the machinery on the presets and the default mix (the variants and the
    # detail mix have unit tests of their own); a real recording takes everything.
    presets = tuple(getattr(args, "presets", None) or (PRESETS if quick else MODELS))
    mixes = tuple(getattr(args, "mixes", None) or (("default",) if quick else MIXES))
    unknown = [p for p in presets if p not in MODELS] + [m for m in mixes if m not in MIXES]
    if unknown:
        raise ConfigError(f"bench seeds: {unknown} unknown; presets and variants: {', '.join(MODELS)}; "
                          f"mixes: {', '.join(MIXES)}")
    # Two seeds by default: a verdict pairs seeds (one run is one draw); --quick checks the machinery.
    seeds = getattr(args, "seeds", None) or (1 if quick else 2)
    record_units(out, units, size=args.size, quick=quick, steps=getattr(args, "steps", None), repeats=args.repeats,
                 presets=presets, seeds=seeds, mixes=mixes, max_units=getattr(args, "max_units", None))
    result = result_from_units(units, mixes, presets, seeds)
    if result is None:
        print(f"[bench seeds] no unit in {units} yet: nothing to render")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    write_result(out, "seeds", result, markdown_row(result), plot)
    print(markdown_table(result))
    if getattr(args, "write_benchmarks_md", False) and not quick:  # the recording's section, the rest kept
        from raybench.bench.report import splice_section

        splice_section(Path("BENCHMARKS.md"), "## The seeds' comparison", markdown_section(result))
    return 0
