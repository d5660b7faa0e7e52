"""scripts/gpu-check.sh without a GPU: its configuration builds the `gpu` size with no
checkpoint, it refuses to pretend when no GPU is visible, and its fusion subset runs.
The whole dry run (Ray Train, Serve) runs in tests/integration/test_serve.py."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from raybench.gpu_check import FUSION_PRESETS, check_config, fusion, main

ROOT = Path(__file__).resolve().parents[2]


def test_script_runs_the_python_check_under_a_time_limit():
    script = ROOT / "scripts" / "gpu-check.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    text = script.read_text()
    assert "timeout" in text and "600" in text and "python3 -m raybench.gpu_check" in text


def test_gpu_size_builds_from_random_weights_on_one_gpu_worker(tmp_path):
    cfg = check_config("gpu", tmp_path / "run", steps=20, gpu=True)
    assert cfg.model.size == "gpu" and cfg.model.llm.hidden_size == 1024 and cfg.model.vision.image_size == 224
    assert cfg.model.vision.pretrained_path is None and cfg.model.llm.pretrained_path is None
    assert (cfg.train.steps, cfg.train.num_workers) == (20, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_without_a_gpu_it_says_so_and_fails(tmp_path, capsys):
    assert main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device visible" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_fusion_subset_measures_every_preset_on_cpu():
    rows = fusion("tiny", torch.device("cpu"), batch=1, repeats=1)
    assert [r["preset"] for r in rows] == list(FUSION_PRESETS)
    assert all(r["prefill_ms"] > 0 and r["gflops_per_sample"] > 0 and r["peak_mem_mib"] is None for r in rows)
