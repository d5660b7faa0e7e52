"""The sweep's search space: config field paths -> Optuna distributions.

A dimension names a config field by its dotted path (`model.fusion.vet.vocab_size`) and
a distribution over it. A trial's config is the user's raw YAML with the sampled values
set on top, expanded and validated exactly like `raybench train` would (so sweeping
`model.preset` re-applies that preset's defaults).

`validate_space` runs before Ray starts: every dimension must name a real model/train
field, have a sane range, and every value at its edges (each choice, `low`, `high`) must
give a valid config - an injection count past the LLM's layers or an unknown schedule
fails here, in a second, with the field, the value and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

from raybench.config import ConfigError, RunConfig, dump_config, flatten, set_path, validate_config
from raybench.tune.config import Dimension

SWEEPABLE = ("model.", "train.")
NOT_SWEEPABLE = {"model.size", "train.num_workers", "train.storage_path", "train.steps", "train.eval_every",
                 "train.checkpoint_every"}  # shape the trial or its ASHA rungs, not the model
_CHOICE_TYPES = (str, int, float, bool, type(None))

# Shorthands the issue tracker and users speak in.
ALIASES = {
    "vet_vocab_size": "model.fusion.vet.vocab_size",
    "num_injections": "model.fusion.deepstack.num_injections",
    "sparsity_schedule": "model.fusion.sparsity.schedule",
    "final_keep_ratio": "model.fusion.sparsity.final_keep_ratio",
    "lr": "train.lr",
    "preset": "model.preset",
}


def canonical(path: str) -> str:
    return ALIASES.get(path, path)


def trial_raw(raw: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    for path, value in params.items():
        raw = set_path(raw, canonical(path).split("."), value)
    return raw


def _edge_values(dim: Dimension) -> list[tuple[str, Any]]:
    if dim.type == "choice":
        return [(f"values[{i}]", v) for i, v in enumerate(dim.values or [])]
    cast = int if dim.type in ("int", "logint") else float
    return [("low", cast(dim.low)), ("high", cast(dim.high))]


def _shape_errors(where: str, dim: Dimension) -> list[str]:
    if dim.type == "choice":
        if not dim.values:
            return [f"{where}.values = {dim.values!r}: a choice needs at least one value"]
        bad = [v for v in dim.values if not isinstance(v, _CHOICE_TYPES)]
        if bad:
            return [f"{where}.values = {dim.values!r}: choices must be strings, numbers, booleans or null"]
        return []
    if dim.low is None or dim.high is None:
        return [f"{where} = {{low: {dim.low}, high: {dim.high}}}: a {dim.type} range needs low and high"]
    errs = []
    if not dim.low < dim.high:
        errs.append(f"{where} = {{low: {dim.low}, high: {dim.high}}}: needs low < high")
    if dim.type in ("loguniform", "logint") and dim.low <= 0:
        errs.append(f"{where}.low = {dim.low}: a log range needs low > 0")
    if dim.type in ("int", "logint") and (dim.low != math.floor(dim.low) or dim.high != math.floor(dim.high)):
        errs.append(f"{where} = {{low: {dim.low}, high: {dim.high}}}: an int range needs integer bounds")
    return errs


MAX_GRID_POINTS = 256  # per int dimension, and in all: a bigger grid is a typo, not a plan


def grid_values(dim: Dimension) -> list[Any]:
    """The values a grid search takes for one dimension: every choice, every integer."""
    if dim.type == "choice":
        return list(dim.values or [])
    if dim.type in ("int", "logint"):
        return list(range(int(dim.low), int(dim.high) + 1))
    raise ValueError(f"a {dim.type} range has no grid; use a choice of values")


def _grid_errors(cfg: RunConfig) -> list[str]:
    errs, points = [], 1
    for path, dim in cfg.sweep.space.items():
        where = f"sweep.space[{path!r}]"
        if dim.type in ("uniform", "loguniform"):
            errs.append(f"{where}: sweep.search = grid needs choice or int dimensions, not {dim.type} "
                        f"(e.g. {{type: choice, values: [{dim.low}, {dim.high}]}})")
            continue
        n = len(grid_values(dim)) if not _shape_errors(where, dim) else 1
        if n > MAX_GRID_POINTS:
            errs.append(f"{where}: {n} grid values; at most {MAX_GRID_POINTS} (use a choice)")
        points *= n
    if not errs and points > MAX_GRID_POINTS:
        errs.append(f"sweep.space: the grid has {points} points; at most {MAX_GRID_POINTS}")
    return errs


def _first_reason(err: ConfigError) -> str:
    return str(err).removeprefix("invalid config:").strip().splitlines()[0].strip()


def _outside(dim: Dimension, value: Any) -> str | None:
    """Why `value` is not a point of `dim`, or None when it is."""
    if dim.type == "choice":
        return None if value in (dim.values or []) else f"not one of {dim.values}"
    if dim.type in ("int", "logint") and (isinstance(value, bool) or not isinstance(value, int)):
        return "not an integer"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "not a number"
    return None if dim.low <= value <= dim.high else f"outside [{dim.low}, {dim.high}]"


def resolve_points(cfg: RunConfig) -> list[dict[str, Any]]:
    """`sweep.points_to_evaluate` as full Optuna params (canonical keys, every dimension):
    what a point leaves out is the config's own value."""
    fields = flatten(dump_config(cfg))
    out = []
    for point in cfg.sweep.points_to_evaluate:
        given = {canonical(k): v for k, v in point.items()}
        full = {}
        for path, dim in cfg.sweep.space.items():
            key = canonical(path)
            value = given.get(key, fields.get(key))
            full[key] = float(value) if dim.type in ("uniform", "loguniform") and isinstance(value, int) else value
        out.append(full)
    return out


