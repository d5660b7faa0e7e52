"""Continuous batching in the LLM stage (serve/engine.py, serve/scheduler.py), Ray-free, on
the tiny model: rows join mid-decode and leave on their own, and greedy rows still give
exactly `HybridVLM.generate`'s tokens (what `raybench ask` prints)."""

import asyncio

import pytest
import torch

from raybench.config import validate_config
from raybench.model.vlm import HybridVLM
from raybench.serve.engine import DecodeEngine, Row
from raybench.serve.payloads import GenRequest
from raybench.serve.scheduler import Scheduler

VOCAB, PAD, BOS, EOS, IMG = 60, 0, 1, 2, 3


@pytest.fixture(scope="module")
def model() -> HybridVLM:
    cfg = validate_config({"model": {"preset": "hybrid", "size": "tiny"}})
    torch.manual_seed(0)
    return HybridVLM(cfg.model, vocab_size=VOCAB, image_token_id=IMG, pad_token_id=PAD,
                     eos_token_id=EOS).eval()


def make_request(model: HybridVLM, case: int, max_tokens: int, **kw):
    """A prompt of its own length, and the image's visual embeds (as the projection stage sends them)."""
    g = torch.Generator().manual_seed(case)
    n = model.config.num_image_tokens
    question = torch.randint(5, VOCAB, (2 + case % 5,), generator=g).tolist()
    size = model.config.vision.image_size
    with torch.no_grad():
        visual, deepstack = model.project(*model.encode_images(torch.randn(1, 3, size, size, generator=g)))
    req = GenRequest([BOS] + [IMG] * n + question, max_tokens, **kw)
    return req, visual[0], [d[0] for d in deepstack]


def reference(model: HybridVLM, req: GenRequest, visual, deepstack) -> list[int]:
    """generate() alone on this one request, cut after its end-of-sequence."""
    ids = torch.tensor([req.prompt_ids])
    out = model.generate_from_visual(ids, torch.ones_like(ids), visual[None], [d[None] for d in deepstack],
                                     max_new_tokens=req.max_tokens)[0].tolist()
    return out[: out.index(EOS) + 1] if EOS in out else out


async def collect(scheduler: Scheduler, row: Row) -> tuple[list[int], str]:
    stream = scheduler.submit(row)
    tokens = []
    async for chunk in stream.chunks():
        tokens += chunk
    return tokens, stream.finish


def run_staggered(model, requests, joins_after: list[int], max_rows: int = 8):
    """Request i is submitted once request 0 has `joins_after[i]` tokens: rows join mid-decode."""
    async def main():
        scheduler = Scheduler(DecodeEngine(model, torch.device("cpu")), max_rows)
        sizes = []
        scheduler.on_step = lambda result, _: sizes.append(result.decoded)
        first = Row(*requests[0])
        stream0 = scheduler.submit(first)
        tasks = []
        for req, after in zip(requests[1:], joins_after[1:]):
            while len(first.tokens) < after and first.finish is None:
                await asyncio.sleep(0.001)
            tasks.append(asyncio.ensure_future(collect(scheduler, Row(*req))))
        tokens0 = []
        async for chunk in stream0.chunks():
            tokens0 += chunk
        return [(tokens0, stream0.finish), *(await asyncio.gather(*tasks))], sizes
    return asyncio.run(main())


def test_greedy_rows_joining_mid_decode_equal_generate(model):
    lengths = [24, 5, 16, 3, 12, 20]
    requests = [make_request(model, seed, n) for seed, n in enumerate(lengths)]
    results, sizes = run_staggered(model, requests, joins_after=[0, 2, 3, 6, 6, 9])
    for (req, vis, ds), (tokens, finish) in zip(requests, results):
        expected = reference(model, req, vis, ds)
        assert tokens == expected
        assert finish == ("stop" if expected[-1] == EOS else "length")
    assert max(sizes) > 2  # rows really shared decode steps


def test_a_short_row_leaves_while_a_long_one_goes_on(model):
    requests = [make_request(model, 0, 30, ignore_eos=True), make_request(model, 1, 2, ignore_eos=True)]
    results, sizes = run_staggered(model, requests, joins_after=[0, 1])
    assert [len(t) for t, _ in results] == [30, 2]
    assert all(f == "length" for _, f in results)
    assert sizes.count(2) == 1  # one step together, then the long row decodes alone


def test_sampled_rows_share_batches_and_a_seed_reproduces_the_answer(model):
    sampled = make_request(model, 3, 10, temperature=1.0, seed=7, ignore_eos=True)
    alone, _ = run_staggered(model, [sampled], joins_after=[0])
    mixed, sizes = run_staggered(model, [make_request(model, 4, 12), sampled, make_request(model, 5, 10)],
                                 joins_after=[0, 1, 2])
    assert mixed[1] == alone[0] and max(sizes) >= 2
    assert mixed[0][0] == reference(model, *make_request(model, 4, 12))  # greedy unaffected by its neighbour


