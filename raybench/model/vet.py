"""Ovis' Visual Embedding Table: visual head -> probabilities over a visual vocabulary ->
`probs @ table`.

Names follow transformers' Ovis2 (`head_linear`, `head_norm`, `VisualEmbeddingTable`).
The last `num_indicator_tokens` rows of the table are indicators that frame the image; the
head has no columns for them, so patches put exactly zero probability there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raybench.model.config import VETConfig
from raybench.model.merger import pixel_shuffle


class VisualEmbeddingTable(nn.Embedding):
    """Integer ids -> lookup; float probabilities [..., V] -> probs @ weight."""

    def forward(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        if visual_tokens.dtype in (torch.int32, torch.int64):
            return super().forward(visual_tokens)
        return torch.matmul(visual_tokens.to(self.weight.dtype), self.weight)


def tokenize(logits: torch.Tensor, function: str, tau: float, training: bool) -> torch.Tensor:
    """Visual-head logits -> a distribution over the visual vocabulary (float32 softmax)."""
    logits = logits.float()
    if function == "softmax":
        return F.softmax(logits / tau, dim=-1)
    if function == "gumbel_argmax" and training:
        return F.gumbel_softmax(logits, tau=tau, hard=True)
    # st_argmax (and gumbel at eval, where noise would make answers random): a hard one-hot
    # whose gradient is the softmax's (straight-through).
    soft = F.softmax(logits / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


class VisualHead(nn.Module):
    """Ovis' visual head: merged patches -> probabilities over the table's atoms."""

    def __init__(self, cfg: VETConfig, vision_hidden: int, merge: int):
        super().__init__()
        self.cfg, self.merge = cfg, merge
        atoms = cfg.vocab_size - cfg.num_indicator_tokens
        self.head_linear = nn.Linear(vision_hidden * merge * merge, atoms, bias=False)
        self.head_norm = nn.LayerNorm(atoms)

    def visual_probs(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, P, Hv] -> [B, N, V] probabilities with zero mass on indicator rows."""
        logits = self.head_norm(self.head_linear(pixel_shuffle(patches, self.merge)))
        probs = tokenize(logits, self.cfg.tokenize_function, self.cfg.tau, self.training)
        return F.pad(probs, (0, self.cfg.num_indicator_tokens))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.visual_probs(patches)


class VETProjector(VisualHead):
    """The main visual head and the table."""

    def __init__(self, cfg: VETConfig, vision_hidden: int, llm_hidden: int, merge: int):
        super().__init__(cfg, vision_hidden, merge)
        self.vte = VisualEmbeddingTable(cfg.vocab_size, llm_hidden)

    def forward(self, patches: torch.Tensor, level_probs: list[torch.Tensor] | None = None):
        """[B, P, Hv] -> [B, 1 + N + (n_ind - 1), D]: first indicator, atoms, remaining indicators.

        `level_probs` (DeepStack through the VET, `deepstack_vet.py`): other visual heads'
        probabilities [B, N, V] each, looked up in the same table here, inside this module's
        forward, so that a wrapper that shards the projector has its table gathered for them;
        then returns (visual embeds, [B, N, D] per level)."""
        atoms = self.vte(self.visual_probs(patches))
        if level_probs is not None:
            return self._framed(atoms), [self.vte(p) for p in level_probs]
        return self._framed(atoms)

    def _framed(self, atoms: torch.Tensor) -> torch.Tensor:
        n_ind = self.cfg.num_indicator_tokens
        if n_ind == 0:
            return atoms
        v = self.cfg.vocab_size
        ind = self.vte(torch.arange(v - n_ind, v, device=atoms.device)).to(atoms.dtype)
        ind = ind.unsqueeze(0).expand(atoms.shape[0], -1, -1)
        return torch.cat([ind[:, :1], atoms, ind[:, 1:]], dim=1)

    @torch.no_grad()
    def init_table_like(self, word_embeddings: torch.Tensor) -> None:
        # Ovis' re_init_vte: start the table in the LLM's embedding distribution.
        self.vte.weight.normal_(word_embeddings.mean().item(), word_embeddings.std().item())
