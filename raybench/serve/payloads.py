"""What travels between the ingress and the stages: plain dataclasses of tensors and ids,
the same whether a stage is its own Serve deployment or runs in-process."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StageError:
    """A request-level failure, returned (not raised) so the rest of the batch goes on."""
    status: int
    message: str
    code: str
    param: str | None = None


@dataclass
class VisionOut:
    patches: torch.Tensor              # [P, Hv]
    taps: list[torch.Tensor]           # DeepStack ViT taps, [P, Hv] each
    batch_sizes: dict[str, int] = field(default_factory=dict)


@dataclass
class ProjectionOut:
    visual_embeds: torch.Tensor        # [N_vis, D]
    deepstack_embeds: list[torch.Tensor]  # [N_vis, D] each
    batch_sizes: dict[str, int] = field(default_factory=dict)


@dataclass
class GenRequest:
    prompt_ids: list[int]              # the conversation rendered by the chat template (not padded)
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    min_tokens: int = 0                # end-of-sequence and stop strings are held off until then
    ignore_eos: bool = False           # end-of-sequence does not end the answer (fixed-length load)
    stop: list[str] = field(default_factory=list)  # answer text that ends the answer
    stream: bool = False               # token chunks as decoded, else only the final answer


@dataclass
class GenOut:
    tokens: list[int]                  # new tokens, up to and including eos
    finish_reason: str                 # "stop" (eos or a stop string) | "length"
    batch_sizes: dict[str, int] = field(default_factory=dict)
