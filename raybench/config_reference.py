"""The config reference (docs/configs.md), generated from the pydantic schemas.

Every field of every section reachable from a root config class gets one table row: its
type, default and allowed range read from the schema, and what it is read from the code:
the comment beside the field (the lines right above it and the one at the end of its line),
else `DESCRIPTIONS` below for the fields whose name says most of it. A field with neither has
no words, and `tests/unit/test_docs_configs.py` fails naming it, as it fails when the
committed page differs from what this module renders (`python scripts/config_reference.py`
rewrites it).

Base layer: the root classes are passed in (scripts/config_reference.py passes the run
config and the serving config), so nothing here imports the code a config configures.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from raybench.model.config import ModelConfig, expand_model
from raybench.model.presets import PRESETS, SIZES
from raybench.schema import flatten

# What a field is, for the fields that carry no comment in the code: "Class.field" -> text.
# A comment in the code wins; a field that gains one must leave this table (the test says so).
DESCRIPTIONS: dict[str, str] = {
    "RunConfig.name": "The run's name: `runs/<name>` holds everything it writes, and MLflow and Tune name "
                      "their runs after it.",
    "RunConfig.model": "The model: vision tower, LLM and fusion families.",
    "RunConfig.data": "The training and validation data.",
    "RunConfig.train": "Training: optimiser, schedule, stages, Ray Train workers, checkpoints.",
    "RunConfig.sweep": "The architecture search (`raybench sweep`, `raybench pipeline`).",
    "ModelConfig.preset": "The fusion family; sets the `fusion` toggles (table below).",
    "ModelConfig.size": "The architecture and each family's per-size defaults (table below).",
    "ModelConfig.vision": "The vision tower.",
    "ModelConfig.llm": "The decoder-only LLM.",
    "ModelConfig.fusion": "How the image reaches the LLM.",
    "VisionConfig.image_size": "Input image side in pixels; the synthetic data is rendered at this size "
                               "unless `data.image_size` says otherwise.",
    "VisionConfig.patch_size": "Patch side in pixels: the ViT sees (image_size / patch_size)^2 patches.",
    "VisionConfig.hidden_size": "ViT width.",
    "VisionConfig.num_layers": "ViT blocks.",
    "VisionConfig.num_heads": "ViT attention heads (must divide hidden_size).",
    "VisionConfig.intermediate_size": "ViT MLP width.",
    "LLMConfig.arch": "Decoder architecture (transformers `Qwen3ForCausalLM` or `LlamaForCausalLM`).",
    "LLMConfig.hidden_size": "LLM width.",
    "LLMConfig.num_layers": "Decoder layers.",
    "LLMConfig.num_heads": "Attention (query) heads.",
    "LLMConfig.num_kv_heads": "Key/value heads (grouped-query attention; must divide num_heads).",
    "LLMConfig.intermediate_size": "LLM MLP width.",
    "LLMConfig.rope_theta": "RoPE base.",
    "LLMConfig.max_position_embeddings": "Longest sequence (prompt + image tokens + answer) the LLM takes.",
    "LLMConfig.pretrained_path": "A local transformers checkpoint directory (nothing is fetched from a hub).",
    "VETConfig.vocab_size": "Rows of the Visual Embedding Table (the visual vocabulary), indicator rows included.",
    "VETConfig.tokenize_function": "How the visual head's logits become probabilities over the table: softmax, "
                                   "or a hard one-hot (Gumbel or straight-through argmax) with soft gradients.",
    "VETConfig.tau": "Temperature of the visual head's softmax / Gumbel sampling.",
    "QFormerConfig.num_queries": "Learned queries = visual tokens the LLM receives.",
    "QFormerConfig.num_layers": "Q-Former cross-attention layers.",
    "QFormerConfig.num_heads": "Q-Former attention heads.",
    "DeepStackConfig.num_injections": "ViT taps, each merged and added at the visual positions after LLM "
                                      "layers 0..K-1 (0: no DeepStack).",
    "SparsityConfig.enabled": "Prune visual tokens progressively (PyramidDrop-style).",
    "SparsityConfig.schedule": "How many image tokens survive each stage on the way to final_keep_ratio.",
    "SparsityConfig.final_keep_ratio": "Share of the image tokens left after the last stage.",
    "FusionConfig.projector": "ViT patches -> LLM space: a 2x2 patch-merger MLP (LLaVA), the Visual Embedding "
                              "Table (Ovis) or a Q-Former (BLIP-2).",
    "FusionConfig.spatial_merge_size": "Patches merged per side into one visual token (mlp and vet).",
    "FusionConfig.vet": "Visual Embedding Table settings (projector vet).",
    "FusionConfig.qformer": "Q-Former settings (projector qformer).",
    "FusionConfig.deepstack": "DeepStack injections.",
    "FusionConfig.sparsity": "Dense->sparse pruning of visual tokens.",
    "DataConfig.num_train": "Synthetic training rows (questions, not images).",
    "DataConfig.num_val": "Synthetic validation rows (one question per image).",
    "DataConfig.seed": "Seed of the synthetic data: the same seed renders byte-identical images.",
    "DataConfig.tokenizer_vocab_size": "Vocabulary of the tokenizer trained offline on the data's text.",
    "StageData.max_objects": "At most this many things per scene (1: no question needs binding).",
    "StageData.num_examples": "Rows of the stage's own scenes.",
    "Stage.name": "Names the stage's scenes directory, its checkpoints and MLflow's `stage_end/<name>`.",
    "TrainConfig.steps": "Optimizer steps of the whole run (every stage together).",
    "TrainConfig.batch_size": "Rows per step (global, over all workers).",
    "TrainConfig.lr": "Peak learning rate (AdamW), after a linear warm-up, then cosine.",
    "TrainConfig.min_lr_ratio": "The cosine ends at lr x this.",
    "TrainConfig.warmup_steps": "Linear warm-up steps.",
    "TrainConfig.weight_decay": "AdamW weight decay.",
    "TrainConfig.grad_clip": "Gradient-norm clip.",
    "TrainConfig.eval_every": "Steps between evaluations (and checkpoints; ASHA's rungs count these).",
    "TrainConfig.eval_samples": "Validation rows each evaluation scores.",
    "TrainConfig.log_every": "Steps between logged training metrics.",
    "TrainConfig.seed": "Seed of initialisation and shuffling.",
    "TrainConfig.compile": "`torch.compile` the model's blocks for training.",
    "Dimension.type": "The distribution.",
    "Dimension.values": "choice: the values to choose from.",
    "Dimension.low": "uniform / loguniform / int / logint: the lowest value.",
    "Dimension.high": "uniform / loguniform / int / logint: the highest value.",
    "ASHAConfig.reduction_factor": "ASHA keeps 1 / reduction_factor of the trials at each rung.",
    "SweepConfig.objective": "accuracy: maximise validation accuracy; pareto: accuracy x sweep.cost_metric.",
    "SweepConfig.asha": "ASHA's rungs (scheduler asha).",
    "SweepConfig.tpe": "Optuna TPE settings (search optuna).",
    "SweepConfig.seed": "Seed of the searcher.",
    "SweepConfig.registered_model": "MLflow registered-model name the champion is registered under.",
    "SweepConfig.alias": "MLflow alias the champion gets (`models:/<registered_model>@<alias>`).",
    "SweepConfig.space": "Config field path (or alias) -> its distribution.",
    "AutoscalingConfig.min_replicas": "Fewest replicas.",
    "AutoscalingConfig.max_replicas": "Most replicas.",
    "AutoscalingConfig.initial_replicas": "Replicas at start (Serve's default when null).",
    "AutoscalingConfig.target_ongoing_requests": "Ongoing requests per replica Serve scales towards.",
    "AutoscalingConfig.upscale_delay_s": "Seconds above target before Serve adds a replica.",
    "AutoscalingConfig.downscale_delay_s": "Seconds below target before Serve removes a replica.",
    "DeploymentConfig.num_cpus": "CPUs per replica (`ray_actor_options.num_cpus`).",
    "DeploymentConfig.num_gpus": "GPUs per replica (`ray_actor_options.num_gpus`).",
    "DeploymentConfig.max_ongoing_requests": "Requests one replica holds at once (Serve's option).",
    "DeploymentConfig.autoscaling_config": "Scale with load instead of a fixed num_replicas.",
    "StageConfig.max_batch_size": "Most requests in one batch of this stage.",
    "LimitsConfig.max_body_bytes": "Largest request body (413 beyond).",
    "LimitsConfig.max_image_bytes": "Largest decoded image.",
    "LimitsConfig.default_max_tokens": "max_tokens of a request that asks for none.",
    "LimitsConfig.max_prompt_chars": "Longest question text.",
    "LimitsConfig.max_messages": "Most chat messages in one request.",
    "ServeConfig.served_model_name": "The model name `/v1/models` lists and answers carry.",
    "ServeConfig.route_prefix": "URL prefix of the application (starts with /).",
    "ServeConfig.host": "HTTP host.",
    "ServeConfig.port": "HTTP port.",
    "ServeConfig.retry_timeout_s": "Seconds all the retries of one request may take (see retries).",
    "ServeConfig.ingress": "The FastAPI ingress deployment.",
    "ServeConfig.vision": "VisionStage: pixels -> ViT taps.",
    "ServeConfig.projection": "ProjectionStage: VET / mergers -> LLM-space embeddings.",
    "ServeConfig.llm": "LLMStage: prefill with injection and pruning, then decode.",
    "ServeConfig.limits": "What one request may ask for.",
}

_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="),
           ("max_length", "length <="), ("pattern", ""))


@dataclass
class Section:
    """One config class and the field paths it appears at (`train.stages.<i>`, ...)."""
    cls: type[BaseModel]
    paths: list[str] = field(default_factory=list)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _comment_lines(src: str) -> dict[int, tuple[str, bool]]:
    """line -> (comment text, whether the line holds nothing else)."""
    lines = src.splitlines()
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            out[row] = (tok.string.lstrip("#").strip(), lines[row - 1].strip().startswith("#"))
    return out


def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field a class body declares: the comment-only lines right above
    it and the comment at the end of its own line(s), joined."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = _comment_lines(src)
    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 1
        while row in comments and comments[row][1]:
            above.insert(0, comments[row][0])
            row -= 1
        trailing = [comments[r][0] for r in range(node.lineno, node.end_lineno + 1)
                    if r in comments and not comments[r][1]]
        text = " ".join(above + trailing).strip()
        if text:
            out[node.target.id] = text
    return out


def _owner(cls: type[BaseModel], name: str) -> type:
    """The class in the MRO whose body declares the field (StageConfig inherits num_cpus)."""
    return next(c for c in cls.__mro__ if name in c.__dict__.get("__annotations__", {}))


def describe(cls: type[BaseModel], name: str) -> str:
    """What a field is: its comment in the code, else its DESCRIPTIONS entry, else ''."""
    owner = _owner(cls, name)
    return field_comments(owner).get(name) or DESCRIPTIONS.get(f"{owner.__name__}.{name}", "")


def _nested(annotation: Any) -> list[tuple[type[BaseModel], str]]:
    """(config class, path suffix) for a field that holds sections: itself, `.<i>`, `.<key>`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, "")]
    if origin in (typing.Union, types.UnionType):
        return [n for a in args for n in _nested(a)]
    if origin is list and args:
        return [(c, ".<i>" + s) for c, s in _nested(args[0])]
    if origin is dict and len(args) == 2:
        return [(c, ".<key>" + s) for c, s in _nested(args[1])]
    return []


