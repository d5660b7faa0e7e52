"""What a model config costs at inference: FLOPs or prefill milliseconds per sample.

A library function, not a benchmark: a Pareto sweep's workers report it as the second
objective with every eval, and `raybench bench fusion` / `bench compile` measure on the same
probe input. It lives at the model's level so that training never imports the benchmarks.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from raybench.model.vlm import HybridVLM

PROMPT_TEXT_TOKENS = 12  # a short question, as in the synthetic set
COST_METRICS = ("gflops_per_sample", "prefill_ms_per_sample")


def probe_model(model_cfg) -> HybridVLM:
    """An untrained model of `model_cfg` for measuring: FLOPs and latency do not depend on the
    weights (pruning keeps a scheduled count, not a data-dependent one)."""
    torch.manual_seed(0)
    model = HybridVLM(model_cfg, vocab_size=512, image_token_id=3, pad_token_id=0, eos_token_id=2)
    return model.eval().requires_grad_(False)  # inference only (and FlopCounterMode needs it)


def probe_inputs(model: HybridVLM, batch: int, seed: int = 0):
    """(input_ids, attention_mask, pixels) of `batch` prompts: <image> slots and a short question."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    # ids >= 10 keep clear of the specials (pad 0, eos 2, <image> 3)
    text = torch.randint(10, model.vocab_size, (batch, PROMPT_TEXT_TOKENS), generator=g)
    ids = torch.cat([torch.full((batch, 1), model.pad_token_id + 1),
                     torch.full((batch, cfg.num_image_tokens), model.image_token_id), text], 1)
    pixels = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return ids, torch.ones_like(ids), pixels


def prefill_fn(model: HybridVLM, batch: int):
    """A no-argument prefill (ViT + projection + LLM prefill + the first token) on probe inputs."""
    ids, mask, pixels = probe_inputs(model, batch)

    def prefill():
        with torch.no_grad():
            model.generate(ids, mask, pixels, max_new_tokens=1)

    return prefill


def gflops_per_sample(prefill, batch: int) -> float:
    with FlopCounterMode(display=False) as counter:
        prefill()
    return counter.get_total_flops() / batch / 1e9


def inference_cost(model_cfg, metric: str = "gflops_per_sample", batch: int = 4, repeats: int = 5) -> float:
    """One inference-cost figure for a model config (a sweep's second objective); latency is a
    median after one warm-up."""
    if metric not in COST_METRICS:
        raise ValueError(f"unknown cost metric {metric!r}")
    prefill = prefill_fn(probe_model(model_cfg), batch)
    if metric == "gflops_per_sample":
        return gflops_per_sample(prefill, batch)
    prefill()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        prefill()
        samples.append((time.perf_counter() - t0) * 1000 / batch)
    return statistics.median(samples)
