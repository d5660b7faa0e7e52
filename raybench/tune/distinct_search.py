"""Ray Tune's OptunaSearch with `ask_distinct` choosing each trial's config (see
`raybench.tune.searcher`). A module of its own, importing Ray at the top, because Tune
pickles the searcher into the experiment state that `raybench sweep --resume` restores."""

from __future__ import annotations

import random

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from raybench.config import SweepConfig
from raybench.tune.searcher import ask_distinct, discrete_points, tpe_sampler


class DistinctOptunaSearch(OptunaSearch):
    def __init__(self, sweep: SweepConfig, **kwargs):
        super().__init__(sampler=tpe_sampler(sweep), **kwargs)
        self._points = discrete_points(sweep.space)
        self._rng = random.Random(sweep.seed)

    def suggest(self, trial_id: str):
        # OptunaSearch asks Optuna only for trial ids it has not seen; ask first, our way.
        if trial_id not in self._ot_trials and self._ot_study is not None:
            trial = ask_distinct(self._ot_study, self._space, self._points, self._rng)
            if trial is None:
                return Searcher.FINISHED  # every config of a discrete space has been tried
            self._ot_trials[trial_id] = trial
        return super().suggest(trial_id)
