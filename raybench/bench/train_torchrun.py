"""The `torchrun` baseline for `raybench bench train`: the same model, FSDP2 wrapping,
preprocessing and `train_step` as a Ray Train worker, without Ray.

    python -m torch.distributed.run --nproc-per-node 2 -m raybench.bench.train_torchrun \
        --config CFG.yaml --warmup 5 --steps 40 --out result.json

Each rank preprocesses its own strided shard of the train split in memory (the Ray path
reads it through Ray Data) and steps through fixed batches; rank 0 writes the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import typing
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from raybench.config import load_config
from raybench.data.loader import read_split
from raybench.data.prepare import tokenizer_dir
from raybench.data.tokenizer import load_tokenizer
from raybench.train.config import TrainConfig
from raybench.train.data import COLUMNS, CollateNumpy, preprocess, to_model_batch
from raybench.train.loop import build_optimizer, build_scheduler, train_step
from raybench.train.parallel import loss_items_per_rank, resolve_wrap
from raybench.train.worker import build_sharded_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", required=True)
    p.add_argument("--fsdp-wrap", choices=typing.get_args(TrainConfig.model_fields["fsdp_wrap"].annotation),
                   default=None,
                   help="override train.fsdp_wrap (default: the config's)")
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(args.config, [f"train.fsdp_wrap={args.fsdp_wrap}"] if args.fsdp_wrap else [])
    t = cfg.train
    per_worker = t.batch_size // world
    tok_dir = tokenizer_dir(cfg)
    table = read_split(cfg.data_path, "train", columns=COLUMNS)
    rows = table.take(list(range(rank, table.num_rows, world))).to_pydict()
    data = preprocess({k: np.array(v, dtype=object) for k, v in rows.items()}, str(tok_dir),
                      cfg.model.vision.image_size, cfg.data.max_length)
    collate = CollateNumpy()
    n = len(data["qtype"]) // per_worker
    batches = [to_model_batch(collate({k: v[i * per_worker:(i + 1) * per_worker] for k, v in data.items()}),
                              torch.device("cpu"), cfg.model.num_image_tokens) for i in range(n)]

    model = build_sharded_model(cfg, load_tokenizer(tok_dir), world, torch.device("cpu"))
    optimizer, scheduler = build_optimizer(model, t), None
    scheduler = build_scheduler(optimizer, t)
    for i in range(args.warmup):
        train_step(model, batches[i % n], optimizer, scheduler, t.grad_clip, loss_items_per_rank(batches[i % n]))
    dist.barrier()
    started_at, t0 = time.time(), time.perf_counter()
    for i in range(args.steps):
        batch = batches[(args.warmup + i) % n]
        train_step(model, batch, optimizer, scheduler, t.grad_clip, loss_items_per_rank(batch))
    dist.barrier()
    elapsed = time.perf_counter() - t0
    if rank == 0:
        Path(args.out).write_text(json.dumps({
            "world_size": world, "steps": args.steps, "fsdp_wrap": resolve_wrap(t.fsdp_wrap, "cpu"), "seconds": elapsed,
            "started_at": started_at, "ended_at": started_at + elapsed,
            "samples_per_s": args.steps * t.batch_size / elapsed,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
