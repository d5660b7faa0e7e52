"""The sweep's TPE: starts modelling inside small budgets, never spends a trial on a repeat."""

from __future__ import annotations

import random

import optuna
import pytest
from optuna.trial import TrialState

from raybench.config import Dimension, SweepConfig
from raybench.tune.searcher import ask_distinct, discrete_points, startup_trials, tpe_sampler
from raybench.tune.space import optuna_space

SPACE = {
    "vet_vocab_size": Dimension(type="choice", values=[32, 256]),  # an alias: keys come out canonical
    "model.fusion.deepstack.num_injections": Dimension(type="int", low=0, high=2),
    "train.lr": Dimension(type="choice", values=[0.001, 0.003]),
}


@pytest.mark.parametrize("num_samples, expected", [(3, 2), (8, 2), (24, 6), (40, 10), (500, 10)])
def test_startup_is_a_quarter_of_the_budget_within_2_to_10(num_samples, expected):
    assert startup_trials(SweepConfig(num_samples=num_samples)) == expected


def test_an_explicit_startup_wins_and_reaches_the_sampler():
    s = SweepConfig(num_samples=8, tpe={"n_startup_trials": 5, "multivariate": False})
    sampler = tpe_sampler(s)
    assert startup_trials(s) == 5
    assert sampler._n_startup_trials == 5 and sampler._multivariate is False


def test_discrete_points_enumerate_the_space_and_refuse_continuous_ones():
    points = discrete_points(SPACE)
    assert len(points) == 12 and len({tuple(sorted(p.items())) for p in points}) == 12
    assert set(points[0]) == {"model.fusion.vet.vocab_size", "model.fusion.deepstack.num_injections", "train.lr"}
    assert discrete_points({**SPACE, "train.lr": Dimension(type="loguniform", low=1e-4, high=1e-2)}) is None


def _study(seed: int = 0) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = SweepConfig(num_samples=12, seed=seed, space=SPACE)
    return optuna.create_study(direction="maximize", sampler=tpe_sampler(s))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_trial_is_new_until_the_space_is_exhausted(seed):
    study, dists, points = _study(seed), optuna_space(SPACE), discrete_points(SPACE)
    rng, seen = random.Random(seed), []
    for _ in range(len(points)):
        trial = ask_distinct(study, dists, points, rng)
        seen.append(tuple(sorted(trial.params.items())))
        # a peaked objective makes TPE want to repeat its best config
        study.tell(trial, 1.0 if trial.params["train.lr"] == 0.003 else 0.0)
    assert len(set(seen)) == len(points)
    assert ask_distinct(study, dists, points, rng) is None
    rejected = study.get_trials(states=(TrialState.FAIL,))
    assert rejected and all(t.user_attrs["rejected"].startswith("repeats") for t in rejected)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == len(points)


def test_a_running_trial_counts_as_taken():
    study = _study()
    only_lr = {"train.lr": SPACE["train.lr"]}
    dists, points = optuna_space(only_lr), discrete_points(only_lr)
    first = ask_distinct(study, dists, points, random.Random(0))  # not told: still RUNNING
    second = ask_distinct(study, dists, points, random.Random(0))
    assert {first.params["train.lr"], second.params["train.lr"]} == {0.001, 0.003}
    assert ask_distinct(study, dists, points, random.Random(0)) is None


def test_resume_fails_a_trial_the_dead_driver_asked_for_but_tune_never_recorded(tmp_path):
    """The race behind a flaky sweep-kill test: SIGKILL after Optuna handed out a trial and
    before Tune saved the searcher. Tune's searcher API with a real sqlite study, no Ray."""
    from raybench.tune.distinct_search import ORPHANED, DistinctOptunaSearch

    only_lr = {"train.lr": SPACE["train.lr"]}
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def searcher():
        return DistinctOptunaSearch(SweepConfig(num_samples=2, seed=0, space=only_lr), space=optuna_space(only_lr),
                                    metric="accuracy", mode="max", study_name="s",
                                    storage=optuna.storages.RDBStorage(storage))

    before_kill = searcher()
    recorded = before_kill.suggest("trial_a")  # Tune saved the experiment state with this one
    before_kill.save(str(tmp_path / "searcher.pkl"))
    before_kill.suggest("trial_b")  # asked, then the driver died before the next save

    resumed = searcher()
    resumed.restore(str(tmp_path / "searcher.pkl"))
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.RUNNING, TrialState.FAIL]
    assert trials[1].user_attrs["orphaned"] == ORPHANED and "orphaned" not in trials[0].user_attrs
    # The orphan's config is free again: the resumed sweep's next trial takes it.
    nxt = resumed.suggest("trial_c")
    assert {recorded["train.lr"], nxt["train.lr"]} == {0.001, 0.003}
    resumed.on_trial_complete("trial_a", {"accuracy": 0.5})  # the recorded trial still finishes
    assert optuna.load_study(study_name="s", storage=storage).trials[0].state == TrialState.COMPLETE
