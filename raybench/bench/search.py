"""Does the search earn its keep? An exhaustive grid vs Optuna TPE + ASHA on the same space.

Two real sweeps over one discrete space, same data, same training budget per trial:

    grid      `sweep.search: grid`, FIFO: every combination, trained to the end
    tpe+asha  `sweep.search: optuna` (TPE, seeded), ASHA, num_samples = ceil(grid / 3)

Compute is what the trials cost: the sum of their Tune `time_total_s` (start-up included,
it is paid per trial) and of the training steps they ran. The issue's goal: the TPE sweep's
best accuracy within 1 point of the grid's best, at <= 1/3 of the grid's compute.

One TPE run is one draw. The grid's table (every config's accuracy) also lets us replay
the search many times for the price of none: the sweep's own sampler (real Optuna, seeded)
proposes configs, the objective looks up the grid's measured accuracy, for `REPLAY_SEEDS`
seeds; the figure is how often the best of ceil(grid / 3) trials is within 1 point of the
grid's best - for TPE as the sweep runs it, TPE with Optuna's defaults, and random search
(the baseline a search has to beat).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from pathlib import Path

import yaml

REPLAY_SEEDS = 50
TOLERANCE = 0.01  # one accuracy point

SPACE = {
    "model.fusion.vet.vocab_size": {"type": "choice", "values": [32, 256]},
    "model.fusion.deepstack.num_injections": {"type": "int", "low": 0, "high": 2},
    "model.fusion.sparsity.schedule": {"type": "choice", "values": ["constant", "exponential"]},
    "train.lr": {"type": "choice", "values": [0.001, 0.003]},
}


def _config(out: Path, name: str, search: str, num_samples: int, steps: int) -> dict:
    return {
        "name": name, "run_dir": str(out / name),
        "model": {"preset": "hybrid", "size": "tiny"},
        "data": {"num_train": 2048, "num_val": 256},  # per run_dir, same seed: identical data
        "train": {"steps": steps, "batch_size": 32, "eval_every": steps // 4, "eval_samples": 256,
                  "log_every": 10},
        "sweep": {"search": search, "num_samples": num_samples, "seed": 0,
                  "scheduler": "fifo" if search == "grid" else "asha",
                  "asha": {"grace_period": 1, "reduction_factor": 2}, "space": SPACE,
                  # explicit, so a finished sweep from before raybench's TPE settings is not reused
                  **({} if search == "grid" else {"tpe": {"n_startup_trials": None, "multivariate": True}})},
    }


def _trials(sweep) -> list[dict]:
    rows = []
    for tdir in sorted(sweep.experiment_dir.glob("run_trial_*")):
        lines = [json.loads(x) for x in (tdir / "result.json").read_text().splitlines() if x.strip()]
        if not lines:
            continue
        last = lines[-1]
        params = json.loads((tdir / "params.json").read_text())
        rows.append({"trial_id": last["trial_id"], "params": params, "accuracy": last.get("accuracy"),
                     "steps": last.get("step", 0), "time_s": last["time_total_s"]})
    return rows


def _span_s(sweep) -> float:
    """First trial launch to last report, from the trials' own result rows."""
    starts, ends = [], []
    for tdir in sweep.experiment_dir.glob("run_trial_*"):
        rows = [json.loads(x) for x in (tdir / "result.json").read_text().splitlines() if x.strip()]
        if rows:
            starts.append(rows[0]["timestamp"] - rows[0]["time_total_s"])
            ends.append(rows[-1]["timestamp"])
    return max(ends) - min(starts)


def _run(out: Path, name: str, search: str, num_samples: int, steps: int) -> tuple[list[dict], float, bool]:
    """Run one sweep, or reuse it when `out` already holds a finished sweep of this exact
    config (the grid is ~20 min here; a re-run of the bench after a crash should not pay it
    again). Returns (trials, wall seconds, reused)."""
    import time

    import ray

    from raybench.tune.sweep import load_sweep, run_sweep

    cfg = _config(out, name, search, num_samples, steps)
    path = out / f"{name}.yaml"
    text = yaml.safe_dump(cfg)
    finished = Path(cfg["run_dir"]) / "summary" / "summary.md"  # written when a sweep ends
    if path.exists() and path.read_text() == text and finished.is_file():
        sweep = load_sweep(path, [])
        return _trials(sweep), _span_s(sweep), True
    shutil.rmtree(cfg["run_dir"], ignore_errors=True)
    path.write_text(text)
    sweep = load_sweep(path, [])
    t0 = time.perf_counter()
    try:
        run_sweep(sweep)
    finally:
        ray.shutdown()
    return _trials(sweep), time.perf_counter() - t0, False


