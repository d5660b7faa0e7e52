"""`raybench bench seeds`: the seeds' comparison table with measured numbers.

The research document we started from compares LLaVA, BLIP-2, Ovis VET, Qwen3-VL DeepStack
and dense-sparse fusion in words (cost Low / Medium / High; "best detail capture"; "+15%
OCR"). This trains every preset with the single-process trainer on the same synthetic data
(rendered once, shared), with the same seed, steps, batch and learning rate, then measures
each trained model's inference cost with `bench fusion`'s `measure`: parameters, prefill
latency, GFLOP/sample. Accuracy is exact match on the validation split, overall and per
question type (`count` and `glyph` are the fine-detail ones). Samples/s is the trainer's
own per-eval-window throughput, median of the windows after the first (warm-up).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from raybench.model.presets import PRESETS

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "default.yaml"
FINE_DETAIL = ("count", "glyph")

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
}


def _raw_config(out: Path, size: str, quick: bool, steps: int | None) -> dict:
    """default.yaml's data and train sections (the pipeline's own settings), scaled for --quick."""
    from raybench.config import load_raw

    # A wheel install has no jobs/: the built-in defaults are default.yaml's values.
    base = load_raw(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else {}
    data = {k: v for k, v in base.get("data", {}).items() if k != "path"}
    train = dict(base.get("train", {}))
    if quick:
        size, steps = "tiny", steps or 30
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
                st["data"] = {**st["data"], "path": str(out / f"seeds-stage-{st['name']}")}
                if quick:
                    st["data"]["num_examples"] = min(st["data"].get("num_examples", 6000), 320)
            stages.append(st)
        train["stages"] = stages
    # Three eval windows for the throughput median; every val row scored at the end.
    train.update(eval_every=max(1, train.get("steps", 600) // 3), eval_samples=data.get("num_val", 1000))
    return {"name": "bench-seeds", "run_dir": str(out / "seeds-runs"),
            "model": {"size": size}, "data": {**data, "path": str(out / "seeds-data")}, "train": train}


def _preset_config(raw: dict, preset: str, seed: int = 0):
    from raybench.config import set_path, validate_config

    raw = set_path(raw, ["model", "preset"], preset)
    raw = set_path(raw, ["name"], f"bench-seeds-{preset}")
    where = f"{raw['run_dir']}/{preset}" + (f"-seed{seed}" if seed else "")
    return validate_config(set_path(raw, ["run_dir"], where))


def _throughput(cfg) -> dict:
    windows = [json.loads(x)["samples_per_s"]
               for x in (cfg.run_path / "logs" / "train_local.jsonl").read_text().splitlines() if x.strip()]
    kept = windows[1:] or windows
    return {"median": statistics.median(kept), "min": min(kept), "max": max(kept), "samples": windows}


def train_and_measure(cfg, batch: int, repeats: int, measure_cost: bool = True) -> dict:
    from raybench.bench.fusion import measure
    from raybench.model.vlm import HybridVLM
    from raybench.train.local import train_local

    t0 = time.perf_counter()
    tag = f"{cfg.model.preset} seed {cfg.train.seed}"
    metrics = train_local(cfg, log=lambda line: print(f"  [{tag}] {line}", flush=True))
    train_s = time.perf_counter() - t0
    row = {"preset": cfg.model.preset, "seed": cfg.train.seed, "train_s": train_s,
           "train_samples_per_s": _throughput(cfg), "accuracy": metrics["accuracy"], "val_loss": metrics["val_loss"],
           "acc": {k[4:]: v for k, v in metrics.items() if k.startswith("acc/")},
           "seeds": SEEDS_CLAIMS[cfg.model.preset]}
    if measure_cost:
        model = HybridVLM.from_pretrained(cfg.run_path / "model").requires_grad_(False)
        cost = measure(model, batch, repeats)
        row.update(params_m=cost["params_m"], image_tokens=cost["image_tokens"], prefill_ms=cost["latency_ms"],
                   gflops_per_sample=cost["gflops_per_sample"], peak_rss_growth_mib=cost["peak_rss_growth_mib"])
    return row


def run_seeds_bench(out: Path, size: str = "small", quick: bool = False, steps: int | None = None,
                    repeats: int = 7, presets: tuple[str, ...] = PRESETS, seeds: int = 1) -> dict:
    from raybench.config import set_path
    from raybench.data.prepare import ensure_tokenizer, tokenizer_dir
    from raybench.data.synthetic import QTYPES, chance_accuracy, write_curriculum, write_synthetic

    batch = 8
    if quick:
        repeats, batch = 3, 2
    out.mkdir(parents=True, exist_ok=True)
    raw = _raw_config(out, size, quick, steps)
    shutil.rmtree(raw["run_dir"], ignore_errors=True)
    shutil.rmtree(raw["data"]["path"], ignore_errors=True)
    first = _preset_config(raw, presets[0])
    d = first.data
    # One data set and one tokenizer for every preset: only the fusion differs.
    write_synthetic(first.data_path, num_train=d.num_train, num_val=d.num_val,
                    image_size=first.image_size, seed=d.seed, qtypes=d.qtypes)
    for st in first.train.stages or []:
        if st.data is not None:
            where = first.stage_path(st)
            shutil.rmtree(where, ignore_errors=True)
            write_curriculum(where, st.data.num_examples, image_size=first.image_size, seed=d.seed,
                             qtypes=first.stage_qtypes(st), max_objects=st.data.max_objects, name=st.name,
                             letter_share=st.data.letter_share)
    ensure_tokenizer(first)
    rows = []
    for preset in presets:
        runs = []
        for seed in range(seeds):  # train.seed: the initial weights and the batch order
            cfg = _preset_config(set_path(raw, ["train", "seed"], seed), preset, seed)
            if cfg.run_path != first.run_path:
                shutil.copytree(tokenizer_dir(first), tokenizer_dir(cfg), dirs_exist_ok=True)
            # FLOPs and prefill latency don't depend on the weights: measured once, on seed 0.
            runs.append(train_and_measure(cfg, batch, repeats, measure_cost=seed == 0))
        rows.append(_over_seeds(runs))
    qtypes = [q for q in QTYPES if any(q in r["acc"] for r in rows)]
    cmd = f"raybench bench seeds --size {raw['model']['size']}" + (" --quick" if quick else "")
    if steps:
        cmd += f" --steps {steps}"
    if seeds > 1:
        cmd += f" --seeds {seeds}"
    return {"bench": "seeds", "quick": quick, "command": cmd, "config": raw, "batch": batch,
            "repeats": repeats, "seeds": seeds, "qtypes": qtypes,
            "chance": {q: chance_accuracy(q) for q in qtypes}, "rows": rows}


def _over_seeds(runs: list[dict]) -> dict:
    """One preset's row: seed 0's cost, the accuracies' mean over seeds (`by_seed` keeps each)."""
    row = dict(runs[0])
    qtypes = sorted({q for r in runs for q in r["acc"]})
    row["accuracy"] = statistics.fmean(r["accuracy"] for r in runs)
    row["val_loss"] = statistics.fmean(r["val_loss"] for r in runs)
    row["acc"] = {q: statistics.fmean(r["acc"].get(q, float("nan")) for r in runs) for q in qtypes}
    row["train_s"] = statistics.fmean(r["train_s"] for r in runs)
    row["by_seed"] = [{"accuracy": r["accuracy"], "acc": r["acc"], "val_loss": r["val_loss"]} for r in runs]
    return row


