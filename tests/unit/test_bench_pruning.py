"""`bench pruning`: its schedules, its guard against checkpoints at other image sizes, and a
--quick run (tiny model, seconds) that keeps the schema `bench report` renders from."""

import pytest
import torch

from raybench.bench import pruning
from raybench.bench.report import check_written
from raybench.config import ConfigError, validate_config
from raybench.cost import probe_inputs, probe_model
from raybench.model.sparsity import keep_counts


def test_schedules_follow_pyramiddrop_on_the_gpu_depth():
    s = pruning.schedules(28)
    assert all(sp.stage_layers == [6, 13, 20] for sp in s.values())  # four stages of 7 layers
    pd = s["pyramiddrop"]
    assert keep_counts(576, pd.schedule, pd.final_keep_ratio, 3) == [288, 144, 72]  # lambda = 0.5


def test_gpu_size_needs_random_init():
    with pytest.raises(ConfigError, match="--random-init"):
        pruning.build("gpu", 576, random_init=False)


def test_set_pruning_runs_a_schedule_on_the_same_weights():
    sp = pruning.schedules(4)["pyramiddrop"]
    sparse = probe_model(validate_config({"model": {"preset": "dense_sparse", "size": "tiny", "fusion": {
        "sparsity": sp.model_dump()}}}).model)
    dense_cfg = validate_config({"model": {"preset": "dense_sparse", "size": "tiny",
                                           "fusion": {"sparsity": {"enabled": False}}}}).model
    model = probe_model(dense_cfg)  # same seed, same weights: pruning has none of its own
    ids, mask, px = probe_inputs(model, 2)
    dense_tokens = model.generate(ids, mask, px, max_new_tokens=4)
    model.set_pruning(sp)
    assert model.stage_layers == sparse.stage_layers and model.stage_keep == sparse.stage_keep
    assert model.config.fusion.sparsity == sp and dense_cfg.fusion.sparsity.enabled is False
    assert torch.equal(model.generate(ids, mask, px, max_new_tokens=4), sparse.generate(ids, mask, px, max_new_tokens=4))
    model.set_pruning(dense_cfg.fusion.sparsity)
    assert model.stage_keep == [] and torch.equal(model.generate(ids, mask, px, max_new_tokens=4), dense_tokens)


def test_quick_run_measures_every_schedule_against_dense(tmp_path):
    result = pruning.run_pruning_bench(tmp_path, quick=True)
    assert check_written(tmp_path, "pruning", quick=True) == []
    rows = result["rows"]
    assert {(r["batch"], r["schedule"]) for r in rows} == {(b, s) for b in (1, 2) for s in
                                                           ["dense", *pruning.schedules(4)]}
    for r in rows:
        n = r["image_tokens"]
        if r["schedule"] == "dense":
            assert r["kept_after_stages"] == [] and r["llm_flops_bound"] == 1 and r["kv_vs_dense"] == 1
        else:
            assert r["kept_after_stages"][-1] < n
            # fewer tokens in later layers: fewer LLM FLOPs and a smaller KV cache than dense
            assert r["llm_flops_bound"] > 1 and r["kv_vs_dense"] < 1
            sp = pruning.schedules(4)[r["schedule"]]  # the schedule asked for is the one that ran
            assert r["kept_after_stages"] == keep_counts(n, sp.schedule, sp.final_keep_ratio, 3)
    section = pruning.markdown_section(result)
    goals = pruning.verdicts(result)  # three goals per batch, each judged from the rows
    assert len(goals) == 6 and all(goal in section for goal, _ in goals)
    # The memory claim, whole: a fresh process per schedule, weights and tower counted.
    whole = result["whole_process"]
    assert [(w["batch"], w["schedule"]) for w in whole] == [(1, "dense"), (1, "pyramiddrop")]  # --quick: batch 1
    for w in whole:
        assert 0 < w["build_peak_mib"] <= w["peak_mib"]
    assert "whole-process peak RSS" in section
