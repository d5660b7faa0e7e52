"""DeepStack through the VET (`model.fusion.deepstack.through_vet`): the research notes' hybrid,
where every tapped ViT level becomes visual words before it is added at its LLM layer.

Each tap has its own visual head (Ovis' `head_linear` + `head_norm`) into the one table the
main projector uses; the lookup itself happens in `VETProjector.forward`, which owns the table.

Why one shared table with a head per level: the notes' hybrid has a single table (`self.vet`)
for every level, as Ovis has a single visual vocabulary, the counterpart of the LLM's one
text-embedding table. What reaches the LLM then stays a mixture of that table's rows at
every level, which is Ovis' point. The levels differ in what their features mean (edges
early, objects late), so each gets its own head, where Qwen3-VL gives each level its own
merger; the notes' per-level linear projection after the lookup would make the embeds
continuous again, so the per-level part sits before the table instead.
"""

from __future__ import annotations

import torch
from torch import nn

from raybench.model.config import VETConfig
from raybench.model.vet import VisualHead


class DeepStackVisualHeads(nn.Module):
    def __init__(self, num_taps: int, cfg: VETConfig, vision_hidden: int, merge: int):
        super().__init__()
        self.visual_heads = nn.ModuleList(VisualHead(cfg, vision_hidden, merge) for _ in range(num_taps))

    def forward(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        """taps[k] [B, P, Hv] -> probabilities [B, N, V] over the shared table, one per tap."""
        return [head(tap) for head, tap in zip(self.visual_heads, taps)]
