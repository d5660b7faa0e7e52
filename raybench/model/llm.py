"""The decoder side: build a transformers causal LM, a per-layer KV cache, attention masks.

We drive the decoder layers ourselves (DeepStack injects between layers and pruning
changes the sequence between layers), so the cache is our own: after pruning, later
layers hold fewer keys than earlier ones, and each layer remembers which keys are valid.
"""

from __future__ import annotations

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from raybench.model.config import LLMConfig


def build_causal_lm(cfg: LLMConfig, vocab_size: int, head_dim: int, hf_config: dict | None = None):
    """From `cfg` (a checkpoint, or fresh weights of its sizes), or from `hf_config`, the
    transformers config a saved model recorded (see `HybridVLM.save_pretrained`)."""
    if hf_config is not None:
        config = AutoConfig.for_model(**hf_config)
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if cfg.pretrained_path:
        lm = AutoModelForCausalLM.from_pretrained(cfg.pretrained_path, local_files_only=True,
                                                  attn_implementation="sdpa", dtype=torch.float32)
        if lm.get_input_embeddings().num_embeddings < vocab_size:
            lm.resize_token_embeddings(vocab_size)  # room for <image> and our specials
        return lm
    common = dict(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=head_dim,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
        initializer_range=cfg.initializer_range,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    config = Qwen3Config(**common) if cfg.arch == "qwen3" else LlamaConfig(**common)
    config._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(config) if cfg.arch == "qwen3" else LlamaForCausalLM(config)


class KVCache:
    """Keys/values per layer plus which cached keys are real (not padding)."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_valid: list[torch.Tensor | None] = [None] * num_layers

    def mask(self, layer_idx: int, key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Record the new tokens' validity; the additive mask over every key they attend to."""
        new = key_valid.shape[1]
        past = self.key_valid[layer_idx]
        if past is not None:
            key_valid = torch.cat([past, key_valid], dim=1)
        self.key_valid[layer_idx] = key_valid
        return attention_mask(key_valid, new, dtype)

    def update(self, key, value, layer_idx, *args, **kwargs):
        # The signature transformers' attention modules call.
        if self.keys[layer_idx] is not None:
            key = torch.cat([self.keys[layer_idx], key], dim=-2)
            value = torch.cat([self.values[layer_idx], value], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def advance(self) -> None:
        """After a decode step (the static cache counts its steps; this one needs nothing)."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[-2]


class StaticKVCache(KVCache):
    """Fixed-size per-layer buffers: room for the prefill plus `max_new_tokens`.

    The growing cache changes every decode step's shapes, so a compiled decode step
    recompiles each token. Here a step writes its key/value in place at a position held in
    a tensor and attends over the whole buffer, unwritten slots masked: every step has the
    same shapes and one compiled graph serves them all. Each layer's prefill length is its
    own (pruning shortens later layers) and fixed once prefill ran.
    """

    def __init__(self, num_layers: int, max_new_tokens: int):
        super().__init__(num_layers)
        self.room = max_new_tokens
        self.prefill_len = [0] * num_layers
        self.step = torch.zeros(1, dtype=torch.long)  # decode steps written so far

    def mask(self, layer_idx: int, key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        buf = self.key_valid[layer_idx]
        if buf is None:  # prefill: attend to its own keys, keep room for the decode steps
            b, t = key_valid.shape
            self.prefill_len[layer_idx] = t
            self.step = self.step.to(key_valid.device)
            self.key_valid[layer_idx] = torch.cat(
                [key_valid, key_valid.new_zeros(b, self.room)], dim=1)
            return attention_mask(key_valid, t, dtype)
        # One new token per row: valid from now on, and it may see every valid key (causal
        # holds: nothing after it has been written).
        buf.index_fill_(1, self._slot(layer_idx), True)
        return torch.zeros(buf.shape, dtype=dtype, device=buf.device).masked_fill(
            ~buf, torch.finfo(dtype).min)[:, None, None, :]

    def _slot(self, layer_idx: int) -> torch.Tensor:
        return self.step + self.prefill_len[layer_idx]

    def update(self, key, value, layer_idx, *args, **kwargs):
        if self.keys[layer_idx] is None:
            pad = key.new_zeros(*key.shape[:2], self.room, key.shape[-1])
            self.keys[layer_idx] = torch.cat([key, pad], dim=-2)
            self.values[layer_idx] = torch.cat([value, pad.clone()], dim=-2)
            return key, value
        self.keys[layer_idx].index_copy_(2, self._slot(layer_idx), key)
        self.values[layer_idx].index_copy_(2, self._slot(layer_idx), value)
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self) -> None:
        self.step += 1

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefill_len[layer_idx]


def attention_mask(key_valid: torch.Tensor, num_queries: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B,1,Tq,Tk] mask: causal over the last Tq keys, padding keys hidden.

    A padding query would otherwise see no key at all (NaN softmax), so every query may
    always see itself.
    """
    tk = key_valid.shape[1]
    q_pos = torch.arange(tk - num_queries, tk, device=key_valid.device)
    k_pos = torch.arange(tk, device=key_valid.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & key_valid[:, None, :]
    allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)
