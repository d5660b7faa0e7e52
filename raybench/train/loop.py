"""The training pieces every launcher shares: optimizer, LR schedule, one step, evaluation.

Kept free of Ray and of process groups so the single-process trainer, Ray Train workers
and `torchrun` run literally the same step (and benchmarks compare like with like).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Iterable

import torch
from torch import nn

from raybench.train.config import TrainConfig
from raybench.train.stages import PlannedStage, lr_lambdas, module_of


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with one param group per (stage module, decay), so a stage can scale each
    module's learning rate. No decay on norms, biases, embeddings and tables: decay there
    only slows learning. Frozen parameters are included: a later stage may unfreeze them."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        no_decay = p.dim() < 2 or "embed" in name or "vte" in name
        groups.setdefault((module_of(name), no_decay), []).append(p)
    param_groups = [{"params": ps, "module": module, "weight_decay": 0.0 if no_decay else cfg.weight_decay}
                    for (module, no_decay), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak (nanoVLM's get_lr)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, stages: list[PlannedStage] | None = None):
    """The schedule above, times each param group's module scale in the stage of the step."""
    base = functools.partial(lr_factor, cfg=cfg)
    if not stages:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, base)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambdas(optimizer, stages, base))


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer, scheduler,
               grad_clip: float, num_items_in_batch: float | None = None, stats: dict | None = None) -> float:
    """One optimizer step; returns the loss. `num_items_in_batch`: a data-parallel rank's loss
    divisor (see `raybench.train.parallel.loss_items_per_rank`); None: this batch's own token
    mean. `stats`, if given, receives the gradient's total norm before clipping (`grad_norm`)."""
    model.train()
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"],
                image_index=batch.get("image_index"), scene_targets=batch.get("scene_targets"),
                num_items_in_batch=num_items_in_batch)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if stats is not None:  # sharded parameters give a DTensor norm: the same value on every rank
        stats["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    optimizer.step()
    scheduler.step()
    return out.loss.detach().item()


def answer_exact_match(logits: torch.Tensor, labels: torch.Tensor, suppressed: list[int]) -> torch.Tensor:
    """Per-sample exact match of greedy decoding, from one teacher-forced forward.

    Greedy decoding reproduces answer+eos exactly iff, given the correct prefix, every
    answer position's argmax is the target; `suppressed` mirrors what generate() masks.
    """
    logits = logits.clone()
    logits[..., suppressed] = float("-inf")
    hit = (logits.argmax(-1) == labels) | (labels == -100)
    return hit.all(dim=1)


def turn_exact_match(logits: torch.Tensor, labels: torch.Tensor, suppressed: list[int]) -> list[list[bool]]:
    """Per sample, per assistant turn (each contiguous run of labelled positions), whether
    greedy decoding reproduces that turn given the reference conversation before it."""
    logits = logits.clone()
    logits[..., suppressed] = float("-inf")
    hit = logits.argmax(-1) == labels
    on = labels != -100
    start = on & ~torch.nn.functional.pad(on[:, :-1], (1, 0), value=False)
    turn = start.long().cumsum(1) * on  # 1, 2, ... on each turn's positions, 0 elsewhere
    out = []
    for row_hit, row_turn, n in zip(hit, turn, start.sum(1).tolist()):
        out.append([bool(row_hit[row_turn == t].all()) for t in range(1, n + 1)])
    return out


@torch.no_grad()
def evaluate_counts(model: nn.Module, batches: Iterable[dict], suppressed: list[int]) -> dict:
    """Raw sums (loss, samples, hits per qtype): they add across ranks, averages don't. Also
    each sample's own outcome, in order (`correct`), for curves that are read per question."""
    model.eval()
    loss_sum, n_total = 0.0, 0
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    turns: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # "turn1", "followup"
    every: list[bool] = []
    for batch in batches:
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"],
                    return_logits=True, image_index=batch.get("image_index"))
        n = batch["input_ids"].shape[0]
        loss_sum += out.loss.item() * n
        n_total += n
        per_turn = turn_exact_match(out.logits, out.labels, suppressed)
        correct = [all(t) for t in per_turn]
        every += correct
        for qtype, ok, row in zip(batch["qtype"], correct, per_turn):
            hits[qtype][0] += int(ok)
            hits[qtype][1] += 1
            if len(row) > 1:  # a conversation: its first answer and its follow-ups apart
                for i, t in enumerate(row):
                    cell = turns["turn1" if i == 0 else "followup"]
                    cell[0] += int(t)
                    cell[1] += 1
    return {"loss_sum": loss_sum, "n": n_total, "hits": dict(hits), "turns": dict(turns), "correct": every}


def merge_counts(parts: list[dict]) -> dict[str, float]:
    """Counts from one or more ranks -> val loss, accuracy (a conversation counts when every
    assistant turn is right) overall and per qtype, and, where rows are multi-turn, the
    accuracy of first turns and of follow-up turns (`acc/turn1`, `acc/followup`)."""
    loss_sum, n = sum(p["loss_sum"] for p in parts), sum(p["n"] for p in parts)
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    turns: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for p in parts:
        for into, got in ((hits, p["hits"]), (turns, p.get("turns", {}))):
            for key, (h, m) in got.items():
                into[key][0] += h
                into[key][1] += m
    metrics = {"val_loss": loss_sum / max(n, 1),
               "accuracy": sum(h for h, _ in hits.values()) / max(n, 1)}
    for qtype, (h, m) in sorted(hits.items()):
        if qtype:  # "": the data has no question types
            metrics[f"acc/{qtype}"] = h / m
    for key in ("turn1", "followup"):
        if key in turns:
            metrics[f"acc/{key}"] = turns[key][0] / turns[key][1]
    return metrics


def evaluate(model: nn.Module, batches: Iterable[dict], suppressed: list[int]) -> dict[str, float]:
    """Validation loss (answer tokens) and exact-match accuracy, overall and per qtype."""
    return merge_counts([evaluate_counts(model, batches, suppressed)])


def format_eval(step: int, total: int, loss: float, metrics: dict[str, float], samples_per_s: float) -> str:
    per_q = " ".join(f"{k[4:]}={v:.2f}" for k, v in metrics.items() if k.startswith("acc/"))
    return (f"step {step:>5}/{total} | loss {loss:.3f} | val_loss {metrics['val_loss']:.3f} | "
            f"acc {metrics['accuracy']:.3f} ({per_q}) | {samples_per_s:.0f} samples/s")


def pack_correct(correct: list[bool]) -> str:
    """Per-sample outcomes as hex, 4 samples a digit (a 1000-question eval in 250 characters)."""
    bits = "".join("1" if c else "0" for c in correct)
    return "".join(f"{int(bits[i:i + 4].ljust(4, '0'), 2):x}" for i in range(0, len(bits), 4))


def unpack_correct(packed: str, n: int) -> list[bool]:
    bits = "".join(f"{int(d, 16):04b}" for d in packed)
    return [b == "1" for b in bits[:n]]
