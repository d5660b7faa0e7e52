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

# keep ratio per stage of each: raybench/model/sparsity.py `keep_ratios`, docs/architecture.md.
SCHEDULES = ("constant", "linear", "exponential", "step", "quadratic", "dense")
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
    # None: placed by tap_placement (see `ModelConfig.deepstack_visual_indexes`).
    visual_indexes: list[int] | None = None
    # Which ViT blocks the taps read when visual_indexes is null. first_to_last: evenly from
    # block 0 to the last block, whose output the main projector also reads. interior:
    # Qwen3-VL's, evenly inside the tower and short of its last block, cutting it into
    # num_injections + 1 equal parts (24 blocks, 3 taps: 5, 11, 17, as Qwen3-VL-4B).
    tap_placement: Literal["first_to_last", "interior"] = "first_to_last"
    # The research notes' hybrid: each tap goes through the VET as the main projector does
    # (its own visual head into the shared table) instead of its own merger. Needs projector vet.
    through_vet: bool = False


class SparsityConfig(Strict):
    """Dense->sparse progressive pruning of visual tokens by query relevance."""
    enabled: bool = False
    schedule: Literal["constant", "linear", "exponential", "step", "quadratic", "dense"] = "exponential"
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
        if ds.tap_placement == "interior":
            # The taps end the first k of k + 1 equal parts of the tower; the last part ends at
            # the block the main projector reads, so no tap repeats its input (Qwen3-VL: 24
            # blocks -> 5, 11, 17). Distinct while k < depth (parts at least one block long).
            return [round((i + 1) * depth / (k + 1)) - 1 for i in range(k)]
        # Evenly from the first ViT block to the last (small: 0, 2, 3): the last tap reads the
        # block the main projector reads. Unlike Qwen3-VL's, whose taps are interior.
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
    errs += _deepstack_errors(m)
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


def _deepstack_errors(m: ModelConfig) -> list[str]:
    """model_errors' part for model.fusion.deepstack."""
    errs: list[str] = []
    v, llm, f = m.vision, m.llm, m.fusion
    ds = f.deepstack
    if ds.num_injections > llm.num_layers:
        errs.append(f"model.fusion.deepstack.num_injections = {ds.num_injections}: at most "
                    f"model.llm.num_layers = {llm.num_layers} (one injection after each of layers 0..K-1)")
    if ds.visual_indexes is None and ds.num_injections > v.num_layers:
        errs.append(f"model.fusion.deepstack.num_injections = {ds.num_injections}: at most "
                    f"model.vision.num_layers = {v.num_layers} ViT taps")
    elif (ds.visual_indexes is None and ds.tap_placement == "interior"
          and ds.num_injections > v.num_layers - 1):
        errs.append(f"model.fusion.deepstack.num_injections = {ds.num_injections}: interior taps leave "
                    f"the last ViT block to the main projector, so at most model.vision.num_layers - 1 "
                    f"= {v.num_layers - 1}")
    if ds.visual_indexes is not None and ds.tap_placement != "first_to_last":
        errs.append(f"model.fusion.deepstack.tap_placement = {ds.tap_placement!r}: visual_indexes "
                    f"= {ds.visual_indexes} already places the taps; set one or the other")
    if ds.through_vet and f.projector != "vet":
        errs.append("model.fusion.deepstack.through_vet = true: the taps go through the main "
                    f"projector's Visual Embedding Table, so it needs projector vet (got "
                    f"{f.projector!r}; presets ovis and hybrid have it)")
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
    return errs
