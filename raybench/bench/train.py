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

from raybench.bench.cpu import CpuSampler


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
    steps = cfg.train.steps - 10
    # --quick's timed steps last seconds, not minutes: sample often enough to read them.
    with CpuSampler(interval_s=0.2 if quick else 1.0) as cpu:
        torchrun = _torchrun(cfg_path, out / "torchrun.json", steps)
        # FSDP2 wrapping: the CPU default (the whole model as one unit) against per-block units,
        # the GPU default, with the same torchrun code in the same run.
        block = {} if quick else _torchrun(cfg_path, out / "torchrun-block.json", steps, "block")
        windows, stretch = _ray_windows(cfg, dashboard=True)
        # torchrun again after Ray: the baseline brackets the Ray run, so drift on a shared
        # machine (the runs are minutes apart) shows as the spread of the two.
        after = None if quick else _torchrun(cfg_path, out / "torchrun-after.json", steps)
        extra = {} if quick else _nodash(cfg, out, block)
    ray_sps = statistics.median(windows[1:] or windows)  # the first window holds warm-up
    baseline = [torchrun] + ([after] if after else [])
    torchrun_sps = statistics.mean(b["samples_per_s"] for b in baseline)
    if "ray_nodash_samples_per_s" in extra:
        extra["ray_nodash_over_torchrun"] = extra["ray_nodash_samples_per_s"] / torchrun_sps
    if "torchrun_block" in extra:
        extra["root_over_block"] = torchrun["samples_per_s"] / block["samples_per_s"]
    cores = {"torchrun": [cpu.cores(b["started_at"], b["ended_at"], _train_part) for b in baseline],
             "ray": cpu.cores(*stretch, _train_part), "ray_by_process": cpu.cores(*stretch, _process_name)}
    kept = windows[1:] or windows
    result = {
        "bench": "train", "quick": quick, "config": raw, "matmul_peak_gflops": peak,
        "command": "raybench bench train " + ("--quick" if quick else f"--size {size}"),  # --quick: tiny
        "step_gflops": flops, "torchrun": torchrun, "torchrun_after": after, "ray_windows_samples_per_s": windows,
        "ray_samples_per_s_stats": {"median": ray_sps, "min": min(kept), "max": max(kept), "samples": windows},
        "ray_samples_per_s": ray_sps, "torchrun_samples_per_s": torchrun_sps,
        "ray_over_torchrun": ray_sps / torchrun_sps, "cpu_cores": cores, **extra,
    }
    return {**result, "mfu_ray": mfu_of(result, ray_sps), "mfu_torchrun": mfu_of(result, torchrun_sps)}


def _train_part(pid: int, cmd: str) -> str:
    """Which part of a training run a process is, for `CpuSampler.cores`."""
    if cmd.startswith("ray::RayTrainWorker") or ("train_torchrun" in cmd and "torch.distributed.run" not in cmd):
        return "workers"
    return "bench driver" if pid == os.getpid() else "other processes"


def _process_name(pid: int, cmd: str) -> str:
    """A process's own name ("ray::TrainController", "raylet", a Python process by its script:
    "log_monitor"), workers as one part; kernel threads (no command line) as one."""
    part = _train_part(pid, cmd)
    if part != "other processes":
        return part
    args = [a for a in cmd.split() if not a.startswith("-")] or ["(kernel threads)"]
    name = Path(args[0]).name
    return Path(args[1]).name.removesuffix(".py") if name.startswith("python") and len(args) > 1 else name


def _nodash(cfg, out: Path, block: dict) -> dict:
    """The same Ray run on a Ray without its dashboard: what the dashboard's processes (head
    and per-node agent, metrics) take from 2 cores, measured rather than guessed."""
    import shutil

    nodash = cfg.model_copy(update={"name": "bench-train-nodash", "run_dir": str(out / "bench-train-nodash"),
                                    "data": cfg.data.model_copy(update={"path": str(cfg.data_path)})})
    shutil.rmtree(nodash.run_path, ignore_errors=True)
    w, _ = _ray_windows(nodash, dashboard=False)
    return {"ray_nodash_windows_samples_per_s": w, "ray_nodash_samples_per_s": statistics.median(w[1:] or w),
            "torchrun_block": block}


