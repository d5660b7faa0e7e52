"""The model's config section (`model:` in a run config): the vision tower, the LLM and the
fusion families, with the shapes derived from them and the checks that span their fields.

Light (pydantic and `raybench.model.presets` only) so a config validates without torch; the
model modules import their config classes from here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from raybench.model.presets import PRESETS, SIZES, deep_merge, model_defaults
from raybench.schema import ConfigError, Strict

SCHEDULES = ("constant", "linear", "exponential", "step")
TOKENIZE_FUNCTIONS = ("softmax", "gumbel_argmax", "st_argmax")


class VisionConfig(Strict):
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


class LLMConfig(Strict):
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
    # uniform for longer (a larger std such as 0.06 gets out of the plateau sooner).
    initializer_range: float = Field(0.02, gt=0)
    max_position_embeddings: int = Field(1024, ge=16)
    vocab_size: int | None = Field(None, ge=1)  # None: taken from the tokenizer at build time
    pretrained_path: str | None = None


class VETConfig(Strict):
    """Ovis Visual Embedding Table: visual head -> probabilities -> probs @ table."""
    vocab_size: int = Field(1024, ge=1)
    tokenize_function: Literal["softmax", "gumbel_argmax", "st_argmax"] = "softmax"
    tau: float = Field(1.0, gt=0)
    # Indicator rows are the table's last rows; they frame the image and never get patch mass.
    num_indicator_tokens: int = Field(2, ge=0)


class QFormerConfig(Strict):
    """BLIP-2-style Q-Former-lite: learned queries cross-attend to ViT patches."""
    num_queries: int = Field(16, ge=1)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)


class DeepStackConfig(Strict):
    """Qwen3-VL DeepStack: ViT taps -> one merger each -> added after LLM layers 0..K-1."""
    num_injections: int = Field(0, ge=0)
    # None: spread the taps evenly over the ViT (see `resolved_visual_indexes`).
    visual_indexes: list[int] | None = None


class SparsityConfig(Strict):
    """Dense->sparse progressive pruning of visual tokens by query relevance."""
    enabled: bool = False
    schedule: Literal["constant", "linear", "exponential", "step"] = "exponential"
    final_keep_ratio: float = Field(0.25, gt=0, le=1)
    stage_layers: list[int] = Field(default_factory=lambda: [1, 2])  # prune after these layers


class FusionConfig(Strict):
    projector: Literal["mlp", "vet", "qformer"] = "mlp"
    spatial_merge_size: int = Field(2, ge=1)
    vet: VETConfig = Field(default_factory=VETConfig)
    qformer: QFormerConfig = Field(default_factory=QFormerConfig)
    deepstack: DeepStackConfig = Field(default_factory=DeepStackConfig)
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig)


class ModelConfig(Strict):
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


def model_errors(m: ModelConfig) -> list[str]:
    """Constraints that span the model's fields; each line: path = value: what is allowed."""
    errs: list[str] = []
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
    return errs