def _point_errors(raw: dict[str, Any], cfg: RunConfig) -> list[str]:
    s = cfg.sweep
    if s.points_to_evaluate and s.search == "grid":
        return ["sweep.points_to_evaluate: a grid search already runs every point; drop it or use "
                "sweep.search = optuna"]
    errs = []
    dims = {canonical(p): d for p, d in s.space.items()}
    for i, (point, full) in enumerate(zip(s.points_to_evaluate, resolve_points(cfg))):
        where = f"sweep.points_to_evaluate[{i}]"
        unknown = [k for k in point if canonical(k) not in dims]
        if unknown:
            errs.append(f"{where}: {unknown} not in sweep.space (a point sets space dimensions only)")
            continue
        given = {canonical(k) for k in point}
        bad = [(k, v, why) for k, v in full.items() if (why := _outside(dims[k], v))]
        for key, value, why in bad:
            source = "" if key in given else " (this config's own value; give one in the point)"
            errs.append(f"{where}[{key!r}] = {value!r}: {why}{source}")
        if not bad:
            try:
                validate_config(trial_raw(raw, full))
            except ConfigError as err:
                errs.append(f"{where}: gives an invalid config: {_first_reason(err)}")
    return errs


def validate_space(raw: dict[str, Any], cfg: RunConfig) -> None:
    """Raise `ConfigError` naming every bad dimension and point (see the module docstring)."""
    fields = flatten(dump_config(cfg))
    errs: list[str] = _grid_errors(cfg) if cfg.sweep.search == "grid" else []
    for path, dim in cfg.sweep.space.items():
        where = f"sweep.space[{path!r}]"
        field = canonical(path)
        if not field.startswith(SWEEPABLE) or field in NOT_SWEEPABLE or field not in fields:
            errs.append(f"{where}: not a sweepable field; use a model.* or train.* path from "
                        f"`raybench validate` (or one of {', '.join(ALIASES)})")
            continue
        shape = _shape_errors(where, dim)
        if shape:
            errs.extend(shape)
            continue
        for edge, value in _edge_values(dim):
            try:
                validate_config(set_path(raw, field.split("."), value))
            except ConfigError as err:
                errs.append(f"{where}.{edge} = {value!r}: gives an invalid config: {_first_reason(err)}")
    if len({canonical(p) for p in cfg.sweep.space}) != len(cfg.sweep.space):
        errs.append("sweep.space: a field is listed twice (under its path and an alias)")
    if not errs:  # points are checked against a sound space
        errs = _point_errors(raw, cfg)
    if errs:
        raise ConfigError("invalid sweep:\n  " + "\n  ".join(errs))


def grid_space(space: dict[str, Dimension]) -> dict[str, Any]:
    """Dimensions -> Tune `grid_search` param space, keyed like `optuna_space`."""
    from ray import tune

    return {canonical(path): tune.grid_search(grid_values(dim)) for path, dim in space.items()}


def optuna_space(space: dict[str, Dimension]) -> dict[str, Any]:
    """Dimensions -> Optuna distributions, keyed by canonical field path."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for path, dim in space.items():
        key = canonical(path)
        if dim.type == "choice":
            out[key] = CategoricalDistribution(list(dim.values))
        elif dim.type in ("uniform", "loguniform"):
            out[key] = FloatDistribution(dim.low, dim.high, log=dim.type == "loguniform")
        else:
            out[key] = IntDistribution(int(dim.low), int(dim.high), log=dim.type == "logint")
    return out
