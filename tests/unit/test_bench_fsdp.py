"""`bench fsdp`: FSDP2's per-rank memory with 1 and 2 real gloo workers (torchrun)."""

import pytest

from raybench.bench import fsdp
from raybench.bench.report import check_written
from raybench.bench.common import write_result


def test_two_workers_each_hold_half_the_state_one_holds(tmp_path):
    result = fsdp.run_fsdp_bench(tmp_path, quick=True)
    write_result(tmp_path, "fsdp", result, fsdp.markdown_row(result), fsdp._plot)
    assert check_written(tmp_path, "fsdp", quick=True) == []
    one = [r for r in result["rows"] if r["world"] == 1]
    two = [r for r in result["rows"] if r["world"] == 2]
    assert [r["rank"] for r in one] == [0] and [r["rank"] for r in two] == [0, 1]
    # Between steps a rank holds its shards: parameters, their gradients, AdamW's moments.
    assert one[0]["grads_mib"] == pytest.approx(one[0]["params_mib"])
    assert one[0]["optimizer_mib"] == pytest.approx(2 * one[0]["params_mib"], rel=0.01)  # exp_avg, exp_avg_sq (+ step)
    assert sum(r["state_mib"] for r in two) == pytest.approx(one[0]["state_mib"], rel=0.01)  # nothing lost or doubled
    for r in two:
        assert 0.45 < r["state_vs_one"] <= fsdp.IDEAL + 0.01
    section = fsdp.markdown_section(result)
    assert "FSDP's memory saving" in section and "**met**" in section
