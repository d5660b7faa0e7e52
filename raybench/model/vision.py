"""SigLIP vision tower with DeepStack taps.

We loop over `encoder.layers` ourselves instead of asking for `output_hidden_states`:
transformers' hidden-state indexing is off by one between its list and int forms, and a
loop makes "the output of block k" unambiguous (Qwen3-VL taps the same way).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from raybench.config import VisionConfig


def build_siglip(cfg: VisionConfig) -> SiglipVisionModel:
    if cfg.pretrained_path:
        # Local directory only: nothing is fetched at run time.
        return SiglipVisionModel.from_pretrained(cfg.pretrained_path, local_files_only=True,
                                                 vision_use_head=False, dtype=torch.float32)
    config = SiglipVisionConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3,
        vision_use_head=False,  # the MAP pooling head would be unused parameters
    )
    config._attn_implementation = "sdpa"
    return SiglipVisionModel(config)


class VisionTower(nn.Module):
    def __init__(self, siglip: SiglipVisionModel):
        super().__init__()
        self.siglip = siglip

    @property
    def blocks(self) -> nn.ModuleList:
        return self.siglip.encoder.layers

    def forward(self, pixel_values: torch.Tensor, tap_indexes: list[int] = ()
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values [B,3,H,W] -> (last hidden after post-LN [B,P,Hv], taps[k] = block k's output)."""
        dtype = self.siglip.embeddings.patch_embedding.weight.dtype
        hidden = self.siglip.embeddings(pixel_values.to(dtype))
        taps = {}
        for idx, block in enumerate(self.blocks):
            hidden = block(hidden, attention_mask=None)
            if idx in tap_indexes:
                taps[idx] = hidden
        return self.siglip.post_layernorm(hidden), [taps[i] for i in tap_indexes]
