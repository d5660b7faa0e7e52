"""`raybench bench fsdp`: what FSDP2 saves per rank, measured with 1 and 2 workers.

FSDP's memory claim is that each of N ranks holds 1/N of the parameters, gradients and
optimizer moments between steps. Each world size runs in its own `torchrun` (gloo, CPU): the
model built and sharded as a Ray Train worker shards it (`build_sharded_model`'s wrapping
and policy), a few `train_step`s on a fixed random batch, then every rank counts the bytes it
holds itself (the local shards of parameters, their gradients, AdamW's two moments and step)
and its process's peak RSS. The ratio per rank (2 workers / 1) is set against the ideal 1/2.
What a rank also holds while it computes (the whole model gathered for forward and backward
under the `root` wrap CPU uses, activations) is in the peak RSS, which does not halve.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m raybench.bench.fsdp --size small --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

IDEAL = 0.5  # 2 workers against 1


def _local_bytes(t) -> int:
    if t is None:
        return 0
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def state_bytes(model, optimizer) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state (local shards)."""
    params = list(model.parameters())
    moments = sum(_local_bytes(v) for st in optimizer.state.values() for v in st.values() if hasattr(v, "numel"))
    return {"params": sum(_local_bytes(p) for p in params), "grads": sum(_local_bytes(p.grad) for p in params),
            "optimizer": moments}


def _batch(model, b: int, vocab: int):
    import torch

    torch.manual_seed(1)
    k, size = model.config.num_image_tokens, model.config.vision.image_size
    ids = torch.cat([torch.full((b, 1), 1), torch.full((b, k), 3), torch.randint(5, vocab, (b, 12)),
                     torch.full((b, 1), 2)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(b, 3, size, size),
            "labels": labels}


def worker() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="small")
    p.add_argument("--preset", default="hybrid")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch
    import torch.distributed as dist

    from raybench.config import validate_config
    from raybench.model.vlm import HybridVLM
    from raybench.train.loop import build_optimizer, build_scheduler, train_step
    from raybench.train.parallel import build_mesh, mixed_precision, parallelize, resolve_wrap
    from raybench.train.stages import plan

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = validate_config({"name": "fsdp", "model": {"preset": args.preset, "size": args.size},
                           "train": {"steps": args.steps, "batch_size": args.batch * world}})
    vocab = cfg.data.tokenizer_vocab_size
    torch.manual_seed(0)
    model = HybridVLM(cfg.model, vocab_size=vocab, image_token_id=3, pad_token_id=0, eos_token_id=2)
    wrap = resolve_wrap(cfg.train.fsdp_wrap, "cpu")
    model = parallelize(model, build_mesh(world, "cpu"), mixed_precision("cpu"), wrap=wrap)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, plan(cfg))
    batch = _batch(model, args.batch, vocab)
    for _ in range(args.steps):
        train_step(model, batch, optimizer, scheduler, cfg.train.grad_clip)
    mine = {"rank": rank, **state_bytes(model, optimizer),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world": world, "wrap": wrap, "ranks": ranks,
                                              "params_total": sum(p.numel() for p in model.parameters())}))
    dist.destroy_process_group()


def measure(world: int, size: str, preset: str, out: Path) -> dict:
    """One world size in its own torchrun; its rank-0 summary."""
    # --standalone: a free port of its own; one thread per rank, as Ray gives a worker with <= 1 CPU.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           "-m", "raybench.bench.fsdp", "--size", size, "--preset", preset, "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=900, capture_output=True, text=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.read_text())


def mib(n: float) -> float:
    return n / 2**20


