"""Patch merging: 2x2 neighbouring patches -> one LLM-space token (Qwen3-VL's PatchMerger)."""

from __future__ import annotations

import torch
from torch import nn


def pixel_shuffle(patches: torch.Tensor, merge: int) -> torch.Tensor:
    """[B, g*g, H] on a g x g grid -> [B, (g/m)^2, H*m*m], each row an m x m neighbourhood."""
    b, p, h = patches.shape
    g = int(round(p**0.5))
    x = patches.view(b, g // merge, merge, g // merge, merge, h)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (g // merge) ** 2, merge * merge * h)


class PatchMerger(nn.Module):
    """LayerNorm -> Linear(h*m^2, h*m^2) -> GELU -> Linear(h*m^2, out).

    `use_postshuffle_norm=False` normalises each patch before the concat (the main merger);
    True normalises the concatenation (DeepStack's mergers) - as in Qwen3-VL.
    """

    def __init__(self, vision_hidden: int, out_hidden: int, merge: int, use_postshuffle_norm: bool):
        super().__init__()
        self.merge = merge
        width = vision_hidden * merge * merge
        self.use_postshuffle_norm = use_postshuffle_norm
        self.norm = nn.LayerNorm(width if use_postshuffle_norm else vision_hidden, eps=1e-6)
        self.linear_fc1 = nn.Linear(width, width)
        self.act_fn = nn.GELU()
        self.linear_fc2 = nn.Linear(width, out_hidden)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if self.use_postshuffle_norm:
            x = self.norm(pixel_shuffle(patches, self.merge))
        else:
            x = pixel_shuffle(self.norm(patches), self.merge)
        return self.linear_fc2(self.act_fn(self.linear_fc1(x)))