def test_min_tokens_holds_off_eos_and_ignore_eos_runs_to_max_tokens(model):
    req, vis, ds = make_request(model, 0, 8)
    # A model that wants to end at once: end-of-sequence scores highest everywhere.
    with torch.no_grad():
        model.llm.lm_head.bias = torch.nn.Parameter(torch.zeros(VOCAB))
        model.llm.lm_head.bias[EOS] = 1e4
    try:
        plain = run_staggered(model, [(req, vis, ds)], [0])[0][0]
        held = run_staggered(model, [(GenRequest(req.prompt_ids, 8, min_tokens=3), vis, ds)], [0])[0][0]
        ignored = run_staggered(model, [(GenRequest(req.prompt_ids, 8, ignore_eos=True), vis, ds)], [0])[0][0]
    finally:
        model.llm.lm_head.bias = None
    assert plain == ([EOS], "stop")
    assert len(held[0]) == 4 and EOS not in held[0][:3] and held == (held[0][:3] + [EOS], "stop")
    assert len(ignored[0]) == 8 and ignored[1] == "length"


def test_a_stop_string_ends_the_row(model):
    req, vis, ds = make_request(model, 2, 12, ignore_eos=True)
    full = reference(model, GenRequest(req.prompt_ids, 12), vis, ds)
    text = lambda ids: " ".join(map(str, ids))  # noqa: E731 - a stand-in detokenizer
    stop = f" {full[3]} {full[4]}" if full[3:5] else "never"

    async def main():
        engine = DecodeEngine(model, torch.device("cpu"), decode_text=text)
        return await collect(Scheduler(engine, 4), Row(GenRequest(req.prompt_ids, 12, stop=[stop]), vis, ds))
    tokens, finish = asyncio.run(main())
    assert finish == "stop" and tokens == full[:5]


def test_a_cancelled_row_frees_its_slot_at_the_next_step(model):
    async def main():
        scheduler = Scheduler(DecodeEngine(model, torch.device("cpu")), max_rows=1)
        long = asyncio.ensure_future(collect(scheduler, Row(*make_request(model, 0, 60, ignore_eos=True))))
        while scheduler.running == 0:
            await asyncio.sleep(0.001)
        waiting = asyncio.ensure_future(collect(scheduler, Row(*make_request(model, 1, 3, ignore_eos=True))))
        await asyncio.sleep(0.01)
        assert scheduler.queued == 1 and scheduler.running == 1  # one slot, taken
        long.cancel()
        tokens, finish = await asyncio.wait_for(waiting, 30)
        assert len(tokens) == 3 and finish == "length" and scheduler.running == 0
    asyncio.run(main())


def test_static_batching_the_bench_baseline_holds_answers_until_the_batch_ends(model):
    """`llm.scheduling: static`: a request waits for the pool to empty, and a short answer
    goes out with the longest of its batch; the tokens are the same."""
    requests = [make_request(model, 0, 12, ignore_eos=True), make_request(model, 1, 3, ignore_eos=True),
                make_request(model, 2, 4, ignore_eos=True)]

    async def main():
        scheduler = Scheduler(DecodeEngine(model, torch.device("cpu")), 8)
        scheduler.set_static(True)
        done_at = {}

        async def timed(i, row):
            out = await collect(scheduler, row)
            done_at[i] = len(steps)
            return out
        steps = []
        scheduler.on_step = lambda result, _: steps.append(result.decoded)
        first = [asyncio.ensure_future(timed(i, Row(*requests[i]))) for i in (0, 1)]
        while not steps:
            await asyncio.sleep(0.001)
        late = asyncio.ensure_future(timed(2, Row(*requests[2])))  # the pool is busy: it waits
        return await asyncio.gather(*first, late), done_at
    results, done_at = asyncio.run(main())
    assert [t for t, _ in results] == [reference(model, GenRequest(r.prompt_ids, r.max_tokens), v, d)
                                       for r, v, d in requests]
    assert done_at[0] == done_at[1] < done_at[2]  # the short one left with the long one


def test_a_streamed_row_hears_every_step_and_one_that_is_not_its_first_token_then_the_end(model):
    async def main():
        scheduler = Scheduler(DecodeEngine(model, torch.device("cpu")), 4)
        plain = scheduler.submit(Row(*make_request(model, 0, 6, ignore_eos=True)))
        streamed = scheduler.submit(Row(*make_request(model, 1, 6, ignore_eos=True, stream=True)))
        async def chunks(stream):
            return [c async for c in stream.chunks()]
        return await asyncio.gather(chunks(plain), chunks(streamed))
    plain, streamed = asyncio.run(main())
    assert [len(c) for c in plain] == [1, 5] and [len(c) for c in streamed] == [1] * 6
