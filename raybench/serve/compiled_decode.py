"""The LLM stage's decode step under `torch.compile` (`serve.compile: true`).

A compiled graph is specialised on its input shapes, and a continuous-batching pool changes
its row count every time a request joins or leaves. So the step runs on a batch-size bucket
(1, 2, 4, 8, ...): the live rows padded up to the bucket with rows that decode nothing, over
a pool whose buffers have a fixed row count (`SlotKVCache(rows=...)`). The pool's key
capacity grows with the longest row and is marked dynamic, so one graph per bucket serves
every capacity: the stage's `warm_up` compiles each bucket at start-up, and no request pays
for a compile.
"""

from __future__ import annotations

import weakref

import torch

from raybench.model.slot_cache import SlotKVCache

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def bucket(n: int) -> int:
    """The smallest bucket that holds `n` rows."""
    for b in BUCKETS:
        if n <= b:
            return b
    raise ValueError(f"{n} rows: at most {BUCKETS[-1]} in a compiled decode step")


class CompiledDecode:
    """`model.decode_step`, compiled, on the bucket that holds the live rows."""

    def __init__(self, model, max_rows: int, backend: str = "inductor"):
        self.model = model
        self.rows = bucket(max_rows)
        self.step = torch.compile(model.decode_step, dynamic=False, backend=backend)
        self._marked = None  # a weak reference to the buffers last marked (new ones as the pool grows)

    def new_cache(self) -> SlotKVCache:
        return SlotKVCache(len(self.model.decoder_layers), rows=self.rows)

    def _mark_capacity_dynamic(self, cache: SlotKVCache) -> None:
        if self._marked is not None and self._marked() is cache.keys[0]:
            return
        for layer in range(cache.num_layers):
            for buf in (cache.keys[layer], cache.values[layer]):  # [rows, heads, capacity, dim]
                torch._dynamo.mark_dynamic(buf, 2)
            torch._dynamo.mark_dynamic(cache.key_valid[layer], 1)  # [rows, capacity]
        self._marked = weakref.ref(cache.keys[0])

    def __call__(self, token: torch.Tensor, pos: torch.Tensor, cache: SlotKVCache) -> torch.Tensor:
        self._mark_capacity_dynamic(cache)
        n = token.shape[0]
        pad = bucket(n) - n
        if pad:  # rows past the live ones decode a pad token at position 0, into unowned slots
            token = torch.cat([token, token.new_zeros(pad)])
            pos = torch.cat([pos, pos.new_zeros(pad)])
        return self.step(token, pos, cache)[:n]
