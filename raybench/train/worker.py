"""What each Ray Train worker runs: build, shard (FSDP2), resume, train, evaluate, checkpoint.

The step itself is `raybench.train.loop.train_step`, the same one the single-process
trainer and the `torchrun` baseline use. Only rank 0 talks to MLflow.
"""

from __future__ import annotations

import json
import os
import shutil
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
                                 merge_counts, pack_correct, train_step)
from raybench.train.parallel import (build_mesh, loss_items_per_rank, mixed_precision, parallelize,
                                     resolve_wrap)
from raybench.train.stages import SCENE_MODULES, plan, set_trainable, stage_at


def build_sharded_model(cfg: RunConfig, tokenizer, world_size: int, device: torch.device) -> HybridVLM:
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank, before sharding
    model = HybridVLM.for_tokenizer(cfg.model, tokenizer).to(device)
    return parallelize(model, build_mesh(world_size, device.type), mixed_precision(device.type),
                       compile=cfg.train.compile, wrap=resolve_wrap(cfg.train.fsdp_wrap, device.type))


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


def _evaluate(model, val_shard, per_worker: int, suppressed: list[int], device) -> tuple[dict[str, float], list[bool]]:
    """Val metrics, and each val question's outcome in the split's order (the shards are
    ordered, equal and consecutive: rank 0 holds the first rows)."""
    batches = (to_model_batch(b, device, model.config.num_image_tokens)
               for b in val_shard.iter_torch_batches(batch_size=per_worker, collate_fn=CollateNumpy()))
    counts = evaluate_counts(model, batches, suppressed)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, counts)
    return merge_counts(parts), [c for p in parts for c in p["correct"]]


def _open_tracker(cfg: RunConfig, rank: int, config: dict):
    if rank != 0:
        return None
    from raybench.track import Tracker

    # Re-opened by name after a restart: the same MLflow run continues.
    return Tracker.open(cfg.run_path, cfg.name, params=flatten(dump_config(cfg)), uri=config["tracking_uri"],
                        parent_run_id=config.get("parent_run_id"), tags=config.get("tags"))


def startup_phases(config: dict, entered: float) -> dict[str, float]:
    """Where the fixed cost goes (seconds since launch): a sweep trial's driver process and
    Tune set-up, the driver's own preparation (imports, data), the Train controller + worker
    group + process group (up to our train function), the workers' import of the model code,
    then model build/shard/resume/MLflow (up to now). The first batch adds `startup_s`."""
    launched_at = config.get("launched_at", entered)
    phases = {"startup_driver_s": config.get("driver_ready_at", launched_at) - launched_at,
              "startup_train_fn_s": config.get("train_fn_entered_at", entered) - launched_at,
              "startup_workers_s": entered - launched_at, "startup_model_s": time.time() - launched_at}
    if config.get("driver_entered_at"):  # a sweep trial: its driver process, up to our code
        phases["startup_trial_s"] = config["driver_entered_at"] - launched_at
    return phases


def _resume(model, optimizer, scheduler, stages) -> ckpt.TrainerState | None:
    resumed = ray.train.get_checkpoint()
    if not resumed:
        return None
    with resumed.as_directory() as d:
        # The resumed stage's modules first: DCP creates optimizer state only for what learns.
        set_trainable(model, stage_at(stages, ckpt.saved_step(Path(d))))
        return ckpt.load(Path(d), model, optimizer, scheduler)


def _start_shared(model, optimizer, scheduler, shared: dict | None) -> ckpt.TrainerState | None:
    """A sweep trial whose leading scene stages another trial already ran (see
    raybench/train/shared_stage.py) starts at their end."""
    if not shared:
        return None
    path = Path(shared["path"])
    ready = [(path / ckpt.SHARED_READY).is_file()]
    dist.broadcast_object_list(ready, src=0)  # rank 0's view: every rank loads, or none
    return ckpt.load_shared(path, model, optimizer, scheduler) if ready[0] else None


def _save_shared(run, stage) -> None:
    """The first trial to finish the shared stages leaves their end state for the others. All
    ranks write into a directory of their own, which rank 0 renames into place: a reader sees
    a whole checkpoint or none, and when two trials race the loser's copy is dropped."""
    shared = run.config.get("shared_stage")
    if not shared or stage.end != shared["end"]:
        return
    final = Path(shared["path"])
    ready = [(final / ckpt.SHARED_READY).is_file()]
    dist.broadcast_object_list(ready, src=0)  # rank 0's view: every rank saves, or none
    if ready[0]:  # another trial already left it
        return
    tmp = final.with_name(f".{final.name}.{run.cfg.name}")
    ckpt.save_shared(tmp, run.model, run.optimizer, SCENE_MODULES, run.rank,
                     {"stage": stage.name, "step": stage.end, "trial": run.cfg.name})
    dist.barrier()
    if run.rank == 0:
        try:
            tmp.rename(final)
            print(f"[raybench] step {stage.end}: stages up to {stage.name} saved for the sweep's other "
                  f"trials at {final}", flush=True)
            if run.tracker:
                run.tracker.client.set_tag(run.tracker.run_id, "raybench.shared_stage", f"saved {final}")
        except OSError:  # another trial got there first: theirs is the same state
            shutil.rmtree(tmp, ignore_errors=True)


