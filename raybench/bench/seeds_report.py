"""What `raybench bench seeds` reports: its table, the seeds' claims and their verdicts from
paired per-seed differences, its BENCHMARKS.md section and its plot, all from the result
`seeds.result_from_units` builds out of the stored units (the recording is in seeds.py)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from raybench.bench.common import REPO

# Which question types stand for what the notes claim, per data mix: fine detail, reading
# ("OCR") and spatial reasoning. The default mix's letter is one capital in a quadrant and
# its "where" a quadrant; the detail mix reads 2-3-letter words and relates neighbours.
FINE = {"default": ("count", "glyph"), "detail": ("shape", "count", "word")}
OCR = {"default": "glyph", "detail": "word"}
SPATIAL = {"default": "position", "detail": "relation"}
FINE_DETAIL = FINE["default"]
AT_CHANCE = 0.03  # within 3 points of a uniform guess counts as not learned


def _fine(r: dict, mix: str = "default") -> float:
    vals = [r["acc"][q] for q in FINE[mix] if q in r["acc"]]
    return sum(vals) / len(vals) if vals else float("nan")


def _mix(r: dict) -> str:
    """The synthetic scenes a mix's units trained on (bench seeds' mix `detail` = data.mix detail)."""
    return r.get("config", {}).get("data", {}).get("mix", "default")


def _runs(row: dict) -> list[dict]:
    """Each seed's accuracies (a result from before --seeds has only the one)."""
    return row.get("by_seed") or [{"seed": row.get("seed", 0), "accuracy": row["accuracy"], "acc": row["acc"]}]


def _mean_range(row: dict, value, digits: int) -> str:
    vals = [value(run) for run in _runs(row)]
    mean = f"{statistics.fmean(vals):.{digits}f}"
    return mean if len(vals) == 1 else f"{mean} ({min(vals):.{digits}f}-{max(vals):.{digits}f})"


def _verdict(diffs: list[float], threshold: float = 0.0, noise: list[float] | None = None) -> str:
    """A claim "a beats b by more than `threshold`" from paired per-seed differences: every
    seed agrees (holds / fails) or not (within noise). One seed decides alone. `noise`: each
    seed's sampling noise of the difference (`_noise`). A seed supports "holds" when its
    difference is past the threshold and, for a gain (threshold >= 0), beyond the noise; it
    supports "fails" when its difference is short of the threshold and, for a tie or a loss
    allowed (threshold <= 0), a loss beyond the noise."""
    if not diffs:
        return "**not measured** (no seed recorded for both)"
    noise = noise or [0.0] * len(diffs)
    seeds = f" on all {len(diffs)} seeds" if len(diffs) > 1 else " (one seed)"
    pairs = list(zip(diffs, noise))
    if all(d > threshold and (threshold < 0 or d > m) for d, m in pairs):
        return "**holds**" + seeds
    if all(d <= threshold and (threshold > 0 or d < -m) for d, m in pairs):
        return "**fails**" + seeds
    if all(abs(d) <= m for d, m in pairs):
        return "**within noise** (each seed inside sampling noise)"
    if all(d > threshold for d in diffs) or all(d <= threshold for d in diffs):
        return "**within noise** (not every seed beyond sampling noise)"
    return "**within noise** (the seeds disagree)"


def _noise(a: dict, b: dict, value, questions: int) -> list[float]:
    """Per seed (`_seed_pairs`), two standard errors of a - b when each is an accuracy
    over `questions` questions: a difference inside it is what another draw of questions
    could give."""
    pairs = [(value(x), value(y)) for x, y in _seed_pairs(a, b)]
    return [2 * math.sqrt((pa * (1 - pa) + pb * (1 - pb)) / max(questions, 1)) for pa, pb in pairs]


def _questions(r: dict, qtypes: int | None = None) -> int:
    """How many validation questions an accuracy counts: all, or `qtypes` of the mix's types
    (the mixes draw every type equally often)."""
    n = r["config"]["data"].get("num_val", 1000)
    return n if qtypes is None else n * qtypes // max(len(r["chance"]), 1)


