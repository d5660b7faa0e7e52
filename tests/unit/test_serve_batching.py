"""serve/batching.py: a batch forms when the model is free, from what queued meanwhile."""

import asyncio

import pytest

from raybench.serve.batching import batch


class Model:
    """A batched method whose batches wait on `release`: the test decides when the model is busy."""

    def __init__(self, timeout_s: float = 0.0, max_batch_size: int = 16):
        self.sizes: list[int] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.double.set_max_batch_size(max_batch_size)
        self.double.set_batch_wait_timeout_s(timeout_s)

    @batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def double(self, xs: list[int], tags: list[str]) -> list[str]:
        self.sizes.append(len(xs))
        self.started.set()
        await self.release.wait()
        if -1 in xs:
            raise ValueError("bad item")
        return [f"{t}{2 * x}" for x, t in zip(xs, tags)]


async def _one_busy_batch_then(model: Model, xs: list[int]) -> list:
    """Send one request; while its batch runs, send `xs` (far apart compared with the batch
    wait), then let the model go."""
    first = asyncio.ensure_future(model.double(100, "a"))
    await model.started.wait()
    rest = []
    for x in xs:
        rest.append(asyncio.ensure_future(model.double(x, "b")))
        await asyncio.sleep(0.01)
    model.release.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def test_what_queued_while_the_model_ran_is_the_next_batch():
    async def main():
        model = Model(timeout_s=0.001)  # 1 ms wait, requests 10 ms apart
        out = await _one_busy_batch_then(model, list(range(10)))
        # Not ten batches of 1 parked behind a semaphore (what Serve's replica showed with `@serve.batch`).
        assert model.sizes == [1, 10]
        assert out == ["a200"] + [f"b{2 * x}" for x in range(10)]
    asyncio.run(main())


def test_batches_respect_max_batch_size_and_keep_order():
    async def main():
        model = Model(max_batch_size=4)
        out = await _one_busy_batch_then(model, list(range(10)))
        assert model.sizes == [1, 4, 4, 2]
        assert out[1:] == [f"b{2 * x}" for x in range(10)]
    asyncio.run(main())


def test_a_failing_batch_fails_its_callers_only_and_the_queue_goes_on():
    async def main():
        model = Model()
        out = await _one_busy_batch_then(model, [1, -1])
        assert out[0] == "a200" and all(isinstance(o, ValueError) for o in out[1:])
        assert await model.double(3, "c") == "c6"  # the worker survived
    asyncio.run(main())


def test_a_cancelled_caller_is_left_out_of_the_batch():
    async def main():
        model = Model()
        first = asyncio.ensure_future(model.double(1, "a"))
        await model.started.wait()
        gone = asyncio.ensure_future(model.double(2, "x"))
        kept = asyncio.ensure_future(model.double(3, "b"))
        await asyncio.sleep(0)
        gone.cancel()
        model.release.set()
        assert await first == "a2" and await kept == "b6"
        assert model.sizes == [1, 1]
    asyncio.run(main())


def test_the_knobs_refuse_bad_values():
    async def main():
        model = Model()
        with pytest.raises(ValueError, match="max_batch_size"):
            model.double.set_max_batch_size(0)
        with pytest.raises(ValueError, match="batch_wait_timeout_s"):
            model.double.set_batch_wait_timeout_s(-1)
    asyncio.run(main())