def sections(root: type[BaseModel]) -> list[Section]:
    """Every config class reachable from `root`, in field order, each with all its paths."""
    found: dict[type, Section] = {}

    def walk(cls: type[BaseModel], path: str) -> None:
        section = found.setdefault(cls, Section(cls))
        section.paths.append(path)
        for name, info in cls.model_fields.items():
            for sub, suffix in _nested(info.annotation):
                walk(sub, f"{path}.{name}{suffix}".lstrip("."))

    walk(root, "")
    return list(found.values())


def type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (", or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"map of {type_name(args[0])} to {type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return "any" if annotation is Any else getattr(annotation, "__name__", str(annotation))


def _changed(value: BaseModel) -> dict[str, Any]:
    """The fields a section's default differs in from its class's own defaults."""
    try:
        plain = type(value)().model_dump(mode="json")
    except Exception:  # noqa: BLE001 - a class with required fields has no plain default
        return value.model_dump(mode="json")
    return {k: v for k, v in value.model_dump(mode="json").items() if plain.get(k) != v}


def default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        changed = _changed(value)
        return "its section's defaults" + ("" if not changed else ", with " + ", ".join(
            f"`{k}: {json.dumps(v)}`" for k, v in changed.items()))
    return f"`{json.dumps(value)}`"


def allowed_text(info: FieldInfo) -> str:
    out = []
    for meta in info.metadata:
        for attr, sym in _BOUNDS:
            bound = getattr(meta, attr, None)
            if bound is not None:
                out.append(f"matches `{bound}`" if attr == "pattern" else f"{sym} {bound}")
    return ", ".join(out)


def _docstring(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    return " ".join(inspect.cleandoc(doc).split()) if doc else ""


def section_markdown(section: Section) -> str:
    heading = (", ".join(f"`{p}`" for p in section.paths) if section.paths != [""]
               else f"top level (`{section.cls.__name__}`)")
    lines = [f"### {heading}", ""]
    if _docstring(section.cls):
        lines += [_docstring(section.cls), ""]
    lines += ["| field | type | default | allowed | what it is |", "|---|---|---|---|---|"]
    for name, info in section.cls.model_fields.items():
        cells = [f"`{name}`", type_name(info.annotation), default_text(info), allowed_text(info),
                 describe(section.cls, name)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def missing_descriptions(root: type[BaseModel]) -> list[str]:
    """`path.field` of every field with neither a comment in the code nor a DESCRIPTIONS entry."""
    return [f"{s.paths[0]}.{name}".lstrip(".") + f" ({s.cls.__name__}.{name})"
            for s in sections(root) for name in s.cls.model_fields if not describe(s.cls, name)]


def stale_descriptions(roots: list[type[BaseModel]]) -> list[str]:
    """DESCRIPTIONS keys that name no field, or a field whose code comment now says it."""
    declared = {f"{_owner(s.cls, n).__name__}.{n}": (_owner(s.cls, n), n)
                for r in roots for s in sections(r) for n in s.cls.model_fields}
    return [key for key in DESCRIPTIONS
            if key not in declared or field_comments(declared[key][0]).get(declared[key][1])]


def _model_values(preset: str, size: str) -> dict[str, Any]:
    raw = expand_model({"preset": preset, "size": size})
    return {k: v for k, v in flatten(ModelConfig.model_validate(raw).model_dump(mode="json")).items()
            if k not in ("preset", "size")}


def _value(v: Any) -> str:
    return f"`{json.dumps(v)}`"


def size_table() -> str:
    """What `model.size` sets: every model field whose value differs between sizes."""
    values = {s: _model_values("llava", s) for s in SIZES}
    varying = [k for k in values[SIZES[0]] if len({json.dumps(values[s][k]) for s in SIZES}) > 1]
    lines = ["| field | " + " | ".join(f"`{s}`" for s in SIZES) + " |", "|---" * (len(SIZES) + 1) + "|"]
    lines += [f"| `model.{k}` | " + " | ".join(_cell(_value(values[s][k])) for s in SIZES) + " |" for k in varying]
    return "\n".join(lines)


def preset_table() -> str:
    """What `model.preset` switches: every model field whose value differs between presets,
    per size where the size changes it (`tiny / small / gpu`)."""
    values = {(p, s): _model_values(p, s) for p in PRESETS for s in SIZES}
    keys = values[(PRESETS[0], SIZES[0])]
    varying = [k for k in keys if any(len({json.dumps(values[(p, s)][k]) for p in PRESETS}) > 1 for s in SIZES)]
    lines = ["| preset | " + " | ".join(f"`model.{k}`" for k in varying) + " |", "|---" * (len(varying) + 1) + "|"]
    for p in PRESETS:
        cells = []
        for k in varying:
            per_size = [_value(values[(p, s)][k]) for s in SIZES]
            cells.append(per_size[0] if len(set(per_size)) == 1 else " / ".join(per_size))
        lines.append(f"| `{p}` | " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def root_markdown(title: str, intro: str, root: type[BaseModel]) -> str:
    return "\n\n".join([f"## {title}", intro, *(section_markdown(s) for s in sections(root))])


RUN_INTRO = """\
A run config is YAML (`jobs/configs/*.yaml`) with the sections below; every command that
takes `--config F` also takes `--set a.b=c` (repeatable; the value is read as YAML, so
`--set train.stages=null` and `--set model.fusion.sparsity.stage_layers=[0,1]` work, and a
list item is addressed by its index: `--set train.stages.0.steps=300`). The whole config is
validated before anything starts, including the checks that span fields (a sparsity stage
layer past the LLM, stage steps that do not add up to `train.steps`, ...), and a bad value
names its field path, the value and what is allowed. `raybench validate --config F` prints
the config fully expanded.

**Defaults.** The defaults in the tables are the schema's. The `model` section is filled in
three layers: `model.size` first (the architecture, table "What `model.size` sets"), then
`model.preset` (which fusion families are on, table "What `model.preset` switches"), then the
fields the file itself gives."""

SERVE_INTRO = """\
`raybench deploy --config F` (and `raybench pipeline --serve-config F`) reads these settings,
from the top level of the file or from a `serve:` section (`jobs/configs/serve.yaml`);
`--set llm.max_batch_size=8` (or `--serve-set` in `raybench pipeline`) overrides one.
`raybench deploy ... --print-serve-config F` writes them as a Ray Serve config file for
`serve deploy` or a KubeRay `RayService`."""


def page(run_config: type[BaseModel], serve_config: type[BaseModel]) -> str:
    """docs/configs.md: the run config's sections, the size and preset tables, the serve config's."""
    header = ("# Config reference\n\n"
              "Generated from the pydantic schemas by `python scripts/config_reference.py` "
              "(`raybench/config_reference.py`); do not edit by hand. A test fails when this page "
              "is out of date or a field has no description.")
    model = ("## What `model.size` sets\n\n" + size_table() + "\n\n## What `model.preset` switches\n\n"
             "Where a size changes the value, the cell reads `tiny / small / gpu`.\n\n" + preset_table())
    return "\n\n".join([header, root_markdown("Run config", RUN_INTRO, run_config), model,
                        root_markdown("Serve config", SERVE_INTRO, serve_config)]) + "\n"
