"""HybridVLM: one model, every fusion family from the seeds' table as a config.

    pixels -> VisionTower (SigLIP, DeepStack taps)             encode_images()
           -> projector (MLP merger | VET | Q-Former)          project()
              + DeepStack mergers (one per tap; or, through_vet, one
                visual head per tap into the VET's table)
           -> LLM: <image> placeholders replaced by visual embeds,
              DeepStack adds after layers 0..K-1,               run_decoder()
              visual tokens pruned after each sparsity stage
           -> loss on answer tokens / prefill + KV-cache decode  forward() / generate()

The three methods are also the three serving stages (vision, projection, LLM). The model
knows nothing of distribution: FSDP is applied from outside (`raybench.train.parallel`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from raybench.model.config import ModelConfig, SparsityConfig
from raybench.model.deepstack import DeepStackMergers, deepstack_process, pad_to_visual_span
from raybench.model.deepstack_vet import DeepStackVisualHeads
from raybench.model.llm import KVCache, StaticKVCache, attention_mask, build_causal_lm
from raybench.model.merger import PatchMerger
from raybench.model.qformer import QFormer
from raybench.model.scene_head import SceneHead
from raybench.model.sparsity import gather_seq, keep_counts, kept_indices, true_positions, visual_relevance
from raybench.model.vet import VETProjector
from raybench.model.vision import VisionTower, build_siglip

IGNORE_INDEX = -100
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class VLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None = None  # [B, T'-1, V]: next-token logits (return_logits=True)
    labels: torch.Tensor | None = None  # [B, T'-1]: the targets aligned with `logits`


@dataclass
class DecoderState:
    """What the decoder loop carries between layers; pruning gathers all of it together."""
    hidden: torch.Tensor          # [B, T, D]
    position_ids: torch.Tensor    # [B, T] original positions (kept through pruning)
    key_valid: torch.Tensor       # [B, T] real token (not padding)
    visual_pos_masks: torch.Tensor  # [B, T]
    query_mask: torch.Tensor      # [B, T] the token whose attention ranks image tokens
    keep_index: torch.Tensor      # [B, T] index into the unpruned sequence
    deepstack_embeds: list[torch.Tensor]  # [B, N_vis, D] each, aligned with visual tokens
    # Image tokens per row, a Python int (every row has the same count): known from the
    # embeds' shape and the keep schedule, never read back from a tensor, so the decoder
    # loop has no host syncs and `torch.compile` traces it whole.
    num_visual: int = 0

    def visual_positions(self) -> torch.Tensor:
        """[B, num_visual]: each image token's index in the current sequence."""
        return true_positions(self.visual_pos_masks, self.num_visual)

    def gather(self, seq_idx: torch.Tensor, kept_vis: torch.Tensor) -> None:
        for name in ("hidden", "position_ids", "key_valid", "visual_pos_masks", "query_mask", "keep_index"):
            setattr(self, name, gather_seq(getattr(self, name), seq_idx))
        self.deepstack_embeds = [gather_seq(e, kept_vis) for e in self.deepstack_embeds]
        self.num_visual = kept_vis.shape[1]


