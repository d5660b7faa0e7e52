"""BLIP-2-style Q-Former-lite: a fixed number of learned queries read the ViT patches.

Each layer is self-attention over the queries, cross-attention into the patches and an
MLP (BLIP-2's Q-Former is a BERT with that structure); the output is projected into the
LLM's space. It compresses P patches to `num_queries` tokens whatever the image size.
"""

from __future__ import annotations

import torch
from torch import nn

from raybench.model.config import QFormerConfig


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig, vision_hidden: int, llm_hidden: int):
        super().__init__()
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_queries, vision_hidden) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(vision_hidden, cfg.num_heads, 4 * vision_hidden, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(cfg.num_layers)
        )
        self.norm = nn.LayerNorm(vision_hidden)
        self.proj = nn.Linear(vision_hidden, llm_hidden)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, P, Hv] -> [B, num_queries, D]."""
        x = self.query_tokens.expand(patches.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, patches)
        return self.proj(self.norm(x))