def _fine(r: dict) -> float:
    vals = [r["acc"][q] for q in FINE_DETAIL if q in r["acc"]]
    return sum(vals) / len(vals) if vals else float("nan")


def _runs(row: dict) -> list[dict]:
    """Each seed's accuracies (a result from before --seeds has only the one)."""
    return row.get("by_seed") or [{"accuracy": row["accuracy"], "acc": row["acc"]}]


def _mean_range(row: dict, value, digits: int) -> str:
    vals = [value(run) for run in _runs(row)]
    mean = f"{statistics.fmean(vals):.{digits}f}"
    return mean if len(vals) == 1 else f"{mean} ({min(vals):.{digits}f}-{max(vals):.{digits}f})"


def _verdict(diffs: list[float], threshold: float = 0.0) -> str:
    """A claim "a beats b by more than `threshold`" from paired per-seed differences: every
    seed agrees (holds / fails) or the seeds disagree (within noise). One seed decides alone."""
    if all(d > threshold for d in diffs):
        return "**holds**" + (f" on all {len(diffs)} seeds" if len(diffs) > 1 else " (one seed)")
    if all(d <= threshold for d in diffs):
        return "**fails**" + (f" on all {len(diffs)} seeds" if len(diffs) > 1 else " (one seed)")
    return "**within noise** (the seeds disagree)"


