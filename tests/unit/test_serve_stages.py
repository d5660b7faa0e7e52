"""The LLM stage as the ingress sees it, Ray-free on a tiny saved model: its event stream
(first token, tokens as decoded, the answer) and its health check."""

import asyncio
import threading

import pytest
import torch

from raybench.serve.payloads import GenOut, GenRequest, ProjectionOut, StageError
from raybench.serve.stages import UNHEALTHY_AFTER_FAILURES, LLMStage


@pytest.fixture(scope="module")
def stage(tiny_model_dir) -> LLMStage:
    return LLMStage(str(tiny_model_dir), batch={"max_batch_size": 4})


def projected(stage: LLMStage) -> ProjectionOut:
    m = stage.model
    z = torch.randn(m.config.num_image_tokens, m.llm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    return ProjectionOut(z, [z] * len(m.config.deepstack_visual_indexes), {"vision": 1, "projection": 1})


def events(stage: LLMStage, gen: GenRequest, upstream=None) -> list:
    async def main():
        return [e async for e in stage.generate(upstream or projected(stage), gen)]
    return asyncio.run(main())


def prompt(stage: LLMStage) -> list[int]:
    m = stage.model
    return [m.pad_token_id + 1] + [m.image_token_id] * m.config.num_image_tokens + [m.pad_token_id + 1] * 3


def test_streamed_events_are_the_tokens_then_the_answer(stage):
    streamed = events(stage, GenRequest(prompt(stage), 6, ignore_eos=True, stream=True))
    *chunks, out = streamed
    assert isinstance(out, GenOut) and out.finish_reason == "length" and len(out.tokens) == 6
    assert sum(chunks, []) == out.tokens and len(chunks) >= 2  # the first token came alone
    assert out.batch_sizes == {"vision": 1, "projection": 1, "llm": 1}
    # Not streamed: only the first token (the request holds a slot), then the same answer.
    first, plain = events(stage, GenRequest(prompt(stage), 6, ignore_eos=True))
    assert first == out.tokens[:1] and plain.tokens == out.tokens


def test_stream_interval_sends_the_first_token_alone_then_that_many_at_a_time(stage):
    stage.reconfigure({"max_batch_size": 4, "stream_interval": 3})
    try:
        *chunks, out = events(stage, GenRequest(prompt(stage), 8, ignore_eos=True, stream=True))
    finally:
        stage.reconfigure({"max_batch_size": 4})
    assert [len(c) for c in chunks] == [1, 3, 3, 1] and sum(chunks, []) == out.tokens
    assert stage.stream_interval == 1  # a reconfigure without it goes back to the default


def test_an_upstream_error_passes_through(stage):
    err = StageError(400, "bad image", "invalid_image")
    assert events(stage, GenRequest(prompt(stage), 4), upstream=err) == [err]


def test_check_health_fails_when_the_model_is_unusable(stage):
    assert stage.run_health_check() is None and stage.health() is None
    stage.check_health()
    weight = stage.model.llm.lm_head.weight
    kept = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] = float("nan")
    try:
        with pytest.raises(RuntimeError, match="non-finite weights in .*lm_head"):
            stage.check_health()
        assert "lm_head" in stage.health()
    finally:
        with torch.no_grad():
            weight[0, 0] = kept
    stage.scheduler.engine.failed_steps = UNHEALTHY_AFTER_FAILURES
    try:
        assert "batches failed" in stage.run_health_check()
    finally:
        stage.scheduler.engine.failed_steps = 0
    assert stage.run_health_check() is None


def test_with_several_torch_threads_load_warm_up_and_steps_share_one_thread(tiny_model_dir):
    """Two OpenMP teams (one per thread running torch) contend for the cores: the stage loads,
    warms up and steps its model on one thread (serve/torch_thread.py), never the event loop's."""
    seen: set[int] = set()

    class Recording(LLMStage):
        def warm_up(self):
            seen.add(threading.get_ident())
            super().warm_up()

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stage = Recording(str(tiny_model_dir), batch={"max_batch_size": 4})
        step = stage.scheduler.engine.step
        stage.scheduler.engine.step = lambda joining: (seen.add(threading.get_ident()), step(joining))[1]
        for max_tokens in (3, 5):
            assert isinstance(events(stage, GenRequest(prompt(stage), max_tokens, ignore_eos=True))[-1], GenOut)
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 1 and threading.get_ident() not in seen