def _untestable(a: dict, b: dict, q: str, chance: float, gain: float) -> str | None:
    """Why "a gains `gain` over b on question type q" cannot be decided by this mix: both at
    chance on every seed (nothing learned to compare), or b so close to 1 that the gain does not
    fit (a ceiling). None when the comparison can tell."""
    both = [run["acc"].get(q, float("nan")) for row in (a, b) for run in _runs(row)]
    if both and all(v <= chance + AT_CHANCE for v in both):
        return f"**not measured** (both at chance on {q}: not learned at this size)"
    if gain > 0 and all(run["acc"].get(q, 0.0) > 1.0 - gain for run in _runs(b)):
        return f"**not measured** ({b['preset']} above {1 - gain:.2f} on {q}: no room for +{gain * 100:.0f})"
    return None


def _seed_pairs(a: dict, b: dict) -> list[tuple[dict, dict]]:
    """(a's run, b's run) on each seed both have, in a's order (a partial recording may hold
    seed 1 of one preset and not of the other; results from before units kept no seed: their
    order)."""
    theirs = {run.get("seed", i): run for i, run in enumerate(_runs(b))}
    return [(x, theirs[k]) for i, x in enumerate(_runs(a)) if (k := x.get("seed", i)) in theirs]


def _paired(a: dict, b: dict, value) -> list[float]:
    """a - b on each seed both have (`_seed_pairs`)."""
    return [value(x) - value(y) for x, y in _seed_pairs(a, b)]


def markdown_table(r: dict) -> str:
    from raybench.bench.common import markdown_table as table, spread

    qs = r["qtypes"]
    fine = FINE[_mix(r)]
    columns = {"preset": "preset", "family": "seeds' family", "cost": "seeds' cost", "params": "params M",
               "prefill": "prefill ms (median, min-max)", "gflops": "GFLOP/sample",
               "train": "train samples/s", "accuracy": "accuracy", **{q: q for q in qs},
               "fine": f"fine detail ({', '.join(fine)})"}
    cells = [{"preset": row["preset"], "family": row["seeds"]["family"], "cost": row["seeds"]["cost"],
              "params": f"{row['params_m']:.2f}", "prefill": spread(row["prefill_ms"]),
              "gflops": f"{row['gflops_per_sample']:.3g}", "train": f"{row['train_samples_per_s']['median']:.0f}",
              "accuracy": _mean_range(row, lambda run: run["accuracy"], 3),
              **{q: _mean_range(row, lambda run, q=q: run["acc"].get(q, float("nan")), 2) for q in qs},
              "fine": f"{_fine(row, _mix(r)):.2f}"} for row in r["rows"]]
    chance = r["chance"]
    cells.append({"preset": "chance", "accuracy": f"{sum(chance.values()) / len(chance):.3f}",
                  **{q: f"{chance[q]:.2f}" for q in qs},
                  "fine": f"{sum(chance.get(q, 0) for q in fine) / len(fine):.2f}"})
    return table(cells, columns)


def _points(diffs: list[float]) -> str:
    if not diffs:
        return "no seed in common"
    return ", ".join(f"{d * 100:+.1f}" for d in diffs) + " points" + (" (per seed)" if len(diffs) > 1 else "")


def _acc(q: str):
    return lambda run: run["acc"].get(q, float("nan"))


def _overall(run: dict) -> float:
    return run["accuracy"]


