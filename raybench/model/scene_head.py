"""A dense scene head on the vision tower: what is in each quadrant of the image.

The `scene` training objective (`train.stages[i].objective`) teaches a from-scratch tower
what pretrained towers already know - every object's shape, colour and place - with a
direct classification loss per quadrant, instead of the one-word answer whose gradient
reaches the tower only through an LLM that has not yet learned to look. It is the CPU
sizes' stand-in for starting from a pretrained SigLIP; the exported model drops the head.

Targets (`raybench.data.synthetic.scene_targets`): the background colour, then per quadrant
(row-major) a shape class (none / circle / square / triangle / each letter) and a colour class
(none / one of the colours). The quadrants pool the patch grid, so where each object is
is in the targets; and every patch also names its own quadrant, so that each visual token
the LLM reads carries where it is in its content (attention mixes tokens; only content
survives the mixing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raybench.data.synthetic import SCENE_CLASSES

IGNORE_INDEX = -100


class SceneHead(nn.Module):
    def __init__(self, vision_hidden: int):
        super().__init__()
        n_bg, n_shape, n_color = SCENE_CLASSES
        self.background = nn.Linear(vision_hidden, n_bg)
        self.shape = nn.Linear(vision_hidden, n_shape)
        self.color = nn.Linear(vision_hidden, n_color)
        self.cell = nn.Linear(vision_hidden, 4)

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """patches [B, g*g, H] -> background [B, n_bg], shape [B, 4, n_shape], colour [B, 4, n_color],
        each patch's quadrant [B, g*g, 4]."""
        b, p, h = patches.shape
        g = int(round(p**0.5))
        quadrants = patches.view(b, 2, g // 2, 2, g // 2, h).mean((2, 4)).reshape(b, 4, h)
        return self.background(patches.mean(1)), self.shape(quadrants), self.color(quadrants), self.cell(patches)

    def loss(self, patches: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """targets [B, 9] (`scene_targets`): mean of the four cross-entropies."""
        bg, shape, color, cell = self(patches)
        g = int(round(patches.shape[1] ** 0.5))
        rows = torch.arange(g, device=patches.device) // (g // 2)
        quadrant = (rows[:, None] * 2 + rows[None, :]).flatten()  # row-major, like the targets
        ce = F.cross_entropy
        return (ce(bg.float(), targets[:, 0], ignore_index=IGNORE_INDEX)
                + ce(shape.flatten(0, 1).float(), targets[:, 1:5].flatten(), ignore_index=IGNORE_INDEX)
                + ce(color.flatten(0, 1).float(), targets[:, 5:9].flatten(), ignore_index=IGNORE_INDEX)
                + ce(cell.flatten(0, 1).float(), quadrant.repeat(patches.shape[0]))) / 4
