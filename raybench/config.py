"""Every raybench config as a pydantic model: YAML in, clear field errors out.

`load_config(path, overrides)` reads YAML, applies `--set a.b=c` overrides, expands the
model preset/size defaults, and validates everything before any process starts. A bad
value fails with the field path, the value and what is allowed, e.g.

    model.fusion.sparsity.final_keep_ratio = 1.5: must be in (0, 1]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raybench.model.presets import PRESETS, SIZES, deep_merge, model_defaults

SCHEDULES = ("constant", "linear", "exponential", "step")
TOKENIZE_FUNCTIONS = ("softmax", "gumbel_argmax", "st_argmax")


class ConfigError(ValueError):
    """A config that cannot run; the message names every bad field."""


class _Strict(BaseModel):
    # Unknown keys are typos until proven otherwise.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class VisionConfig(_Strict):
    """SigLIP-style vision tower (transformers `SiglipVisionModel`)."""
    image_size: int = Field(64, ge=8)
    patch_size: int = Field(8, ge=1)
    hidden_size: int = Field(128, ge=1)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(256, ge=1)
    # How pixels become patch tokens. patch: SigLIP's one strided conv (what real checkpoints
    # have). conv: a stack of 3x3 stride-2 convs down to the same grid (Xiao et al. 2021, "Early
    # convolutions help transformers see better"): locality a from-scratch tower cannot
    # learn from a few thousand scenes.
    stem: Literal["patch", "conv"] = "patch"
    # A dense scene head on the tower (raybench/model/scene_head.py), trained by a stage with
    # `objective: scene`; set automatically when a stage has one, dropped from the exported model.
    scene_head: bool = False
    pretrained_path: str | None = None  # a local transformers checkpoint directory


class LLMConfig(_Strict):
    """Decoder-only LLM (transformers `Qwen3ForCausalLM` or `LlamaForCausalLM`)."""
    arch: Literal["qwen3", "llama"] = "qwen3"
    hidden_size: int = Field(128, ge=1)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    head_dim: int | None = Field(None, ge=1)  # None: hidden_size // num_heads
    intermediate_size: int = Field(384, ge=1)
    rope_theta: float = Field(10_000.0, gt=0)
    # std of the normal init of every linear/embedding weight when training from scratch.
    # transformers' 0.02 is tuned for wide models; at width 128 it leaves attention nearly
    # uniform for longer (measured: 0.06 gets out of the plateau ~50 steps sooner).
    initializer_range: float = Field(0.02, gt=0)
    max_position_embeddings: int = Field(1024, ge=16)
    vocab_size: int | None = Field(None, ge=1)  # None: taken from the tokenizer at build time
    pretrained_path: str | None = None


class VETConfig(_Strict):
    """Ovis Visual Embedding Table: visual head -> probabilities -> probs @ table."""
    vocab_size: int = Field(1024, ge=1)
    tokenize_function: Literal["softmax", "gumbel_argmax", "st_argmax"] = "softmax"
    tau: float = Field(1.0, gt=0)
    # Indicator rows are the table's last rows; they frame the image and never get patch mass.
    num_indicator_tokens: int = Field(2, ge=0)


class QFormerConfig(_Strict):
    """BLIP-2-style Q-Former-lite: learned queries cross-attend to ViT patches."""
    num_queries: int = Field(16, ge=1)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)


class DeepStackConfig(_Strict):
    """Qwen3-VL DeepStack: ViT taps -> one merger each -> added after LLM layers 0..K-1."""
    num_injections: int = Field(0, ge=0)
    # None: spread the taps evenly over the ViT (see `resolved_visual_indexes`).
    visual_indexes: list[int] | None = None


class SparsityConfig(_Strict):
    """Dense->sparse progressive pruning of visual tokens by query relevance."""
    enabled: bool = False
    schedule: Literal["constant", "linear", "exponential", "step"] = "exponential"
    final_keep_ratio: float = Field(0.25, gt=0, le=1)
    stage_layers: list[int] = Field(default_factory=lambda: [1, 2])  # prune after these layers


class FusionConfig(_Strict):
    projector: Literal["mlp", "vet", "qformer"] = "mlp"
    spatial_merge_size: int = Field(2, ge=1)
    vet: VETConfig = Field(default_factory=VETConfig)
    qformer: QFormerConfig = Field(default_factory=QFormerConfig)
    deepstack: DeepStackConfig = Field(default_factory=DeepStackConfig)
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig)


class ModelConfig(_Strict):
    preset: Literal["llava", "blip2", "ovis", "deepstack", "dense_sparse", "hybrid"] = "hybrid"
    size: Literal["tiny", "small", "gpu"] = "small"
    vision: VisionConfig = Field(default_factory=VisionConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)

    # Derived shapes, in one place so the model, data collator and serving agree.
    @property
    def num_patches(self) -> int:
        return (self.vision.image_size // self.vision.patch_size) ** 2

    @property
    def num_merged_tokens(self) -> int:
        return self.num_patches // self.fusion.spatial_merge_size**2

    @property
    def num_image_tokens(self) -> int:
        """How many `<image>` placeholders the prompt carries for one image."""
        f = self.fusion
        if f.projector == "qformer":
            return f.qformer.num_queries
        extra = f.vet.num_indicator_tokens if f.projector == "vet" else 0
        return self.num_merged_tokens + extra

    @property
    def deepstack_visual_indexes(self) -> list[int]:
        ds = self.fusion.deepstack
        if ds.visual_indexes is not None:
            return list(ds.visual_indexes)
        k, depth = ds.num_injections, self.vision.num_layers
        if k == 0:
            return []
        # Evenly from the first to the last ViT block, like Qwen3-VL's (8, 16, 24) of 27.
        return [round(i * (depth - 1) / max(k - 1, 1)) for i in range(k)] if k > 1 else [depth // 2]

    @property
    def llm_head_dim(self) -> int:
        return self.llm.head_dim or self.llm.hidden_size // self.llm.num_heads


MODULES = ("vision", "projector", "deepstack", "llm")
Module = Literal["vision", "projector", "deepstack", "llm"]


class StageData(_Strict):
    """Synthetic scenes a stage trains on instead of the training set: e.g. 1-object scenes
    first, where "what shape is red?" needs no binding (find the one object, read one
    attribute), or dense captions (`qtypes: [describe]`) to teach the tower what is where."""

    max_objects: int = Field(4, ge=1, le=4)
    num_examples: int = Field(6000, ge=1)
    qtypes: list[str] | None = None  # None: data.qtypes
    # None: generated into <run_dir>/<stage name>-<max_objects>obj-<num_examples>[...] on first
    # use; a sweep pins every trial to the sweep's own set (like data.path).
    path: str | None = None


class Stage(_Strict):
    """One phase of training: which modules learn, at what learning rate, on which data.
    LLaVA's "align, then tune" is two stages: `{train: [projector]}` then everything."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    steps: int | None = Field(None, ge=1)  # None (the last stage only): up to train.steps
    train: list[Module] = Field(default_factory=lambda: list(MODULES))  # the rest are frozen
    # Multiplies train.lr (and its schedule) per module, e.g. {vision: 0.3} for a tower that
    # must not forget what an earlier stage taught it.
    lr_scale: dict[Module, float] = Field(default_factory=dict)
    data: StageData | None = None  # None: the training set
    # answer: the next-token loss on answers (every other stage). scene: the vision tower
    # learns each quadrant's shape and colour and the background directly, from the stage's
    # own `describe` scenes - a from-scratch tower's stand-in for pretraining (see
    # raybench/model/scene_head.py); the LLM side does not take part.
    objective: Literal["answer", "scene"] = "answer"


