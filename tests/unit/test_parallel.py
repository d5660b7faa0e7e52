"""FSDP2 wrapping applied from outside (raybench.train.parallel): both wraps train the model
exactly as the plain, unsharded one does (one gloo rank, in this process)."""

import copy

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from raybench.config import validate_config
from raybench.model.vlm import HybridVLM
from raybench.train.parallel import mixed_precision, parallelize, resolve_wrap

VOCAB, PAD, EOS, IMG = 60, 0, 2, 3


def _model_and_batch(b: int = 3):
    # hybrid: pruning scores with the next layer's q/k outside its forward (before_scoring).
    cfg = validate_config({"model": {"preset": "hybrid", "size": "tiny"}})
    torch.manual_seed(0)
    model = HybridVLM(cfg.model, vocab_size=VOCAB, image_token_id=IMG, pad_token_id=PAD, eos_token_id=EOS)
    n, size = model.config.num_image_tokens, model.config.vision.image_size
    text = torch.randint(5, VOCAB, (b, 6))
    ids = torch.cat([torch.full((b, 1), 1), torch.full((b, n), IMG), text, torch.full((b, 1), EOS)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]  # the answer and eos
    return model, (ids, torch.ones_like(ids), torch.randn(b, 3, size, size), labels)


def _steps(model, data, n: int = 3) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(n):
        out = model(data[0], data[1], data[2], data[3])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


def test_auto_wrap_is_per_block_on_gpu_and_the_root_on_cpu():
    assert resolve_wrap("auto", "cuda") == "block" and resolve_wrap("auto", "cpu") == "root"
    assert resolve_wrap("block", "cpu") == "block" and resolve_wrap("root", "cuda") == "root"


@pytest.mark.parametrize("wrap", ["block", "root"])
def test_each_wrap_trains_like_the_unsharded_model(one_rank, wrap):
    plain, data = _model_and_batch()
    sharded = parallelize(copy.deepcopy(plain), one_rank, mixed_precision("cpu"), wrap=wrap)
    assert _steps(sharded, data) == pytest.approx(_steps(plain, data), rel=1e-5)
    blocks = [u for u in sharded.units() if isinstance(u, FSDPModule)]
    assert len(blocks) == (len(sharded.units()) if wrap == "block" else 0)
    assert isinstance(sharded, FSDPModule)
