"""`raybench bench train`: Ray Train 2-worker FSDP2 vs plain `torchrun` with the same code,
and model FLOPs utilisation against a `torch.matmul` peak measured in the same run.

- torchrun: `raybench.bench.train_torchrun` (same model build, FSDP2 wrapping, preprocessing
  and `train_step`; data preprocessed in memory), timed after a warm-up.
- Ray Train: `raybench train` on the same config; throughput is the workers' own
  `samples_per_s` per eval window (evals and checkpoints excluded), median of the windows
  after the first (which holds warm-up).
- MFU: FLOPs of one fwd+bwd step (torch FlopCounterMode, the unsharded model in-process) x
  steps/s, over the fp32 matmul peak of this machine (2048^2, all threads, median).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml


def matmul_peak_gflops(n: int = 2048, repeats: int = 7) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        samples.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return statistics.median(samples)


def step_gflops(cfg) -> float:
    """FLOPs of one optimizer step's forward + backward at the global batch size."""
    from torch.utils.flop_counter import FlopCounterMode

    from raybench.data.loader import read_split
    from raybench.data.processor import VQAProcessor
    from raybench.data.tokenizer import load_tokenizer
    from raybench.data.prepare import tokenizer_dir
    from raybench.model.vlm import HybridVLM

    tok = load_tokenizer(tokenizer_dir(cfg))
    proc = VQAProcessor(tok, cfg.model.num_image_tokens, cfg.model.vision.image_size)
    rows = read_split(cfg.data_path, "train", columns=["image", "question", "answer"]).slice(
        0, cfg.train.batch_size).to_pydict()
    batch = proc.collate(rows)
    torch.manual_seed(0)
    model = HybridVLM.for_tokenizer(cfg.model, tok)
    with FlopCounterMode(display=False) as counter:
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
        out.loss.backward()
    return counter.get_total_flops() / 1e9


def _config(out: Path, size: str, quick: bool) -> dict:
    return {
        "name": "bench-train", "run_dir": str(out / "bench-train-run"),
        "model": {"preset": "hybrid", "size": "tiny" if quick else size},
        "data": {"num_train": 1024 if quick else 4096, "num_val": 64},
        "train": {"steps": 30 if quick else 120, "batch_size": 32 if quick else 64,
                  "eval_every": 10 if quick else 30, "eval_samples": 64, "log_every": 10,
                  "num_workers": 2, "warmup_steps": 5},
    }


def run_train_bench(out: Path, size: str, quick: bool) -> dict:
    import shutil

    from raybench.config import load_config
    from raybench.data.prepare import ensure_data, ensure_tokenizer

    import ray

    if not quick and (ray.is_initialized() or os.environ.get("RAY_ADDRESS")):
        # The full run compares Ray with and without its dashboard: each needs a Ray of its own.
        raise RuntimeError("bench train (full) starts its own local Rays: run it without RAY_ADDRESS, "
                           "outside a running Ray")
    out.mkdir(parents=True, exist_ok=True)
    raw = _config(out, size, quick)
    shutil.rmtree(raw["run_dir"], ignore_errors=True)
    cfg_path = out / "bench-train.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(cfg_path)
    ensure_data(cfg)
    ensure_tokenizer(cfg)

    peak = matmul_peak_gflops()
    flops = step_gflops(cfg)

    torchrun = _torchrun(cfg_path, out / "torchrun.json", cfg.train.steps - 10)
    # FSDP2 wrapping: the CPU default (the whole model as one unit) against per-block units,
    # the GPU default, with the same torchrun code in the same run.
    block = {} if quick else _torchrun(cfg_path, out / "torchrun-block.json", cfg.train.steps - 10, "block")

    windows = _ray_windows(cfg, dashboard=True)
    ray_sps = statistics.median(windows[1:] or windows)  # the first window holds warm-up
    extra = {}
    if not quick:
        # The same run on a Ray without its dashboard: what the dashboard's processes (head
        # and per-node agent, metrics) take from 2 cores, measured rather than guessed.
        nodash = cfg.model_copy(update={"name": "bench-train-nodash", "run_dir": str(out / "bench-train-nodash"),
                                        "data": cfg.data.model_copy(update={"path": str(cfg.data_path)})})
        shutil.rmtree(nodash.run_path, ignore_errors=True)
        w = _ray_windows(nodash, dashboard=False)
        sps = statistics.median(w[1:] or w)
        extra = {"ray_nodash_windows_samples_per_s": w, "ray_nodash_samples_per_s": sps,
                 "ray_nodash_over_torchrun": sps / torchrun["samples_per_s"], "torchrun_block": block,
                 "root_over_block": torchrun["samples_per_s"] / block["samples_per_s"]}

    kept = windows[1:] or windows
    result = {
        "bench": "train", "quick": quick, "config": raw, "matmul_peak_gflops": peak,
        "command": "raybench bench train " + ("--quick" if quick else f"--size {size}"),  # --quick: tiny
        "step_gflops": flops, "torchrun": torchrun, "ray_windows_samples_per_s": windows,
        "ray_samples_per_s_stats": {"median": ray_sps, "min": min(kept), "max": max(kept), "samples": windows},
        "ray_samples_per_s": ray_sps, "torchrun_samples_per_s": torchrun["samples_per_s"],
        "ray_over_torchrun": ray_sps / torchrun["samples_per_s"], **extra,
    }
    return {**result, "mfu_ray": mfu_of(result, ray_sps), "mfu_torchrun": mfu_of(result, torchrun["samples_per_s"])}


