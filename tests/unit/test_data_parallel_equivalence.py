"""Two FSDP2 ranks, each on half of one batch, train exactly as one process on the whole
batch: the same loss, the same gradient norm before clipping, the same parameters after
a few clipped AdamW steps (real gloo process groups in two spawned processes, no Ray).

The halves hold different numbers of answer tokens. Without the shared loss divisor
(`loss_items_per_rank`) each rank's token mean would weigh a token on the shorter-answer
rank more, and the run would differ from the single-process one: that case is checked too.
"""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from raybench.config import validate_config
from raybench.model.vlm import HybridVLM
from raybench.net import free_port
from raybench.train.loop import build_optimizer, build_scheduler, train_step

VOCAB, PAD, EOS, IMG = 60, 0, 2, 3
ROWS, STEPS, WORLD = 8, 3, 2
PARAM_ATOL = 2e-4


def _config():
    # hybrid: VET, DeepStack and pruning all take part; a clip low enough that it acts.
    return validate_config({"model": {"preset": "hybrid", "size": "tiny"},
                            "train": {"lr": 1e-2, "warmup_steps": 0, "steps": STEPS, "grad_clip": 0.05}})


def _model(cfg):
    torch.manual_seed(0)
    return HybridVLM(cfg.model, vocab_size=VOCAB, image_token_id=IMG, pad_token_id=PAD, eos_token_id=EOS)


def _batch(cfg) -> dict:
    """ROWS right-padded rows; the first half answer with 1 token, the second with 4."""
    n, size = cfg.model.num_image_tokens, cfg.model.vision.image_size
    gen = torch.Generator().manual_seed(1)
    width = 1 + n + 4 + 4 + 1
    ids = torch.full((ROWS, width), PAD)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r in range(ROWS):
        answer = 1 if r < ROWS // 2 else 4
        text = torch.randint(5, VOCAB, (4 + answer,), generator=gen)
        row = torch.cat([torch.tensor([1]), torch.full((n,), IMG), text, torch.tensor([EOS])])
        ids[r, :len(row)], mask[r, :len(row)] = row, 1
        labels[r, len(row) - answer - 1:len(row)] = row[-answer - 1:]  # the answer and eos
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "pixel_values": torch.randn(ROWS, 3, size, size, generator=gen)}


def _run(model, cfg, batches, divisor) -> tuple[list[float], list[float]]:
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    losses, norms = [], []
    for batch in batches:
        stats = {}
        losses.append(train_step(model, batch, optimizer, scheduler, cfg.train.grad_clip, divisor(batch), stats))
        norms.append(stats["grad_norm"])
    return losses, norms


def _rank(rank: int, port: int, wrap: str, shared_divisor: bool, out: str) -> None:
    import torch.distributed as dist

    from raybench.train.checkpoint import full_state_dict
    from raybench.train.parallel import build_mesh, loss_items_per_rank, mixed_precision, parallelize

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    cfg = _config()
    model = parallelize(_model(cfg), build_mesh(WORLD, "cpu"), mixed_precision("cpu"), wrap=wrap)
    half = {k: v[rank * ROWS // WORLD:(rank + 1) * ROWS // WORLD] for k, v in _batch(cfg).items()}
    losses, norms = _run(model, cfg, [half] * STEPS,
                         loss_items_per_rank if shared_divisor else (lambda b: None))
    # The whole batch's loss: with the shared divisor the ranks' losses add up to it, times
    # the world size; without it, the mean of the ranks' token means.
    summed = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(summed)
    params = full_state_dict(model)
    if rank == 0:
        torch.save(params, out + ".pt")
        with open(out + ".json", "w") as f:
            json.dump({"losses": (summed / WORLD).tolist(), "norms": norms}, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_process():
    cfg = _config()
    model = _model(cfg)
    losses, norms = _run(model, cfg, [_batch(cfg)] * STEPS, lambda b: None)
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _two_ranks(tmp_path, wrap: str, shared_divisor: bool):
    out = str(tmp_path / "rank0")
    mp.spawn(_rank, args=(free_port(), wrap, shared_divisor, out), nprocs=WORLD, join=True)
    with open(out + ".json") as f:
        got = json.load(f)
    return got["losses"], got["norms"], torch.load(out + ".pt", weights_only=True)


@pytest.mark.parametrize("wrap", ["root", "block"])
def test_two_ranks_on_half_batches_train_as_one_process_on_the_whole(tmp_path, single_process, wrap):
    losses, norms, params = _two_ranks(tmp_path, wrap, shared_divisor=True)
    ref_losses, ref_norms, ref_params = single_process
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert norms == pytest.approx(ref_norms, rel=1e-4)
    assert all(n > _config().train.grad_clip for n in ref_norms)  # clipping acted on every step
    assert params.keys() == ref_params.keys()
    for name, ref in ref_params.items():
        # Float noise only: AdamW's first steps move each weight by ~lr whatever its gradient's
        # size, so a gradient that is ~0 (a key bias) turns summation-order noise into a
        # small step. PARAM_ATOL is a fiftieth of one step at this lr.
        torch.testing.assert_close(params[name], ref, rtol=1e-4, atol=PARAM_ATOL, msg=name)


def test_each_rank_s_own_token_mean_would_train_another_model(tmp_path, single_process):
    losses, _, params = _two_ranks(tmp_path, "root", shared_divisor=False)
    ref_losses, _, ref_params = single_process
    assert losses[0] != pytest.approx(ref_losses[0], rel=1e-3)
    assert max((params[k] - ref_params[k]).abs().max().item() for k in ref_params) > 10 * PARAM_ATOL
