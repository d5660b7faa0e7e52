"""Qwen3-VL DeepStack: several ViT layers injected into several early LLM layers.

Tap k (ViT block `deepstack_visual_indexes[k]`) goes through its own merger and is added
to the hidden states at the visual positions after LLM decoder layer k - no gate, no scale,
prefill only (as `Qwen3VLTextModel._deepstack_process`). With `through_vet` the taps go
through the VET instead of mergers (`deepstack_vet.py`); the injection is the same.
"""

from __future__ import annotations

import torch
from torch import nn

from raybench.model.merger import PatchMerger


class DeepStackMergers(nn.Module):
    def __init__(self, num_taps: int, vision_hidden: int, llm_hidden: int, merge: int):
        super().__init__()
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(vision_hidden, llm_hidden, merge, use_postshuffle_norm=True)
            for _ in range(num_taps)
        )

    def forward(self, taps: list[torch.Tensor], pad_before: int = 0, pad_after: int = 0
                ) -> list[torch.Tensor]:
        """taps[k] [B, P, Hv] -> embeds[k] [B, N_vis, D] aligned with the visual span.

        `pad_before/after` zero rows line the embeds up with tokens that are visual positions
        but not patches (the VET's indicator tokens): they receive nothing.
        """
        return [pad_to_visual_span(merger(tap), pad_before, pad_after)
                for merger, tap in zip(self.deepstack_merger_list, taps)]


def pad_to_visual_span(embeds: torch.Tensor, pad_before: int, pad_after: int) -> torch.Tensor:
    """[B, N, D] -> [B, pad_before + N + pad_after, D] with zero rows: positions that get nothing."""
    if pad_before or pad_after:
        return nn.functional.pad(embeds, (0, 0, pad_before, pad_after))
    return embeds


def deepstack_process(hidden_states: torch.Tensor, visual_positions: torch.Tensor,
                      visual_embeds: torch.Tensor) -> torch.Tensor:
    """hidden[b, visual_positions[b, j]] += embeds[b, j], out of place (autograd-safe).

    `visual_positions` [B, N_vis] (`sparsity.true_positions`), embeds [B, N_vis, D]. A
    scatter_add, not boolean-mask indexing: static shapes, so `torch.compile` does not break."""
    index = visual_positions.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1])
    return hidden_states.scatter_add(1, index, visual_embeds.to(hidden_states.dtype))