class DataConfig(_Strict):
    path: str | None = None  # None: <run_dir>/data (generated by `raybench data synth`)
    num_train: int = Field(20_000, ge=1)
    num_val: int = Field(1_000, ge=1)
    seed: int = 0
    qtypes: list[str] | None = None  # None: every synthetic question type
    image_size: int | None = Field(None, ge=8)  # None: model.vision.image_size
    tokenizer_vocab_size: int = Field(512, ge=300)
    max_length: int = Field(96, ge=8)  # text tokens per row (+1 <image> placeholder), padded to this in Ray Data
    # Synthetic training (and curriculum) scenes asked up to this many questions each, in
    # consecutive rows sharing the image: the trainers run the vision tower once per image,
    # so each tower pass teaches several question types (validation stays one per image).
    questions_per_image: int = Field(1, ge=1, le=7)  # at most one per question type


class TrainConfig(_Strict):
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
    # Fractional on small machines: Ray Data's tasks (read, decode, split) need one whole
    # free CPU next to the workers; 2 x 0.45 (+ a sweep's 0.01 driver) leaves it on 2 cores.
    cpus_per_worker: float = Field(0.45, gt=0)
    # PACK fills a node first (fast collectives); SPREAD puts workers on different nodes.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    checkpoint_every: int | None = Field(None, ge=1)  # None: at every eval
    keep_checkpoints: int = Field(2, ge=1)  # the best by val accuracy, and always the latest
    max_failures: int = Field(2, ge=-1)  # worker-group restarts from the last checkpoint (-1: forever)
    storage_path: str | None = None  # None: <run_dir>/ray; S3/NFS on a multi-node cluster


