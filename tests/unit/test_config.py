"""Config loading, overrides and validation: bad values fail with path, value and what is allowed."""

from pathlib import Path

import pytest

from raybench.config import ConfigError, apply_overrides, load_config, validate_config

ROOT = Path(__file__).resolve().parents[2]


def _error(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return str(info.value)


@pytest.mark.parametrize("name", ["smoke.yaml", "default.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "jobs" / "configs" / name)
    assert cfg.run_path == Path("runs") / cfg.name
    assert cfg.data_path == cfg.run_path / "data"


def test_preset_and_size_expand_and_user_fields_win():
    cfg = validate_config({"model": {"preset": "hybrid", "size": "tiny",
                                     "fusion": {"vet": {"vocab_size": 99}}}})
    f = cfg.model.fusion
    assert f.projector == "vet" and f.sparsity.enabled and f.deepstack.num_injections == 2
    assert f.vet.vocab_size == 99
    assert cfg.model.vision.image_size == 32
    llava = validate_config({"model": {"preset": "llava", "size": "tiny"}}).model.fusion
    assert llava.projector == "mlp" and not llava.sparsity.enabled and llava.deepstack.num_injections == 0


def test_overrides_parse_yaml_values_and_create_sections():
    raw = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=1e-3", "model.fusion.sparsity.stage_layers=[0,1]",
                                                   "name=x"])
    assert raw == {"train": {"lr": 1e-3}, "model": {"fusion": {"sparsity": {"stage_layers": [0, 1]}}},
                   "name": "x"}
    cfg = load_config(ROOT / "jobs/configs/smoke.yaml", ["train.steps=7", "run_dir=/tmp/elsewhere"])
    assert cfg.train.steps == 7 and cfg.run_path == Path("/tmp/elsewhere")


def test_more_injections_than_llm_layers():
    msg = _error({"model": {"preset": "deepstack", "size": "tiny", "vision": {"num_layers": 8},
                            "fusion": {"deepstack": {"num_injections": 5}}}})
    assert "model.fusion.deepstack.num_injections = 5" in msg and "num_layers = 4" in msg


def test_vocab_size_zero():
    msg = _error({"model": {"preset": "ovis", "size": "tiny", "fusion": {"vet": {"vocab_size": 0}}}})
    assert "model.fusion.vet.vocab_size = 0" in msg and "greater than or equal to 1" in msg


@pytest.mark.parametrize("ratio", [0, 1.5, -0.2])
def test_keep_ratio_outside_unit_interval(ratio):
    msg = _error({"model": {"preset": "dense_sparse", "size": "tiny",
                            "fusion": {"sparsity": {"final_keep_ratio": ratio}}}})
    assert f"model.fusion.sparsity.final_keep_ratio = {ratio}" in msg


def test_vit_tap_past_last_layer():
    msg = _error({"model": {"preset": "deepstack", "size": "tiny",
                            "fusion": {"deepstack": {"num_injections": 2, "visual_indexes": [0, 2]}}}})
    assert "visual_indexes = [0, 2]" in msg and "allowed 0..1" in msg


def test_unknown_schedule_lists_allowed_names():
    msg = _error({"model": {"preset": "dense_sparse", "fusion": {"sparsity": {"schedule": "cosine"}}}})
    assert "model.fusion.sparsity.schedule = 'cosine'" in msg
    for name in ("constant", "linear", "exponential", "step"):
        assert name in msg


def test_unknown_preset_and_typo_field():
    assert "unknown preset" in _error({"model": {"preset": "flamingo"}})
    assert "train.stpes" in _error({"train": {"stpes": 3}})


def test_stage_layer_needs_a_next_layer():
    msg = _error({"model": {"preset": "dense_sparse", "size": "tiny",
                            "fusion": {"sparsity": {"stage_layers": [1, 3]}}}})
    assert "stage_layers = [1, 3]" in msg and "allowed 0..2" in msg


def test_deepstack_with_qformer_is_refused():
    msg = _error({"model": {"preset": "blip2", "size": "tiny", "fusion": {"deepstack": {"num_injections": 1}}}})
    assert "projector mlp or vet" in msg


def test_unknown_qtype():
    assert "data.qtypes" in _error({"data": {"qtypes": ["color", "smell"]}})


def test_bad_stages_are_refused_with_their_field_paths():
    msg = _error({"train": {"steps": 100, "batch_size": 32, "stages": [
        {"name": "a", "train": []}, {"name": "a", "steps": 3, "data": {"num_examples": 16, "qtypes": ["smell"]},
                                     "lr_scale": {"vision": -1}}]}})
    for expected in ["train.stages = ['a', 'a']: stage names must be unique",
                     "train.stages.0.steps = None: only the last stage may leave its steps open",
                     "train.stages.0.train = []", "train.stages.1.data.num_examples = 16: fewer than one batch",
                     "train.stages.1.data.qtypes = ['smell']", "train.stages.1.lr_scale = {'vision': -1.0}",
                     "the stages' steps add up to 3, train.steps = 100"]:
        assert expected in msg, expected
    assert "train.stages.0.data.max_objects" in _error(
        {"train": {"stages": [{"name": "c", "steps": 5, "data": {"max_objects": 5}}, {"name": "m"}]}})
    assert "train.stages.0.train.0" in _error({"train": {"stages": [{"name": "c", "train": ["eyes"]}]}})
    assert "the last stage would get none" in _error(
        {"train": {"steps": 10, "stages": [{"name": "c", "steps": 10}, {"name": "m"}]}})


def test_stage_paths_and_the_moved_curriculum():
    cfg = validate_config({"run_dir": "r", "data": {"questions_per_image": 5}, "train": {"steps": 50, "stages": [
        {"name": "easy", "steps": 10, "data": {"max_objects": 1, "num_examples": 100}},
        {"name": "see", "steps": 10, "data": {"num_examples": 100, "qtypes": ["describe"]}}, {"name": "main"}]}})
    easy, see, main = cfg.train.stages
    assert cfg.stage_path(easy) == Path("r/easy-1obj-100-5q")
    assert cfg.stage_path(see) == Path("r/see-4obj-100-5q-describe") and cfg.stage_path(main) is None
    msg = _error({"data": {"curriculum": {"steps": 3}}})
    assert "data.curriculum: moved to train.stages" in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