def _announce(model, tracker, state, resumed: bool, world: int, device) -> None:
    """Rank 0: where the workers landed (placement_strategy) and the model's size, for the record."""
    nodes = [None] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())  # collective: every rank
    if tracker is None:
        return
    print(f"[raybench] {'resuming at step ' + str(state.step) if resumed else 'starting'}: "
          f"{world} workers on {device.type} across {len(set(nodes))} node(s), pid {os.getpid()}", flush=True)
    tracker.client.set_tag(tracker.run_id, "raybench.worker_nodes", ",".join(sorted(set(nodes))))
    shards = [p.to_local().numel() for p in model.parameters()]
    tracker.log_metrics({"params_local": sum(shards), "params_full": sum(p.numel() for p in model.parameters())},
                        step=state.step)
    if resumed:
        tracker.log_metrics({"resumed_from_step": state.step}, step=state.step)


def _export(model, tokenizer, config: dict, tracker) -> None:
    """The trained model as safetensors + tokenizer, uploaded to the run. Called before the
    last report: Tune may stop a trial the moment it sees its last result (ASHA at max_t), and a
    trial that reported its final accuracy must have its model."""
    full = ckpt.full_state_dict(model)  # collective: every rank takes part
    if tracker is not None:
        out = model.save_pretrained(Path(config["model_dir"]), state_dict=full)
        tokenizer.save_pretrained(out)
        tracker.log_model_dir(out)
        print(f"[raybench] model saved to {out}", flush=True)


def _measure_cost(config: dict, cfg: RunConfig, rank: int, extra: dict) -> None:
    """A sweep's inference cost, measured once, after the first step (not start-up): a fresh
    model of this config (FLOPs don't depend on the weights; see raybench/cost.py). Tune and
    MLflow read rank 0's report."""
    key = config.get("cost_metric")
    if key and rank == 0 and key not in extra:
        from raybench.cost import inference_cost

        extra[key] = inference_cost(cfg.model, key)


class _Window:
    """Training loss and throughput of the steps since the last boundary (eval, checkpoint
    and report excluded: a window opens after one boundary and closes before the next)."""

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