class Dimension(_Strict):
    """One search-space dimension over a config field (`sweep.space` maps field path -> this).

    choice: `values`; uniform / loguniform: float `low`..`high`; int / logint: integers.
    """
    type: Literal["choice", "uniform", "loguniform", "int", "logint"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None


class ASHAConfig(_Strict):
    grace_period: int = Field(1, ge=1)  # in evaluations (Tune iterations), not steps
    reduction_factor: float = Field(2.0, gt=1)


class TPEConfig(_Strict):
    # Optuna's default of 10 random trials first makes any sweep of <= 10 trials random
    # search; None: a quarter of num_samples, 2 to 10 (raybench.tune.searcher).
    n_startup_trials: int | None = Field(None, ge=1)
    multivariate: bool = True  # model the dimensions jointly: vocab size x injections interact


class SweepConfig(_Strict):
    # optuna: TPE samples `num_samples` trials; grid: every combination of the (choice / int)
    # dimensions once - the exhaustive baseline a search is measured against.
    search: Literal["optuna", "grid"] = "optuna"
    num_samples: int = Field(8, ge=1)  # optuna only
    max_concurrent_trials: int = Field(1, ge=1)  # 1 on a 2-core machine (ray#54305)
    objective: Literal["accuracy", "pareto"] = "accuracy"
    # pareto: accuracy (max) x inference cost (min): FLOPs or measured prefill latency per sample
    cost_metric: Literal["gflops_per_sample", "prefill_ms_per_sample"] = "gflops_per_sample"
    scheduler: Literal["asha", "fifo"] = "asha"  # ASHA needs a single objective
    asha: ASHAConfig = Field(default_factory=ASHAConfig)
    tpe: TPEConfig = Field(default_factory=TPEConfig)
    seed: int = 0
    trial_max_failures: int = Field(1, ge=-1)  # Tune-level trial restarts
    driver_cpus: float = Field(0.01, gt=0)  # the per-trial driver function; 0 is refused by Tune
    storage: str | None = None  # Optuna RDB URL; None: sqlite:///<run_dir>/optuna.db
    registered_model: str = Field("raybench-vlm", min_length=1)
    alias: str = Field("champion", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    space: dict[str, Dimension] = Field(default_factory=dict)
    # Configs Optuna tries first, before TPE proposes (Tune's `points_to_evaluate`): each
    # maps space dimensions to values; a dimension a point leaves out takes this config's
    # own value, so `[{}]` makes trial 1 the config as written - a known-good start that
    # the champion can only improve on. Optuna search only.
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)


class RunConfig(_Strict):
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
        return self.run_path / name

    def stage_qtypes(self, stage: "Stage") -> list[str] | None:
        """The question types of a stage's own scenes (None: every default type)."""
        if stage.data is not None and stage.data.qtypes is not None:
            return stage.data.qtypes
        return ["describe"] if stage.objective == "scene" else self.data.qtypes


# ---------------------------------------------------------------------------- loading


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


def expand_model(raw_model: dict[str, Any] | None) -> dict[str, Any]:
    """Size defaults <- preset toggles <- the user's own model fields."""
    raw_model = dict(raw_model or {})
    preset = raw_model.get("preset", "hybrid")
    size = raw_model.get("size", "small")
    if preset not in PRESETS:
        raise ConfigError(f"model.preset = {preset!r}: unknown preset; allowed: {', '.join(PRESETS)}")
    if size not in SIZES:
        raise ConfigError(f"model.size = {size!r}: unknown size; allowed: {', '.join(SIZES)}")
    return deep_merge(model_defaults(preset, size), raw_model)


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        lines.append(f"{path} = {e.get('input')!r}: {e['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _cross_field_errors(cfg: RunConfig) -> list[str]:
    """Constraints that span fields; each line: path = value: what is allowed."""
    m, errs = cfg.model, []
    v, llm, f = m.vision, m.llm, m.fusion
    if v.image_size % (v.patch_size * f.spatial_merge_size):
        errs.append(f"model.vision.image_size = {v.image_size}: must be a multiple of patch_size x "
                    f"spatial_merge_size = {v.patch_size * f.spatial_merge_size}")
    if v.stem == "conv" and (v.patch_size < 2 or v.patch_size & (v.patch_size - 1)):
        errs.append(f"model.vision.patch_size = {v.patch_size}: the conv stem halves the grid per "
                    "layer, so it needs a power of two >= 2")
    if v.stem == "conv" and v.pretrained_path:
        errs.append(f"model.vision.stem = 'conv': a pretrained tower ({v.pretrained_path}) has SigLIP's "
                    "patch embedding; use stem 'patch'")
    if v.hidden_size % v.num_heads:
        errs.append(f"model.vision.num_heads = {v.num_heads}: must divide hidden_size {v.hidden_size}")
    if llm.num_heads % llm.num_kv_heads:
        errs.append(f"model.llm.num_kv_heads = {llm.num_kv_heads}: must divide num_heads {llm.num_heads}")
    if llm.head_dim is None and llm.hidden_size % llm.num_heads:
        errs.append(f"model.llm.num_heads = {llm.num_heads}: must divide hidden_size {llm.hidden_size} "
                    "(or set model.llm.head_dim)")
    if f.projector == "vet" and f.vet.vocab_size <= f.vet.num_indicator_tokens:
        errs.append(f"model.fusion.vet.vocab_size = {f.vet.vocab_size}: must exceed "
                    f"num_indicator_tokens = {f.vet.num_indicator_tokens}")
    ds = f.deepstack
    if ds.num_injections > llm.num_layers:
        errs.append(f"model.fusion.deepstack.num_injections = {ds.num_injections}: at most "
                    f"model.llm.num_layers = {llm.num_layers} (one injection after each of layers 0..K-1)")
    if ds.visual_indexes is None and ds.num_injections > v.num_layers:
        errs.append(f"model.fusion.deepstack.num_injections = {ds.num_injections}: at most "
                    f"model.vision.num_layers = {v.num_layers} ViT taps")
    if ds.visual_indexes is not None:
        if len(ds.visual_indexes) != ds.num_injections:
            errs.append(f"model.fusion.deepstack.visual_indexes = {ds.visual_indexes}: needs exactly "
                        f"num_injections = {ds.num_injections} entries")
        bad = [i for i in ds.visual_indexes if not 0 <= i < v.num_layers]
        if bad:
            errs.append(f"model.fusion.deepstack.visual_indexes = {ds.visual_indexes}: taps {bad} are past "
                        f"the ViT; allowed 0..{v.num_layers - 1}")
    if ds.num_injections and f.projector == "qformer":
        errs.append("model.fusion.deepstack.num_injections = "
                    f"{ds.num_injections}: DeepStack adds per patch position and needs projector mlp or "
                    "vet; the Q-Former's queries have no patch positions")
    sp = f.sparsity
    if sp.enabled:
        st = sp.stage_layers
        if not st:
            errs.append("model.fusion.sparsity.stage_layers = []: needs at least one layer when enabled")
        if st != sorted(set(st)):
            errs.append(f"model.fusion.sparsity.stage_layers = {st}: must be strictly increasing")
        # A stage ends after layer L and is scored with layer L+1's q/k, so L+1 must exist.
        bad = [layer for layer in st if not 0 <= layer < llm.num_layers - 1]
        if bad:
            errs.append(f"model.fusion.sparsity.stage_layers = {st}: layers {bad} out of range; "
                        f"allowed 0..{llm.num_layers - 2} (scoring uses the next layer)")
    errs += _stage_errors(cfg)
    errs += _qtype_errors("data.qtypes", cfg.data.qtypes)
    return errs


def _stage_errors(cfg: RunConfig) -> list[str]:
    t, errs = cfg.train, []
    stages = t.stages or []
    names = [st.name for st in stages]
    if len(set(names)) != len(names):
        errs.append(f"train.stages = {names}: stage names must be unique (they name checkpoints and data)")
    for i, st in enumerate(stages):
        where = f"train.stages.{i}"
        if st.steps is None and i != len(stages) - 1:
            errs.append(f"{where}.steps = None: only the last stage may leave its steps open "
                        "(it runs up to train.steps)")
        if not st.train:
            errs.append(f"{where}.train = []: a stage must train at least one module of {', '.join(MODULES)}")
        if st.data is not None:
            if st.data.num_examples < t.batch_size:
                errs.append(f"{where}.data.num_examples = {st.data.num_examples}: fewer than one batch "
                            f"(train.batch_size = {t.batch_size})")
            errs += _qtype_errors(f"{where}.data.qtypes", st.data.qtypes)
        if st.objective == "scene":
            if st.data is None:
                errs.append(f"{where}.data = None: a scene stage reads the targets from its own synthetic "
                            "`describe` scenes; give it data: {num_examples: N}")
            elif cfg.stage_qtypes(st) != ["describe"]:
                errs.append(f"{where}.data.qtypes = {st.data.qtypes}: a scene stage needs [describe] (or leave it out)")
            if "vision" not in st.train:
                errs.append(f"{where}.train = {st.train}: a scene stage trains the vision tower; include vision")
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


def _qtype_errors(where: str, qtypes: list[str] | None) -> list[str]:
    if qtypes is None:
        return []
    from raybench.data.synthetic import ALL_QTYPES  # light: only PIL/pyarrow at import
    bad = [q for q in qtypes if q not in ALL_QTYPES]
    return [f"{where} = {qtypes}: unknown {bad}; allowed: {', '.join(ALL_QTYPES)}"] if bad else []


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
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
    errs = _cross_field_errors(cfg)
    if errs:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errs))
    return cfg


def load_raw(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The user's YAML plus overrides, before preset expansion (what a sweep varies)."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(raw).__name__}")
    return apply_overrides(raw, overrides or [])


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    return validate_config(load_raw(path, overrides))


def dump_config(cfg: RunConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


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
