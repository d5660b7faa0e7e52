"""Schedulers replayed on recorded learning curves: does early stopping keep the winner?

`raybench bench curves` stores, for a fixed set of configs of the default's space and
several training seeds each, every eval of a sweep trial's training (each val question's
outcome included). A replay is a sweep that trains nothing:

- TPE (`raybench.tune.searcher`, as the sweep seeds and runs it, no repeats) proposes
  configs from the recorded set; trial 1 is the enqueued one (the pipeline's default's values);
- each trial's curve is one of its config's recorded seeds, drawn at random, so what a
  scheduler sees at a rung carries the real seed-to-seed noise;
- the scheduler sees each trial's reports at the sweep's eval cadence, on the sweep's own
  val questions (the first `eval_samples` of the recorded ones, read per question), trials
  one after another (`max_concurrent_trials: 1`). ASHA is Ray Tune's own bracket
  (`ray.tune.schedulers.async_hyperband._Bracket`); the median stopping rule follows
  `ray.tune.schedulers.MedianStoppingRule`'s decision (hard stop, a trial's best result
  against the median of the others' running means).

Per scheduler and budget, over many replays: how often the budget's best trial (the best
final accuracy on every recorded val question) reaches the end; the champion's final
accuracy (the completed trial with the best last report, as `raybench sweep` registers);
and the answer-stage steps trained against FIFO's (the shared scene stage is the same for
every scheduler and is left out).
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace



@dataclass(frozen=True)
class Curve:
    """One recorded (config, seed): per step, accuracy on the sweep's val questions, on all
    recorded ones, and the val loss (on all recorded ones: it is not stored per question)."""
    config: str
    seed: int
    start: int                   # the answer stage's first step: evals before it are the scene stage's
    sweep_accuracy: dict[int, float]
    accuracy: dict[int, float]
    val_loss: dict[int, float]

    @property
    def final(self) -> float:
        return self.accuracy[max(self.accuracy)]


@dataclass(frozen=True)
class Scheduler:
    """What `sweep.scheduler` (+ its rung settings) would be; `every`: the eval cadence."""
    kind: str                    # fifo | asha | hyperband | median
    first_rung: int = 0          # asha/hyperband: grace period (first rung); median: grace period, in steps
    reduction_factor: float = 3
    metric: str = "accuracy"     # or val_loss
    every: int = 250
    brackets: int = 1            # hyperband: Ray's AsyncHyperBandScheduler(brackets=...)

    @property
    def label(self) -> str:
        if self.kind == "fifo":
            return "FIFO (no early stop)"
        if self.kind == "median":
            return f"median stopping (grace {self.first_rung}, {self.metric}, every {self.every})"
        brackets = f"{self.brackets} brackets, " if self.kind == "hyperband" else ""
        name = "ASHA" if self.kind == "asha" else "async HyperBand"
        return (f"{name} ({brackets}first rung {self.first_rung}, rf {self.reduction_factor:g}, {self.metric}, "
                f"every {self.every})")


def load_curves(units: Path, sweep_eval_samples: int) -> dict[str, list[Curve]]:
    """The Ray trainer's recorded units (what a sweep trial runs), by config."""
    from raybench.train.loop import unpack_correct

    out: dict[str, list[Curve]] = {}
    for path in sorted(units.glob("*-s*.json")):
        r = json.loads(path.read_text())
        if r.get("trainer", "ray") != "ray":
            continue
        start = r.get("shared_stage_end") or 0
        evals = [e for e in r["evals"] if e["step"] > start]
        sweep_acc = {}
        for e in evals:
            seen = unpack_correct(e["correct"], e["n"])[:sweep_eval_samples]
            sweep_acc[e["step"]] = sum(seen) / len(seen)
        out.setdefault(r["config"], []).append(Curve(
            r["config"], r["seed"], start, sweep_acc, {e["step"]: e["accuracy"] for e in evals},
            {e["step"]: e["val_loss"] for e in evals}))
    return out


def _reports(curve: Curve, every: int) -> list[int]:
    return [s for s in sorted(curve.accuracy) if s % every == 0]


def _value(curve: Curve, step: int, metric: str) -> float:
    """What the scheduler compares, larger is better (Ray negates a `min` metric likewise)."""
    return curve.sweep_accuracy[step] if metric == "accuracy" else -curve.val_loss[step]