class _Run:
    """One worker's training run: its model, optimizer, data shards, state and reports."""

    def __init__(self, config: dict, entered: float):
        self.config, self.cfg = config, RunConfig.model_validate(config["cfg"])
        t = self.t = self.cfg.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
        self.tokenizer = load_tokenizer(config["tokenizer_dir"])
        self.model = build_sharded_model(self.cfg, self.tokenizer, self.world, self.device)
        self.stages = plan(self.cfg)
        self.optimizer = build_optimizer(self.model, t)
        self.scheduler = build_scheduler(self.optimizer, t, self.stages)
        state = _resume(self.model, self.optimizer, self.scheduler, self.stages)
        resumed = state is not None
        self.shared_from = None if resumed else _start_shared(self.model, self.optimizer, self.scheduler,
                                                              config.get("shared_stage"))
        self.state = state or self.shared_from or ckpt.TrainerState()
        self.tracker = _open_tracker(self.cfg, self.rank, config)
        _announce(self.model, self.tracker, self.state, resumed, self.world, self.device)
        if self.shared_from and self.tracker:
            shared = config["shared_stage"]
            print(f"[raybench] step {shared['end']}: starting after the sweep's shared stages (up to "
                  f"{shared['name']}) from {shared['path']}", flush=True)
            self.tracker.client.set_tag(self.tracker.run_id, "raybench.shared_stage", f"loaded {shared['path']}")
        self.launched_at = config.get("launched_at", entered)
        # A fresh run reports its start-up phases with every eval, from its first step on.
        self.startup = None if resumed else startup_phases(config, entered)
        self.extra: dict[str, float] = {}  # reported with every eval: start-up, a sweep's cost
        self.per_worker = t.batch_size // self.world
        self.suppressed = [self.model.image_token_id, self.model.pad_token_id]
        self.val_shard = ray.train.get_dataset_shard("val")
        self.every = t.checkpoint_every or t.eval_every
        self.window, self.exported = _Window(), False

    def batches(self, stage):
        return _epoch_batches(ray.train.get_dataset_shard(stage.dataset), self.per_worker, self.t.seed,
                              self.state.epoch, self.state.batch_in_epoch, self.device,
                              self.cfg.model.num_image_tokens, self.cfg.data.questions_per_image,
                              scene=stage.objective == "scene")

    def first_step(self) -> None:  # launch -> first step: the fixed cost
        self.extra.update(self.startup, startup_s=time.time() - self.launched_at)
        self.startup = None
        if self.tracker:
            self.tracker.log_metrics({k: v for k, v in self.extra.items() if k.startswith("startup")},
                                     step=self.state.step)

    def end_stage(self, stage) -> None:  # the next stage starts at its own epoch 0, batch 0
        self.state.epoch, self.state.batch_in_epoch = 0, 0
        _save_shared(self, stage)
        if self.tracker:
            print(f"[raybench] step {self.state.step}: stage {stage.name} done", flush=True)
            self.tracker.log_metrics({f"stage_end/{stage.name}": self.state.step}, step=self.state.step)

    def log_step(self, loss: float, batch, stage) -> None:
        # Throughput counts every rank's samples and real (unpadded) tokens.
        self.window.add(loss, self.per_worker * self.world, int(batch["attention_mask"].sum()) * self.world)
        if self.tracker and self.state.step % self.t.log_every == 0:
            self.tracker.log_metrics({"train_loss": loss, "lr": self.scheduler.get_last_lr()[0],
                                      "stage": self.stages.index(stage)}, step=self.state.step)

    def export(self) -> None:
        _export(self.model, self.tokenizer, self.config, self.tracker)
        self.exported = True

    def record_eval(self, metrics: dict, correct: list[bool]) -> None:
        """Rank 0 appends every eval to <run_dir>/logs/evals.jsonl, with each val question's
        outcome (`correct`, hex: `raybench.train.loop.unpack_correct`): learning curves as data,
        per question (`raybench bench curves` reads them). A resumed run appends again from
        its checkpoint's step; readers keep the last record of each step."""
        logs = self.cfg.run_path / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        stage = stage_at(self.stages, self.state.step - 1).name
        record = {**metrics, "stage": stage, "n": len(correct), "correct": pack_correct(correct)}
        with (logs / "evals.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def checkpoint_and_report(self) -> None:
        # The window holds training steps only: it closes before this boundary's work (cost,
        # export, eval, checkpoint, report) and the next one opens after it. `eval_s` times the
        # part before the report (cost, export, eval); the checkpoint and report come after it.
        throughput, started = self.window.metrics(), time.perf_counter()
        _measure_cost(self.config, self.cfg, self.rank, self.extra)
        if self.state.step == self.t.steps:
            self.export()
        metrics, correct = _evaluate(self.model, self.val_shard, self.per_worker, self.suppressed, self.device)
        metrics.update(step=self.state.step, **throughput, **self.extra, eval_s=time.perf_counter() - started)
        if self.rank == 0:
            self.record_eval(metrics, correct)
        if self.tracker:
            print(format_eval(self.state.step, self.t.steps, metrics["train_loss"], metrics,
                              metrics["samples_per_s"]), flush=True)
            # Per-step `train_loss` is already logged; the eval window's mean gets its own name.
            self.tracker.log_metrics({("train_loss_avg" if k == "train_loss" else k): v
                                      for k, v in metrics.items() if k != "step"}, step=self.state.step)
            self.tracker.flush()
        with tempfile.TemporaryDirectory(prefix="raybench-ckpt-") as tmp:
            ckpt.save(Path(tmp), self.model, self.optimizer, self.scheduler, self.state, self.rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        self.window = _Window()


def train_loop_per_worker(config: dict) -> None:
    entered = time.time()
    # One progress bar per epoch per worker drowns the per-eval lines; Ray's own reporting stays.
    ray.data.DataContext.get_current().enable_progress_bars = False
    run = _Run(config, entered)
    state, steps = run.state, run.t.steps
    # Each stage reads its own data (its scenes, or the training set) and counts its own
    # epochs and batches; the stage follows from the step, so a run resumed inside any stage
    # lands on the exact batch it stopped before, with that stage's modules learning.
    while state.step < steps:
        stage = stage_at(run.stages, state.step)
        set_trainable(run.model, stage)
        for batch in run.batches(stage):
            if run.startup is not None:
                run.first_step()
            loss = train_step(run.model, batch, run.optimizer, run.scheduler, run.t.grad_clip,
                              loss_items_per_rank(batch))
            state.step, state.batch_in_epoch = state.step + 1, state.batch_in_epoch + 1
            stage_done = state.step == stage.end and state.step < steps
            if stage_done:
                run.end_stage(stage)
            run.log_step(loss, batch, stage)
            if state.step % run.every == 0 or state.step == steps:
                run.checkpoint_and_report()  # at the last step: exports the model first
            if state.step >= steps or stage_done:
                break
        else:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    if not run.exported:  # resumed from the last step's checkpoint: nothing was left to train
        run.export()
    if run.tracker:
        run.tracker.finish()
