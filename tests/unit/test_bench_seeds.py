"""`bench seeds --seeds N`: a preset's row is the mean over seeds, and a seeds' claim holds or
fails only when every seed says so (pure functions; the --quick run is in test_bench_quick.py)."""

import pytest

from raybench.bench.seeds import _mean_range, _over_seeds, _paired, _verdict


def run(seed, accuracy, glyph):
    return {"preset": "llava", "seed": seed, "accuracy": accuracy, "val_loss": 1.0 - accuracy,
            "acc": {"glyph": glyph, "color": 1.0}, "train_s": 10.0 + seed, "params_m": 1.5}


def test_a_row_is_the_mean_over_seeds_and_keeps_each_seed():
    row = _over_seeds([run(0, 0.6, 0.2), run(1, 0.8, 0.4)])
    assert row["accuracy"] == pytest.approx(0.7) and row["acc"]["glyph"] == pytest.approx(0.3)
    assert row["params_m"] == 1.5  # cost: seed 0's
    assert [s["accuracy"] for s in row["by_seed"]] == [0.6, 0.8]
    assert _mean_range(row, lambda r: r["accuracy"], 2) == "0.70 (0.60-0.80)"


def test_a_claim_needs_every_seed():
    a, b = _over_seeds([run(0, 0.6, 0.5), run(1, 0.8, 0.6)]), _over_seeds([run(0, 0.5, 0.2), run(1, 0.7, 0.5)])
    glyph = _paired(a, b, lambda r: r["acc"]["glyph"])
    assert glyph == pytest.approx([0.3, 0.1])
    assert _verdict(glyph).startswith("**holds**")
    assert _verdict(glyph, threshold=0.15).startswith("**within noise**")  # "+15%": one seed short
    assert _verdict([-0.1, -0.2]).startswith("**fails**")
    assert _verdict([0.2]) == "**holds** (one seed)"
