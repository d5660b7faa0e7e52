"""The training config section (`train:` in a run config), with its stages: which modules
learn, at what learning rate, on which data (`raybench.train.stages` turns them into a plan).

Light (pydantic only) so a config validates without torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raybench.data.config import DESCRIBE, qtype_errors
from raybench.schema import Strict

MODULES = ("vision", "projector", "deepstack", "llm")
Module = Literal["vision", "projector", "deepstack", "llm"]


class StageData(Strict):
    """Synthetic scenes a stage trains on instead of the training set: e.g. 1-object scenes
    first, where "what shape is red?" needs no binding (find the one object, read one
    attribute), or dense captions (`qtypes: [describe]`) to teach the tower what is where."""

    max_objects: int = Field(4, ge=1, le=4)
    num_examples: int = Field(6000, ge=1)
    qtypes: list[str] | None = None  # None: data.qtypes
    # How many of the `describe` scenes hold a letter (None: one in six, as in the question
    # mix). A scene stage that must teach a from-scratch tower 10 glyphs wants more of them.
    letter_share: float | None = Field(None, ge=0, le=1)
    # None: generated into <run_dir>/<stage name>-<max_objects>obj-<num_examples>[...] on first
    # use; a sweep pins every trial to the sweep's own set (like data.path).
    path: str | None = None


class Stage(Strict):
    """One phase of training: which modules learn, at what learning rate, on which data.
    LLaVA's "align, then tune" is two stages: `{train: [projector]}` then everything."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    steps: int | None = Field(None, ge=1)  # None (the last stage only): up to train.steps
    train: list[Module] = Field(default_factory=lambda: list(MODULES))  # the rest are frozen
    # Multiplies train.lr (and its schedule) per module, e.g. {vision: 0.3} for a tower that
    # must not forget what an earlier stage taught it.
    lr_scale: dict[Module, float] = Field(default_factory=dict)
    # This stage's peak learning rate in place of train.lr (the warm-up + cosine shape stays
    # the run's). A sweep over train.lr then leaves this stage alone, so its trials can share
    # it (sweep.share_scene_stages).
    lr: float | None = Field(None, gt=0)
    # A linear ramp of this stage's learning rate over its first N steps (times the run's
    # schedule). Modules that start learning here start with fresh AdamW moments, at the
    # schedule's rate of that step (no warm-up of their own without this).
    warmup_steps: int = Field(0, ge=0)
    data: StageData | None = None  # None: the training set
    # answer: the next-token loss on answers (every other stage). scene: the vision tower
    # learns each quadrant's shape and colour and the background directly, from the stage's
    # own `describe` scenes - a from-scratch tower's stand-in for pretraining (see
    # raybench/model/scene_head.py); the LLM side does not take part.
    objective: Literal["answer", "scene"] = "answer"


class TrainConfig(Strict):
    steps: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(100, ge=1)
    eval_samples: int = Field(512, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0
    compile: bool = False
    # None: one stage, every module learning on the training set. See `Stage`.
    stages: list[Stage] | None = None
    # Ray Train (`raybench train` without --local)
    num_workers: int = Field(2, ge=1)
    # What FSDP2 shards as one unit. block: every ViT block / decoder layer / projector
    # (torchtitan's wrapping: a big model never holds all its parameters at once). root: the
    # whole model is one unit, gathered once per step and kept for backward - for models that
    # fit anyway, where per-block collectives are pure overhead (gloo on CPU pays for each).
    # auto: block on GPU, root on CPU (BENCHMARKS.md "Training" has the measured gap).
    fsdp_wrap: Literal["auto", "block", "root"] = "auto"
    # Fractional on small machines: Ray Data's tasks (read, decode, split) need one whole
    # free CPU next to the workers; 2 x 0.45 (+ a sweep's 0.01 driver) leaves it on 2 cores.
    cpus_per_worker: float = Field(0.45, gt=0)
    # PACK fills a node first (fast collectives); SPREAD puts workers on different nodes.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    checkpoint_every: int | None = Field(None, ge=1)  # None: at every eval
    keep_checkpoints: int = Field(2, ge=1)  # the best by val accuracy, and always the latest
    max_failures: int = Field(2, ge=-1)  # worker-group restarts from the last checkpoint (-1: forever)
    storage_path: str | None = None  # None: <run_dir>/ray; S3/NFS on a multi-node cluster


def stage_qtypes(stage: Stage, data_qtypes: list[str] | None) -> list[str] | None:
    """The question types of a stage's own scenes: its own, else [describe] for a scene stage,
    else the run's data.qtypes (None: every default type)."""
    if stage.data is not None and stage.data.qtypes is not None:
        return stage.data.qtypes
    return [DESCRIBE] if stage.objective == "scene" else data_qtypes


def stage_errors(t: TrainConfig, data_qtypes: list[str] | None) -> list[str]:
    """Constraints on `train.stages`; `data_qtypes` is the run's data.qtypes (a stage's default)."""
    errs: list[str] = []
    stages = t.stages or []
    names = [st.name for st in stages]
    if len(set(names)) != len(names):
        errs.append(f"train.stages = {names}: stage names must be unique (they name checkpoints and data)")
    for i, st in enumerate(stages):
        where, qtypes = f"train.stages.{i}", stage_qtypes(st, data_qtypes)
        if st.steps is None and i != len(stages) - 1:
            errs.append(f"{where}.steps = None: only the last stage may leave its steps open "
                        "(it runs up to train.steps)")
        if not st.train:
            errs.append(f"{where}.train = []: a stage must train at least one module of {', '.join(MODULES)}")
        if st.data is not None:
            if st.data.num_examples < t.batch_size:
                errs.append(f"{where}.data.num_examples = {st.data.num_examples}: fewer than one batch "
                            f"(train.batch_size = {t.batch_size})")
            errs += qtype_errors(f"{where}.data.qtypes", st.data.qtypes)
            if st.data.letter_share is not None and DESCRIBE not in (qtypes or []):
                errs.append(f"{where}.data.letter_share = {st.data.letter_share}: it shapes `describe` "
                            f"scenes, and this stage asks {qtypes}")
        if st.objective == "scene":
            if st.data is None:
                errs.append(f"{where}.data = None: a scene stage reads the targets from its own synthetic "
                            "`describe` scenes; give it data: {num_examples: N}")
            elif qtypes != [DESCRIBE]:
                errs.append(f"{where}.data.qtypes = {st.data.qtypes}: a scene stage needs [describe] (or leave it out)")
            if "vision" not in st.train:
                errs.append(f"{where}.train = {st.train}: a scene stage trains the vision tower; include vision")
        if st.steps is not None and st.warmup_steps > st.steps:
            errs.append(f"{where}.warmup_steps = {st.warmup_steps}: longer than the stage ({st.steps} steps)")
        bad = [m for m, v in st.lr_scale.items() if v < 0]
        if bad:
            errs.append(f"{where}.lr_scale = {st.lr_scale}: {bad} negative; 0 freezes the weights but "
                        "keeps their optimizer state, leave a module out of `train` to freeze it")
    fixed = sum(st.steps or 0 for st in stages)
    if stages and stages[-1].steps is None and fixed >= t.steps:
        errs.append(f"train.stages: the stages before the last take {fixed} steps, not below "
                    f"train.steps = {t.steps}; the last stage would get none")
    if stages and stages[-1].steps is not None and fixed != t.steps:
        errs.append(f"train.stages: the stages' steps add up to {fixed}, train.steps = {t.steps}; make them "
                    "equal, or leave the last stage's steps out (it then runs up to train.steps)")
    return errs
