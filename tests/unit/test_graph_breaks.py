"""Prefill traces as one graph: the decoder loop keeps token counts as Python ints and selects
tokens with shape-static sorts and gathers, so `torch.compile` has nothing to break on. A
`.item()`, a `nonzero` or a Python `if` on a tensor creeping back into it fails here."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from raybench.config import validate_config
from raybench.cost import probe_inputs, probe_model


def _prefill(preset: str):
    model = probe_model(validate_config({"model": {"preset": preset, "size": "tiny"}}).model)
    ids, mask, pixels = probe_inputs(model, 3)
    # Row 1 left-padded by two: visual positions differ between rows.
    ids[1] = torch.cat([torch.full((2,), model.pad_token_id), ids[1, :-2]])
    mask[1, :2] = 0

    def prefill():
        with torch.no_grad():
            return model.generate(ids, mask, pixels, max_new_tokens=1)

    return model, prefill


@pytest.mark.parametrize("preset", ["hybrid", "llava"])
def test_prefill_compiles_without_graph_breaks(preset):
    model, prefill = _prefill(preset)
    if preset == "hybrid":  # pruning and DeepStack are inside the traced function
        assert model.deepstack is not None and model.stage_keep[-1] < model.config.num_image_tokens
    torch._dynamo.reset()
    explained = torch._dynamo.explain(prefill)()
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_traced_prefill_answers_as_eager():
    _, prefill = _prefill("hybrid")
    torch._dynamo.reset()
    assert torch.equal(torch.compile(prefill, backend="eager")(), prefill())


def test_a_compiled_decode_step_with_the_static_cache_compiles_once():
    model, _ = _prefill("hybrid")
    ids, mask, pixels = probe_inputs(model, 2)
    model.eos_token_id = -1  # never "done": every one of the steps runs
    eager = model.generate(ids, mask, pixels, max_new_tokens=6)
    torch._dynamo.reset()
    counter = CompileCounter()
    model.decode_step = torch.compile(model.decode_step, backend=counter)
    static = model.generate(ids, mask, pixels, max_new_tokens=6, static_cache=True)
    assert torch.equal(static, eager)
    assert counter.frame_count == 1  # 5 decode steps, one graph
    # The growing cache changes shapes every step: Dynamo has to trace it again.
    model.generate(ids, mask, pixels, max_new_tokens=6)
    assert counter.frame_count > 1