def _key(params: dict) -> str:
    return json.dumps({k: params[k] for k in sorted(SPACE)}, sort_keys=True)


def replay(table: dict[str, float], budget: int, sampler: str, seeds: int = REPLAY_SEEDS) -> list[float]:
    """Best accuracy found in `budget` trials, per seed, with the grid as the objective.

    tpe: what `raybench sweep` runs (`tpe_sampler`, repeats rejected by `ask_distinct`);
    tpe_optuna_defaults: `TPESampler(seed)` as Optuna ships it, repeats and all;
    random: `RandomSampler`, repeats rejected too - the baseline a search has to beat."""
    import random

    import optuna

    from raybench.config import Dimension, SweepConfig
    from raybench.tune.searcher import ask_distinct, discrete_points, tpe_sampler
    from raybench.tune.space import optuna_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {k: Dimension(**v) for k, v in SPACE.items()}
    dists, points = optuna_space(space), discrete_points(space)
    best = []
    for seed in range(seeds):
        make = {"tpe": lambda: tpe_sampler(SweepConfig(num_samples=budget, seed=seed, space=space)),
                "tpe_optuna_defaults": lambda: optuna.samplers.TPESampler(seed=seed),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed)}[sampler]
        study = optuna.create_study(direction="maximize", sampler=make())
        rng = random.Random(seed)
        for _ in range(budget):
            trial = (study.ask(dists) if sampler == "tpe_optuna_defaults"
                     else ask_distinct(study, dists, points, rng))
            study.tell(trial, table[_key(trial.params)])
        best.append(study.best_value)
    return best


def run_search_bench(out: Path, steps: int = 200) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    grid, grid_wall, grid_reused = _run(out, "search-grid", "grid", 1, steps)
    budget = math.ceil(len(grid) / 3)
    tpe, tpe_wall, tpe_reused = _run(out, "search-tpe", "optuna", budget, steps)
    table = {_key(t["params"]): t["accuracy"] for t in grid}
    grid_best = max(table.values())
    tpe_best = max(t["accuracy"] for t in tpe)
    compute = {name: {"time_s": sum(t["time_s"] for t in rows), "steps": sum(t["steps"] for t in rows)}
               for name, rows in (("grid", grid), ("tpe_asha", tpe))}
    replays = {s: replay(table, budget, s) for s in ("tpe", "tpe_optuna_defaults", "random")}
    return {
        "bench": "search", "config": {"space": SPACE, "steps_per_trial": steps, "budget": budget,
                                      "replay_seeds": REPLAY_SEEDS, "tolerance": TOLERANCE},
        "grid": {"trials": grid, "wall_s": grid_wall, "best_accuracy": grid_best, "reused": grid_reused},
        "tpe_asha": {"trials": tpe, "wall_s": tpe_wall, "best_accuracy": tpe_best, "reused": tpe_reused},
        "compute_ratio_time": compute["tpe_asha"]["time_s"] / compute["grid"]["time_s"],
        "compute_ratio_steps": compute["tpe_asha"]["steps"] / compute["grid"]["steps"],
        "gap_points": 100 * (grid_best - tpe_best),
        "replay": {s: {"best": v, "within_1pt": sum(grid_best - b <= TOLERANCE + 1e-12 for b in v) / len(v),
                       "median_gap_points": 100 * statistics.median(grid_best - b for b in v)}
                   for s, v in replays.items()},
        "accuracy_spread_points": 100 * (grid_best - min(table.values())),
    }


