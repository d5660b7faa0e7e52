"""Schedulers replayed on recorded curves (raybench/bench/replay.py), on hand-made curves
whose right decisions are known. ASHA is Ray Tune's own bracket; no Ray instance runs."""

import json

import pytest

from raybench.bench.replay import Curve, Scheduler, load_curves, replay, replay_once, simulate
from raybench.train.loop import pack_correct

MAX_T, START = 1500, 600


def curve(config: str, at: dict[int, float], final: float | None = None, seed: int = 0, loss=None) -> Curve:
    """Accuracy rising linearly between the given points (step -> accuracy), every 50 steps."""
    points = sorted({START: 0.0, **at}.items())
    acc = {}
    for (s0, a0), (s1, a1) in zip(points, points[1:]):
        for s in range(s0 + 50, s1 + 1, 50):
            acc[s] = a0 + (a1 - a0) * (s - s0) / (s1 - s0)
    if final is not None:
        acc[MAX_T] = final
    return Curve(config, seed, START, dict(acc), dict(acc), loss or {s: 1 - a for s, a in acc.items()})


def write_recorded_unit(folder, config: str, seed: int, early: float, final: float, n: int,
                        last_as_final: bool = False, **fields) -> None:
    """A recorded unit, `folder/{config}-s{seed}.json`, in the default's geometry: evals every
    50 steps from 650 to MAX_T on n questions, `early` accuracy before step 1100 and `final`
    from there; `last_as_final` adds the last eval as the unit's "final", `fields` the rest."""
    evals = []
    for step in range(650, MAX_T + 1, 50):
        acc = early if step < 1100 else final
        right = round(acc * n)
        evals.append({"step": step, "accuracy": right / n, "val_loss": 1 - acc, "n": n,
                      "correct": pack_correct([True] * right + [False] * (n - right))})
    record = {"config": config, "seed": seed, "trainer": "ray", "shared_stage_end": START, "evals": evals}
    if last_as_final:
        record["final"] = evals[-1]
    (folder / f"{config}-s{seed}.json").write_text(json.dumps({**record, **fields}))


def test_asha_stops_a_trial_below_the_rung_s_cutoff_as_ray_does():
    first = curve("a", {750: 0.6, MAX_T: 0.9})
    worse = curve("b", {750: 0.5, MAX_T: 0.99})     # behind at the rung, best at the end
    better = curve("c", {750: 0.7, MAX_T: 0.8})
    sched = Scheduler("asha", 750, 3, "accuracy", 250)
    assert simulate([first, worse, better], sched, MAX_T) == [MAX_T, 750, MAX_T]
    assert simulate([first, worse, better], Scheduler("fifo"), MAX_T) == [MAX_T] * 3
    # on val loss the same ordering decides the same way (Ray negates a `min` metric)
    assert simulate([first, worse, better], Scheduler("asha", 750, 3, "val_loss", 250), MAX_T) == [MAX_T, 750, MAX_T]
    # a later first rung, after the late bloomer caught up: it is kept
    assert simulate([first, worse], Scheduler("asha", 1350, 3, "accuracy", 50), MAX_T) == [MAX_T, MAX_T]


def test_hyperband_draws_each_trial_s_bracket_and_the_late_bracket_never_stops_it():
    """Ray's AsyncHyperBandScheduler: bracket s's first rung is grace * rf**s, a trial's bracket
    drawn (likelier the more rungs it has). With grace 700, rf 2: rungs at 700 and 1400, at
    1400, or none; the late bloomer is stopped in the first two and kept in the third."""
    first = curve("a", {700: 0.6, 1400: 0.8, MAX_T: 0.9})
    bloomer = curve("b", {700: 0.3, 1400: 0.5, MAX_T: 0.99})
    sched = Scheduler("hyperband", 700, 2, "accuracy", 50, brackets=3)
    outcomes = [simulate([first, bloomer], sched, MAX_T, seed)[1] for seed in range(40)]
    assert outcomes == [simulate([first, bloomer], sched, MAX_T, seed)[1] for seed in range(40)]  # seeded
    assert set(outcomes) == {700, 1400, MAX_T}
    assert outcomes.count(MAX_T) < outcomes.count(700)  # the rung-less bracket is the least likely
    assert simulate([first, bloomer], Scheduler("asha", 700, 2, "accuracy", 50), MAX_T) == [MAX_T, 700]


def test_median_stopping_waits_for_three_earlier_trials():
    sched = Scheduler("median", 750, metric="accuracy", every=50)
    good = [curve(c, {750: 0.8, MAX_T: 0.9}) for c in "abc"]
    late = curve("d", {750: 0.2, MAX_T: 0.95})
    assert simulate([late, *good], sched, MAX_T) == [MAX_T] * 4   # too few others when it ran
    assert simulate([*good, late], sched, MAX_T) == [MAX_T] * 3 + [750]


def test_fifo_always_keeps_the_best_and_asha_loses_a_late_bloomer():
    curves = {"default": [curve("default", {750: 0.62, MAX_T: 0.90})],
              "bloomer": [curve("bloomer", {750: 0.55, MAX_T: 0.99})],
              "flat": [curve("flat", {750: 0.58, MAX_T: 0.60})]}
    fifo = replay(curves, Scheduler("fifo"), 3, 5, MAX_T, "default")
    assert fifo["keeps_best"] == 1.0 and fifo["champion_mean"] == pytest.approx(0.99)
    asha = replay_once(curves, Scheduler("asha", 750, 3, "accuracy", 250), 3, 0, MAX_T, "default")
    assert asha["configs"][0] == "default"  # trial 1 is the enqueued default
    assert sorted(asha["configs"]) == ["bloomer", "default", "flat"]
    assert asha["stops"][asha["configs"].index("bloomer")] == 750 and not asha["best_completed"]
    assert asha["champion"] == "default" and asha["champion_final"] == pytest.approx(0.90)
    assert asha["answer_steps"] < 3 * (MAX_T - START)


