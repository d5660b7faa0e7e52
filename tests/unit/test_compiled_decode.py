"""The compiled decode step of the LLM stage (serve/compiled_decode.py), Ray-free on the
tiny model: rows padded to a batch-size bucket decode exactly the eager engine's tokens,
and once every bucket ran, rows joining and leaving compile nothing more.

Dynamo's "eager" backend: the graphs are captured (and guarded) as with inductor, without
inductor's code generation, which `raybench bench compile` times."""

import pytest
import torch
from torch._dynamo.utils import counters

from raybench.serve.compiled_decode import BUCKETS, CompiledDecode, bucket
from raybench.serve.engine import DecodeEngine, Row

from test_serve_continuous import EOS, make_request, model, reference  # noqa: F401 - the fixture


def test_buckets_hold_their_rows():
    assert [bucket(n) for n in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    with pytest.raises(ValueError):
        bucket(BUCKETS[-1] + 1)


def _drain(engine: DecodeEngine, joins: list[list[Row]]) -> None:
    """Rows join at successive steps (a list per step), then the pool decodes to its end."""
    for group in joins:
        engine.step(group)
    while engine.rows:
        engine.step([])


def test_padded_buckets_decode_the_eager_engine_s_tokens_and_compile_once_per_bucket(model):  # noqa: F811
    torch._dynamo.reset()
    compiled = CompiledDecode(model, 4, backend="eager")
    engine = DecodeEngine(model, torch.device("cpu"), compiled=compiled)
    cases = [make_request(model, c, max_tokens=3 + c % 4, ignore_eos=c % 2 == 0) for c in range(4)]
    long = make_request(model, 4, max_tokens=40, ignore_eos=True)  # joins later: the pool's keys grow

    def rows(idx):
        return [Row(*cases[i]) for i in idx]

    # Warm every bucket up to 4 at this capacity, as the stage's warm_up does.
    for k in (1, 2, 4):
        _drain(engine, [rows(list(range(k)))])
    graphs = counters["stats"]["unique_graphs"]
    cases.append(long)
    # Rows join mid-decode (2, then 2 more, one of them long enough to grow the pool's key
    # capacity, then 1 more: 3 live rows pad to 4) and leave on their own.
    idx = ([0, 1], [2, 4], [3])
    joined = [rows(i) for i in idx]
    _drain(engine, joined)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after warm-up
    assert engine.compiled.rows == 4 and max(len(r.tokens) for g in joined for r in g) == 40
    for group, ids in zip(joined, idx):
        for row, i in zip(group, ids):
            req, visual, deepstack = cases[i]
            if not req.ignore_eos:  # generate() stops at eos; ignore_eos rows go on
                assert row.tokens == reference(model, req, visual, deepstack)
    eager = DecodeEngine(model, torch.device("cpu"))
    again = [rows(i) for i in idx]
    _drain(eager, again)
    assert [r.tokens for g in joined for r in g] == [r.tokens for g in again for r in g]