def _torchrun(cfg_path: Path, out: Path, steps: int, wrap: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what Ray gives a worker with <= 1 CPU
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-port", "29517", "-m", "raybench.bench.train_torchrun", "--config", str(cfg_path),
                    "--warmup", "5", "--steps", str(steps), "--out", str(out),
                    *(["--fsdp-wrap", wrap] if wrap else [])], check=True, env=env)
    return json.loads(out.read_text())


def _ray_windows(cfg, dashboard: bool) -> tuple[list[float], tuple[float, float]]:
    """Fit `cfg` on a fresh local Ray (or the one this process already runs in, which is then
    left running); the samples/s of each eval window, from MLflow, and the wall-clock stretch
    of the windows after the first (from the first window's report to the last's)."""
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
    history = sorted(client.get_metric_history(run_id, "samples_per_s"), key=lambda m: m.step)
    return [m.value for m in history], (history[0].timestamp / 1000, history[-1].timestamp / 1000)


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
        f"({tr.get('steps', '?')} steps after warm-up{_bracket(r)}) | {r['torchrun_samples_per_s']:.0f} | "
        f"{r['mfu_torchrun']:.1%} |",
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
        "an eval boundary (eval, DCP checkpoint, `ray.train.report`) and the next opens after it. The "
        "dashboard row switches off the one piece of Ray a user can.",
        *_cores_lines(r),
    ]) + "\n"


def _both_torchruns(r: dict) -> str | None:
    """"178 and 160": the torchrun runs before and after Ray (None when only one ran)."""
    after = r.get("torchrun_after")
    return f"{r['torchrun']['samples_per_s']:.0f} and {after['samples_per_s']:.0f}" if after else None


def _bracket(r: dict) -> str:
    both = _both_torchruns(r)
    return f"; mean of a run before Ray and one after: {both}" if both else ""


def _cores_lines(r: dict) -> list[str]:
    """Where the 2 cores went during the timed steps, and what that predicts for the ratio."""
    cores = r.get("cpu_cores")
    if not cores or not cores["ray"] or not all(cores["torchrun"]):
        return []
    tr = {k: statistics.mean(c.get(k, 0.0) for c in cores["torchrun"])
          for k in ("workers", "other processes", "bench driver", "idle")}
    ray = cores["ray"]

    def row(name: str, c: dict) -> str:
        return (f"| {name} | {c.get('workers', 0):.2f} | {c.get('other processes', 0):.2f} | "
                f"{c.get('bench driver', 0):.2f} | {c.get('idle', 0):.2f} |")
    predicted = ray.get("workers", 0) / tr["workers"]
    named = [(k, v) for k, v in cores.get("ray_by_process", {}).items()
             if k not in ("workers", "bench driver", "idle")]
    top = ", ".join(f"{k} {v:.2f}" for k, v in named[:6])
    both = _both_torchruns(r)
    return ["", "Cores during the timed steps (per-process CPU seconds over wall seconds, from /proc, sampled "
            "every second by the bench; Ray: from the end of its first window to its last report):", "",
            "| | training workers | other processes | bench driver | idle |", "|---|---|---|---|---|",
            row("torchrun" + (" (mean of both runs)" if len(cores["torchrun"]) > 1 else ""), tr),
            row("Ray Train", ray), "",
            f"The workers' cores, Ray / torchrun = **{predicted:.2f}**, against the measured throughput ratio "
            f"of {r['ray_over_torchrun']:.2f}. The workers compute the same steps either way and are CPU-bound, "
            "so throughput follows the CPU they get. In Ray the cores they do not get go to the other processes "
            "(Ray's daemons, the Train controller and its helper actors, Ray Data's actors, the dashboard), and "
            "those are Ray's own: a 2-core machine pays them in full" + (f" (the largest: {top})" if top else "") + ". "
            "Per worker core the two run at "
            f"{r['torchrun_samples_per_s'] / tr['workers']:.0f} (torchrun) and "
            f"{r['ray_samples_per_s'] / ray['workers']:.0f} (Ray) samples/s; that part varies from run to run "
            "on this shared host" + (f", as the two torchrun runs ({both}) show" if both else "") + "."]


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
