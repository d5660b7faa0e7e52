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

import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

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
    "URI", "apply_overrides", "dump_config", "expand_model", "flatten", "format_validation_error", "load_config",
    "load_raw", "local_or_uri", "parse_override", "set_path", "uri_scheme", "validate_config",
]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def uri_scheme(location: object) -> str | None:
    """`s3` for `s3://bucket/x`, `file` for `file:///abs`; None for a local path (a `Path`, or
    a string without `scheme://`)."""
    m = _SCHEME.match(location) if isinstance(location, str) else None
    return m.group(1).lower() if m else None


class URI(str):
    """A location on a filesystem other than the local one (`s3://bucket/prefix`,
    `gs://bucket/x`, ...), kept as the string itself: `pathlib.Path` would make it
    `s3:/bucket/prefix`. `pyarrow.fs` and Ray Data read it (`raybench.data.loader`).
    `resolve()` and `expanduser()` return it unchanged, so code that makes a local path
    absolute (`str(cfg.data_path.resolve())`) passes a URI through as it is."""

    def resolve(self, strict: bool = False) -> "URI":
        return self

    def expanduser(self) -> "URI":
        return self


def _file_uri_error(location: str) -> str | None:
    """What is wrong with a `file://` URI (None: nothing), e.g. a host: `file://data/x` is
    host `data`, not the relative path `data/x`."""
    parts = urlsplit(location)
    if parts.netloc not in ("", "localhost"):
        return (f"a file:// URI names a path on this machine: file:///abs/path (three slashes), "
                f"not host {parts.netloc!r}")
    if parts.query or parts.fragment:
        return "a file:// URI takes no ?query or #fragment"
    return None


def local_or_uri(location: str) -> Path | URI:
    """A config's location as what reads it: a `Path` for a local path and for `file://`
    (it is local: `file:///data/x` -> `/data/x`), a `URI` (the string) for any other scheme."""
    scheme = uri_scheme(location)
    if scheme is None:
        return Path(location)
    if scheme == "file":
        err = _file_uri_error(location)
        if err:
            raise ConfigError(f"{location}: {err}")
        return Path(unquote(urlsplit(location).path))
    return URI(location)


class RunConfig(Strict):
    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")
    # None: runs/<name>. Local (a path or file:///abs): it holds the MLflow sqlite store, the
    # tokenizer and logs; checkpoints go to shared storage with train.storage_path: s3://...
    run_dir: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @property
    def run_path(self) -> Path:
        return local_or_uri(self.run_dir) if self.run_dir else Path("runs") / self.name

    @property
    def data_path(self) -> Path | URI:
        """The dataset: a `Path` when local (`file://` included), else the `URI` itself."""
        if self.data.path:
            return local_or_uri(self.data.path)
        # Another mix's scenes in the same run_dir render beside, never in place of, these.
        return self.run_path / ("data" if self.data.mix == "default" else f"data-{self.data.mix}")

    @property
    def image_size(self) -> int:
        return self.data.image_size or self.model.vision.image_size

    def stage_path(self, stage: "Stage") -> Path | URI | None:
        """Where a stage's own scenes are (None: it trains on the training set); a `URI` for
        a `data.path` on another filesystem, as `data_path`."""
        d = stage.data
        if d is None:
            return None
        if d.path:
            return local_or_uri(d.path)
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


def mix_errors(cfg: RunConfig) -> list[str]:
    """The `detail` mix's scenes come only as the training set: a stage's own scenes are the
    default mix's, which a scene stage (the tower's pretraining) wants and an answer stage would not."""
    if cfg.data.mix == "default":
        return []
    return [f"train.stages.{i}.data: an answer stage's own scenes would be the default mix's, not data.mix = "
            f"{cfg.data.mix!r}; train it on the training set (leave data out)"
            for i, st in enumerate(cfg.train.stages or []) if st.data is not None and st.objective != "scene"]


def location_errors(cfg: RunConfig) -> list[str]:
    """`run_dir` must be local; a `file://` location must name a path on this machine."""
    errs = []
    places = [("run_dir", cfg.run_dir), ("data.path", cfg.data.path)] + [
        (f"train.stages.{i}.data.path", st.data.path) for i, st in enumerate(cfg.train.stages or [])
        if st.data is not None]
    for where, location in places:
        scheme = uri_scheme(location)
        if scheme == "file":
            err = _file_uri_error(location)
            if err:
                errs.append(f"{where} = {location!r}: {err}")
        elif scheme is not None and where == "run_dir":
            errs.append(f"run_dir = {location!r}: must be a local directory (a path or file:///abs/path): "
                        "it holds the MLflow sqlite store, the tokenizer and logs; put checkpoints on "
                        f"shared storage with train.storage_path: {scheme}://... instead")
    return errs


def _cross_field_errors(cfg: RunConfig) -> list[str]:
    """Constraints that span fields; each line: path = value: what is allowed."""
    return (location_errors(cfg) + model_errors(cfg.model) + stage_errors(cfg.train, cfg.data.qtypes)
            + qtype_errors("data.qtypes", cfg.data.qtypes, cfg.data.mix) + mix_errors(cfg))


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