def grid_section(r: dict) -> str:
    """The grid-vs-search part of the sweep section (a sub-heading, a table, the verdict)."""
    from raybench.bench.report import claim

    g, t, rp, c = r["grid"], r["tpe_asha"], r["replay"], r["config"]
    dims = ", ".join(f"`{k.split('.')[-1]}` {len(v.get('values') or range(v['low'], v['high'] + 1))}"
                     for k, v in c["space"].items())
    met = r["gap_points"] <= 100 * c["tolerance"] + 1e-9 and r["compute_ratio_time"] <= 1 / 3 + 1e-9
    return "\n".join([
        f"### Search vs exhaustive grid (hybrid `tiny`, {c['steps_per_trial']} steps per trial; space: {dims})",
        "",
        "| | trials | best val accuracy | compute (trial seconds) | trained steps |",
        "|---|---|---|---|---|",
        f"| grid (`sweep.search: grid`, FIFO) | {len(g['trials'])} | {100 * g['best_accuracy']:.1f}% | "
        f"{sum(x['time_s'] for x in g['trials']):.0f} s | {sum(x['steps'] for x in g['trials'])} |",
        f"| TPE + ASHA (`sweep.search: optuna`) | {len(t['trials'])} | {100 * t['best_accuracy']:.1f}% | "
        f"{sum(x['time_s'] for x in t['trials']):.0f} s | {sum(x['steps'] for x in t['trials'])} |",
        "",
        f"The real TPE+ASHA sweep's best is {r['gap_points']:.1f} points below the grid's best at "
        f"{r['compute_ratio_time']:.2f}x its compute ({r['compute_ratio_steps']:.2f}x its steps): goal "
        f"(within 1 point at <= 1/3 of the compute) {claim(met)}. The configs' accuracies span "
        f"{r['accuracy_spread_points']:.1f} points."
        + "".join(f" The {name} sweep was reused from an earlier run of this exact config in the same `--out` "
                  f"(its wall time is from its trials' own timestamps)."
                  for name, x in (("grid", g), ("TPE", t)) if x.get("reused")),
        "",
        f"One sweep is one draw. Replaying the sweep's sampler on the grid's measured table "
        f"({c['replay_seeds']} seeds, {c['budget']} trials each, no training), how often the best is "
        f"within 1 point of the grid's best:",
        "",
        "| sampler | within 1 point | median gap |",
        "|---|---|---|",
        *(f"| {label} | **{rp[k]['within_1pt']:.0%}** | {rp[k]['median_gap_points']:.1f} pt |"
          for k, label in (("tpe", f"TPE as `raybench sweep` runs it ({max(2, min(10, c['budget'] // 4))} random "
                                   "startup trials, multivariate, repeats rejected)"),
                           ("tpe_optuna_defaults", "TPE with Optuna's defaults (10 random startup trials, "
                                                   "repeats allowed)"),
                           ("random", "random search, repeats rejected"))
          if k in rp),
        ""])


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    accs = sorted(100 * t["accuracy"] for t in r["grid"]["trials"])
    ax.plot(range(len(accs)), accs, "o-", ms=3, label="grid: every config (sorted)")
    for name, style in (("tpe", "C1"), ("tpe_optuna_defaults", "C4"), ("random", "C2")):
        if name not in r["replay"]:
            continue
        ax.axhline(100 * statistics.median(r["replay"][name]["best"]), color=style, ls="--",
                   label=f"{name} replay: median best of {r['config']['budget']}")
    ax.axhline(100 * r["tpe_asha"]["best_accuracy"], color="C3", label="TPE+ASHA sweep (real)")
    ax.set_ylabel("val accuracy (%)")
    ax.set_xlabel("grid config rank")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PIPELINE = "ASHA (first rung 750, rf 3, accuracy, every 250)"  # default.yaml's sweep, as the replay names it
KEEP_GOAL, COMPUTE_GOAL = 0.90, 0.70


def trial_1_rows(units: Path, sweep_eval_samples: int, sweep_every: int, replays: int, max_t: int) -> list[dict]:
    """FIFO and the pipeline's ASHA, 3 trials, with each recorded config that was or is
    default.yaml (its former values, its current ones) enqueued as trial 1."""
    from raybench.bench.curves import DEFAULT_POINT
    from raybench.bench.replay import Scheduler, load_curves, replay

    curves = load_curves(units, sweep_eval_samples)
    some = next(iter(curves.values()))[0]
    pipeline = Scheduler("asha", some.start + round((max_t - some.start) / 6), 3, "accuracy", sweep_every)
    rows = []
    for first in (c for c in ("former-default", DEFAULT_POINT) if c in curves):
        fifo = None
        for sched in (Scheduler("fifo", every=sweep_every), pipeline):
            row = replay(curves, sched, 3, replays, max_t, first)
            fifo = fifo or row["answer_steps"]
            rows.append({**row, "trial_1": first, "compute_vs_fifo": row["answer_steps"] / fifo})
    return rows


