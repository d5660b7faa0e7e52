"""Sweep space: validation before Ray starts, trial configs, Optuna distributions, Pareto front."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from raybench.cli import main
from raybench.config import ConfigError, validate_config
from raybench.tune.report import TrialRow, pareto_front
from raybench.tune.space import optuna_space, resolve_points, trial_raw, validate_space
from raybench.tune.sweep import load_sweep
from raybench.tune.trial import process_started_at, trial_config

BASE = {"name": "sw", "model": {"preset": "hybrid", "size": "tiny"}}


def _raw(space: dict, **sweep) -> dict:
    return {**BASE, "sweep": {"space": space, **sweep}}


def _errors(space: dict) -> str:
    raw = _raw(space)
    with pytest.raises(ConfigError) as err:
        validate_space(raw, validate_config(raw))
    return str(err.value)


def test_the_issue_dimensions_validate():
    raw = _raw({
        "model.fusion.vet.vocab_size": {"type": "logint", "low": 32, "high": 256},
        "num_injections": {"type": "int", "low": 0, "high": 2},  # alias
        "model.fusion.sparsity.schedule": {"type": "choice", "values": ["constant", "linear", "exponential", "step"]},
        "model.fusion.sparsity.final_keep_ratio": {"type": "uniform", "low": 0.25, "high": 1.0},
        "train.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
        "model.preset": {"type": "choice", "values": ["llava", "hybrid"]},
    })
    cfg = validate_config(raw)
    assert validate_space(raw, cfg) is None  # raises ConfigError on any bad dimension
    assert set(optuna_space(cfg.sweep.space)) == {  # the alias is its field's path
        "model.fusion.vet.vocab_size", "model.fusion.deepstack.num_injections", "model.fusion.sparsity.schedule",
        "model.fusion.sparsity.final_keep_ratio", "train.lr", "model.preset"}
    # The upper edges together still make a valid trial config, with exactly those values.
    edge = validate_config(trial_raw(raw, {"model.fusion.vet.vocab_size": 256, "num_injections": 2,
                                           "model.fusion.sparsity.final_keep_ratio": 1.0, "train.lr": 1e-2}))
    assert (edge.model.fusion.vet.vocab_size, edge.model.fusion.deepstack.num_injections) == (256, 2)
    assert (edge.model.fusion.sparsity.final_keep_ratio, edge.train.lr) == (1.0, 1e-2)


@pytest.mark.parametrize("space, expected", [
    ({"model.fusion.deepstack.num_injections": {"type": "int", "low": 0, "high": 9}},
     "num_injections'].high = 9: gives an invalid config: model.fusion.deepstack.num_injections = 9: at most"),
    ({"model.fusion.sparsity.schedule": {"type": "choice", "values": ["linear", "cosine"]}},
     "values[1] = 'cosine': gives an invalid config: model.fusion.sparsity.schedule = 'cosine'"),
    ({"model.fusion.sparsity.final_keep_ratio": {"type": "uniform", "low": 0.5, "high": 1.5}},
     "final_keep_ratio'].high = 1.5"),
    ({"train.lr": {"type": "loguniform", "low": 0.0, "high": 0.01}}, "a log range needs low > 0"),
    ({"model.fusion.vet.vocab_size": {"type": "int", "low": 300, "high": 100}}, "needs low < high"),
    ({"model.fusion.vet.vocab_size": {"type": "int", "low": 1.5, "high": 100}}, "needs integer bounds"),
    ({"model.fusion.vet.vocab_size": {"type": "int", "low": 0, "high": 100}}, "low = 0: gives an invalid config"),
    ({"model.fusion.vet.vocab_size": {"type": "int"}}, "needs low and high"),
    ({"model.fusion.sparsity.schedule": {"type": "choice", "values": []}}, "at least one value"),
    ({"model.nonsense": {"type": "int", "low": 1, "high": 2}}, "['model.nonsense']: not a sweepable field"),
    ({"data.num_train": {"type": "int", "low": 1, "high": 2}}, "not a sweepable field"),
    ({"train.steps": {"type": "int", "low": 1, "high": 2}}, "not a sweepable field"),
])
def test_invalid_dimensions_name_field_value_and_rule(space, expected):
    assert expected in _errors(space)


def test_every_bad_dimension_is_reported_at_once():
    msg = _errors({"train.lr": {"type": "loguniform", "low": -1, "high": 1},
                   "model.fusion.sparsity.schedule": {"type": "choice", "values": ["cosine"]}})
    assert "train.lr" in msg and "cosine" in msg


def test_unknown_dimension_type_is_a_config_error():
    with pytest.raises(ConfigError, match="sweep.space.train.lr.type"):
        validate_config(_raw({"train.lr": {"type": "normal", "low": 1, "high": 2}}))


def test_empty_space_fails(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError, match="a sweep needs at least one dimension"):
        load_sweep(path, [])


def test_bad_sweep_fails_in_the_cli_before_ray(tmp_path, capsys):
    import ray

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_raw({"model.fusion.sparsity.schedule": {"type": "choice",
                                                                           "values": ["cosine"]}})))
    assert main(["sweep", "--config", str(path)]) == 2
    assert "'cosine'" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists()


def test_trial_config_applies_sampled_values_and_reexpands_presets(tmp_path):
    ctx = {"raw": _raw({}), "name": "sw", "run_dir": str(tmp_path), "data_path": str(tmp_path / "data")}
    cfg = trial_config(ctx, {"model.fusion.vet.vocab_size": 100, "train.lr": 0.005}, "abc_00001")
    assert cfg.name == "sw-abc_00001" and cfg.run_path == tmp_path / "trials" / "abc_00001"
    assert cfg.model.fusion.vet.vocab_size == 100 and cfg.train.lr == 0.005
    assert cfg.data.path == str(tmp_path / "data")
    # Sweeping the preset switches the families with it (llava: plain MLP, no sparsity).
    llava = trial_config(ctx, {"model.preset": "llava"}, "abc_00002")
    assert llava.model.fusion.projector == "mlp" and not llava.model.fusion.sparsity.enabled
    assert trial_raw(ctx["raw"], {"lr": 0.1})["train"]["lr"] == 0.1  # aliases resolve
    assert "train" not in ctx["raw"]  # the base is never mutated


def test_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    raw = _raw({"vet_vocab_size": {"type": "logint", "low": 32, "high": 256},
                "train.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
                "model.fusion.sparsity.schedule": {"type": "choice", "values": ["linear", "step"]}})
    space = optuna_space(validate_config(raw).sweep.space)
    assert space["model.fusion.vet.vocab_size"] == IntDistribution(32, 256, log=True)
    assert space["train.lr"] == FloatDistribution(1e-3, 1e-2, log=True)
    assert space["model.fusion.sparsity.schedule"] == CategoricalDistribution(["linear", "step"])


def test_pareto_front_keeps_only_non_dominated_trials():
    rows = [TrialRow("a", "completed", {}, accuracy=0.5, cost=1.0),
            TrialRow("b", "completed", {}, accuracy=0.6, cost=2.0),
            TrialRow("c", "completed", {}, accuracy=0.4, cost=1.5),   # worse than a on both
            TrialRow("d", "completed", {}, accuracy=0.6, cost=3.0),   # b is as good and cheaper
            TrialRow("e", "error", {}, accuracy=None, cost=None)]
    assert [r.trial_id for r in pareto_front(rows)] == ["a", "b"]


def test_grid_search_enumerates_choices_and_integers():
    from ray import tune

    from raybench.tune.space import grid_space

    raw = _raw({"num_injections": {"type": "int", "low": 0, "high": 2},
                "model.fusion.sparsity.schedule": {"type": "choice", "values": ["constant", "step"]}},
               search="grid")
    sweep_cfg = validate_config(raw)
    validate_space(raw, sweep_cfg)
    space = grid_space(sweep_cfg.sweep.space)
    assert space == {"model.fusion.deepstack.num_injections": tune.grid_search([0, 1, 2]),
                     "model.fusion.sparsity.schedule": tune.grid_search(["constant", "step"])}


def test_grid_search_refuses_continuous_and_huge_grids():
    raw = _raw({"train.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
                "model.fusion.vet.vocab_size": {"type": "int", "low": 32, "high": 4096}}, search="grid")
    with pytest.raises(ConfigError) as err:
        validate_space(raw, validate_config(raw))
    msg = str(err.value)
    assert "train.lr']: sweep.search = grid needs choice or int dimensions, not loguniform" in msg
    assert "vocab_size']: 4065 grid values; at most 256" in msg


def test_grid_trials_land_in_the_optuna_study_once(tmp_path):
    """A grid sweep has no searcher; its trials are written into the same RDB study a TPE
    sweep uses (plots, optuna-dashboard), and a resumed summary doesn't add them twice."""
    import optuna

    from raybench.tune.report import record_grid_in_study

    raw = {**_raw({"num_injections": {"type": "int", "low": 0, "high": 1},
                   "model.fusion.sparsity.schedule": {"type": "choice", "values": ["constant", "step"]}},
                  search="grid"), "run_dir": str(tmp_path / "sw")}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    sweep = load_sweep(path, [])
    assert sweep.num_trials == 4
    key_i, key_s = "model.fusion.deepstack.num_injections", "model.fusion.sparsity.schedule"
    rows = [TrialRow("t1", "completed", {key_i: 0, key_s: "constant"}, accuracy=0.5),
            TrialRow("t2", "completed", {key_i: 1, key_s: "step"}, accuracy=0.75),
            TrialRow("t3", "error", {key_i: 1, key_s: "constant"})]
    (tmp_path / "sw").mkdir()
    record_grid_in_study(sweep, rows)
    record_grid_in_study(sweep, rows)
    study = optuna.load_study(study_name="sw", storage=sweep.study_storage)
    trials = {t.user_attrs["trial_id"]: t for t in study.trials}
    assert sorted(trials) == ["t1", "t2", "t3"]
    assert trials["t2"].value == 0.75 and trials["t2"].params == {key_i: 1, key_s: "step"}
    assert trials["t3"].state == optuna.trial.TrialState.FAIL
    assert study.best_trial.user_attrs["trial_id"] == "t2"


