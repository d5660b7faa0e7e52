"""Opportunistic dynamic batching for the stages: a batch is formed when the model is free.

Why not `@serve.batch`: since concurrent batching (ray-project/ray#53096; Ray 2.60 here),
its queue forms the next batch as soon as one is handed off, then parks it behind the
`max_concurrent_batches` semaphore. Under load the model is busy, requests arrive further
apart than `batch_wait_timeout_s`, and every parked batch closes with one request in it: the
LLM stage ran batches of 1 while requests queued in its replica (`raybench bench serve`
shows the batch sizes each stage ran). Here the one worker takes everything waiting (up to
`max_batch_size`) each time the previous batch is done, so the queue that builds up while
the model runs is the next batch.

Same call contract as `@serve.batch`: the method takes one list per argument and returns one
result per item; callers call it with single items. `set_max_batch_size` and
`set_batch_wait_timeout_s` change the knobs live (a deployment's `reconfigure`).
"""

from __future__ import annotations

import asyncio
import collections
import functools
from typing import Any, Awaitable, Callable


class BatchQueue:
    """One instance's queue and worker for one batched method."""

    def __init__(self, fn: Callable[..., Awaitable[list[Any]]], max_batch_size: int, batch_wait_timeout_s: float):
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self._pending: collections.deque[tuple[tuple, asyncio.Future]] = collections.deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None

    def set_max_batch_size(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {n}")
        self.max_batch_size = n

    def set_batch_wait_timeout_s(self, s: float) -> None:
        if s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {s}")
        self.batch_wait_timeout_s = s

    async def submit(self, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((args, future))
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run())
        return await future

    async def _next_batch(self) -> list[tuple[tuple, asyncio.Future]]:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        # Wait for a fuller batch only from the first request on, as `@serve.batch` does.
        deadline = asyncio.get_running_loop().time() + self.batch_wait_timeout_s
        while len(self._pending) < self.max_batch_size:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        n = min(len(self._pending), self.max_batch_size)
        return [self._pending.popleft() for _ in range(n)]

    async def _run(self) -> None:
        while True:
            batch = [(args, f) for args, f in await self._next_batch() if not f.done()]  # skip cancelled callers
            if not batch:
                continue
            try:
                results = await self.fn(*(list(column) for column in zip(*(args for args, _ in batch))))
                if len(results) != len(batch):
                    raise RuntimeError(f"a batched method returned {len(results)} results for {len(batch)} items")
            except Exception as err:  # noqa: BLE001 - every caller of the batch gets the error
                for _, f in batch:
                    if not f.done():
                        f.set_exception(err)
                continue
            for (_, f), result in zip(batch, results):
                if not f.done():
                    f.set_result(result)


class batch:  # noqa: N801 - used as a decorator, like `serve.batch`
    """`@batch(max_batch_size=16, batch_wait_timeout_s=0.005)` on an async method taking lists."""

    def __init__(self, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005):
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s

    def __call__(self, method: Callable[..., Awaitable[list[Any]]]) -> "batch":
        self.method = method
        return self

    def __set_name__(self, owner: type, name: str) -> None:
        self.attr = f"_batch_queue_{name}"

    def __get__(self, obj: Any, objtype: type | None = None):
        if obj is None:
            return self
        queue = obj.__dict__.get(self.attr)
        if queue is None:
            queue = obj.__dict__[self.attr] = BatchQueue(functools.partial(self.method, obj),
                                                         self.max_batch_size, self.batch_wait_timeout_s)

        # A real coroutine function (Serve awaits what `inspect` says is async), with the knobs.
        async def call(*args: Any) -> Any:
            return await queue.submit(*args)

        call.__name__ = call.__qualname__ = self.method.__name__
        call.set_max_batch_size = queue.set_max_batch_size
        call.set_batch_wait_timeout_s = queue.set_batch_wait_timeout_s
        call.queued = lambda: len(queue._pending)
        return call
