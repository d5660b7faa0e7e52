"""The Ray-free benchmarks in their --quick form, in-process: every output keeps the schema
`bench report` and `bench all` rely on (keys, not numbers: timing goals live in the benches).

Ray-free but not unit tests: `bench seeds --quick` trains every preset. train / sweep / serve
start Ray; their --quick runs are in test_bench_quick_ray.py, checked with the same
`check_written`.
"""

import copy
import json
import re
from pathlib import Path

import pytest

from raybench.bench import compile as compile_bench
from raybench.bench import seeds as seeds_bench
from raybench.bench.common import write_result
from raybench.bench.report import check_written, normalize, validate_result, write_report
from raybench.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

QUICK = ("fusion", "compile", "seeds")


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "fusion", "--quick", "--out", str(out)]) == 0
    assert main(["bench", "seeds", "--quick", "--seeds", "2", "--out", str(out)]) == 0
    # Dynamo tracing without inductor: the same code path, minus minutes of C++ builds.
    result = compile_bench.run_compile_bench(quick=True, backend="eager")
    write_result(out, "compile", result, compile_bench.markdown_row(result), compile_bench._plot)
    return out


def _load(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.parametrize("name", QUICK)
def test_quick_results_keep_the_schema(quick_out, name):
    assert check_written(quick_out, name, quick=True) == []  # schema, no error, plot, results.md row


def test_seeds_scores_every_preset_and_qtype_on_one_data_set(quick_out):
    result = _load(quick_out, "seeds")
    assert [r["preset"] for r in result["rows"]] == ["llava", "blip2", "ovis", "deepstack", "dense_sparse",
                                                     "hybrid"]
    assert all(set(r["acc"]) == set(result["qtypes"]) for r in result["rows"])
    assert result["config"]["data"]["path"] == str(quick_out / "seeds-data")
    # Two seeds each: the row is their mean, each seed's own figures kept beside it.
    assert result["seeds"] == 2 and result["command"].endswith("--seeds 2")
    for row in result["rows"]:
        assert len(row["by_seed"]) == 2
        assert row["accuracy"] == pytest.approx(sum(s["accuracy"] for s in row["by_seed"]) / 2)
    section = seeds_bench.markdown_section(result)
    assert "mean over 2 seeds" in section
    # Each claim is judged from both seeds' paired differences.
    verdicts = [line for line in section.splitlines() if line.startswith("- ") and ("OCR" in line or "best detail" in line)]
    # Or not measured for what the mix cannot show (a tiny model at chance, or no room below 1),
    # never for want of a seed.
    assert len(verdicts) == 3 and all(re.search(r"\*\*(holds|fails|within noise)\*\*|\*\*not measured\*\* "
                                                r"\((both at chance|.* no room)", v) for v in verdicts)


def test_compile_traces_prefill_whole_and_keeps_the_answers(quick_out):
    row = _load(quick_out, "compile")["rows"][0]
    # Pruning and DeepStack included: one graph, no breaks, the eager greedy tokens.
    assert row["preset"] == "hybrid" and row["prefill"]["graph_breaks"] == 0 and row["prefill"]["graphs"] == 1
    assert row["prefill"]["same_tokens"] is True
    # Decode on the static KV cache: one graph for every step, nothing recompiled.
    assert row["decode"]["graph_breaks"] == 0 and row["decode"]["recompiles"] == 0
    # The train step does break (the loss selects the answer positions): the counter counts.
    assert row["train_step"]["graph_breaks"] > 0


def test_report_renders_every_section_and_says_what_is_missing(quick_out, capsys):
    assert main(["bench", "report", "--out", str(quick_out)]) == 0
    page = (quick_out / "BENCHMARKS.md").read_text()
    for title in ("## Fusion", "## The seeds' comparison", "## torch.compile"):
        assert title in page
    for name in ("train", "serve", "sweep"):
        assert f"no `{name}.json`" in page
    assert "Quick run" in page and "schema" not in capsys.readouterr().err


def test_all_renders_after_the_benches_and_copies_only_when_asked(quick_out, tmp_path, monkeypatch):
    import raybench.cli

    monkeypatch.setattr(raybench.cli, "BENCHMARKS", ())  # the benches ran in the fixture
    monkeypatch.chdir(tmp_path)
    (quick_out / "BENCHMARKS.md").unlink(missing_ok=True)
    assert main(["bench", "all", "--out", str(quick_out)]) == 0
    assert (quick_out / "BENCHMARKS.md").exists() and not (tmp_path / "BENCHMARKS.md").exists()
    assert main(["bench", "all", "--out", str(quick_out), "--write-benchmarks-md"]) == 0
    assert (tmp_path / "BENCHMARKS.md").read_text() == (quick_out / "BENCHMARKS.md").read_text()


def test_schema_breaks_are_named_and_stop_a_strict_report(quick_out, tmp_path):
    broken = copy.deepcopy(_load(quick_out, "fusion"))
    del broken["machine"]["torch"]
    del broken["rows"][1]["latency_ms"]["samples"]
    errs = validate_result("fusion", broken)
    assert "machine.torch: missing" in errs and "rows[1].latency_ms.samples: missing" in errs
    assert validate_result("sweep", {"bench": "sweep"})  # empty: everything missing
    (tmp_path / "fusion.json").write_text(json.dumps(broken))
    assert write_report(tmp_path, strict=True) == 1 and not (tmp_path / "BENCHMARKS.md").exists()
    assert write_report(tmp_path, strict=False) == 0  # older files: warnings, still rendered


def test_results_from_before_the_common_schema_still_render():
    legacy = {"benchmark": "serve", "command": "raybench bench serve --size small", "size": "small"}
    r = normalize("serve", legacy)
    assert r["bench"] == "serve" and r["quick"] is False and r["config"] == {"size": "small"}


def test_compile_without_a_cxx_compiler_fails_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compile_bench, "_cxx", lambda: None)
    assert main(["bench", "compile", "--quick", "--out", str(tmp_path)]) == 1
    assert "no C++ compiler" in capsys.readouterr().err
    result = _load(tmp_path, "compile")
    assert "no C++ compiler" in result["error"] and validate_result("compile", result) == []