def run_fsdp_bench(out_dir: Path, size: str = "small", quick: bool = False, preset: str = "hybrid") -> dict:
    from raybench.bench.common import machine_info

    if quick:
        size = "tiny"
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = []
    for world in (1, 2):
        r = measure(world, size, preset, out_dir / f"fsdp-{world}.json")
        for rank in r["ranks"]:
            state = rank["params"] + rank["grads"] + rank["optimizer"]
            rows.append({"world": world, "rank": rank["rank"], "wrap": r["wrap"], "params_mib": mib(rank["params"]),
                         "grads_mib": mib(rank["grads"]), "optimizer_mib": mib(rank["optimizer"]),
                         "state_mib": mib(state), "peak_rss_mib": rank["peak_rss_mib"]})
    one = next(r for r in rows if r["world"] == 1)
    for r in rows:
        r["state_vs_one"] = r["state_mib"] / one["state_mib"]
        r["rss_vs_one"] = r["peak_rss_mib"] / one["peak_rss_mib"]
    command = f"raybench bench fsdp --size {size}" + (" --quick" if quick else "")
    return {"bench": "fsdp", "quick": quick, "command": command, "size": size,
            "config": {"size": size, "preset": preset, "steps": 3, "batch_per_rank": 8},
            "machine": machine_info(), "runtime_s": time.perf_counter() - started, "rows": rows}


def markdown_row(r: dict) -> str:
    two = [row for row in r["rows"] if row["world"] == 2]
    return (f"| fsdp ({r['size']}) | per-rank parameters + gradients + optimizer state, 2 workers / 1: "
            + ", ".join(f"rank {row['rank']} x{row['state_vs_one']:.3f}" for row in two) + f" (ideal x{IDEAL}) |")


def markdown_section(r: dict) -> str:
    from raybench.bench.common import markdown_table
    from raybench.bench.report import claim, heading

    cols = {"world": "workers", "rank": "rank", "params": "parameters MiB", "grads": "gradients MiB",
            "optim": "optimizer MiB", "state": "state MiB (vs 1 worker)", "rss": "peak RSS MiB (vs 1 worker)"}
    cells = [{"world": row["world"], "rank": row["rank"], "params": f"{row['params_mib']:.2f}",
              "grads": f"{row['grads_mib']:.2f}", "optim": f"{row['optimizer_mib']:.2f}",
              "state": f"{row['state_mib']:.2f} ({row['state_vs_one']:.3f})",
              "rss": f"{row['peak_rss_mib']:.0f} ({row['rss_vs_one']:.2f})"} for row in r["rows"]]
    two = [row for row in r["rows"] if row["world"] == 2]
    worst = max(row["state_vs_one"] for row in two)
    wrap = r["rows"][0]["wrap"]
    return "\n".join([
        heading(r, f"{r['config']['preset']} `{r['size']}`, FSDP2 `{wrap}` wrap on gloo, {r['config']['steps']} "
                   f"steps of batch {r['config']['batch_per_rank']} per rank"), "",
        markdown_table(cells, cols), "",
        "State = what a rank keeps between steps: its shards of the parameters, their gradients and "
        "AdamW's moments, counted from the local tensors after the last step. Peak RSS is the "
        "whole worker process (Python, torch, the model gathered whole for forward and backward "
        f"under the `{wrap}` wrap, activations): the part FSDP does not shard.", "",
        f"- FSDP's memory saving: per-rank state with 2 workers <= {IDEAL + 0.01:.2f}x one worker's "
        f"(largest rank x{worst:.3f}; ideal x{IDEAL}, shards of uneven tensors round up) — "
        f"{claim(worst <= IDEAL + 0.01)}",
        f"- whole-process peak RSS per rank with 2 workers: x{max(row['rss_vs_one'] for row in two):.2f} of one "
        "worker's (not a claim of FSDP's: it shards state, not the gathered model or the interpreter)",
    ]) + "\n"


def _plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    labels = [f"{row['world']} worker{'s' if row['world'] > 1 else ''}\nrank {row['rank']}" for row in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = [0.0] * len(rows)
    for key, name in (("params_mib", "parameters"), ("grads_mib", "gradients"), ("optimizer_mib", "optimizer")):
        vals = [row[key] for row in rows]
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("MiB held between steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args) -> int:
    from raybench.bench.common import write_result

    out = Path(args.out)
    result = run_fsdp_bench(out, size=args.size or "small", quick=args.quick)
    write_result(out, "fsdp", result, markdown_row(result), _plot)
    section = markdown_section(result)
    print(section)
    if getattr(args, "write_benchmarks_md", False) and not args.quick:
        from raybench.bench.report import splice_section

        splice_section(Path("BENCHMARKS.md"), "## FSDP memory per rank", section)
    return 0


if __name__ == "__main__":
    worker()