def simulate(trials: list[Curve], sched: Scheduler, max_t: int, seed: int = 0) -> list[int]:
    """The step each trial stops at (max_t: it completed), trials run one after another.
    HyperBand assigns each trial a bracket at random as Ray does (`seed`: that draw's)."""
    import numpy as np
    from ray.tune.schedulers.async_hyperband import _Bracket

    brackets = [_Bracket(sched.first_rung, max_t, sched.reduction_factor, s)
                for s in range(sched.brackets if sched.kind == "hyperband" else 1)] \
        if sched.kind in ("asha", "hyperband") else []
    draw = np.random.default_rng(seed)
    history: list[list[tuple[int, float]]] = []  # every earlier trial's (step, value) reports
    stops = []
    for i, curve in enumerate(trials):
        bracket = None
        if brackets:  # AsyncHyperBandScheduler.on_trial_add: brackets with more rungs are likelier
            sizes = np.array([len(b._rungs) for b in brackets])
            probs = np.e ** (sizes - sizes.max())
            bracket = brackets[draw.choice(len(brackets), p=probs / probs.sum())]
        mine: list[tuple[int, float]] = []
        stop = max_t
        for step in _reports(curve, sched.every):
            value = _value(curve, step, sched.metric)
            mine.append((step, value))
            if step >= max_t:
                break
            if bracket is not None and bracket.on_result(SimpleNamespace(trial_id=i), step, value) == "STOP":
                stop = step
                break
            if sched.kind == "median" and _median_stops(mine, history, step, sched.first_rung):
                stop = step
                break
        history.append(mine)
        stops.append(stop)
    return stops


def _median_stops(mine: list[tuple[int, float]], others: list[list[tuple[int, float]]], step: int,
                  grace: int, min_samples: int = 3) -> bool:
    """MedianStoppingRule (hard stop): past the grace period, stop when this trial's best so
    far is below the median of the running means (grace..step) of the trials that reached step."""
    if step < grace:
        return False
    means = []
    for h in others:
        if h and h[-1][0] >= step:
            scoped = [v for s, v in h if grace <= s <= step]
            if scoped:
                means.append(sum(scoped) / len(scoped))
    if len(means) < min_samples:
        return False
    return max(v for _, v in mine) < statistics.median(means)


def propose(configs: list[str], budget: int, seed: int, told: callable, first: str | None) -> list[str]:
    """`budget` configs as `raybench sweep` proposes them: trial 1 (`first`, the default's own
    values) enqueued, then TPE (the sweep's sampler settings, no repeats); `told(config)` is
    the value reported to Optuna."""
    import optuna

    from raybench.config import Dimension, SweepConfig
    from raybench.tune.searcher import ask_distinct, discrete_points, tpe_sampler
    from raybench.tune.space import optuna_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"config": Dimension(type="choice", values=configs)}
    study = optuna.create_study(direction="maximize",
                                sampler=tpe_sampler(SweepConfig(num_samples=budget, seed=seed, space=space)))
    if first in configs:
        study.enqueue_trial({"config": first})
    dists, points, rng = optuna_space(space), discrete_points(space), random.Random(seed)
    chosen = []
    for _ in range(min(budget, len(configs))):
        trial = ask_distinct(study, dists, points, rng)
        chosen.append(trial.params["config"])
        study.tell(trial, told(trial.params["config"]))
    return chosen


def replay_once(curves: dict[str, list[Curve]], sched: Scheduler, budget: int, seed: int, max_t: int,
                first: str | None) -> dict:
    """One sweep: TPE's proposals, a drawn seed per trial, the scheduler's stops, the champion."""
    rng = random.Random(10_000 + seed)
    trials: list[Curve] = []
    stops: list[int] = []

    def run_trial(config: str) -> float:
        """The trial TPE proposed runs (one of its seeds, drawn), the scheduler decides where it
        stops, and its last report is what TPE is told, as Tune tells Optuna."""
        trials.append(rng.choice(curves[config]))
        stops[:] = simulate(trials, sched, max_t, seed)
        last = [s for s in _reports(trials[-1], sched.every) if s <= stops[-1]][-1]
        return trials[-1].sweep_accuracy[last]

    propose(sorted(curves), budget, seed, run_trial, first)
    completed = [i for i, s in enumerate(stops) if s >= max_t]
    champion = max(completed, key=lambda i: trials[i].sweep_accuracy[max_t])
    best = max(range(len(trials)), key=lambda i: trials[i].final)
    return {"configs": [t.config for t in trials], "stops": stops, "champion": trials[champion].config,
            "champion_final": trials[champion].final, "best_completed": best in completed,
            "best_final": trials[best].final,
            "answer_steps": sum(s - t.start for s, t in zip(stops, trials))}