def markdown_section(r: dict) -> str:
    """BENCHMARKS.md's search section: the recorded curves, then the schedulers replayed on them."""
    from raybench.bench.common import markdown_table
    from raybench.bench.report import claim

    lines = [f"## Search — `{r['command']}` ({r['replays']} replays per scheduler and budget, on the curves "
             f"`raybench bench curves` recorded in `{r['units_rel']}`; {r.get('date', 'undated')})", "",
             "Every configuration below was trained as a sweep trial trains it (Ray Train, 2 FSDP2 workers, the "
             "scene stage shared per seed), on each training seed, every eval kept with each val question's "
             "outcome. `@750` and `@1000` are the accuracy the sweep sees at those steps (its own 512 "
             "questions), the rest are on all 1000; `4 objects`: the finished model's greedy answers on "
             "4-object scenes.", "", r["curves_table"], "",
             f"The replays draw from {len(r['configs'])} recorded configs on the Ray trainer "
             f"({', '.join(f'{c}: seeds {sorted(s)}' for c, s in r['configs'].items())}); a budget larger than "
             "that proposes every config. A recording still in progress (`bench curves` resumes) widens it.", ""]
    lines += [f"Replays: TPE proposes from the recorded configs as `raybench sweep` does (trial 1 default.yaml's "
              f"own values, `{r['trial_1']}`), "
              "each trial's curve is one of its config's seeds drawn at random, trials run one after another. "
              "*Best trial reaches the end*: how often the budget's best trial (best final accuracy) is not "
              "stopped early. *Answer steps / FIFO*: training steps after the shared scene stage, against "
              "no early stopping.", "", r["replay_table"], ""]
    if r.get("trial_1_rows"):
        lines += ["What trial 1 is decides most of it: the same replays with another recorded config enqueued "
                  "as trial 1 (3 trials).", "",
                  markdown_table([{"first": x["trial_1"], "scheduler": x["scheduler"],
                                   "keeps": f"{100 * x['keeps_best']:.0f}%", "mean": f"{x['champion_mean']:.3f}",
                                   "p10": f"{x['champion_p10']:.3f}", "compute": f"{x['compute_vs_fifo']:.2f}"}
                                  for x in r["trial_1_rows"]],
                                 {"first": "trial 1", "scheduler": "scheduler", "keeps": "best trial reaches the end",
                                  "mean": "champion's final acc (mean)", "p10": "10th pct",
                                  "compute": "answer steps / FIFO"}), ""]
    pipeline = [x for x in r["rows"] if x["scheduler"] == PIPELINE]
    for x in pipeline:
        keeps, compute = x["keeps_best"], x["compute_vs_fifo"]
        lines.append(f"- The pipeline's scheduler ({PIPELINE}), {x['budget']} trials: keeps the best trial in "
                     f"{100 * keeps:.0f}% of replays at {compute:.2f}x FIFO's answer steps; goal >= "
                     f"{100 * KEEP_GOAL:.0f}% at <= {COMPUTE_GOAL:.1f}x: {claim(keeps >= KEEP_GOAL and compute <= COMPUTE_GOAL)}.")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    """`raybench bench search`: schedulers replayed on the curves `bench curves` recorded
    (raybench/bench/replay.py; no training). The grid vs TPE sweeps above run inside
    `bench sweep`'s full mode."""
    from raybench.bench.common import machine_info
    from raybench.bench.curves import REPO, UNITS_DIR, markdown_summary
    from raybench.bench.replay import markdown_table, run_replays
    from raybench.bench.report import splice_section
    from raybench.bench.seeds import DEFAULT_CONFIG
    from raybench.config import load_config

    base = load_config(DEFAULT_CONFIG, [])
    units = Path(args.units) if args.units else UNITS_DIR
    # The sweep's own eval cadence and questions (default.yaml's), read out of the recording.
    result = run_replays(units, (3,) if args.quick else (3, 6), 8 if args.quick else 200,
                         base.train.eval_samples, None if args.quick else base.train.eval_every)
    if not args.quick:  # --quick recordings have their own cadence and configs
        result["trial_1_rows"] = trial_1_rows(units, base.train.eval_samples, base.train.eval_every, 200,
                                              result["max_t"])
    command = "raybench bench search" + (" --quick" if args.quick else "")
    rel = units.resolve().relative_to(REPO) if units.resolve().is_relative_to(REPO) else units
    result.update(bench="search", command=command, date=time.strftime("%Y-%m-%d"), quick=bool(args.quick), replays=8 if args.quick else 200,
                  units_rel=str(rel), curves_table=markdown_summary(units, base.train.eval_samples),
                  replay_table=markdown_table(result), machine=machine_info())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(result, indent=1))
    section = markdown_section(result)
    print(section)
    if getattr(args, "write_benchmarks_md", False):
        splice_section(Path("BENCHMARKS.md"), "## Search", section)
    return 0
