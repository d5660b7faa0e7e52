"""Dense->sparse: progressive, query-relevance top-k pruning of visual tokens.

After the last layer of each stage (`stage_layers`), image tokens are scored PyramidDrop-
style (`pdrop_rank_drop`): the *next* layer's input norm, q/k projections and RoPE, applied
to detached hidden states, give the attention of the query token (the last prompt token:
the question's end at inference, the token before the answer in training) over the keys;
averaged over heads and restricted to image keys, the top-k survive, in original order.
Text tokens are never dropped. Original position ids are kept (FastV's choice), which
keeps RoPE and the KV cache consistent without re-indexing.
"""

from __future__ import annotations

import math

import torch
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb


def keep_ratios(schedule: str, final_keep_ratio: float, num_stages: int) -> list[float]:
    """Fraction of the original visual tokens alive after each stage s = 1..S.

    constant     prune to r at the first stage, then hold (FastV-like one shot)
    linear       1 - (1 - r) * s / S
    exponential  r ** (s / S)          (PyramidDrop's geometric lambda)
    step         keep everything for the first half of the stages, then r
    quadratic    1 - (1 - r) * (s / S) ** 2
    dense        1: nothing pruned, whatever r

    The research notes' `get_sparsity_ratio` gives the share dropped at depth x = layer /
    layers: x (linear), x ** 2 (which they call exponential), none for the first half then
    0.75 (step), and none for any other name (constant). With x = s / S and the drop scaled to
    reach 1 - r at the last stage, `linear` is the notes' linear and `step` their step; the
    notes' exponential is `quadratic` here (it keeps more early, where `exponential` drops
    most early) and their constant is `dense`. `constant` and `exponential` keep their own
    formulas: recorded results were measured with them.
    """
    r, n = final_keep_ratio, num_stages
    if schedule == "constant":
        return [r] * n
    if schedule == "linear":
        return [1 - (1 - r) * s / n for s in range(1, n + 1)]
    if schedule == "exponential":
        return [r ** (s / n) for s in range(1, n + 1)]
    if schedule == "step":
        return [1.0 if s <= n // 2 else r for s in range(1, n + 1)]
    if schedule == "quadratic":
        return [1 - (1 - r) * (s / n) ** 2 for s in range(1, n + 1)]
    if schedule == "dense":
        return [1.0] * n
    raise ValueError(f"unknown sparsity schedule {schedule!r}")


def keep_counts(num_visual: int, schedule: str, final_keep_ratio: float, num_stages: int) -> list[int]:
    """Visual tokens alive after each stage; at least one, never increasing."""
    counts, prev = [], num_visual
    for ratio in keep_ratios(schedule, final_keep_ratio, num_stages):
        prev = min(prev, max(1, math.ceil(num_visual * ratio - 1e-9)))
        counts.append(prev)
    return counts


@torch.no_grad()
def visual_relevance(next_layer, hidden: torch.Tensor, position_embeddings, query_index: torch.Tensor,
                     key_valid: torch.Tensor, visual_positions: torch.Tensor) -> torch.Tensor:
    """Query-token attention over the image tokens, from the next layer's q/k: [B, N_vis].
    `visual_positions` [B, N_vis]: each image token's sequence index (`true_positions`)."""
    attn = next_layer.self_attn
    x = next_layer.input_layernorm(hidden.detach())
    b, t, _ = x.shape
    hd = attn.head_dim
    rows = torch.arange(b, device=x.device)
    q = attn.q_proj(x[rows, query_index]).view(b, 1, -1, hd)
    k = attn.k_proj(x).view(b, t, -1, hd)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head; Llama does not
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = position_embeddings
    q, _ = apply_rotary_pos_emb(q, q, cos[rows, query_index].unsqueeze(1), sin[rows, query_index].unsqueeze(1))
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).squeeze(2) * attn.scaling  # [B, heads, T]
    causal = torch.arange(t, device=x.device)[None, :] <= query_index[:, None]
    scores = scores.masked_fill(~(causal & key_valid)[:, None, :], float("-inf"))
    probs = scores.float().softmax(-1).mean(1)  # [B, T]
    return probs.gather(1, visual_positions)


def true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The indices of the `count` True entries of each row of mask [B, T], in order: [B, count].

    Every row must hold exactly `count` (a Python int the caller knows: the visual-token count
    from the embeds' shape, the keep count from the schedule). A sort rather than `nonzero`:
    the output shape is static, so `torch.compile` traces through it without a graph break."""
    t = mask.shape[1]
    arange = torch.arange(t, device=mask.device)
    return torch.where(mask, arange, arange + t).sort(dim=1).values[:, :count]


def kept_indices(scores: torch.Tensor, keep: int, visual_positions: torch.Tensor, seq_len: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k visual tokens per sample -> (kept visual-relative ids [B,k], kept sequence ids [B,T'])."""
    b, n_vis = visual_positions.shape
    kept_vis = scores.topk(keep, dim=-1).indices.sort(-1).values
    keep_seq = torch.ones(b, seq_len, dtype=torch.bool, device=scores.device)
    keep_seq = keep_seq.scatter(1, visual_positions, False).scatter(1, visual_positions.gather(1, kept_vis), True)
    return kept_vis, true_positions(keep_seq, seq_len - n_vis + keep)


def gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along dim 1 of [B, T, ...] with per-sample indices [B, T']."""
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))
