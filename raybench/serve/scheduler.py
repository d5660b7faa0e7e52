"""The LLM stage's slot pool: one decode loop, requests join and leave between its steps.

`submit(row)` queues a request and returns its `RowStream`; one loop task (started by the
first request, ended when nothing is left) runs `DecodeEngine.step` off the event loop (on
the process's model thread, serve/torch_thread.py), so the replica keeps taking requests
while the model runs. Before each step the
loop moves waiting requests into free slots (`max_rows`, live through `set_max_rows`);
after it, each row's stream learns its new tokens and, when the row ended, its finish.

A caller that stops listening (a client gone, a timeout: its task is cancelled) marks its
row cancelled; the next step drops it and its slot goes to the next waiting request.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import AsyncIterator, Callable

from raybench.serve import torch_thread
from raybench.serve.engine import DecodeEngine, Row, StepResult


class RowStream:
    """What one request sees of its row: tokens so far and, at the end, its finish (a request
    that is not streamed: its first token, then the rest at the end)."""

    def __init__(self, row: Row):
        self.row = row
        self.n = 0                     # tokens delivered (row.tokens[:n] never change)
        self.finish: str | None = None
        self.changed = asyncio.Event()

    def _deliver(self) -> None:
        # A request that is not streamed needs its first token (it holds a slot) and its end:
        # waking its consumer at every step would cost the event loop a wake-up per row per step.
        if not self.row.req.stream and self.n and self.row.finish is None:
            return
        # Snapshots on the event loop's thread, between steps: the next step may append.
        self.n, self.finish = len(self.row.tokens), self.row.finish
        self.changed.set()

    async def chunks(self) -> AsyncIterator[list[int]]:
        """New tokens as the steps produce them (all that arrived since the last chunk), until
        the row ends. Cancelling the consumer cancels the row."""
        sent = 0
        try:
            while True:
                await self.changed.wait()
                self.changed.clear()
                n, finish = self.n, self.finish
                if n > sent:
                    yield self.row.tokens[sent:n]
                    sent = n
                if finish is not None:
                    return
        finally:
            if self.finish is None:
                self.row.cancelled = True


class Scheduler:
    def __init__(self, engine: DecodeEngine, max_rows: int,
                 on_step: Callable[[StepResult, float], None] | None = None):
        self.engine = engine
        self.max_rows = max_rows
        self.on_step = on_step          # metrics and counters: (result, step seconds)
        self.waiting: collections.deque[RowStream] = collections.deque()
        self._loop_task: asyncio.Task | None = None
        self.static = False             # see set_static

    def set_static(self, static: bool) -> None:
        """Static batching, the baseline `raybench bench serve` compares with: requests join
        only an empty pool, and every answer of a batch goes out when its longest has ended."""
        self.static = static
        self.engine.hold_finished = static

    def set_max_rows(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {n}")
        self.max_rows = n  # a smaller pool fills no new slots until rows leave

    def submit(self, row: Row) -> RowStream:
        stream = RowStream(row)
        self.waiting.append(stream)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())
        return stream

    @property
    def queued(self) -> int:
        return sum(1 for s in self.waiting if not s.row.cancelled)

    @property
    def running(self) -> int:
        return len(self.engine.rows)

    async def _loop(self) -> None:
        streams: dict[int, RowStream] = {}
        while self.waiting or self.engine.rows:
            joining = []
            while (self.waiting and len(self.engine.rows) + len(joining) < self.max_rows
                   and not (self.static and self.engine.rows)):
                s = self.waiting.popleft()
                if not s.row.cancelled:
                    joining.append(s.row)
                    streams[id(s.row)] = s
            t0 = time.perf_counter()
            try:
                result = await torch_thread.run(self.engine.step, joining)
            except Exception:  # noqa: BLE001 - the engine catches model errors; this is a bug
                result = self._fail_all(joining)
            if self.on_step is not None:
                self.on_step(result, time.perf_counter() - t0)
            held = self.static and bool(self.engine.rows)
            # Static batching delivers to every row of the batch: held answers go out at its end.
            for row in (result.advanced if not self.static else [s.row for s in streams.values()]):
                if held and row.finish is not None:
                    continue  # static batching: answers go out when the batch has ended
                streams[id(row)]._deliver()
                if row.finish is not None:
                    del streams[id(row)]
            for key in [k for k, s in streams.items() if s.row.cancelled and s.row not in self.engine.rows]:
                del streams[key]  # dropped by this step

    def _fail_all(self, joining: list[Row]) -> StepResult:
        """Every row in the pool or joining ends with an error; the pool starts empty."""
        rows = [*self.engine.rows, *joining]
        for r in rows:
            r.finish = "error"
        self.engine.reset()
        return StepResult(rows, 0, 0)
