"""Optuna TPE set up for sweeps of a few trials, and never the same config twice.

Two of TPE's defaults waste a small budget (measured by `raybench bench sweep`'s replay
on a 24-config grid with 8 proposals):

- `n_startup_trials=10`: TPE samples at random until 10 trials are done, so a sweep of
  <= 10 trials is random search under TPE's name. We start modelling after a quarter of
  the budget (2 to 10 trials).
- On a discrete space TPE proposes configs it has already tried (the replay counts how
  often), and each repeat is a full trial spent learning nothing. `ask_distinct`
  rejects a repeat before any trial starts: the rejected Optuna trial is told FAIL (TPE
  ignores failed trials; optuna-dashboard shows it with the reason as a user attribute)
  and TPE asks again; if it keeps repeating itself, an untried grid point is enqueued.
  When every point of a discrete space has been tried, the search is finished.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from typing import Any

from raybench.tune.config import Dimension, SweepConfig
from raybench.tune.space import canonical, grid_values

MAX_ENUMERATED = 100_000  # points; a bigger discrete space is not exhausted by any sweep
RETRIES = 20  # then an untried point (fewer: more random fallbacks; `bench sweep`'s replay)


def startup_trials(s: SweepConfig) -> int:
    if s.tpe.n_startup_trials is not None:
        return s.tpe.n_startup_trials
    return max(2, min(10, s.num_samples // 4))


def tpe_sampler(s: SweepConfig):
    import optuna

    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=startup_trials(s),
                                      multivariate=s.tpe.multivariate)


def discrete_points(space: dict[str, Dimension]) -> list[dict[str, Any]] | None:
    """Every config of an all-discrete space (choice / int), keyed like `optuna_space`;
    None when a dimension is continuous or there are too many points to list."""
    if any(d.type in ("uniform", "loguniform") for d in space.values()):
        return None
    keys = [canonical(p) for p in space]
    values = [grid_values(d) for d in space.values()]
    if math.prod(len(v) for v in values) > MAX_ENUMERATED:
        return None
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def ask_distinct(study, distributions: dict, points: list[dict] | None, rng: random.Random):
    """An Optuna trial whose params no earlier (finished, pruned or running) trial had, or
    None when `points` (the whole discrete space) are all taken."""
    from optuna.trial import TrialState

    taken = {_key(t.params) for t in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))}
    if points is not None and all(_key(p) in taken for p in points):
        return None
    for attempt in range(RETRIES):
        trial = study.ask(distributions)
        if _key(trial.params) not in taken:
            return trial
        if points is None and attempt == RETRIES - 1:
            return trial  # a continuous space: a repeat is vanishingly rare, keep it
        trial.set_user_attr("rejected", "repeats an earlier trial's config")
        study.tell(trial, state=TrialState.FAIL)
    untried = [p for p in points if _key(p) not in taken]
    study.enqueue_trial(rng.choice(untried))
    return study.ask(distributions)
