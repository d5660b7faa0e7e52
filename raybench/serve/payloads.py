"""What travels between the ingress and the stages: plain dataclasses of arrays and ids,
the same whether a stage is its own Serve deployment or runs in-process.

Features travel as numpy arrays (`to_wire`), turned back into tensors where a stage uses them
(`from_wire`): Ray hands numpy arrays over as zero-copy pickle5 buffers, while a torch tensor
goes through torch's own pickler on both sides of every hop (measured: docs/experiments.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def to_wire(t: torch.Tensor) -> np.ndarray | torch.Tensor:
    """A CPU tensor as an array of its own (not a view of the batch); bfloat16, which numpy
    has no type for, stays a tensor."""
    return t.clone() if t.dtype == torch.bfloat16 else t.numpy().copy()


def from_wire(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x)


@dataclass
class StageError:
    """A request-level failure, returned (not raised) so the rest of the batch goes on."""
    status: int
    message: str
    code: str
    param: str | None = None


@dataclass
class VisionOut:
    patches: np.ndarray                # [P, Hv]
    taps: list[np.ndarray]             # DeepStack ViT taps, [P, Hv] each
    batch_sizes: dict[str, int] = field(default_factory=dict)


@dataclass
class ProjectionOut:
    visual_embeds: np.ndarray          # [N_vis, D]
    deepstack_embeds: list[np.ndarray]  # [N_vis, D] each
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