def _torchrun(cfg_path: Path, out: Path, steps: int, wrap: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what Ray gives a worker with <= 1 CPU
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-port", "29517", "-m", "raybench.bench.train_torchrun", "--config", str(cfg_path),
                    "--warmup", "5", "--steps", str(steps), "--out", str(out),
                    *(["--fsdp-wrap", wrap] if wrap else [])], check=True, env=env)
    return json.loads(out.read_text())


def _ray_windows(cfg, dashboard: bool) -> list[float]:
    """Fit `cfg` on a fresh local Ray (or the one this process already runs in, which is then
    left running); the samples/s of each eval window, from MLflow."""
    import ray
    from mlflow.tracking import MlflowClient

    from raybench.track import tracking_uri
    from raybench.runtime import init_ray
    from raybench.train.trainer import fit

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    owned = init_ray(include_dashboard=dashboard)
    try:
        result = fit(cfg)
    finally:
        if owned:
            ray.shutdown()
    if result.error:
        raise result.error
    client = MlflowClient(tracking_uri(cfg.run_path))
    run_id = (cfg.run_path / "mlflow_run_id").read_text().strip()
    return [m.value for m in sorted(client.get_metric_history(run_id, "samples_per_s"), key=lambda m: m.step)]


def markdown_row(r: dict) -> str:
    m = r["config"]["model"]
    return (f"| train ({m['preset']} {m['size']}, 2 workers FSDP2, batch {r['config']['train']['batch_size']}) | "
            f"Ray Train {r['ray_samples_per_s']:.0f} samples/s vs torchrun {r['torchrun_samples_per_s']:.0f} = "
            f"**{r['ray_over_torchrun']:.2f}x** (goal >= 0.95) | MFU {r['mfu_ray']:.1%} (torchrun "
            f"{r['mfu_torchrun']:.1%}) of a {r['matmul_peak_gflops']:.0f} GFLOP/s fp32 matmul peak |")


def mfu_of(r: dict, samples_per_s: float) -> float:
    return r["step_gflops"] * samples_per_s / r["config"]["train"]["batch_size"] / r["matmul_peak_gflops"]


def markdown_section(r: dict) -> str:
    from raybench.bench.report import claim, heading

    m, t = r["config"]["model"], r["config"]["train"]
    tr = r.get("torchrun", {})
    goal = 0.95
    return "\n".join([
        heading(r, f"{m['preset']} `{m['size']}`, {t['num_workers']} FSDP2 workers on gloo, "
                f"global batch {t['batch_size']}, {t['steps']} steps"), "",
        "| | samples/s | MFU |", "|---|---|---|",
        f"| plain `torchrun`, same model/FSDP2/`train_step`, batches prebuilt in memory "
        f"({tr.get('steps', '?')} steps after warm-up) | {r['torchrun_samples_per_s']:.0f} | {r['mfu_torchrun']:.1%} |",
        f"| Ray Train `TorchTrainer` (Ray Data input, median of eval windows after the first) | "
        f"{r['ray_samples_per_s']:.0f} | {r['mfu_ray']:.1%} |",
        f"| **Ray / torchrun** | **{r['ray_over_torchrun']:.2f}x** (goal >= {goal}: "
        f"{claim(r['ray_over_torchrun'] >= goal)}) | |",
        *([f"| Ray Train, same run on a Ray started without its dashboard | {r['ray_nodash_samples_per_s']:.0f} "
           f"({r['ray_nodash_over_torchrun']:.2f}x torchrun) | {mfu_of(r, r['ray_nodash_samples_per_s']):.1%} |"]
          if "ray_nodash_samples_per_s" in r else []),
        *([f"| plain `torchrun`, FSDP2 per block (`train.fsdp_wrap: block`, the GPU default) instead of "
           f"the whole model as one unit (`auto` on CPU: `root`) | {r['torchrun_block']['samples_per_s']:.0f} "
           f"(root / block = {r['root_over_block']:.2f}x) | {mfu_of(r, r['torchrun_block']['samples_per_s']):.1%} |"]
          if "root_over_block" in r else []), "",
        f"MFU = FLOPs of one fwd+bwd step (FlopCounterMode, {r['step_gflops']:.1f} GFLOP at batch "
        f"{t['batch_size']}) x steps/s over a fp32 2048² `torch.matmul` peak of "
        f"{r['matmul_peak_gflops']:.0f} GFLOP/s measured in the same run (it varies "
        "from host to host and run to run on a shared machine). Ray windows: "
        + ", ".join(f"{w:.0f}" for w in r["ray_windows_samples_per_s"]) + " samples/s.", "",
        "What differs between the two: the baseline steps through batches prebuilt in memory; the Ray "
        "workers pull each batch from Ray Data (`iter_torch_batches`, local shuffle, collate) and rank 0 "
        "logs to MLflow every `log_every` steps. A Ray window holds training steps only: it closes before "
        "an eval boundary (eval, DCP checkpoint, `ray.train.report`) and the next opens after it. Where "
        "the rest of the gap goes (Ray's processes on the same 2 cores, or raybench's worker loop) is not "
        "established yet; the window-to-window spread above is the noise any explanation must beat. The "
        "dashboard row switches off the one piece of Ray a user can; within that noise it is not the lever.",
    ]) + "\n"


def main(args) -> int:
    from raybench.bench.common import write_result

    out = Path(args.out)
    result = run_train_bench(out, args.size, args.quick)
    write_result(out, "train", result, markdown_row(result), _plot)
    return 0


def _plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(["torchrun", "Ray Train"], [r["torchrun_samples_per_s"], r["ray_samples_per_s"]])
    ax.set_ylabel("samples/s (2 FSDP2 workers)")
    ax.set_title(f"Ray/torchrun = {r['ray_over_torchrun']:.2f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