def claim_verdicts(r: dict) -> list[dict]:
    """Each of the notes' claims this mix can test: {"claim", "line", "verdict"} (the verdict's
    first word: holds / fails / within noise / not measured)."""
    by, mix, out = {row["preset"]: row for row in r["rows"]}, _mix(r), []

    def add(claim: str, line: str, verdict: str) -> None:
        # The table's cell: the verdict and on how many seeds ("holds on all 2 seeds", "fails (one seed)").
        out.append({"claim": claim, "line": f"- {line} — {verdict}", "verdict": verdict.split("**")[1],
                    "cell": verdict.replace("**", "")})

    def versus(a: str, b: str, claim: str, what: str, value, threshold: float = 0.0, q: str | None = None) -> None:
        if a in by and b in by:
            diffs = _paired(by[a], by[b], value)
            why = q and _untestable(by[a], by[b], q, r["chance"].get(q, 0.0), threshold)
            noise = _noise(by[a], by[b], value, _questions(r, 1 if q else None))
            add(claim, f"{claim}: {what}, {a} vs {b} {_points(diffs)}", why or _verdict(diffs, threshold, noise))

    if "deepstack" in by and len(r["rows"]) > 1:
        # Among the notes' other families: not our hybrid (it holds DeepStack), nor a variant
        # (deepstack_interior, ...), which is compared with its own preset below.
        others = [row for row in r["rows"] if row["preset"] != "deepstack" and row["seeds"]["level"] is not None]
        best = max(others, key=lambda row: _fine(row, mix))
        diffs = _paired(by["deepstack"], best, lambda run: _fine(run, mix))
        noise = _noise(by["deepstack"], best, lambda run: _fine(run, mix), _questions(r, len(FINE[mix])))
        add("DeepStack \"best detail capture\"", f"DeepStack \"best detail capture\": fine detail "
            f"({', '.join(FINE[mix])}) {_fine(by['deepstack'], mix):.2f}, best of the others {best['preset']} "
            f"{_fine(best, mix):.2f}: {_points(diffs)}", _verdict(diffs, noise=noise))
    # deepstack = llava + taps injected into the LLM: the taps' own effect.
    versus("deepstack", "llava", "DeepStack \"+15% OCR\"", f"{OCR[mix]} accuracy", _acc(OCR[mix]), 0.15 - 1e-9,
           q=OCR[mix])
    versus("deepstack", "llava", "DeepStack \"+10% spatial reasoning\"", f"{SPATIAL[mix]} accuracy",
           _acc(SPATIAL[mix]), 0.10 - 1e-9, q=SPATIAL[mix])
    if "deepstack" in by:
        add("DeepStack \"+20% document parsing\"", "DeepStack \"+20% document parsing\": neither mix has "
            "documents", "**not measured**")
    if "ovis" in by and "llava" in by:  # alignment itself is not observable here; accuracy is
        diffs = _paired(by["ovis"], by["llava"], _overall)
        add("Ovis VET vs an MLP connector", f"Ovis VET vs an MLP connector (\"best alignment, moderate cost\"): "
            f"accuracy vs llava {_points(diffs)}, GFLOP/sample "
            f"x{by['ovis']['gflops_per_sample'] / by['llava']['gflops_per_sample']:.2f}",
            _verdict(diffs, noise=_noise(by["ovis"], by["llava"], _overall, _questions(r))))
    _sparse_claims(by, mix, add, r["chance"], _questions(r))
    versus("deepstack_interior", "deepstack", "Interior taps (Qwen3-VL-like) beat first-to-last", "accuracy", _overall)
    versus("hybrid_vet_taps", "hybrid", "VET on every tapped level (the notes' hybrid) beats mergers", "accuracy",
           _overall)
    return out


def _sparse_claims(by: dict, mix: str, add, chance: dict, n_val: int) -> None:
    if "dense_sparse" not in by or "llava" not in by:
        return
    ds, dense = by["dense_sparse"], by["llava"]  # llava = dense_sparse without pruning
    ocr = _paired(ds, dense, _acc(OCR[mix]))
    why = _untestable(ds, dense, OCR[mix], chance.get(OCR[mix], 0.0), 0.15 - 1e-9)
    add("dense-sparse \"+15% OCR\"", f"dense-sparse \"+15% OCR\" ({OCR[mix]}, vs llava = the same model unpruned): "
        f"{_points(ocr)}", why or _verdict(ocr, threshold=0.15 - 1e-9))
    acc = _paired(ds, dense, _overall)
    acc_noise = _noise(ds, dense, _overall, n_val)
    add("dense-sparse \"preserves accuracy\"", f"dense-sparse \"preserves accuracy\" (no more than 2 points below llava): "
        f"{_points(acc)}, GFLOP/sample x{ds['gflops_per_sample'] / dense['gflops_per_sample']:.2f}, prefill "
        f"x{ds['prefill_ms']['median'] / dense['prefill_ms']['median']:.2f}",
        _verdict(acc, threshold=-0.02 - 1e-9, noise=acc_noise))
    curves = [run["keep_curve"] for run in _runs(ds) if run.get("keep_curve")]
    if curves:
        # The same weights at each keep ratio: accuracy lost to pruning alone, against keeping all.
        at = {c["keep"]: [] for c in curves[0]}
        for curve in curves:
            full = next(c["accuracy"] for c in curve if c["keep"] == 1.0)
            for c in curve:
                at[c["keep"]].append(c["accuracy"] - full)
        trained = curves[0][0]["trained_keep"]
        lost = at.get(trained, [])
        add("dense-sparse keeps accuracy at its keep ratio", "dense-sparse's own weights at each keep ratio, "
            "accuracy vs keeping every visual token: " + "; ".join(
                f"{k:g} ({c['kept_after_stages'][-1]} tokens) {_points(v)}" for (k, v), c in zip(at.items(), curves[0]))
            + f"; at the trained {trained:g}, no more than 2 points lost", _verdict(lost, threshold=-0.02 - 1e-9))


