"""The benches that use Ray, in their --quick form, through the real CLI entry point, in this
session's local Ray (a bench leaves a Ray it did not start running): `bench train` (Ray Train
vs torchrun), `bench sweep` (a real Tune sweep) and `bench serve` (real Serve over real HTTP).
The Ray-free ones (fusion, seeds, compile) are in test_bench_quick.py.

What is checked is the JSON `bench report` renders and that each figure was really measured
(every trial timed, every load point answered), never the numbers against their goals:
those live in BENCHMARKS.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raybench.bench.report import check_written
from raybench.bench.serve import CONCURRENCY, DECODE_TOKENS, n_requests
from raybench.bench.serve_llm import engine_name
from raybench.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

RAY_BENCHES = ("train", "sweep", "serve")


@pytest.fixture(scope="module")
def out(tmp_path_factory, ray_session) -> Path:
    import ray

    out = tmp_path_factory.mktemp("bench-ray")
    for name in RAY_BENCHES:  # one at a time, each in the session's Ray (3 Ray starts saved)
        assert main(["bench", name, "--quick", "--out", str(out)]) == 0, name
        assert ray.is_initialized(), f"bench {name} shut down a Ray it did not start"
    return out


@pytest.fixture(scope="module")
def results(out) -> dict[str, dict]:
    return {name: json.loads((out / f"{name}.json").read_text()) for name in RAY_BENCHES}


@pytest.mark.parametrize("name", RAY_BENCHES)
def test_quick_results_keep_the_schema(out, name):
    assert check_written(out, name, quick=True) == []  # schema, no error, plot, results.md row


def test_train_measures_ray_and_torchrun_on_the_same_run(results):
    r = results["train"]
    assert r["machine"]["ray"] and r["machine"]["cpus"] > 0
    t = r["config"]["train"]
    # one throughput window per eval; the first (warm-up) is reported but not in the median
    assert len(r["ray_windows_samples_per_s"]) == t["steps"] // t["eval_every"]
    assert r["ray_samples_per_s_stats"]["min"] <= r["ray_samples_per_s"] <= r["ray_samples_per_s_stats"]["max"]
    assert r["ray_over_torchrun"] == pytest.approx(r["ray_samples_per_s"] / r["torchrun_samples_per_s"])
    assert r["torchrun"]["samples_per_s"] == r["torchrun_samples_per_s"] > 0
    assert 0 < r["mfu_ray"] < 1 and 0 < r["mfu_torchrun"] < 1
    # Where the cores went during the timed steps: the workers of each run were found and busy.
    cores = r["cpu_cores"]
    assert cores["ray"]["workers"] > 0.3 and [c["workers"] > 0.3 for c in cores["torchrun"]] == [True]


def test_sweep_times_every_trial_and_its_start_up_phases(results):
    r = results["sweep"]
    trials = r["trials"]
    assert len(trials) == r["config"]["sweep"]["num_samples"]
    assert len({t["trial_id"] for t in trials}) == len(trials)
    for t in trials:
        p = t["phases"]  # seconds since launch at which each phase was done: in order
        order = [p[k] for k in ("startup_trial_s", "startup_driver_s", "startup_train_fn_s", "startup_workers_s",
                                "startup_model_s", "startup_s")]
        assert 0 <= order[0] and order == sorted(order), p
        assert t["startup_s"] == p["startup_s"] and t["training_s"] > 0
        assert t["total_s"] == pytest.approx(t["startup_s"] + t["training_s"])
    # FIFO: the second trial ran in the first one's driver process (sweep.reuse_trial_drivers),
    # so its launch is its function's entry: no process start or Tune set-up before it.
    assert sorted(t["phases"]["startup_trial_s"] == 0 for t in trials) == [False, True]
    # Trials run one after another (max_concurrent_trials 1): the wall holds all of them.
    assert r["sweep_wall_s"] >= sum(t["total_s"] for t in trials)
    assert r["wall_over_training"] == pytest.approx(r["sweep_wall_s"] / r["sum_training_s"])
    # The baseline: an empty TorchTrainer on the same Ray reached its train function, then returned.
    floor = r["empty_trainer"]
    assert floor["repeats"] == len(floor["samples"]["fit_s"]) == len(floor["samples"]["train_fn_entry_s"]) == 1
    assert 0 < floor["train_fn_entry_s"] < floor["fit_s"]
    assert r["over_floor_s"] == pytest.approx(r["startup_s"]["median"] - floor["train_fn_entry_s"])
    # The same empty trainer, importing what a trial's workers import: done after it entered.
    imports = r["empty_trainer_imports"]
    assert len(imports["samples"]["imported_s"]) == 1
    assert 0 < imports["train_fn_entry_s"] < imports["imported_s"] < imports["fit_s"]


def test_serve_answers_every_load_point_without_errors(results):
    r = results["serve"]
    points = {(x["config"], x["concurrency"]): x for x in r["rows"]}
    for config in ("in-process, unbatched", "in-process, batched", "serve no-op, 3 hops",
                   "single deployment, batched", "3-stage, batched", "3-stage, unbatched"):
        for c in CONCURRENCY:
            row = points[(config, c)]
            assert row["errors"] == 0, (config, c)
            assert row["requests"] == n_requests(c, True, r["repeats"])
            assert 0 < row["p50_ms"] <= row["p99_ms"]
    # Open loop: fixed arrivals past the unbatched pipeline's closed-loop rate, every request
    # answered, and each answer's batch sizes counted per stage.
    unbatched_top = points[("3-stage, unbatched", max(CONCURRENCY))]["req_per_s"]
    for config in ("3-stage, batched, open loop", "3-stage, unbatched, open loop"):
        (row,) = [x for x in r["rows"] if x["config"] == config]
        assert row["offered_req_s"] == pytest.approx(2 * unbatched_top, abs=0.1)
        assert row["errors"] == 0 and row["requests"] == 16
        assert sum(row["batch_histograms"]["llm"].values()) == 16
        assert 1 <= row["median_batch"]["llm"] <= row["largest_batch"]
    # Decode-heavy: the top concurrency again with DECODE_TOKENS per answer, on both pipelines;
    # at the top concurrency every row says which processes used the cores.
    top = max(CONCURRENCY)
    for config in ("3-stage, batched", "3-stage, unbatched"):
        row = points[(f"{config}, {DECODE_TOKENS} tokens", top)]
        assert row["errors"] == 0 and row["requests"] == n_requests(top, True, r["repeats"])
        for cores in (row["cpu_cores"], points[(config, top)]["cpu_cores"]):
            assert {"LLMStage", "ChatIngress", "load client"} <= set(cores) and all(v > 0 for v in cores.values())
    # The mixed mix on the LLM engine alone (no Serve), continuous and static: every request answered.
    for static in (False, True):
        row = points[(engine_name(static), top)]
        assert row["errors"] == 0 and row["requests"] == 2 * top and 0 < row["p50_ms"] <= row["p99_ms"]
    g = r["goals"]
    assert g["decode_batched_over_unbatched_req_s"] == pytest.approx(
        points[(f"3-stage, batched, {DECODE_TOKENS} tokens", top)]["req_per_s"]
        / points[(f"3-stage, unbatched, {DECODE_TOKENS} tokens", top)]["req_per_s"])
    assert g["decode_llm_median_batch"] > 1  # a batch forms while the model runs (serve/batching.py)
    assert g["open_loop_rate"] == pytest.approx(2 * unbatched_top, abs=0.1)
    assert g["pipeline_added_ms_at_c1"] == pytest.approx(
        g["pipeline_p50_ms"] - g["in_process_p50_ms"] - g["noop_3hop_p50_ms"])
    assert g["batched_over_unbatched_req_s_at_c32"] > 0


def test_curves_records_each_unit_once_with_every_question_s_outcome(tmp_path, ray_session):
    """`bench curves --quick`: two units on the session's Ray. The first trains the scene
    stage and leaves it, the second starts after it; each stores every eval with each val
    question's outcome, in the val split's order; a second run finds both and trains nothing."""
    import ray

    from raybench.train.loop import unpack_correct

    units = tmp_path / "units"
    argv = ["bench", "curves", "--quick", "--out", str(tmp_path), "--units", str(units),
            "--configs", "readme-champion", "late-fusion-linear"]
    assert main(argv) == 0 and ray.is_initialized()
    meta = json.loads((units / "meta.json").read_text())
    qtypes = meta["val_qtypes"]
    records = {u: json.loads((units / f"{u}.json").read_text()) for u in ("readme-champion-s0", "late-fusion-linear-s0")}
    first, second = records["readme-champion-s0"], records["late-fusion-linear-s0"]
    every, see_end, steps = first["eval_every"], first["shared_stage_end"], first["steps"]
    assert [e["step"] for e in first["evals"]] == list(range(every, steps + 1, every))
    assert not first["started_after_shared_stage"] and second["started_after_shared_stage"]
    assert [e["step"] for e in second["evals"]] == list(range(see_end + every, steps + 1, every))
    for record in records.values():
        assert record["trainer"] == "ray" and record["final"]["step"] == steps
        assert record["scenes"]["matched"] == len(qtypes)  # the finished model answered every val question
        for e in record["evals"]:
            correct = unpack_correct(e["correct"], e["n"])
            assert e["n"] == len(qtypes) and e["accuracy"] == pytest.approx(sum(correct) / len(correct))
            for q in set(qtypes):  # the per-type accuracies line up with the val split's order
                mine = [c for c, t in zip(correct, qtypes) if t == q]
                assert e[f"acc/{q}"] == pytest.approx(sum(mine) / len(mine))
    written = {p.name: p.stat().st_mtime_ns for p in units.glob("*-s0.json")}
    runs = sorted(p.name for p in (tmp_path / "curves" / "units").iterdir())
    assert main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in units.glob("*-s0.json")} == written
    assert sorted(p.name for p in (tmp_path / "curves" / "units").iterdir()) == runs
