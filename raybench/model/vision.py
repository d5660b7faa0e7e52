"""SigLIP vision tower with DeepStack taps.

We loop over `encoder.layers` ourselves instead of asking for `output_hidden_states`:
transformers' hidden-state indexing is off by one between its list and int forms, and a
loop makes "the output of block k" unambiguous (Qwen3-VL taps the same way).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from raybench.model.config import VisionConfig


class ConvStem(nn.Module):
    """3x3 stride-2 convs (GroupNorm, GELU) from pixels to the patch grid, then a 1x1 conv to
    the width: Xiao et al.'s early-convolution stem in place of SigLIP's single patchify conv.
    It gives a tower trained from scratch the locality (edges, corners) that shapes are made
    of. GroupNorm, not BatchNorm: serving batches of one and training batches then agree."""

    def __init__(self, patch_size: int, hidden_size: int, num_channels: int = 3):
        super().__init__()
        depth = patch_size.bit_length() - 1  # one halving per layer: 8 px patches -> 3 convs
        widths = [max(hidden_size >> (depth - 1 - i), 8) for i in range(depth)]
        layers: list[nn.Module] = []
        c_in = num_channels
        for c in widths:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False),
                       nn.GroupNorm(8 if c % 8 == 0 else 1, c), nn.GELU()]
            c_in = c
        layers.append(nn.Conv2d(c_in, hidden_size, 1))
        self.layers = nn.Sequential(*layers)

    @property
    def weight(self) -> torch.Tensor:
        # SiglipVisionEmbeddings casts pixels to `patch_embedding.weight.dtype`.
        return self.layers[0].weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values)  # [B, hidden, grid, grid], as the patchify conv


def build_siglip(cfg: VisionConfig, hf_config: dict | None = None) -> SiglipVisionModel:
    """From `cfg`, or from `hf_config`, the transformers config a saved model recorded."""
    if hf_config is not None:
        config = SiglipVisionConfig.from_dict(hf_config)
        config._attn_implementation = "sdpa"
        return SiglipVisionModel(config)
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
    siglip = SiglipVisionModel(config)
    if cfg.stem == "conv":
        siglip.embeddings.patch_embedding = ConvStem(cfg.patch_size, cfg.hidden_size)
    return siglip


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
