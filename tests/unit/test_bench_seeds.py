"""`bench seeds`: resumable (preset, seed, mix) units, and the table, claims and verdicts
rendered from the stored units alone. No training here: a unit file is written by hand (the
--quick recording runs in tests/integration/test_bench_quick.py)."""

import json
from pathlib import Path

import pytest

from raybench.bench import seeds as bench
from raybench.bench.report import check_written, write_report
from raybench.bench.seeds import (_over_seeds, _raw_config, record_units, result_from_units, unit_name, unit_order,
                                  unit_path, unit_raw, todo_units)
from raybench.bench.seeds_report import _mean_range, _noise, _paired, _untestable, _verdict, claim_verdicts
from raybench.cli import main
from raybench.config import ConfigError
from raybench.model.presets import PRESETS


def run(seed, accuracy, glyph):
    return {"preset": "llava", "seed": seed, "accuracy": accuracy, "val_loss": 1.0 - accuracy,
            "acc": {"glyph": glyph, "color": 1.0}, "train_s": 10.0 + seed, "params_m": 1.5,
            "prefill_ms": {"median": 20.0}, "train_samples_per_s": {"median": 400.0}}


def test_a_row_is_the_mean_over_seeds_and_keeps_each_seed():
    row = _over_seeds([run(0, 0.6, 0.2), run(1, 0.8, 0.4)])
    assert row["accuracy"] == pytest.approx(0.7) and row["acc"]["glyph"] == pytest.approx(0.3)
    assert row["params_m"] == 1.5  # cost: seed 0's
    assert [s["accuracy"] for s in row["by_seed"]] == [0.6, 0.8]
    assert _mean_range(row, lambda r: r["accuracy"], 2) == "0.70 (0.60-0.80)"


def test_timings_come_from_the_seed_that_measured_fastest():
    def timed(seed, prefill, samples_per_s):
        return {**run(seed, 0.5, 0.5), "prefill_ms": {"median": prefill}, "train_samples_per_s": {"median": samples_per_s}}

    # Seed 0's prefill measured beside another process (slow), seed 1's training was the slow one.
    row = _over_seeds([timed(0, 31.6, 400.0), timed(1, 22.0, 240.0)])
    assert row["prefill_ms"]["median"] == 22.0 and row["train_samples_per_s"]["median"] == 400.0


def test_a_claim_needs_every_seed():
    a, b = _over_seeds([run(0, 0.6, 0.5), run(1, 0.8, 0.6)]), _over_seeds([run(0, 0.5, 0.2), run(1, 0.7, 0.5)])
    glyph = _paired(a, b, lambda r: r["acc"]["glyph"])
    assert glyph == pytest.approx([0.3, 0.1])
    assert _verdict(glyph).startswith("**holds**")
    assert _verdict(glyph, threshold=0.15).startswith("**within noise**")  # "+15%": one seed short
    assert _verdict([-0.1, -0.2]).startswith("**fails**")
    assert _verdict([0.2]) == "**holds** (one seed)"


def test_a_plain_beats_needs_each_seed_beyond_the_questions_sampling_noise():
    a, b = _over_seeds([run(0, 0.985, 0.5), run(1, 0.984, 0.5)]), _over_seeds([run(0, 0.980, 0.5), run(1, 0.981, 0.5)])
    noise = _noise(a, b, lambda r: r["accuracy"], 1000)
    assert noise == pytest.approx([2 * ((0.985 * 0.015 + 0.98 * 0.02) / 1000) ** 0.5,
                                   2 * ((0.984 * 0.016 + 0.981 * 0.019) / 1000) ** 0.5])
    diffs = _paired(a, b, lambda r: r["accuracy"])  # +0.5, +0.3 points: ahead on both seeds, by less than noise
    assert _verdict(diffs).startswith("**holds**")
    assert _verdict(diffs, noise=noise).startswith("**within noise** (each seed inside")
    assert _verdict([0.10, 0.12], noise=[0.04, 0.04]).startswith("**holds**")
    assert _verdict([-0.10, -0.12], noise=[0.04, 0.04]).startswith("**fails**")
    assert _verdict([0.10, -0.08], noise=[0.04, 0.04]).startswith("**within noise** (the seeds disagree)")
    assert _verdict([0.10, 0.01], noise=[0.04, 0.04]).startswith("**within noise** (not every seed beyond")
    # A claimed size (+10 points) is judged on the size: +5 beyond noise is still short of it.
    assert _verdict([0.05, 0.06], threshold=0.10, noise=[0.04, 0.04]).startswith("**fails**")
    # "No more than 2 points below": fails only on a loss beyond noise, holds on the estimate.
    assert _verdict([-0.035, -0.049], threshold=-0.02, noise=[0.043, 0.043]) == (
        "**within noise** (not every seed beyond sampling noise)")
    assert _verdict([-0.06, -0.07], threshold=-0.02, noise=[0.043, 0.043]).startswith("**fails**")
    assert _verdict([-0.01, 0.03], threshold=-0.02, noise=[0.043, 0.043]).startswith("**holds**")


