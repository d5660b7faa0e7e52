"""Staged training: which modules learn, at what learning rate, on which data, step by step.

`train.stages` (see `raybench.train.config.Stage`) is resolved once into a plan of step ranges.
Everything a stage changes is a function of the step: the module freeze, the per-module
learning-rate multiplier (folded into the LR schedule's lambdas) and the data. A run
resumed at any step therefore lands in the same stage with the same settings, and the
local and Ray trainers share this module so they cannot disagree.

Frozen modules are `requires_grad=False`: no gradient, no clip, and AdamW creates no state
for a parameter that never had a gradient (FSDP2 reads the flag at every all-gather, so
this works on sharded models too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from raybench.config import RunConfig
from raybench.train.config import MODULES, Stage, StageData


# All a `scene` stage can change: the tower and its scene head (the LLM side does not run).
SCENE_MODULES = ("vision", "scene_head")


@dataclass(frozen=True)
class PlannedStage:
    name: str
    start: int                      # first step (0-based optimizer steps) of this stage
    end: int                        # one past its last step
    train: frozenset[str]
    lr_scale: dict[str, float] = field(default_factory=dict)
    data: StageData | None = None   # None: the training set
    data_path: Path | None = None
    objective: str = "answer"       # or "scene": the tower's dense scene loss (scene_head.py)
    lr_ratio: float = 1.0           # the stage's own peak lr over train.lr (Stage.lr)
    warmup: int = 0                 # Stage.warmup_steps

    @property
    def dataset(self) -> str:
        """The Ray Dataset / table this stage reads."""
        return f"stage-{self.name}" if self.data is not None else "train"

    def scale(self, module: str, step: int | None = None) -> float:
        """A module's lr multiplier in this stage (at `step`, inside the stage's warm-up)."""
        if module not in self.train:
            return 0.0
        ramp = min(1.0, (step - self.start + 1) / self.warmup) if self.warmup and step is not None else 1.0
        return self.lr_ratio * self.lr_scale.get(module, 1.0) * ramp


def plan(cfg: RunConfig) -> list[PlannedStage]:
    """`train.stages` as step ranges; no stages = one stage, everything learning, the training set."""
    stages = cfg.train.stages or [Stage(name="main")]
    out, start = [], 0
    for st in stages:
        end = start + st.steps if st.steps is not None else cfg.train.steps
        ratio = st.lr / cfg.train.lr if st.lr is not None else 1.0
        out.append(PlannedStage(st.name, start, end, frozenset(st.train), dict(st.lr_scale), st.data,
                                cfg.stage_path(st), st.objective, ratio, st.warmup_steps))
        start = end
    return out


def stage_at(stages: list[PlannedStage], step: int) -> PlannedStage:
    for st in stages:
        if step < st.end:
            return st
    return stages[-1]


def module_of(param_name: str) -> str:
    """HybridVLM's top-level parts are the stage modules (vision, projector, deepstack, llm);
    the scene head learns with the tower it reads."""
    # A whole-model torch.compile wraps it: its parameters are named `_orig_mod.<name>`.
    head = param_name.removeprefix("_orig_mod.").split(".", 1)[0]
    if head == "scene_head":
        return "vision"
    if head not in MODULES:
        raise ValueError(f"parameter {param_name!r} is in no stage module ({', '.join(MODULES)})")
    return head


def set_trainable(model: nn.Module, stage: PlannedStage) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(module_of(name) in stage.train)


def lr_lambdas(optimizer: torch.optim.Optimizer, stages: list[PlannedStage], base):
    """One LambdaLR lambda per param group: the base schedule times the group's module scale
    in the stage of that step."""
    return [lambda step, m=group["module"]: base(step) * stage_at(stages, step).scale(m, step)
            for group in optimizer.param_groups]
