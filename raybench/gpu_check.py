"""The GPU path end to end on one GPU, in minutes, with figures (`scripts/gpu-check.sh`):

1. train: the `gpu`-size model (SigLIP-base/16 @224 + a Qwen3-0.6B-shaped decoder) with random
   weights (`model.*.pretrained_path=null`: no checkpoint needed), 20 steps under Ray Train on
   one GPU worker: FSDP2 over nccl with bf16 parameters (trainer.py picks both when the
   cluster has a GPU per worker);
2. fusion: prefill latency, GFLOPs and peak GPU memory of a subset of presets
   (`raybench bench fusion`'s measurement, on the GPU under bf16 autocast);
3. compile: `torch.compile` of every block (as serving's `compile: true`) vs eager prefill;
4. serve: the trained model behind the 3-stage Serve pipeline with each stage on a GPU
   share, one OpenAI chat completion over HTTP, and which device each stage ran on.

`--dry-run` runs the same steps with the `tiny` size on the CPU (compile backend "eager"),
so the suite exercises this file without a GPU (tests/integration/test_serve.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
FUSION_PRESETS = ("llava", "deepstack", "hybrid")


def check_config(size: str, run_dir: Path, steps: int, gpu: bool):
    """A short Ray Train run of `size` with random weights on one worker."""
    from raybench.config import load_config

    return load_config(ROOT / "jobs" / "configs" / "smoke.yaml", [
        f"name=gpu-check-{size}", f"run_dir={run_dir}", f"model.size={size}",
        # Random weights: the check must not depend on checkpoints being mounted.
        "model.vision.pretrained_path=null", "model.llm.pretrained_path=null",
        "data.num_train=256", "data.num_val=32", "train.stages=null",
        f"train.steps={steps}", "train.batch_size=8", f"train.eval_every={steps}", "train.eval_samples=16",
        "train.warmup_steps=1", "train.log_every=1", "train.num_workers=1", "train.compile=false",
        # On a CPU dry run inside another app's Ray, leave room for Ray Data's 1-CPU tasks.
        f"train.cpus_per_worker={2 if gpu else 0.1}",
    ])


def train(cfg) -> dict[str, Any]:
    import ray

    from raybench.train.trainer import fit, model_dir

    t0 = time.perf_counter()
    result = fit(cfg)
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    m = result.metrics or {}
    return {"wall_s": round(time.perf_counter() - t0, 1), "steps": cfg.train.steps,
            "gpu_workers": ray.cluster_resources().get("GPU", 0) >= cfg.train.num_workers,
            "train_loss": m.get("train_loss"), "samples_per_s": m.get("samples_per_s"),
            "model_dir": str(model_dir(cfg))}


def _model(preset: str, size: str, device: torch.device):
    from raybench.config import validate_config
    from raybench.model.vlm import HybridVLM

    cfg = validate_config({"model": {"preset": preset, "size": size, "vision": {"pretrained_path": None},
                                     "llm": {"pretrained_path": None}}})
    torch.manual_seed(0)
    m = HybridVLM(cfg.model, vocab_size=512, image_token_id=3, pad_token_id=0, eos_token_id=2)
    return m.to(device).eval().requires_grad_(False)


def _prefill_ms(model, inputs, device: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    def prefill():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            model.generate(*inputs, max_new_tokens=1)
        if device.type == "cuda":
            torch.cuda.synchronize()

    from raybench.bench.common import timed_ms

    return timed_ms(prefill, repeats, warmup)


def _inputs(model, batch: int, device: torch.device):
    from raybench.cost import probe_inputs  # the fusion bench's exact input

    return [t.to(device) for t in probe_inputs(model, batch)]


def fusion(size: str, device: torch.device, batch: int, repeats: int) -> list[dict[str, Any]]:
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    for preset in FUSION_PRESETS:
        model = _model(preset, size, device)
        inputs = _inputs(model, batch, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms = _prefill_ms(model, inputs, device, repeats)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.generate(*inputs, max_new_tokens=1)
        rows.append({"preset": preset, "prefill_ms": round(statistics.median(ms), 2),
                     "gflops_per_sample": counter.get_total_flops() / batch / 1e9,
                     "image_tokens": model.config.num_image_tokens,
                     "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                     "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None})
        del model
    return rows


def compiled_prefill(size: str, device: torch.device, batch: int, repeats: int, backend: str) -> dict[str, Any]:
    model = _model("hybrid", size, device)
    inputs = _inputs(model, batch, device)
    eager = statistics.median(_prefill_ms(model, inputs, device, repeats))
    for unit in model.units():  # per block, as serving and training compile (see stages._compile)
        unit.compile(backend=backend, dynamic=False)
    t0 = time.perf_counter()
    _prefill_ms(model, inputs, device, repeats=0, warmup=1)
    compile_s = time.perf_counter() - t0
    compiled = statistics.median(_prefill_ms(model, inputs, device, repeats))
    return {"backend": backend, "compile_s": round(compile_s, 1), "eager_ms": round(eager, 2),
            "compiled_ms": round(compiled, 2), "speedup": round(eager / compiled, 2)}


def serve_one(model_dir: str, data_path: Path, port: int, gpu: bool) -> dict[str, Any]:
    """The trained model behind the 3-stage pipeline (its own app on this Ray's Serve), asked once."""
    import requests
    from ray import serve

    from raybench.data.loader import read_split
    from raybench.pipeline import ask_endpoint
    from raybench.serve.app import build_application
    from raybench.serve.config import validate_serve_config

    share = {"vision": 0.25, "projection": 0.25, "llm": 0.5} if gpu else {}
    stage = lambda k: {"num_cpus": 0.05, "num_gpus": share.get(k, 0.0)}  # noqa: E731
    cfg = validate_serve_config({"model": model_dir, "name": "gpu-check", "route_prefix": "/gpu-check",
                                 "port": port, "ingress": {"num_cpus": 0.05}, "vision": stage("vision"),
                                 "projection": stage("projection"), "llm": stage("llm")})
    t0 = time.perf_counter()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})  # joins a running Serve as it is
    serve.run(build_application(cfg), name=cfg.name, route_prefix=cfg.route_prefix)
    up_s = time.perf_counter() - t0
    try:
        base = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix}"
        row = read_split(data_path, "val", columns=["image", "question", "answer"]).slice(0, 1).to_pylist()[0]
        t0 = time.perf_counter()
        answer = ask_endpoint(base, row["image"], row["question"], cfg.served_model_name)
        latency_ms = (time.perf_counter() - t0) * 1000
        stages = requests.get(base + "/v1/stats", timeout=30).json()["stages"]
    finally:
        serve.delete(cfg.name)
    return {"deploy_s": round(up_s, 1), "request_ms": round(latency_ms, 1), "question": row["question"],
            "answer": answer, "stage_devices": {k: sorted({r["device"] for r in v}) for k, v in stages.items()}}