def test_a_gain_nothing_learned_or_no_room_for_is_not_measured():
    def row(preset, *glyphs):
        return {**_over_seeds([run(i, 0.5, g) for i, g in enumerate(glyphs)]), "preset": preset}

    # Both at chance (0.10) on every seed: "fails" would blame a model for what the mix does not teach.
    assert "both at chance on glyph" in _untestable(row("deepstack", 0.11, 0.12), row("llava", 0.10, 0.09), "glyph", 0.10, 0.15)
    # The reference above 0.85 on every seed: +15 points cannot fit.
    assert "no room for +15" in _untestable(row("deepstack", 0.99, 0.98), row("llava", 0.97, 0.90),
                                                   "glyph", 0.10, 0.15)
    # One learned value, or one seed with room, and the seeds decide.
    assert _untestable(row("deepstack", 0.40, 0.12), row("llava", 0.10, 0.09), "glyph", 0.10, 0.15) is None
    assert _untestable(row("deepstack", 0.99, 0.98), row("llava", 0.97, 0.80), "glyph", 0.10, 0.15) is None


def test_differences_pair_seeds_by_number_not_by_position():
    a = _over_seeds([run(0, 0.6, 0.5), run(1, 0.8, 0.6)])
    b = _over_seeds([run(1, 0.7, 0.5)])  # seed 0 not recorded yet
    assert _paired(a, b, lambda r: r["accuracy"]) == pytest.approx([0.1])
    assert _verdict(_paired(b, _over_seeds([run(0, 0.5, 0.5)]), lambda r: r["accuracy"])).startswith("**not measured")


def test_units_are_named_by_mix_preset_seed_and_recorded_seed_by_seed():
    assert unit_name("dense_sparse", 1) == "default-dense_sparse-s1"
    assert bench.MIXES["default"] == {}  # default.yaml's own data
    assert bench.MIXES["detail"]["data.mix"] == "detail"
    order = unit_order(PRESETS, 2, ("default", "other"))
    assert len(order) == len(set(order)) == 2 * 2 * len(PRESETS)
    # every preset on every mix at seed 0 first: a partial recording is a whole table early
    assert {s for _, s, _ in order[:2 * len(PRESETS)]} == {0}
    assert order[:len(PRESETS)] == [(p, 0, "default") for p in PRESETS]


def test_the_default_mix_keeps_default_yaml_s_data_tower_and_stage_share(tmp_path):
    raw = _raw_config(tmp_path, "small", quick=False, steps=None)
    from raybench.config import load_raw, validate_config

    yaml = load_raw(bench.DEFAULT_CONFIG)
    assert {k: v for k, v in raw["data"].items() if k != "path"} == yaml["data"]
    assert raw["model"]["vision"] == yaml["model"]["vision"]
    cfg = validate_config(unit_raw(raw, "deepstack", 1))
    assert (cfg.model.preset, cfg.train.seed) == ("deepstack", 1)
    assert cfg.run_path == tmp_path / "seeds-runs" / "default-deepstack-s1"
    assert cfg.data_path == tmp_path / "seeds-data"
    assert [st.steps for st in cfg.train.stages] == [st["steps"] for st in yaml["train"]["stages"][:1]] + [None]


def test_the_detail_mix_is_default_yaml_s_run_on_detail_scenes_rendered_beside(tmp_path):
    from raybench.config import validate_config

    default, detail = (_raw_config(tmp_path, "small", quick=False, steps=None, mix=m) for m in ("default", "detail"))
    assert detail["data"] == {**default["data"], "mix": "detail", "path": str(tmp_path / "seeds-data-detail")}
    assert detail["train"]["steps"] == 3000 and default["train"]["steps"] == 1500  # the detail mix trains longer
    # ... after the same scene stage: 600 steps either way.
    assert detail["train"]["stages"][0]["steps"] == default["train"]["stages"][0]["steps"] == 600
    cfg = validate_config(unit_raw(detail, "llava", 0, "detail"))
    assert cfg.run_path == tmp_path / "seeds-runs" / "detail-llava-s0"
    assert cfg.stage_path(cfg.train.stages[0]) == tmp_path / "seeds-stage-detail-see"


