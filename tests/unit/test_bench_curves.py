"""`bench curves` without training: which units run in what order, what each unit's config
is (its overrides, seed, the base's data, the scene stage it shares), how the recorded evals
are read back. The recording itself runs in tests/integration/test_bench_quick_ray.py."""

import json
from pathlib import Path

import pytest

from raybench.bench.curves import (CONFIGS, DEFAULT_POINT, FIRST, LOCAL, base_raw, read_evals, unit_config,
                                   unit_order)
from raybench.train.loop import pack_correct, unpack_correct
from raybench.train.shared_stage import shared_stage


def test_the_first_configs_run_on_every_seed_before_the_rest():
    order = unit_order(list(CONFIGS), 2)
    assert len(order) == 2 * len(CONFIGS) == len(set(order))
    head = order[:2 * len(FIRST)]
    assert {c for c, _ in head} == set(FIRST) and {s for _, s in head} == {0, 1}
    rest = order[2 * len(FIRST):]
    assert [s for _, s in rest] == sorted(s for _, s in rest)  # seed 0's rest, then seed 1's


@pytest.mark.parametrize("n", [0, 1, 4, 5, 1000, 1001])
def test_per_question_outcomes_pack_and_unpack(n):
    correct = [(i * 7) % 3 == 0 for i in range(n)]
    packed = pack_correct(correct)
    assert len(packed) == (n + 3) // 4
    assert unpack_correct(packed, n) == correct


def test_every_config_is_valid_and_shares_its_seed_s_scene_stage(tmp_path):
    raw = base_raw(tmp_path, quick=False)
    base_dir = tmp_path / "curves"
    paths = {}
    for config in CONFIGS:
        for seed in (0, 1):
            cfg = unit_config(raw, tmp_path, config, seed)
            assert cfg.train.seed == seed
            assert cfg.data_path == (base_dir / "data").resolve()  # one rendering for all units
            assert cfg.run_path == tmp_path / "curves" / "units" / f"{config}-s{seed}"
            assert cfg.train.eval_every == 50 and cfg.train.eval_samples == 1000
            if config not in LOCAL:
                paths.setdefault(seed, set()).add(shared_stage(cfg, base_dir)["path"])
    # every Ray config starts from its seed's one scene stage; the seeds' differ
    assert [len(p) for p in paths.values()] == [1, 1] and paths[0] != paths[1]
    champion = unit_config(raw, tmp_path, "readme-champion", 0)
    assert champion.model.fusion.deepstack.num_injections == 2 and champion.train.lr == 0.00126
    assert unit_config(raw, tmp_path, "former-default-stage-warmup", 0).train.stages[1].warmup_steps == 100


def test_default_yaml_is_the_recorded_point_the_sweep_enqueues_as_trial_1(tmp_path):
    """The replay's trial 1 is DEFAULT_POINT: default.yaml must hold exactly its values, and
    every recorded point must name each axis the sweep searches (a name means one config)."""
    from raybench.bench.seeds import DEFAULT_CONFIG
    from raybench.config import load_config

    base = load_config(DEFAULT_CONFIG, [])
    assert unit_config(base_raw(tmp_path, quick=False), tmp_path, DEFAULT_POINT, 0).model == base.model
    assert unit_config(base_raw(tmp_path, quick=False), tmp_path, DEFAULT_POINT, 0).train.lr == base.train.lr
    for config, overrides in CONFIGS.items():
        assert set(base.sweep.space) <= set(overrides), config


def test_a_resumed_run_s_repeated_evals_are_read_once_the_last_kept(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = [{"step": 50, "accuracy": 0.1, "stage": "see", "correct": "0", "n": 2, "samples_per_s": 9},
             {"step": 100, "accuracy": 0.2, "stage": "main", "correct": "8", "n": 2},
             {"step": 100, "accuracy": 0.3, "stage": "main", "correct": "c", "n": 2}]  # resumed at 50
    (logs / "evals.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    evals = read_evals(Path(tmp_path))
    assert [(e["step"], e["accuracy"]) for e in evals] == [(50, 0.1), (100, 0.3)]
    assert "samples_per_s" not in evals[0]  # throughput is not part of a curve