def run_check(out: Path, dry_run: bool, steps: int, port: int) -> dict[str, Any]:
    gpu = not dry_run
    size, device = ("gpu", torch.device("cuda")) if gpu else ("tiny", torch.device("cpu"))
    figures: dict[str, Any] = {"size": size, "device": torch.cuda.get_device_name() if gpu else "cpu",
                               "torch": torch.__version__}
    cfg = check_config(size, out / "run", steps, gpu)
    t0 = time.perf_counter()
    figures["train"] = train(cfg)
    figures["fusion"] = fusion(size, device, batch=8 if gpu else 2, repeats=10 if gpu else 2)
    figures["compile"] = compiled_prefill(size, device, batch=8 if gpu else 2, repeats=10 if gpu else 2,
                                          backend="inductor" if gpu else "eager")
    figures["serve"] = serve_one(figures["train"]["model_dir"], cfg.data_path, port, gpu)
    figures["total_s"] = round(time.perf_counter() - t0, 1)
    want = "cuda" if gpu else "cpu"
    figures["ok"] = (figures["train"]["gpu_workers"] == gpu and bool(figures["serve"]["answer"] is not None)
                     and all(d == [want] for d in figures["serve"]["stage_devices"].values()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps(figures, indent=2))
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny size on the CPU: exercise the script, no figures")
    p.add_argument("--out", default="gpu-check-out", help="run dir and gpu-check.json go here")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 20; dry run 2)")
    p.add_argument("--port", type=int, default=8000, help="Serve HTTP port")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible (torch.cuda.is_available() is False); "
              f"torch {torch.__version__}. Use --dry-run to exercise the script on the CPU.", file=sys.stderr)
        return 2
    import ray

    try:
        figures = run_check(Path(args.out), args.dry_run, args.steps or (2 if args.dry_run else 20), args.port)
    finally:
        ray.shutdown()  # the local Ray fit() started, with Serve in it
    print(json.dumps(figures, indent=2))
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