def unit(raw: dict, preset: str, seed: int, accuracy: float, glyph: float, count: float = 0.5,
         gflops: float = 1.0, wall_s: float = 600.0) -> dict:
    """A unit file as `run_unit` writes it, with made-up figures."""
    stats = {"median": 2.0 * gflops, "min": 1.9 * gflops, "max": 2.1 * gflops, "samples": [2.0 * gflops]}
    return {"unit": unit_name(preset, seed), "mix": "default", "trainer": "local", "preset": preset, "seed": seed,
            "train_s": wall_s - 5, "train_samples_per_s": {"median": 50.0, "min": 49.0, "max": 51.0, "samples": [50.0]},
            "accuracy": accuracy, "val_loss": 1 - accuracy, "acc": {"count": count, "glyph": glyph, "color": 0.9},
            "params_m": 3.0, "image_tokens": 64, "prefill_ms": stats, "gflops_per_sample": gflops,
            "peak_rss_growth_mib": 10.0, "wall_s": wall_s, "date": f"2026-12-0{5 + seed}", "commit": f"c0ffee{seed}",
            "quick": False, "command": "raybench bench seeds --size small", "cost_batch": 8, "cost_repeats": 7,
            "raw": unit_raw(raw, preset, seed), "config": {}}


def write_units(units: Path, raw: dict, which: dict[str, list[tuple[float, float]]]) -> None:
    units.mkdir(parents=True, exist_ok=True)
    cost = {"llava": 1.0, "blip2": 2.0, "ovis": 1.5, "deepstack": 3.0, "dense_sparse": 0.5, "hybrid": 2.5}
    for preset, per_seed in which.items():
        for seed, (accuracy, glyph) in enumerate(per_seed):
            record = unit(raw, preset, seed, accuracy, glyph, gflops=cost[preset], wall_s=600.0 + 60 * seed)
            unit_path(units, (preset, seed, "default")).write_text(json.dumps(record))


def test_a_finished_unit_is_not_trained_again(tmp_path):
    units, out = tmp_path / "units", tmp_path / "out"
    raw = _raw_config(out, "small", quick=False, steps=None)
    write_units(units, raw, {"llava": [(0.6, 0.3)], "ovis": [(0.7, 0.4)]})
    order = unit_order(("llava", "ovis"), 2)
    assert todo_units(order, units) == [("llava", 1, "default"), ("ovis", 1, "default")]
    # Every unit asked for is on file: nothing rendered, nothing trained, nothing written.
    assert record_units(out, units, presets=("llava", "ovis"), seeds=1) == []
    assert not out.exists()
    # A unit recorded under another --out is the same unit: paths are not its config.
    assert record_units(tmp_path / "elsewhere", units, presets=("llava", "ovis"), seeds=1) == []
    assert record_units(out, units, presets=("llava", "ovis"), seeds=2, max_units=0) == []


def test_a_unit_of_another_config_is_not_mixed_in(tmp_path):
    units, out = tmp_path / "units", tmp_path / "out"
    write_units(units, _raw_config(out, "small", quick=False, steps=300), {"llava": [(0.6, 0.3)]})
    with pytest.raises(ConfigError, match="default-llava-s0"):
        record_units(out, units, presets=("llava",), seeds=1)


def test_the_section_renders_from_unit_files_alone_partial_recording_included(tmp_path):
    units = tmp_path / "units"
    raw = _raw_config(tmp_path / "recorded-elsewhere", "small", quick=False, steps=None)
    write_units(units, raw, {"llava": [(0.60, 0.30), (0.62, 0.32)], "blip2": [(0.50, 0.20)],
                             "ovis": [(0.70, 0.40), (0.72, 0.41)], "deepstack": [(0.80, 0.90), (0.70, 0.30)],
                             "dense_sparse": [(0.61, 0.50), (0.60, 0.52)]})
    r = result_from_units(units, seeds=2)
    assert [row["preset"] for row in r["rows"]] == ["llava", "blip2", "ovis", "deepstack", "dense_sparse"]
    assert r["seeds"] == 2 and r["command"].endswith(f"--units {units} --seeds 2")
    assert [s["seed"] for s in r["rows"][1]["by_seed"]] == [0]  # blip2: what it has
    section = bench.markdown_section(r)
    assert "| llava " in section and "0.610 (0.600-0.620)" in section
    assert ("Partial recording: blip2 1 of 2 seeds so far; no unit yet for hybrid, deepstack_interior, "
            "hybrid_vet_taps.") in section
    assert "9 of 16 units in" in section and "2026-12-05 to 2026-12-06" in section
    assert "llava s0 10.0, s1 11.0" in section  # each unit's wall minutes
    assert "**holds** on all 2 seeds" in section  # dense_sparse glyph vs llava: +0.20 on both seeds
    assert "**within noise**" in section  # deepstack's fine detail: ahead on seed 0, behind on seed 1
    # The verdicts at a glance, one row per claim the recorded presets can test.
    verdicts = {c["claim"]: c["verdict"] for c in claim_verdicts(r)}
    assert verdicts['dense-sparse "+15% OCR"'] == "holds"  # +20 points on both seeds
    assert verdicts['DeepStack "best detail capture"'] == "within noise"
    assert verdicts['DeepStack "+20% document parsing"'] == "not measured"
    assert verdicts['dense-sparse "preserves accuracy"'] == "holds"  # -1.0, -2.0 points: within 2
    assert "Interior taps (Qwen3-VL-like) beat first-to-last" not in verdicts  # no variant recorded
    assert "| DeepStack \"+15% OCR\" " in section and "| mix `default`" in section
    assert result_from_units(units, seeds=1)["seeds"] == 1  # seed 1 left out when not asked for
    assert result_from_units(tmp_path / "empty") is None