def claims(r: dict) -> list[str]:
    """The seeds' qualitative statements, each turned into a number from this run."""
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
    return out + [c["line"] for c in claim_verdicts(r)]


def verdict_table(r: dict) -> str:
    """One row per claim, one column per mix: the verdicts at a glance."""
    from raybench.bench.common import markdown_table as table

    results = {r["mix"]: r, **r.get("mixes", {})}
    per_mix = {mix: {c["claim"]: c["cell"] for c in claim_verdicts(m)} for mix, m in results.items()}
    names = list(dict.fromkeys(c for v in per_mix.values() for c in v))
    cells = [{"claim": name, **{mix: v.get(name, "-") for mix, v in per_mix.items()}} for name in names]
    return table(cells, {"claim": "claim", **{mix: f"mix `{mix}`" for mix in results}})


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
        md, mt = m["config"]["data"], m["config"]["train"]
        others += ["", f"### Mix `{mix}` ({mt['steps']} steps, {md['num_train']} train / {md['num_val']} val "
                       "questions)", "",
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
        "Verdicts, claim by claim (the lines under each table give the figures):", "", verdict_table(r), "",
        *_mix_block(r), *others, "",
        ("One run per preset on one seed: accuracy differences of a few points are within "
         "run-to-run noise; the cost columns are the stable part." if r.get("seeds", 1) == 1 else
         f"Accuracy: the mean over {r['seeds'] if whole else 'the recorded'} seeds (`train.seed`: initial weights "
         "and batch order; the same data), with the lowest and highest seed in brackets; a claim holds or fails "
         "only when every seed both presets have says so. Cost: the lowest seed's model (it does not depend on "
         "the weights); prefill ms and train samples/s: the seed that measured fastest (a busy core only "
         "slows a timing down)."),
        "A seed counts for a gain (or against a claimed tie) only where its difference is beyond two standard "
        "errors of a difference of two accuracies over that many questions: the validation questions are one "
        "draw too. "
        "A gain on one question type is **not measured** when the mix cannot show it: both presets within "
        f"{AT_CHANCE * 100:.0f} points of chance on every seed (nothing learned to compare), or the reference "
        "so close to 1 on every seed that the claimed gain does not fit.",
    ]) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qs, rows = r["qtypes"] + ["overall"], r["rows"]
    width = 0.8 / len(rows)
    curves = {row["preset"]: [run["keep_curve"] for run in _runs(row) if run.get("keep_curve")] for row in rows}
    curves = {k: v for k, v in curves.items() if v}
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(16 if curves else 11, 4),
                             gridspec_kw={"width_ratios": [11, 5]} if curves else None)
    ax = axes[0] if curves else axes
    if curves:
        _plot_keep(axes[1], curves)
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


def _plot_keep(ax, curves: dict[str, list[list[dict]]]) -> None:
    """Accuracy against prefill ms at each keep ratio, per pruned preset (mean over seeds)."""
    for preset, runs in curves.items():
        keeps = [c["keep"] for c in runs[0]]
        acc = [statistics.fmean(run[i]["accuracy"] for run in runs) for i in range(len(keeps))]
        ms = [statistics.fmean(run[i]["prefill_ms"]["median"] for run in runs) for i in range(len(keeps))]
        ax.plot(ms, acc, marker="o", label=preset)
        for k, x, y in zip(keeps, ms, acc):
            ax.annotate(f"{k:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("prefill ms (batch of the cost measure)")
    ax.set_ylabel("accuracy")
    ax.set_title("keep ratio: accuracy x prefill cost, same weights")
    ax.legend(fontsize=8)