def test_recorded_units_read_the_sweep_s_questions_out_of_every_recorded_one(tmp_path):
    outcomes = [True] * 3 + [False] * 5  # the sweep sees the first 4: 0.75; all 8: 0.375
    evals = [{"step": s, "accuracy": 0.375, "val_loss": 1.0, "n": 8, "correct": pack_correct(outcomes)}
             for s in (600, 650, MAX_T)]
    for seed in (0, 1):
        (tmp_path / f"default-s{seed}.json").write_text(json.dumps(
            {"config": "default", "seed": seed, "trainer": "ray", "shared_stage_end": 600, "evals": evals}))
    (tmp_path / "default-local-s0.json").write_text(json.dumps(
        {"config": "default-local", "seed": 0, "trainer": "local", "evals": evals}))
    curves = load_curves(tmp_path, sweep_eval_samples=4)
    assert list(curves) == ["default"] and [c.seed for c in curves["default"]] == [0, 1]
    c = curves["default"][0]
    assert sorted(c.accuracy) == [650, MAX_T]  # the scene stage's evals are not the answer stage's
    assert c.sweep_accuracy[650] == 0.75 and c.final == 0.375


def test_bench_search_replays_a_recording_and_writes_its_table(tmp_path):
    """The CLI on a hand-made recording in the default's geometry (answer stage 600-1500,
    evals every 50, 8 questions of which the sweep sees 4): three configs, two seeds each."""
    from raybench.cli import main

    units, out = tmp_path / "units", tmp_path / "out"
    units.mkdir()
    shapes = {"default": (0.5, 0.75), "bloomer": (0.25, 1.0), "flat": (0.5, 0.5)}  # (at the rung, final)
    for config, (early, final) in shapes.items():
        for seed in (0, 1):
            write_recorded_unit(units, config, seed, early, final, 8, last_as_final=True, wall_s=300.0,
                                scenes={"qtypes": {"shape": {"accuracy_by_objects": {"4": final}}}})
    assert main(["bench", "search", "--quick", "--units", str(units), "--out", str(out)]) == 0
    r = json.loads((out / "search.json").read_text())
    assert r["max_t"] == MAX_T and r["configs"] == {c: [0, 1] for c in sorted(shapes)}
    assert r["curves_table"].count("| bloomer ") == 2  # one row per recorded unit
    rows = {x["scheduler"]: x for x in r["rows"]}
    fifo = rows["FIFO (no early stop)"]
    assert fifo["keeps_best"] == 1.0 and fifo["compute_vs_fifo"] == 1.0 and fifo["champion_mean"] == 1.0
    # the pipeline's ASHA: rung at 750 on the sweep's questions; the bloomer is behind there
    pipeline = rows["ASHA (first rung 750, rf 3, accuracy, every 50)"]
    assert pipeline["keeps_best"] < 1.0 and pipeline["compute_vs_fifo"] < 1.0
    # the half-way rung (1050) still comes before the bloomer catches up (1100)
    assert rows["ASHA (first rung 1050, rf 3, accuracy, every 50)"]["keeps_best"] < 1.0


def test_a_recording_s_section_replaces_its_own_in_the_page_and_nothing_else(tmp_path):
    from raybench.bench.report import splice_section

    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# Benchmarks\n\n## Training — a\n\nold train\n\n## Search — old\n\nold search\n\n## Sweeps — c\n\nsweeps\n")
    splice_section(page, "## Search", "## Search — new\n\nnew search\n")
    assert page.read_text() == ("# Benchmarks\n\n## Training — a\n\nold train\n\n## Search — new\n\nnew search\n"
                                "\n## Sweeps — c\n\nsweeps\n")
    splice_section(page, "## Fusion", "## Fusion — x\n\nfusion\n")  # absent: appended
    assert page.read_text().endswith("sweeps\n\n## Fusion — x\n\nfusion\n")


def test_trial_1_rows_compare_the_former_and_the_current_default_as_trial_1(tmp_path):
    """The Search section's trial-1 table: the same replays with the former default or
    DEFAULT_POINT enqueued first; a trial 1 that is the best config always reaches the end."""
    from raybench.bench.curves import DEFAULT_POINT
    from raybench.bench.search import trial_1_rows

    shapes = {"former-default": (0.6, 0.90), DEFAULT_POINT: (0.55, 0.99), "flat": (0.5, 0.5)}
    for config, (early, final) in shapes.items():
        write_recorded_unit(tmp_path, config, 0, early, final, 100)
    rows = trial_1_rows(tmp_path, 100, 250, 4, MAX_T)
    assert [(r["trial_1"], r["scheduler"].split(" ")[0]) for r in rows] == [
        ("former-default", "FIFO"), ("former-default", "ASHA"), (DEFAULT_POINT, "FIFO"), (DEFAULT_POINT, "ASHA")]
    by = {(r["trial_1"], r["scheduler"].split(" ")[0]): r for r in rows}
    assert by[("former-default", "ASHA")]["keeps_best"] == 0.0   # the best is behind trial 1 at the rung
    assert by[(DEFAULT_POINT, "ASHA")]["keeps_best"] == 1.0
    assert by[(DEFAULT_POINT, "FIFO")]["compute_vs_fifo"] == 1.0
