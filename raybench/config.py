"""The run config: YAML in, clear field errors out.

`load_config(path, overrides)` reads YAML, applies `--set a.b=c` overrides, expands the
model preset/size defaults, and validates everything before any process starts. A bad
value fails with the field path, the value and what is allowed, e.g.

    model.fusion.sparsity.final_keep_ratio = 1.5: must be in (0, 1]

Each section lives beside the code it configures: `raybench.model.config` (model:),
`raybench.data.config` (data:), `raybench.train.config` (train:, with its stages) and
`raybench.tune.config` (sweep:), all on `raybench.schema` (the strict base, YAML loading,
overrides, the error format). This module composes them into `RunConfig`, checks what spans
sections, and re-exports the names callers import from `raybench.config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from raybench.data.config import DataConfig, qtype_errors
from raybench.model.config import (SCHEDULES, TOKENIZE_FUNCTIONS, DeepStackConfig, FusionConfig, LLMConfig,
                                   ModelConfig, QFormerConfig, SparsityConfig, VETConfig, VisionConfig,
                                   expand_model, model_errors)
from raybench.schema import (ConfigError, Strict, apply_overrides, flatten, format_validation_error, load_yaml,
                             parse_override, set_path, validate_as)
from raybench.train.config import MODULES, Module, Stage, StageData, TrainConfig, stage_errors, stage_qtypes
from raybench.tune.config import ASHAConfig, Dimension, SweepConfig, TPEConfig

__all__ = [
    "ASHAConfig", "ConfigError", "DataConfig", "DeepStackConfig", "Dimension", "FusionConfig", "LLMConfig",
    "MODULES", "ModelConfig", "Module", "QFormerConfig", "RunConfig", "SCHEDULES", "SparsityConfig", "Stage",
    "StageData", "SweepConfig", "TOKENIZE_FUNCTIONS", "TPEConfig", "TrainConfig", "VETConfig", "VisionConfig",
    "apply_overrides", "dump_config", "expand_model", "flatten", "format_validation_error", "load_config",
    "load_raw", "parse_override", "set_path", "validate_config",
]


class RunConfig(Strict):
    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")
    run_dir: str | None = None  # None: runs/<name>
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or Path("runs") / self.name)

    @property
    def data_path(self) -> Path:
        return Path(self.data.path) if self.data.path else self.run_path / "data"

    @property
    def image_size(self) -> int:
        return self.data.image_size or self.model.vision.image_size

    def stage_path(self, stage: "Stage") -> Path | None:
        """Where a stage's own scenes are (None: it trains on the training set)."""
        d = stage.data
        if d is None:
            return None
        if d.path:
            return Path(d.path)
        k = self.data.questions_per_image
        name = f"{stage.name}-{d.max_objects}obj-{d.num_examples}" + (f"-{k}q" if k > 1 else "")
        qtypes = self.stage_qtypes(stage)
        if qtypes != self.data.qtypes:  # a set of other question types is another set of scenes
            name += "-" + "+".join(qtypes)
        if d.letter_share is not None:
            name += f"-letters{d.letter_share:g}"
        return self.run_path / name

    def stage_qtypes(self, stage: "Stage") -> list[str] | None:
        """The question types of a stage's own scenes (None: every default type)."""
        return stage_qtypes(stage, self.data.qtypes)


def _cross_field_errors(cfg: RunConfig) -> list[str]:
    """Constraints that span fields; each line: path = value: what is allowed."""
    return (model_errors(cfg.model) + stage_errors(cfg.train, cfg.data.qtypes)
            + qtype_errors("data.qtypes", cfg.data.qtypes))


# A field that moved: say where to, rather than pydantic's "extra inputs are not permitted".
_MOVED = {("data", "curriculum"): (
    "data.curriculum: moved to train.stages; a curriculum is a first stage on its own scenes, e.g. "
    "train.stages: [{name: curriculum, steps: 500, data: {max_objects: 1, num_examples: 6000}}, {name: main}]")}


def _wants_scene_head(raw: dict[str, Any]) -> bool:
    stages = (raw.get("train") or {}).get("stages") or []
    return any(isinstance(st, dict) and st.get("objective") == "scene" for st in stages)


def validate_config(raw: dict[str, Any]) -> RunConfig:
    raw = dict(raw)
    if _wants_scene_head(raw):
        raw = set_path(raw, ["model", "vision", "scene_head"], True)
    for (section, key), msg in _MOVED.items():
        if isinstance(raw.get(section), dict) and key in raw[section]:
            if raw[section][key] is not None:
                raise ConfigError(f"invalid config:\n  {msg}")
            raw[section] = {k: v for k, v in raw[section].items() if k != key}  # null: not asked for
    raw["model"] = expand_model(raw.get("model"))
    cfg = validate_as(RunConfig, raw)
    errs = _cross_field_errors(cfg)
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
    return cfg


def load_raw(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The user's YAML plus overrides, before preset expansion (what a sweep varies)."""
    raw = load_yaml(path) if path is not None else {}
    return apply_overrides(raw, overrides or [])


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    return validate_config(load_raw(path, overrides))


def dump_config(cfg: RunConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
