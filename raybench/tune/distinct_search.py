"""Ray Tune's OptunaSearch with `ask_distinct` choosing each trial's config (see
`raybench.tune.searcher`). A module of its own, importing Ray at the top, because Tune
pickles the searcher into the experiment state that `raybench sweep --resume` restores.

On restore, a study trial still RUNNING that the restored searcher does not know is an
orphan: the driver died after Optuna handed it out and before Tune's experiment state
recorded it. Nothing will ever finish it, and `ask_distinct` would count its config as
taken, so it is told FAIL (with the reason as a user attribute, for optuna-dashboard)."""

from __future__ import annotations

import random

from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from raybench.tune.config import SweepConfig
from raybench.tune.searcher import ask_distinct, discrete_points, tpe_sampler


ORPHANED = "the sweep driver died before Tune recorded this trial; --resume failed it"


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

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        if self._ot_study is None:
            return
        known = {t.number for t in self._ot_trials.values()}
        for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in known:
                # Study has no public setter for another trial's attributes; its storage does.
                self._ot_study._storage.set_trial_user_attr(t._trial_id, "orphaned", ORPHANED)
                self._ot_study.tell(t.number, state=TrialState.FAIL)
