"""What every raybench config is built on: the strict pydantic base, YAML loading, `--set`
overrides and the error format.

The run config (`raybench.config`, its sections beside the code they configure) and the
serving config (`raybench.serve.config`) share this module, so both read files, take
overrides and report a bad field the same way:

    model.fusion.sparsity.final_keep_ratio = 1.5: must be in (0, 1]

Imports only pydantic and PyYAML: every config section builds on it, and configs validate
before anything heavy loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A config that cannot run; the message names every bad field."""


class Strict(BaseModel):
    # Unknown keys are typos until proven otherwise.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


M = TypeVar("M", bound=BaseModel)


def format_validation_error(err: ValidationError, what: str = "config") -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        lines.append(f"{path} = {e.get('input')!r}: {e['msg']}")
    return f"invalid {what}:\n  " + "\n  ".join(lines)


def validate_as(cls: type[M], raw: dict[str, Any], what: str = "config") -> M:
    """`cls.model_validate(raw)`, with pydantic's errors turned into one ConfigError."""
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, what)) from None


def load_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file reads as {})."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (['a', 'b'], c) with c parsed as YAML, so `x=3`, `x=[1,2]`, `x=null` work."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):
        try:  # PyYAML reads `1e-3` (no dot) as a string; users mean a number
            parsed = float(parsed)
        except ValueError:
            pass
    return key.strip().split("."), parsed


def set_path(raw: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """A copy of `raw` with raw[path[0]]...[path[-1]] = value; the dicts and lists on the
    path are copied, so the input is never mutated. A numeric part indexes a list that is
    already there (`train.stages.0.steps`)."""
    raw = dict(raw)
    node: Any = raw
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{'.'.join(path)}: no item {part} in {'.'.join(path[:i])} "
                                  f"(a list of {len(node)})")
            part = int(part)
        if last:
            node[part] = value
            break
        child = node[part] if isinstance(node, list) else node.get(part)
        child = dict(child) if isinstance(child, dict) else list(child) if isinstance(child, list) else {}
        node[part] = child
        node = child
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        raw = set_path(raw, *parse_override(item))
    return dict(raw)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: for MLflow params and sweep spaces. A list of sections
    (`train.stages`) flattens by index, `train.stages.0.steps`, as `--set` and sweeps name it;
    a list of values (`stage_layers`) stays one value."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out.update(flatten({str(i): x for i, x in enumerate(v)}, key + "."))
        else:
            out[key] = v
    return out
