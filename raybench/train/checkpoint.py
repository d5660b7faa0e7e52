"""Distributed checkpoints (torch.distributed.checkpoint) and the final full-weight export.

Every rank saves its own shards into its own directory; Ray Train merges the per-rank
directories into one persisted checkpoint, which DCP loads back resharded to whatever
world size resumes it. Beside the shards: `trainer_state.json` (step, epoch, position in
the epoch) and the LR scheduler state, written by rank 0.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainerState:
    step: int = 0             # optimizer steps taken
    epoch: int = 0            # current pass over this rank's shard
    batch_in_epoch: int = 0   # batches of that epoch already consumed (resume skips them)


class AppState(Stateful):
    """Model + optimizer in DCP's sharded form (the official Ray FSDP2 example's pattern)."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self):
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict):
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"])


def save(directory: Path, model, optimizer, scheduler, state: TrainerState, rank: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    dcp.save({"app": AppState(model, optimizer)}, checkpoint_id=str(directory))
    if rank == 0:
        (directory / TRAINER_STATE).write_text(json.dumps(
            {**asdict(state), "scheduler": scheduler.state_dict()}))


def load(directory: Path, model, optimizer, scheduler) -> TrainerState:
    dcp.load({"app": AppState(model, optimizer)}, checkpoint_id=str(directory))
    meta = json.loads((directory / TRAINER_STATE).read_text())
    scheduler.load_state_dict(meta.pop("scheduler"))
    return TrainerState(**meta)


class PartialAppState(AppState):
    """Only the parameters of some top-level modules, with their optimizer moments: a sweep's
    shared scene stages (the tower), loaded into trials whose other modules differ in shape
    or exist only there. The param groups stay the loading optimizer's own."""

    def __init__(self, model, optimizer, modules: tuple[str, ...]):
        super().__init__(model, optimizer)
        self.modules = modules

    def _ours(self, fqn: str) -> bool:
        return fqn.removeprefix("_orig_mod.").split(".", 1)[0] in self.modules

    def state_dict(self):
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        self.param_groups = optim_sd["param_groups"]
        return {"model": {k: v for k, v in model_sd.items() if self._ours(k)},
                "optim": {"state": {k: v for k, v in optim_sd["state"].items() if self._ours(k)}}}

    def load_state_dict(self, state_dict):
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict={"state": state_dict["optim"]["state"],
                                         "param_groups": self.param_groups},
                       options=StateDictOptions(strict=False))


SHARED_READY = "shared_stage.json"


def save_shared(directory: Path, model, optimizer, modules: tuple[str, ...], rank: int, meta: dict) -> None:
    """The end state of a sweep's shared stages: `modules`' weights and moments. Every rank
    writes its shards; rank 0 writes `shared_stage.json` last (the caller makes the whole
    directory appear atomically)."""
    directory.mkdir(parents=True, exist_ok=True)
    dcp.save({"app": PartialAppState(model, optimizer, modules)}, checkpoint_id=str(directory))
    if rank == 0:
        (directory / SHARED_READY).write_text(json.dumps({**meta, "modules": list(modules)}))


def load_shared(directory: Path, model, optimizer, scheduler) -> TrainerState:
    """Start a run where `save_shared` left off, in a model whose other modules may differ:
    the shared modules' weights and moments, the LR schedule at that step (from this run's own
    train.lr), the rest at their initial weights."""
    meta = json.loads((directory / SHARED_READY).read_text())
    modules = tuple(meta["modules"])
    for name, p in model.named_parameters():  # DCP creates moments for exactly these, then loads them
        p.requires_grad_(name.removeprefix("_orig_mod.").split(".", 1)[0] in modules)
    dcp.load({"app": PartialAppState(model, optimizer, modules)}, checkpoint_id=str(directory))
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": no step was skipped
        warnings.simplefilter("ignore", UserWarning)
        scheduler.last_epoch = meta["step"] - 1
        scheduler.step()
    return TrainerState(step=meta["step"])


def saved_step(directory: Path) -> int:
    """The step a checkpoint was saved at, without loading it."""
    return json.loads((directory / TRAINER_STATE).read_text())["step"]


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """All-gather the full weights to CPU (a collective: every rank must call it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