def replay(curves: dict[str, list[Curve]], sched: Scheduler, budget: int, replays: int, max_t: int,
           first: str | None) -> dict:
    runs = [replay_once(curves, sched, budget, seed, max_t, first) for seed in range(replays)]
    finals = sorted(r["champion_final"] for r in runs)
    return {"scheduler": sched.label, "budget": budget, "replays": replays,
            "keeps_best": sum(r["best_completed"] for r in runs) / replays,
            "champion_mean": statistics.mean(finals), "champion_p10": finals[max(0, int(0.1 * replays) - 1)],
            "champion_min": finals[0], "answer_steps": statistics.mean(r["answer_steps"] for r in runs)}


def schedulers(start: int, max_t: int, fine: int, sweep_every: int) -> list[Scheduler]:
    """FIFO, the pipeline's ASHA as configured (first rung 1/6 of the answer stage in, at the
    sweep's eval cadence), and variants a default could move to: the first rung at 1/9, 1/6,
    1/3 or 1/2 of the answer stage, reduction factor 2 or 3, on accuracy or val loss, at the
    recorded (finer) eval cadence; async HyperBand (3 brackets from the first rung at 1/9);
    the median stopping rule. Steps scale with the recording
    (the default's: answer stage 600-1500, evals every 50)."""
    def at(frac: float) -> int:
        return start + round(frac * (max_t - start))

    out = [Scheduler("fifo", every=sweep_every), Scheduler("asha", at(1 / 6), 3, "accuracy", sweep_every)]
    for metric in ("accuracy", "val_loss"):
        for frac in (1 / 9, 1 / 6, 1 / 3, 1 / 2):
            for rf in (2, 3):
                out.append(Scheduler("asha", at(frac), rf, metric, fine))
        out.append(Scheduler("hyperband", at(1 / 9), 2, metric, fine, brackets=3))
    out += [Scheduler("median", at(frac), metric="accuracy", every=fine) for frac in (1 / 6, 1 / 3)]
    return out


def run_replays(units: Path, budgets: tuple[int, ...], replays: int, sweep_eval_samples: int,
                sweep_every: int | None = None, first: str | None = None) -> dict:
    """`sweep_every`: the sweep's eval cadence (None: the recorded one); `first`: the config
    enqueued as trial 1 (None: `bench curves`' DEFAULT_POINT, what the pipeline enqueues)."""
    from raybench.bench.curves import DEFAULT_POINT
    from raybench.config import ConfigError

    curves = load_curves(units, sweep_eval_samples)
    if len(curves) < 2:
        raise ConfigError(f"{units}: {len(curves)} recorded config(s); a replay needs at least 2 "
                         "(raybench bench curves records them)")
    some = next(iter(curves.values()))[0]
    steps = sorted(some.accuracy)
    max_t, fine = steps[-1], min(b - a for a, b in zip(steps, steps[1:]))
    rows = []
    for budget in budgets:
        fifo = None
        for sched in schedulers(some.start, max_t, fine, sweep_every or fine):
            row = replay(curves, sched, budget, replays, max_t, first or DEFAULT_POINT)
            fifo = fifo or row["answer_steps"]
            rows.append({**row, "compute_vs_fifo": row["answer_steps"] / fifo})
    return {"units": str(units), "trial_1": first or DEFAULT_POINT, "configs": {c: [cv.seed for cv in cs] for c, cs in sorted(curves.items())},
            "config_final_mean": {c: statistics.mean(cv.final for cv in cs) for c, cs in sorted(curves.items())},
            "max_t": max_t, "sweep_eval_samples": sweep_eval_samples, "rows": rows}


def markdown_table(r: dict) -> str:
    from raybench.bench.common import markdown_table as table

    return table([{"budget": str(x["budget"]), "scheduler": x["scheduler"],
                   "keeps": f"{100 * x['keeps_best']:.0f}%", "mean": f"{x['champion_mean']:.3f}",
                   "p10": f"{x['champion_p10']:.3f}", "compute": f"{x['compute_vs_fifo']:.2f}"}
                  for x in r["rows"]],
                 {"budget": "trials", "scheduler": "scheduler", "keeps": "best trial reaches the end",
                  "mean": "champion's final acc (mean)", "p10": "10th pct", "compute": "answer steps / FIFO"})
