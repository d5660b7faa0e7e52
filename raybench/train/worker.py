"""What each Ray Train worker runs: build, shard (FSDP2), resume, train, evaluate, checkpoint.

The step itself is `raybench.train.loop.train_step`, the same one the single-process
trainer and the `torchrun` baseline use. Only rank 0 talks to MLflow.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import ray
import ray.data
import ray.train
import torch
import torch.distributed as dist

from raybench.config import RunConfig, dump_config, flatten
from raybench.data.tokenizer import load_tokenizer
from raybench.model.vlm import HybridVLM
from raybench.train import checkpoint as ckpt
from raybench.train.data import CollateNumpy, group_shuffled, to_model_batch
from raybench.train.loop import (build_optimizer, build_scheduler, evaluate_counts, format_eval,
                                 merge_counts, train_step)
from raybench.train.parallel import build_mesh, mixed_precision, parallelize
from raybench.train.stages import plan, set_trainable, stage_at


def build_sharded_model(cfg: RunConfig, tokenizer, world_size: int, device: torch.device) -> HybridVLM:
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank, before sharding
    model = HybridVLM.for_tokenizer(cfg.model, tokenizer).to(device)
    return parallelize(model, build_mesh(world_size, device.type), mixed_precision(device.type),
                       compile=cfg.train.compile)


SHUFFLE_CHUNK_BATCHES = 8  # group shuffle: a buffer of 8 batches (Ray's row shuffle: >= 256 rows)


def _epoch_batches(shard, per_worker: int, seed: int, epoch: int, skip: int, device, num_image_tokens: int,
                   questions_per_image: int = 1, scene: bool = False):
    # Deterministic: an ordered shard and a seeded local shuffle, so `skip` lands on the
    # exact batch a resumed run stopped before.
    if questions_per_image > 1:  # keep each image's questions together (one ViT pass per image)
        # The last, partial chunk still gives its whole batches: as many as the row shuffle would.
        chunks = shard.iter_torch_batches(batch_size=per_worker * SHUFFLE_CHUNK_BATCHES, collate_fn=CollateNumpy())
        batches = group_shuffled(chunks, per_worker, seed * 1000 + epoch)
    else:
        batches = shard.iter_torch_batches(batch_size=per_worker, drop_last=True,
                                           local_shuffle_buffer_size=max(4 * per_worker, 256),
                                           local_shuffle_seed=seed * 1000 + epoch, collate_fn=CollateNumpy())
    for i, batch in enumerate(batches):
        if i >= skip:
            yield to_model_batch(batch, device, num_image_tokens, scene)


def _evaluate(model, val_shard, per_worker: int, suppressed: list[int], device) -> dict[str, float]:
    batches = (to_model_batch(b, device, model.config.num_image_tokens)
               for b in val_shard.iter_torch_batches(batch_size=per_worker, collate_fn=CollateNumpy()))
    counts = evaluate_counts(model, batches, suppressed)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, counts)
    return merge_counts(parts)


def _open_tracker(cfg: RunConfig, rank: int, config: dict):
    if rank != 0:
        return None
    from raybench.track import Tracker

    # Re-opened by name after a restart: the same MLflow run continues.
    return Tracker.open(cfg.run_path, cfg.name, params=flatten(dump_config(cfg)), uri=config["tracking_uri"],
                        parent_run_id=config.get("parent_run_id"), tags=config.get("tags"))


def train_loop_per_worker(config: dict) -> None:
    entered = time.time()
    cfg = RunConfig.model_validate(config["cfg"])
    t = cfg.train
    # One progress bar per epoch per worker drowns the per-eval lines; Ray's own reporting stays.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    tokenizer = load_tokenizer(config["tokenizer_dir"])
    model = build_sharded_model(cfg, tokenizer, world, device)
    stages = plan(cfg)
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, stages)
    state = ckpt.TrainerState()
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            # The resumed stage's modules first: DCP creates optimizer state only for what learns.
            set_trainable(model, stage_at(stages, ckpt.saved_step(Path(d))))
            state = ckpt.load(Path(d), model, optimizer, scheduler)
    tracker = _open_tracker(cfg, rank, config)
    nodes = [None] * world  # where the workers landed (placement_strategy), for the record
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    extra: dict[str, float] = {}  # reported with every eval: start-up phases, a sweep's cost
    launched_at = config.get("launched_at", entered)
    # Where the fixed cost goes (seconds since launch): a sweep trial's driver process and
    # Tune set-up, the driver's own preparation (imports, data),
    # the Train controller + worker group + process group (up to our train function), the
    # workers' import of the model code, then model build/shard/resume/MLflow, then the
    # first batch.
    startup = {"startup_driver_s": config.get("driver_ready_at", launched_at) - launched_at,
               "startup_train_fn_s": config.get("train_fn_entered_at", entered) - launched_at,
               "startup_workers_s": entered - launched_at, "startup_model_s": time.time() - launched_at}
    if config.get("driver_entered_at"):  # a sweep trial: its driver process, up to our code
        startup["startup_trial_s"] = config["driver_entered_at"] - launched_at
    if rank == 0:
        print(f"[raybench] {'resuming at step ' + str(state.step) if resumed else 'starting'}: "
              f"{world} workers on {device.type} across {len(set(nodes))} node(s), pid {os.getpid()}", flush=True)
        tracker.client.set_tag(tracker.run_id, "raybench.worker_nodes", ",".join(sorted(set(nodes))))
        shards = [p.to_local().numel() for p in model.parameters()]
        tracker.log_metrics({"params_local": sum(shards), "params_full": sum(p.numel() for p in model.parameters())},
                            step=state.step)
        if resumed:
            tracker.log_metrics({"resumed_from_step": state.step}, step=state.step)

    per_worker = t.batch_size // world
    suppressed = [model.image_token_id, model.pad_token_id]
    val_shard = ray.train.get_dataset_shard("val")
    # Each stage reads its own data (its scenes, or the training set) and counts its own
    # epochs and batches; the stage follows from the step, so a run resumed inside any stage
    # lands on the exact batch it stopped before, with that stage's modules learning.
    every = t.checkpoint_every or t.eval_every
    window = _Window()
    while state.step < t.steps:
        stage = stage_at(stages, state.step)
        set_trainable(model, stage)
        shard = ray.train.get_dataset_shard(stage.dataset)
        for batch in _epoch_batches(shard, per_worker, t.seed, state.epoch, state.batch_in_epoch, device,
                                    cfg.model.num_image_tokens, cfg.data.questions_per_image,
                                    scene=stage.objective == "scene"):
            if not resumed and "startup_s" not in extra:  # launch -> first step: the fixed cost
                extra.update(startup, startup_s=time.time() - launched_at)
                if tracker:
                    tracker.log_metrics({k: v for k, v in extra.items() if k.startswith("startup")},
                                        step=state.step)
            loss = train_step(model, batch, optimizer, scheduler, t.grad_clip)
            state.step += 1
            state.batch_in_epoch += 1
            stage_done = state.step == stage.end and state.step < t.steps
            if stage_done:  # the next stage starts at its own epoch 0, batch 0
                state.epoch, state.batch_in_epoch = 0, 0
                if tracker:
                    print(f"[raybench] step {state.step}: stage {stage.name} done", flush=True)
                    tracker.log_metrics({f"stage_end/{stage.name}": state.step}, step=state.step)
            # Throughput counts every rank's samples and real (unpadded) tokens.
            window.add(loss, per_worker * world, int(batch["attention_mask"].sum()) * world)
            if tracker and state.step % t.log_every == 0:
                tracker.log_metrics({"train_loss": loss, "lr": scheduler.get_last_lr()[0],
                                     "stage": stages.index(stage)}, step=state.step)
            if state.step % every == 0 or state.step == t.steps:
                if config.get("cost_metric") and rank == 0 and config["cost_metric"] not in extra:
                    # A sweep's inference cost, measured once, after the first step (not start-up):
                    # a fresh model of this config (FLOPs don't depend on the weights; see
                    # raybench/cost.py). Tune and MLflow read rank 0's report.
                    from raybench.cost import inference_cost
                    extra[config["cost_metric"]] = inference_cost(cfg.model, config["cost_metric"])
                _checkpoint_and_report(model, optimizer, scheduler, state, val_shard, per_worker, suppressed,
                                       device, tracker, rank, window, t.steps, extra)
                window = _Window()
            if state.step >= t.steps or stage_done:
                break
        else:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    full = ckpt.full_state_dict(model)  # collective: every rank takes part
    if rank == 0:
        out = model.save_pretrained(Path(config["model_dir"]), state_dict=full)
        tokenizer.save_pretrained(out)
        tracker.log_model_dir(out)
        tracker.finish()
        print(f"[raybench] model saved to {out}", flush=True)


class _Window:
    """Training loss and throughput since the last eval (eval time excluded)."""

    def __init__(self):
        self.start, self.samples, self.tokens, self.losses = time.perf_counter(), 0, 0, []

    def add(self, loss: float, samples: int, tokens: int) -> None:
        self.losses.append(loss)
        self.samples += samples
        self.tokens += tokens

    def metrics(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"train_loss": sum(self.losses) / max(len(self.losses), 1),
                "samples_per_s": self.samples / elapsed, "tokens_per_s": self.tokens / elapsed}


def _checkpoint_and_report(model, optimizer, scheduler, state, val_shard, per_worker, suppressed, device,
                           tracker, rank, window: _Window, total_steps, extra: dict) -> None:
    throughput = window.metrics()
    metrics = _evaluate(model, val_shard, per_worker, suppressed, device)
    metrics.update(step=state.step, **throughput, **extra)
    if rank == 0:
        print(format_eval(state.step, total_steps, metrics["train_loss"], metrics, metrics["samples_per_s"]),
              flush=True)
        # Per-step `train_loss` is already logged; the eval window's mean gets its own name.
        tracker.log_metrics({("train_loss_avg" if k == "train_loss" else k): v
                             for k, v in metrics.items() if k != "step"}, step=state.step)
        tracker.flush()
    with tempfile.TemporaryDirectory(prefix="raybench-ckpt-") as tmp:
        ckpt.save(Path(tmp), model, optimizer, scheduler, state, rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
