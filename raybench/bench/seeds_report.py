"""What `raybench bench seeds` reports: its table, the seeds' claims and their verdicts from
paired per-seed differences, its BENCHMARKS.md section and its plot, all from the result
`seeds.result_from_units` builds out of the stored units (the recording is in seeds.py)."""

from __future__ import annotations

import statistics
from pathlib import Path

from raybench.bench.common import REPO

FINE_DETAIL = ("count", "glyph")


def _fine(r: dict) -> float:
    vals = [r["acc"][q] for q in FINE_DETAIL if q in r["acc"]]
    return sum(vals) / len(vals) if vals else float("nan")


def _runs(row: dict) -> list[dict]:
    """Each seed's accuracies (a result from before --seeds has only the one)."""
    return row.get("by_seed") or [{"seed": row.get("seed", 0), "accuracy": row["accuracy"], "acc": row["acc"]}]


def _mean_range(row: dict, value, digits: int) -> str:
    vals = [value(run) for run in _runs(row)]
    mean = f"{statistics.fmean(vals):.{digits}f}"
    return mean if len(vals) == 1 else f"{mean} ({min(vals):.{digits}f}-{max(vals):.{digits}f})"


def _verdict(diffs: list[float], threshold: float = 0.0) -> str:
    """A claim "a beats b by more than `threshold`" from paired per-seed differences: every
    seed agrees (holds / fails) or the seeds disagree (within noise). One seed decides alone."""
    if not diffs:
        return "**not measured** (no seed recorded for both)"
    if all(d > threshold for d in diffs):
        return "**holds**" + (f" on all {len(diffs)} seeds" if len(diffs) > 1 else " (one seed)")
    if all(d <= threshold for d in diffs):
        return "**fails**" + (f" on all {len(diffs)} seeds" if len(diffs) > 1 else " (one seed)")
    return "**within noise** (the seeds disagree)"


def _paired(a: dict, b: dict, value) -> list[float]:
    """a - b on each seed both have, by seed (a partial recording may hold seed 1 of one
    preset and not of the other; results from before units kept no seed: their order)."""
    theirs = {run.get("seed", i): run for i, run in enumerate(_runs(b))}
    return [value(x) - value(theirs[k]) for i, x in enumerate(_runs(a)) if (k := x.get("seed", i)) in theirs]


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
        if not diffs:
            return "no seed in common"
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


def _units_lines(r: dict) -> list[str]:
    """Where the units are, when and at which commit they were recorded, each one's wall time
    (training and the cost measure), and which presets have fewer seeds than the most."""
    if "units" not in r:  # a result from before units
        return []
    runs = [run for row in r["rows"] for run in _runs(row)]
    dates = sorted({run["date"] for run in runs if run.get("date")})
    commits = list(dict.fromkeys(run["commit"] for run in sorted(runs, key=lambda x: x.get("date") or "")
                                 if run.get("commit")))
    units = Path(r["units_dir"])
    where = units.relative_to(REPO) if units.is_relative_to(REPO) else units
    walls = "; ".join(f"{row['preset']} " + ", ".join(f"s{run['seed']} {run['wall_s'] / 60:.1f}"
                                                      for run in _runs(row) if "wall_s" in run)
                      for row in r["rows"])
    asked = r.get("asked") or {"presets": [row["preset"] for row in r["rows"]], "seeds": r["seeds"]}
    short = [f"{row['preset']} {len(_runs(row))}" for row in r["rows"] if len(_runs(row)) < asked["seeds"]]
    missing = [p for p in asked["presets"] if p not in {row["preset"] for row in r["rows"]}]
    when = " to ".join(dict.fromkeys([dates[0], dates[-1]])) if dates else "undated"
    lines = [f"{len(runs)} of {len(asked['presets']) * asked['seeds']} units in `{where}/` ({when}, "
             f"commit {', '.join(commits) or 'unknown'}); wall minutes per unit: {walls}."]
    if short or missing:
        lines.append("Partial recording: " + "; ".join(
            ([f"{', '.join(short)} of {asked['seeds']} seeds so far"] if short else [])
            + ([f"no unit yet for {', '.join(missing)}"] if missing else [])) + ".")
    return lines


def _mix_block(r: dict) -> list[str]:
    return [markdown_table(r), "", *claims(r), "", *_units_lines(r)]


def markdown_section(r: dict) -> str:
    from raybench.bench.report import heading

    t, d = r["config"]["train"], r["config"]["data"]
    head = heading(r,
                   f"size `{r['config']['model']['size']}`, {t['steps']} steps, batch {t['batch_size']}, "
                   f"lr {t['lr']}, {d['num_train']} train / {d['num_val']} val questions")
    others = []
    for mix, m in r.get("mixes", {}).items():
        md = m["config"]["data"]
        others += ["", f"### Mix `{mix}` ({md['num_train']} train / {md['num_val']} val questions)", "",
                   *_mix_block(m)]
    whole = all(len(_runs(row)) == r.get("seeds", 1) for row in r["rows"])
    return "\n".join([
        head, "",
        "Every preset trained by the single-process trainer on the same synthetic data (one "
        "render, one tokenizer), the same seed, steps, batch and learning rate (jobs/configs/"
        "default.yaml's train section, shrunk by --quick); accuracy is exact match on all validation questions, per "
        "question type; cost is the trained model's prefill (as `bench fusion`, batch "
        f"{r['batch']}, {r['repeats']} repeats) and FLOPs. `seeds' cost` is the research "
        "document's column (section 10); `chance` is a uniform guess over the type's answers."
        + (f" Data mix `{r['mix']}` first." if others else ""), "",
        *_mix_block(r), *others, "",
        ("One run per preset on one seed: accuracy differences of a few points are within "
         "run-to-run noise; the cost columns are the stable part." if r.get("seeds", 1) == 1 else
         f"Accuracy: the mean over {r['seeds'] if whole else 'the recorded'} seeds (`train.seed`: initial weights "
         "and batch order; the same data), with the lowest and highest seed in brackets; a claim holds or fails "
         "only when every seed both presets have says so. Cost: the lowest seed's model (it does not depend on "
         "the weights)."),
    ]) + "\n"


def plot(r: dict, path: Path) -> None:
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