class HybridVLM(nn.Module):
    def __init__(self, config: ModelConfig, *, vocab_size: int, image_token_id: int,
                 pad_token_id: int, eos_token_id: int, towers: dict[str, dict] | None = None):
        """`towers`: the transformers configs of towers that came from checkpoints, as
        `save_pretrained` recorded them ("vision", "llm"); such a tower is built from its
        own config, not from `config`'s sizes."""
        super().__init__()
        self.config = config
        self.vocab_size, self.image_token_id = vocab_size, image_token_id
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        f = config.fusion
        towers = dict(towers or {})
        self.vision = VisionTower(build_siglip(config.vision, towers.get("vision")))
        # Trained by a `scene` stage, never used for answers (see scene_head.py).
        self.scene_head = SceneHead(self.vision.siglip.config.hidden_size) if config.vision.scene_head else None
        self.llm = build_causal_lm(config.llm, vocab_size, config.llm_head_dim, towers.get("llm"))
        self.towers = checkpoint_towers(config, self.vision.siglip, self.llm, towers)
        hv, d = self.vision.siglip.config.hidden_size, self.llm.config.hidden_size
        if f.projector == "mlp":
            self.projector = PatchMerger(hv, d, f.spatial_merge_size, use_postshuffle_norm=False)
        elif f.projector == "vet":
            self.projector = VETProjector(f.vet, hv, d, f.spatial_merge_size)
            self.projector.init_table_like(self.llm.get_input_embeddings().weight)
        else:
            self.projector = QFormer(f.qformer, hv, d)
        self.deepstack_visual_indexes = config.deepstack_visual_indexes
        num_taps = len(self.deepstack_visual_indexes)
        if num_taps and f.deepstack.through_vet:
            self.deepstack = DeepStackVisualHeads(num_taps, f.vet, hv, f.spatial_merge_size)
        else:
            self.deepstack = (DeepStackMergers(num_taps, hv, d, f.spatial_merge_size)
                              if num_taps else None)
        # Pruning scores with the *next* layer's q/k outside that layer's forward; a wrapper
        # that shards layers (FSDP) sets this to gather that layer's weights first.
        self.before_scoring: Callable[[nn.Module], None] | None = None
        self.set_pruning(f.sparsity)

    def set_pruning(self, sparsity: SparsityConfig) -> None:
        """Which layers end a pruning stage and how many image tokens survive each. Pruning has
        no weights of its own (it scores with the next layer's q/k), so one set of weights can
        run any schedule, or none: `bench pruning` compares schedules on the same model."""
        fusion = self.config.fusion.model_copy(update={"sparsity": sparsity})
        self.config = self.config.model_copy(update={"fusion": fusion})  # the caller's stays as it was
        self.stage_layers = list(sparsity.stage_layers) if sparsity.enabled else []
        self.stage_keep = (keep_counts(self.config.num_image_tokens, sparsity.schedule,
                                       sparsity.final_keep_ratio, len(self.stage_layers))
                           if sparsity.enabled else [])

    @classmethod
    def for_tokenizer(cls, config: ModelConfig, tokenizer) -> "HybridVLM":
        from raybench.data.tokenizer import image_token_id
        return cls(config, vocab_size=len(tokenizer), image_token_id=image_token_id(tokenizer),
                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    # ----------------------------------------------------------------- the three stages

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.llm.model.layers

    def units(self, parts: tuple[str, ...] = ("vision", "llm", "projector", "deepstack")) -> list[nn.Module]:
        """The blocks each called once per forward, of the given parts: what FSDP shards and
        `torch.compile` compiles one by one. Per block, because the LLM's layers are run by
        `run_decoder` one at a time, never through `self.llm.forward`. A part a serving stage
        dropped (None) has no units."""
        units: list[nn.Module] = []
        if "vision" in parts and self.vision is not None:
            units += list(self.vision.blocks)
        if "llm" in parts and self.llm is not None:
            units += list(self.decoder_layers)
        if "projector" in parts and self.projector is not None:
            units.append(self.projector)
        if "deepstack" in parts and self.deepstack is not None:
            units.append(self.deepstack)
        return units

    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage 1 (ViT): pixels [B,3,H,W] -> (patches [B,P,Hv], DeepStack taps)."""
        return self.vision(pixel_values, self.deepstack_visual_indexes)

    def project(self, patches: torch.Tensor, taps: list[torch.Tensor]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage 2: ViT features -> (visual embeds [B,N_vis,D], DeepStack embeds [B,N_vis,D] each)."""
        if self.deepstack is None:
            return self.projector(patches), []
        n_ind = self.config.fusion.vet.num_indicator_tokens if self.config.fusion.projector == "vet" else 0
        pad_before, pad_after = min(n_ind, 1), max(n_ind - 1, 0)
        if isinstance(self.deepstack, DeepStackVisualHeads):
            # Each tap's visual head gives probabilities; the projector looks them up in its table.
            visual, levels = self.projector(patches, self.deepstack(taps))
            return visual, [pad_to_visual_span(e, pad_before, pad_after) for e in levels]
        return self.projector(patches), self.deepstack(taps, pad_before=pad_before, pad_after=pad_after)

    def embed(self, input_ids: torch.Tensor, visual_embeds: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with `<image>` placeholders replaced by visual embeds."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        visual_pos_masks = input_ids == self.image_token_id
        if visual_embeds is None:
            if visual_pos_masks.any():
                raise ValueError("prompt has <image> tokens but no image was given")
            return embeds, visual_pos_masks
        n_vis = visual_embeds.shape[1]
        # Checked eagerly; a compiled caller (bench compile) has its inputs from probe_inputs.
        if not torch.compiler.is_compiling():
            counts = visual_pos_masks.sum(1)
            if (counts != n_vis).any():
                raise ValueError(f"each prompt needs exactly {n_vis} <image> tokens for one image, "
                                 f"got {counts.tolist()}")
        embeds = embeds.masked_scatter(visual_pos_masks.unsqueeze(-1), visual_embeds.to(embeds.dtype))
        return embeds, visual_pos_masks

    def run_decoder(self, state: DecoderState, cache: KVCache | None = None, prune: bool = True
                    ) -> DecoderState:
        """Stage 3's prefill (and each decode step with `prune=False`, no visuals)."""
        rotary = self.llm.model.rotary_emb
        pe = rotary(state.hidden, state.position_ids)
        layers = self.decoder_layers
        has_visual = state.num_visual > 0
        vis_pos = state.visual_positions() if has_visual else None
        for i, layer in enumerate(layers):
            mask = (attention_mask(state.key_valid, state.hidden.shape[1], state.hidden.dtype)
                    if cache is None else cache.mask(i, state.key_valid, state.hidden.dtype))
            state.hidden = layer(state.hidden, attention_mask=mask, position_embeddings=pe,
                                 position_ids=state.position_ids, cache=cache)
            if has_visual and i < len(state.deepstack_embeds):
                state.hidden = deepstack_process(state.hidden, vis_pos, state.deepstack_embeds[i])
            if prune and has_visual and i in self.stage_layers:
                keep = self.stage_keep[self.stage_layers.index(i)]
                if keep < state.num_visual:
                    if self.before_scoring is not None:
                        self.before_scoring(layers[i + 1])
                    scores = visual_relevance(layers[i + 1], state.hidden, pe,
                                              state.query_mask.float().argmax(1), state.key_valid, vis_pos)
                    kept_vis, seq_idx = kept_indices(scores, keep, vis_pos, state.hidden.shape[1])
                    state.gather(seq_idx, kept_vis)
                    vis_pos = state.visual_positions()
                    pe = rotary(state.hidden, state.position_ids)
        return state

    def _prefill_state(self, input_ids, attention_mask_2d, visual_embeds, deepstack_embeds,
                       query_index) -> DecoderState:
        embeds, visual_pos_masks = self.embed(input_ids, visual_embeds)
        key_valid = attention_mask_2d.bool()
        position_ids = (key_valid.long().cumsum(1) - 1).clamp(min=0)
        b, t = input_ids.shape
        arange = torch.arange(t, device=input_ids.device)
        return DecoderState(
            hidden=embeds, position_ids=position_ids, key_valid=key_valid,
            visual_pos_masks=visual_pos_masks, query_mask=arange[None, :] == query_index[:, None],
            keep_index=arange[None, :].expand(b, t), deepstack_embeds=list(deepstack_embeds),
            num_visual=0 if visual_embeds is None else visual_embeds.shape[1],
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm.lm_head(self.llm.model.norm(hidden))

    # ----------------------------------------------------------------- training forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_logits: bool = False, image_index: torch.Tensor | None = None,
                scene_targets: torch.Tensor | None = None,
                num_items_in_batch: float | None = None) -> VLMOutput:
        """Right-padded batch -> loss on answer tokens (labels != -100) only. `image_index[i]`
        names row i's image in `pixel_values` (several questions about one image share its
        vision tower pass); None: one image per row. With `scene_targets` [rows, 9] (a `scene`
        stage) the loss is the scene head's on the tower's patches instead; the LLM side is
        not run. Both go through `forward` so that FSDP's root hooks gather its weights.

        `num_items_in_batch` (transformers' name): divide the summed answer-token loss by this
        instead of this batch's own token count. A data-parallel trainer passes the global
        count over its world size, so that averaging the ranks' gradients gives the gradient
        of the whole batch's token mean (ranks' batches hold different numbers of tokens)."""
        if scene_targets is not None:
            if self.scene_head is None:
                raise ValueError("scene_targets given but the model has no scene head (model.vision.scene_head)")
            patches, _ = self.vision(pixel_values)
            if image_index is not None:
                patches = patches[image_index]
            return VLMOutput(loss=self.scene_head.loss(patches, scene_targets))
        visual, deepstack = None, []
        if pixel_values is not None:
            visual, deepstack = self.project(*self.encode_images(pixel_values))
            if image_index is not None:
                visual, deepstack = visual[image_index], [d[image_index] for d in deepstack]
        if labels is not None:
            # The query for pruning is the token before the answer (PyramidDrop's training rule).
            query_index = ((labels != IGNORE_INDEX).float().argmax(1) - 1).clamp(min=0)
        else:
            query_index = attention_mask.long().sum(1) - 1
        state = self.run_decoder(self._prefill_state(input_ids, attention_mask, visual, deepstack,
                                                     query_index))
        hidden = state.hidden[:, :-1]
        if labels is None:
            return VLMOutput(loss=None, logits=self.logits(hidden) if return_logits else None)
        targets = labels.gather(1, state.keep_index)[:, 1:]
        selected = targets != IGNORE_INDEX
        # Project only the answer positions: the vocabulary matmul dominates otherwise.
        if num_items_in_batch is None:
            loss = F.cross_entropy(self.logits(hidden[selected]).float(), targets[selected])
        else:
            loss = F.cross_entropy(self.logits(hidden[selected]).float(), targets[selected],
                                   reduction="sum") / num_items_in_batch
        return VLMOutput(loss=loss, logits=self.logits(hidden) if return_logits else None,
                         labels=targets if return_logits else None)

    # ----------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 pixel_values: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Left-padded prompts -> new token ids [B, <=max_new_tokens] (eos-padded)."""
        visual, deepstack = None, []
        if pixel_values is not None:
            visual, deepstack = self.project(*self.encode_images(pixel_values))
        return self.generate_from_visual(input_ids, attention_mask, visual, deepstack, **kwargs)

    @torch.no_grad()
    def generate_from_visual(self, input_ids, attention_mask, visual_embeds, deepstack_embeds, *,
                             max_new_tokens: int = 8, temperature: float = 0.0, top_p: float = 1.0,
                             use_cache: bool = True, static_cache: bool = False,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """Prefill, then one token at a time. `static_cache`: fixed-size KV buffers
        (`StaticKVCache`), so a compiled `decode_step` has the same shapes every step."""
        if not torch.compiler.is_compiling() and not bool(attention_mask[:, -1].all()):
            raise ValueError("generate() needs left-padded prompts (the last column must be real tokens)")
        b = input_ids.shape[0]
        n_layers = len(self.decoder_layers)
        cache = None
        if use_cache:
            cache = StaticKVCache(n_layers, max_new_tokens) if static_cache else KVCache(n_layers)
        logits, next_pos = self.prefill(input_ids, attention_mask, visual_embeds, deepstack_embeds, cache)
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        out = []
        for step in range(max_new_tokens):
            self.forbid_placeholders(logits)
            token = sample_next(logits, temperature, top_p, generator)
            token = token.masked_fill(done, self.eos_token_id)
            out.append(token)
            done |= token == self.eos_token_id
            if step == max_new_tokens - 1 or bool(done.all()):  # the last step needs no sync
                break
            if use_cache:
                logits = self.decode_step(token, next_pos, cache)
                cache.advance()
                next_pos = next_pos + 1
            else:  # full recompute: the reference the KV cache must reproduce
                ids = torch.cat([input_ids, torch.stack(out, 1)], 1)
                mask = torch.cat([attention_mask, torch.ones(b, len(out), dtype=attention_mask.dtype,
                                                             device=ids.device)], 1)
                # Pruned by the question's end, as the cached path was at prefill.
                logits, _ = self.prefill(ids, mask, visual_embeds, deepstack_embeds,
                                         query_index=torch.full((b,), input_ids.shape[1] - 1,
                                                                 device=ids.device))
        return torch.stack(out, 1)

    def forbid_placeholders(self, logits: torch.Tensor) -> None:
        """In place: placeholders are never text (an emitted <image> would need an image)."""
        logits[:, [self.image_token_id, self.pad_token_id]] = float("-inf")

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual_embeds,
                deepstack_embeds, cache: KVCache | None = None, query_index: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 3's prompt pass over left-padded prompts (injection, pruning, `cache` filled)
        -> (next-token logits [B, V], the next token's positions [B]). Pruning ranks image
        tokens by the attention of `query_index` (default: the last column, the question's end)."""
        b, t = input_ids.shape
        if query_index is None:
            query_index = torch.full((b,), t - 1, device=input_ids.device)
        state = self.run_decoder(self._prefill_state(input_ids, attention_mask, visual_embeds,
                                                     deepstack_embeds, query_index), cache)
        return self.logits(state.hidden[:, -1]), state.position_ids[:, -1] + 1

    def decode_step(self, token: torch.Tensor, position_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row [B] at positions [B] through the cached decoder -> logits [B, V]."""
        b = token.shape[0]
        ones = torch.ones(b, 1, dtype=torch.bool, device=token.device)
        state = DecoderState(
            hidden=self.llm.get_input_embeddings()(token[:, None]), position_ids=position_ids[:, None],
            key_valid=ones, visual_pos_masks=~ones, query_mask=ones,
            keep_index=torch.zeros(b, 1, dtype=torch.long, device=token.device), deepstack_embeds=[])
        return self.logits(self.run_decoder(state, cache, prune=False).hidden[:, -1])

    # ----------------------------------------------------------------- save / load

    def save_pretrained(self, directory: str | Path,
                        state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """safetensors weights + config.json (no pickle anywhere).

        `state_dict`: full weights gathered elsewhere (from an FSDP-sharded model).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = self.config.model_copy(deep=True)
        # The saved weights are complete: loading must not need the original checkpoints.
        cfg.vision.pretrained_path = None
        cfg.llm.pretrained_path = None
        cfg.vision.scene_head = False  # a training device: what serves the model never uses it
        cfg.llm.vocab_size = self.vocab_size
        meta = {"format": "raybench-hybrid-vlm", "model": cfg.model_dump(mode="json"),
                "vocab_size": self.vocab_size, "image_token_id": self.image_token_id,
                "pad_token_id": self.pad_token_id, "eos_token_id": self.eos_token_id}
        if self.towers:
            meta["towers"] = self.towers
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        if state_dict is None and self.scene_head is None:
            save_model(self, str(directory / WEIGHTS_NAME))  # dedups tied embeddings
        else:
            state_dict = self.state_dict() if state_dict is None else state_dict
            skip = self.tied_aliases()
            save_file({k: v.detach().clone().contiguous() for k, v in state_dict.items()
                       if not k.startswith("scene_head.") and k not in skip}, str(directory / WEIGHTS_NAME))
        return directory

    def tied_aliases(self) -> set[str]:
        """Names of parameters that are another's (lm_head tied to the input embeddings, as
        in Qwen3-0.6B). A gathered state dict holds the tensor under both names; written
        twice, loading into the tied model fails on the second name (what `save_model` avoids)."""
        first: dict[int, str] = {}
        aliases = set()
        for name, p in self.named_parameters(remove_duplicate=False):
            if first.setdefault(id(p), name) != name:
                aliases.add(name)
        return aliases

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "HybridVLM":
        directory = Path(directory)
        meta = json.loads((directory / CONFIG_NAME).read_text())
        if meta.get("format") != "raybench-hybrid-vlm":
            raise ValueError(f"{directory}: not a raybench model directory (config.json format "
                             f"{meta.get('format')!r})")
        cfg = ModelConfig.model_validate(meta["model"])
        model = cls(cfg, vocab_size=meta["vocab_size"], image_token_id=meta["image_token_id"],
                    pad_token_id=meta["pad_token_id"], eos_token_id=meta["eos_token_id"],
                    towers=meta.get("towers"))
        load_model(model, str(directory / WEIGHTS_NAME), device=str(device))
        return model.eval()


def checkpoint_towers(config: ModelConfig, siglip: nn.Module, llm: nn.Module,
                      towers: dict[str, dict]) -> dict[str, dict]:
    """The transformers configs of the towers that came from checkpoints (`towers`: those
    already recorded, for a model loaded from a save). A checkpoint's own config is what its
    weights need, and the run config cannot say it: Qwen3-0.6B has more embedding rows
    (151936) than its tokenizer has tokens and ties lm_head to the input embeddings, and its
    rope, norms and biases are its own. Rebuilt from the run config (`len(tokenizer)` rows,
    untied), such a model would not load again."""
    for name, tower, path in (("vision", siglip, config.vision.pretrained_path),
                              ("llm", llm, config.llm.pretrained_path)):
        if path:
            towers[name] = {k: v for k, v in tower.config.to_dict().items() if k != "_name_or_path"}
    return towers


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: argmax at temperature 0, else top-p sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set with mass >= top_p
        sorted_p = sorted_p.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