def _paired(a: dict, b: dict, value) -> list[float]:
    return [value(x) - value(y) for x, y in zip(_runs(a), _runs(b))]


def markdown_table(r: dict) -> str:
    from raybench.bench.common import markdown_table as table, spread

    qs = r["qtypes"]
    columns = {"preset": "preset", "family": "seeds' family", "cost": "seeds' cost", "params": "params M",
               "prefill": "prefill ms (median, min-max)", "gflops": "GFLOP/sample",
               "train": "train samples/s", "accuracy": "accuracy", **{q: q for q in qs},
               "fine": "fine detail (count, glyph)"}
    cells = [{"preset": row["preset"], "family": row["seeds"]["family"], "cost": row["seeds"]["cost"],
              "params": f"{row['params_m']:.2f}", "prefill": spread(row["prefill_ms"]),
              "gflops": f"{row['gflops_per_sample']:.3g}", "train": f"{row['train_samples_per_s']['median']:.0f}",
              "accuracy": _mean_range(row, lambda run: run["accuracy"], 3),
              **{q: _mean_range(row, lambda run, q=q: run["acc"].get(q, float("nan")), 2) for q in qs},
              "fine": f"{_fine(row):.2f}"} for row in r["rows"]]
    chance = r["chance"]
    cells.append({"preset": "chance", **{q: f"{chance[q]:.2f}" for q in qs},
                  "fine": f"{sum(chance.get(q, 0) for q in FINE_DETAIL) / len(FINE_DETAIL):.2f}"})
    return table(cells, columns)


def claims(r: dict) -> list[str]:
    """The seeds' qualitative statements, each turned into a number from this run."""
    by = {row["preset"]: row for row in r["rows"]}
    out = []
    ranked = [row for row in r["rows"] if row["seeds"]["level"] is not None]
    pairs = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:]
             if a["seeds"]["level"] != b["seeds"]["level"]]
    agree = sum((a["seeds"]["level"] < b["seeds"]["level"]) == (a["gflops_per_sample"] < b["gflops_per_sample"])
                for a, b in pairs)
    order = " < ".join(f"{row['preset']} {row['gflops_per_sample']:.3g}"
                       for row in sorted(r["rows"], key=lambda x: x["gflops_per_sample"]))
    if pairs:
        out.append(f"- cost order (Low < Low-Medium < Medium < Medium-High): measured GFLOP/sample "
                   f"{order}; {agree} of {len(pairs)} pairs the seeds rank differently agree")
    def points(diffs: list[float]) -> str:
        return ", ".join(f"{d * 100:+.1f}" for d in diffs) + " points" + (" (per seed)" if len(diffs) > 1 else "")

    if "deepstack" in by and len(r["rows"]) > 1:
        best = max((row for row in r["rows"] if row["preset"] != "deepstack"), key=_fine)
        diffs = _paired(by["deepstack"], best, _fine)
        out.append(f"- DeepStack \"best detail capture\": fine-detail accuracy {_fine(by['deepstack']):.2f}, "
                   f"best of the others {best['preset']} {_fine(best):.2f}: {points(diffs)} — " + _verdict(diffs))
    if "ovis" in by and "llava" in by:  # alignment itself is not observable here; accuracy is
        diffs = _paired(by["ovis"], by["llava"], lambda run: run["accuracy"])
        out.append(f"- Ovis \"best alignment, moderate cost\": accuracy vs llava {points(diffs)} — "
                   f"{_verdict(diffs)}; GFLOP/sample x{by['ovis']['gflops_per_sample'] / by['llava']['gflops_per_sample']:.2f}")
    if "dense_sparse" in by and "llava" in by:
        ds, dense = by["dense_sparse"], by["llava"]  # llava = dense_sparse without pruning
        glyph = _paired(ds, dense, lambda run: run["acc"].get("glyph", float("nan")))
        out.append(f"- dense-sparse \"+15% OCR\" (glyph, vs llava = the same model unpruned): "
                   f"{points(glyph)} — " + _verdict(glyph, threshold=0.15 - 1e-9))
        acc = _paired(ds, dense, lambda run: run["accuracy"])
        out.append(f"- dense-sparse \"comparable accuracy\" at lower cost: accuracy {points(acc)} "
                   f"(within 2 points: {_verdict([-abs(d) for d in acc], threshold=-0.02)}), GFLOP/sample "
                   f"x{ds['gflops_per_sample'] / dense['gflops_per_sample']:.2f}, prefill "
                   f"x{ds['prefill_ms']['median'] / dense['prefill_ms']['median']:.2f} vs llava")
    return out


