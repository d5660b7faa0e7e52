"""A sweep's leading scene stages, run once and shared by every trial they would not differ in.

A `scene` stage trains only the vision tower (and its scene head) on the tower's own loss; the
LLM side takes no part. What the sweep searches is mostly on that LLM side (VET vocabulary,
DeepStack injections, sparsity, the answer stages' learning rate), so most trials would run
the same tower pretraining - on 2 cores, 600 of the default's 1500 steps. The first trial
that reaches the end of those stages saves the tower's weights and optimizer moments there
(`raybench.train.checkpoint.save_shared`); a later trial with the same key starts from them,
at that step, with its own LLM side at its own initial weights - exactly where it would have
been had it trained the stages itself (tests/unit/test_shared_stage.py).

The key is a hash of every config field that can change those steps: the whole config but
the run's name and directories, the sweep section, the model's LLM side (`model.llm`,
`model.fusion`, which the stage never runs), the evaluation and logging cadence, and the
stages after the shared ones. `train.lr` is left out only when every shared stage sets its
own `lr`. A field missing here would silently share what differs, so the rule is the other
way round: everything counts unless it is listed as not taking part.

Light (no torch, no Ray): the sweep driver, the in-process trainer (`bench seeds` shares the
stage between presets) and tests use it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from raybench.config import RunConfig, dump_config

# Fields the scene stages never read: where the run writes, how often it evaluates or logs.
_NOT_TAKING_PART = {"train": ("eval_every", "eval_samples", "log_every", "checkpoint_every",
                              "keep_checkpoints", "max_failures", "storage_path")}
SHARED_DIR = "shared-stages"


def leading_scene_stages(cfg: RunConfig) -> int:
    """How many stages at the start are `scene` stages (those a sweep can share)."""
    n = 0
    for st in cfg.train.stages or []:
        if st.objective != "scene":
            break
        n += 1
    return n


def stage_key(cfg: RunConfig, n: int) -> str:
    """What the first `n` (scene) stages depend on, hashed."""
    d: dict[str, Any] = dump_config(cfg)
    for field in ("name", "run_dir", "sweep"):
        d.pop(field, None)
    d["model"] = {k: v for k, v in d["model"].items() if k not in ("llm", "fusion", "preset")}
    train = d["train"]
    for field in _NOT_TAKING_PART["train"]:
        train.pop(field, None)
    train["stages"] = train["stages"][:n]
    if all(st["lr"] is not None for st in train["stages"]):
        train.pop("lr")
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def shared_stage(cfg: RunConfig, root: Path) -> dict[str, Any] | None:
    """Where a trial of `cfg` finds (or leaves) its leading scene stages' end state, and the
    step they end at; None when it has none to share."""
    n = leading_scene_stages(cfg)
    if n == 0 or n == len(cfg.train.stages):  # nothing would be left to train after them
        return None
    stages = cfg.train.stages[:n]
    end = sum(st.steps for st in stages)  # only the last stage may leave its steps open
    name = stages[-1].name
    return {"name": name, "end": end, "path": str(Path(root) / SHARED_DIR / f"{name}-{stage_key(cfg, n)}")}