def test_bench_seeds_renders_units_into_the_report_without_training(tmp_path):
    units, out = tmp_path / "units", tmp_path / "out"
    write_units(units, _raw_config(out, "small", quick=False, steps=None),
                {p: [(0.5, 0.2), (0.55, 0.25)] for p in PRESETS})
    assert main(["bench", "seeds", "--out", str(out), "--units", str(units), "--seeds", "2", "--max-units", "0"]) == 0
    assert check_written(out, "seeds", quick=False) == []  # the schema `bench report` reads
    assert not (out / "seeds-data").exists()
    assert write_report(out) == 0
    assert "## The seeds' comparison" in (out / "BENCHMARKS.md").read_text()


def test_the_keep_curve_is_the_trained_model_at_each_ratio_and_its_own_eval_at_its_own(tmp_path):
    from raybench.bench.keep_curve import keep_curve
    from raybench.config import validate_config
    from raybench.model.vlm import HybridVLM
    from raybench.train.local import train_local

    cfg = validate_config({"name": "k", "run_dir": str(tmp_path), "model": {"preset": "dense_sparse", "size": "tiny"},
                           "data": {"num_train": 32, "num_val": 24},
                           "train": {"steps": 2, "batch_size": 8, "eval_every": 2, "eval_samples": 24}})
    metrics = train_local(cfg, log=lambda _: None)
    model = HybridVLM.from_pretrained(cfg.run_path / "model").requires_grad_(False)
    curve = keep_curve(model, cfg, batch=2, repeats=1)
    assert [c["keep"] for c in curve] == [1.0, 0.75, 0.5, 0.25, 0.125]
    kept = [c["kept_after_stages"][-1] for c in curve]
    assert kept == sorted(kept, reverse=True) and kept[0] == cfg.model.num_image_tokens > kept[-1]
    trained = next(c for c in curve if c["keep"] == c["trained_keep"])  # tiny trains at 0.5
    assert trained["accuracy"] == pytest.approx(metrics["accuracy"])
    assert trained["acc"] == pytest.approx({k[4:]: v for k, v in metrics.items() if k.startswith("acc/")})
    assert model.stage_keep == trained["kept_after_stages"]  # left pruning as it trained


def test_the_keep_curve_claim_and_plot_come_from_the_units_curves(tmp_path):
    units = tmp_path / "units"
    write_units(units, _raw_config(tmp_path / "out", "small", quick=False, steps=None),
                {"llava": [(0.60, 0.30), (0.62, 0.32)], "dense_sparse": [(0.61, 0.50), (0.60, 0.52)]})
    for seed, lost_at_trained in ((0, 0.01), (1, 0.03)):
        path = unit_path(units, ("dense_sparse", seed, "default"))
        record = json.loads(path.read_text())
        record["keep_curve"] = [{"keep": k, "trained_keep": 0.25, "accuracy": 0.6 - (lost_at_trained if k == 0.25 else
                                                                                      0.1 * (1 - k)),
                                 "acc": {}, "kept_after_stages": [max(1, int(16 * k))], "prefill_ms": {"median": 5 + 10 * k},
                                 "gflops_per_sample": 1.0} for k in (1.0, 0.75, 0.5, 0.25, 0.125)]
        path.write_text(json.dumps(record))
    r = result_from_units(units, seeds=2)
    keep = next(c for c in claim_verdicts(r) if c["claim"] == "dense-sparse keeps accuracy at its keep ratio")
    assert keep["verdict"] == "within noise"  # -1 point on seed 0, -3 on seed 1
    assert "0.25 (4 tokens) -1.0, -3.0 points" in keep["line"]
    bench.plot(r, tmp_path / "seeds.png")  # the second panel: accuracy x prefill cost per keep
    assert (tmp_path / "seeds.png").stat().st_size > 0