def markdown_row(r: dict) -> str:
    parts = [f"{row['preset']} {row['accuracy']:.2f}" for row in r["rows"]]
    return f"| seeds ({r['config']['model']['size']}, {r['config']['train']['steps']} steps) | accuracy " \
           + ", ".join(parts) + " |"


def markdown_section(r: dict) -> str:
    from raybench.bench.report import heading

    t, d = r["config"]["train"], r["config"]["data"]
    head = heading(r,
                   f"size `{r['config']['model']['size']}`, {t['steps']} steps, batch {t['batch_size']}, "
                   f"lr {t['lr']}, {d['num_train']} train / {d['num_val']} val questions")
    return "\n".join([
        head, "",
        "Every preset trained by the single-process trainer on the same synthetic data (one "
        "render, one tokenizer), the same seed, steps, batch and learning rate (jobs/configs/"
        "default.yaml's train section, shrunk by --quick); accuracy is exact match on all validation questions, per "
        "question type; cost is the trained model's prefill (as `bench fusion`, batch "
        f"{r['batch']}, {r['repeats']} repeats) and FLOPs. `seeds' cost` is the research "
        "document's column (section 10); `chance` is a uniform guess over the type's answers.", "",
        markdown_table(r), "", *claims(r), "",
        ("One run per preset on one seed: accuracy differences of a few points are within "
         "run-to-run noise; the cost columns are the stable part." if r.get("seeds", 1) == 1 else
         f"Accuracy: the mean over {r['seeds']} seeds (`train.seed`: initial weights and batch order; "
         "the same data), with the lowest and highest seed in brackets; a claim holds or fails "
         "only when every seed says so. Cost: seed 0's model (it does not depend on the weights)."),
    ]) + "\n"


def _plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qs, rows = r["qtypes"] + ["overall"], r["rows"]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(11, 4))
    for k, row in enumerate(rows):
        vals = [row["acc"].get(q, 0.0) for q in r["qtypes"]] + [row["accuracy"]]
        ax.bar([i + k * width for i in range(len(qs))], vals, width, label=row["preset"])
    for i, q in enumerate(r["qtypes"]):
        ax.hlines(r["chance"][q], i - width / 2, i + 0.8 - width / 2, colors="black", linestyles="dotted")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(qs))])
    ax.set_xticklabels(qs)
    ax.set_ylabel("exact-match accuracy (dotted: chance)")
    ax.set_ylim(0, 1)
    ax.legend(ncol=3, fontsize=8)
    ax.set_title(f"accuracy per question type, {r['config']['train']['steps']} steps each")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args) -> int:
    from raybench.bench.common import write_result

    out = Path(args.out)
    result = run_seeds_bench(out, size=args.size, quick=args.quick, steps=getattr(args, "steps", None),
                             repeats=args.repeats, seeds=getattr(args, "seeds", None) or 1)
    write_result(out, "seeds", result, markdown_row(result), _plot)
    print(markdown_table(result))
    return 0