def test_trial_launch_is_the_process_start_not_the_call():
    # A sweep trial's start-up is timed from its driver process's start, so the imports
    # before our code count too: a child process must report roughly when it was spawned,
    # not when (after its imports) it asked.
    spawned = time.time()
    out = subprocess.run([sys.executable, "-c", "import time; from raybench.tune.trial import process_started_at; "
                          "print(process_started_at(), time.time())"], capture_output=True, text=True, check=True)
    started, asked = map(float, out.stdout.split())
    assert spawned - 0.05 <= started < asked
    assert started - spawned < 0.5 * (asked - spawned)  # nearer the spawn than the call
    assert process_started_at() <= time.time()


def test_trial_drivers_are_reused_under_fifo_only(tmp_path):
    def sweep(**fields):
        path = tmp_path / "s.yaml"
        raw = _raw({"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}})
        raw["sweep"].update(fields)
        path.write_text(yaml.safe_dump(raw))
        return load_sweep(path, []).cfg.sweep

    assert sweep(scheduler="fifo").reuses_drivers and not sweep(scheduler="asha").reuses_drivers
    assert not sweep(scheduler="fifo", reuse_trial_drivers=False).reuses_drivers
    with pytest.raises(ConfigError, match="reuse_trial_drivers = true needs sweep.scheduler = fifo"):
        sweep(scheduler="asha", reuse_trial_drivers=True)


POINT_SPACE = {
    "vet_vocab_size": {"type": "logint", "low": 32, "high": 256},
    "model.fusion.sparsity.schedule": {"type": "choice", "values": ["constant", "linear", "exponential", "step"]},
    "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
}


def test_points_to_evaluate_fill_what_they_leave_out_from_the_config():
    raw = {**_raw(POINT_SPACE, points_to_evaluate=[{}, {"vet_vocab_size": 200, "train.lr": 0.003}]),
           "train": {"lr": 0.0005}}
    raw["model"]["fusion"] = {"vet": {"vocab_size": 48}, "sparsity": {"schedule": "linear"}}
    cfg = validate_config(raw)
    validate_space(raw, cfg)
    assert resolve_points(cfg) == [
        {"model.fusion.vet.vocab_size": 48, "model.fusion.sparsity.schedule": "linear", "train.lr": 0.0005},
        {"model.fusion.vet.vocab_size": 200, "model.fusion.sparsity.schedule": "linear", "train.lr": 0.003},
    ]


def test_the_points_reach_optuna_first():
    import optuna
    from optuna.trial import TrialState

    from raybench.tune.searcher import ask_distinct

    raw = _raw(POINT_SPACE, points_to_evaluate=[{"vet_vocab_size": 200}])
    cfg = validate_config(raw)
    study = optuna.create_study(direction="maximize")
    for point in resolve_points(cfg):  # what Tune's OptunaSearch does with points_to_evaluate
        study.enqueue_trial(point)
    first = ask_distinct(study, optuna_space(cfg.sweep.space), None, __import__("random").Random(0))
    assert first.params == resolve_points(cfg)[0]
    assert study.get_trials(states=(TrialState.WAITING,)) == []


@pytest.mark.parametrize("points, expected", [
    ([{"train.lr": 0.5}], "points_to_evaluate[0]['train.lr'] = 0.5: outside [0.0001, 0.01]"),
    ([{"model.fusion.sparsity.schedule": "cosine"}], "= 'cosine': not one of"),
    ([{"vet_vocab_size": 64.5}], "vocab_size'] = 64.5: not an integer"),
    ([{"model.llm.num_layers": 2}], "['model.llm.num_layers'] not in sweep.space"),
    ([{}, {"train.lr": "fast"}], "points_to_evaluate[1]['train.lr'] = 'fast': not a number"),
])
def test_bad_points_fail_before_ray_with_the_point_and_the_rule(points, expected):
    raw = _raw(POINT_SPACE, points_to_evaluate=points)
    with pytest.raises(ConfigError) as err:
        validate_space(raw, validate_config(raw))
    assert expected in str(err.value)


def test_a_config_value_outside_the_space_says_to_give_it_in_the_point():
    raw = {**_raw(POINT_SPACE, points_to_evaluate=[{}]), "train": {"lr": 0.05}}
    with pytest.raises(ConfigError, match=r"'train.lr'\] = 0.05: outside .*this config's own value"):
        validate_space(raw, validate_config(raw))


def test_a_grid_search_refuses_points():
    space = {"model.fusion.sparsity.schedule": {"type": "choice", "values": ["linear", "step"]}}
    raw = _raw(space, search="grid", points_to_evaluate=[{}])
    with pytest.raises(ConfigError, match="a grid search already runs every point"):
        validate_space(raw, validate_config(raw))


def test_stage_fields_are_sweepable_and_trials_share_the_sweeps_stage_scenes(tmp_path):
    stages = [{"name": "easy", "steps": 4, "data": {"num_examples": 64, "max_objects": 1}}, {"name": "main"}]
    raw = {**_raw({"train.stages.0.steps": {"type": "int", "low": 2, "high": 20}}),
           "train": {"steps": 12, "batch_size": 16, "stages": stages}}
    with pytest.raises(ConfigError, match=r"sweep.space\['train.stages.0.steps'\].high = 20: gives an invalid "
                                          r"config: train.stages: the stages before the last take 20 steps"):
        validate_space(raw, validate_config(raw))
    raw["sweep"]["space"]["train.stages.0.steps"]["high"] = 8
    validate_space(raw, validate_config(raw))
    shared = {"easy": {"path": str(tmp_path / "shared-easy"), "key": {"max_objects": 1, "num_examples": 64,
                                                                     "qtypes": None, "letter_share": None}}}
    ctx = {"raw": raw, "name": "sw", "run_dir": str(tmp_path), "data_path": str(tmp_path / "data"),
           "stage_scenes": shared}
    cfg = trial_config(ctx, {"train.stages.0.steps": 6}, "abc_00001")
    assert cfg.train.stages[0].steps == 6 and cfg.train.stages[0].data.path == str(tmp_path / "shared-easy")
    # A trial whose stage asks for other scenes renders its own.
    other = trial_config(ctx, {"train.stages.0.data.max_objects": 2}, "abc_00002")
    assert other.train.stages[0].data.path is None
    assert raw["train"]["stages"][0]["steps"] == 4  # the base is never mutated
