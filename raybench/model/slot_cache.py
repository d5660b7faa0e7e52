"""A KV cache whose rows come and go: the decode pool of continuous batching.

`generate()` prefills a batch and decodes it to the end; its caches hold rows that all
started together. A serving decode loop admits a request's rows between decode steps and
drops each row when it finishes, so here every row keeps its own write position per
layer (rows were prefilled at different times, with different prompt lengths, and pruning
makes each layer's length its own).

Layout: per layer, buffers [rows, kv heads, capacity, head dim] with the live rows first
(0..n-1). A decode step over the pool runs on views `[:n]`, with no copy; a finished row is
replaced by the last live row (one row copied per layer), so the live rows stay packed.
Unwritten and padding keys are masked, so a row attends to exactly the keys its own
`generate()` would have: its prompt's and its own decoded tokens'.
"""

from __future__ import annotations

import torch

from raybench.model.llm import KVCache

# Capacity grows in steps of this many keys, and rows in steps of _GROW_ROWS: fewer
# re-allocations (each copies the whole pool) as rows join.
_GROW = 32
_GROW_ROWS = 8


class SlotKVCache:
    """`decode_step`'s cache for a pool of rows at different positions.

    `rows`: allocate this many row slots at once and never grow them, for a compiled decode
    step (serve/compiled_decode.py), whose graphs are specialised on the buffers' shapes. A
    step may then run on more rows than are live (a batch-size bucket); the extra rows write
    into slots no live row owns, which `admit` resets before use."""

    def __init__(self, num_layers: int, rows: int | None = None):
        self.num_layers = num_layers
        self.fixed_rows = rows
        self._clear()

    def _clear(self) -> None:
        num_layers = self.num_layers
        self.n = 0  # live rows, packed at the front
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_valid: list[torch.Tensor | None] = [None] * num_layers  # [rows, capacity]
        self.length: torch.Tensor | None = None  # [layers, rows]: each row's next write index

    def admit(self, prefilled: KVCache, rows: list[int], room: list[int]) -> list[int]:
        """Copy rows of a just-prefilled cache into the pool, each with `room` more keys for
        its decode steps. Returns their pool indices (appended after the live rows)."""
        first, k = self.n, len(rows)
        src = torch.tensor(rows, device=prefilled.keys[0].device)
        if self.fixed_rows is not None and first + k > self.fixed_rows:
            raise ValueError(f"the pool holds {self.fixed_rows} rows; {first + k} asked for")
        self._reserve(max(first + k, self.fixed_rows or 0), [prefilled.keys[l].shape[2] + max(room) for l in range(self.num_layers)],
                      prefilled.keys[0])
        for l in range(self.num_layers):
            t = prefilled.keys[l].shape[2]
            self.keys[l][first:first + k, :, :t] = prefilled.keys[l][src]
            self.values[l][first:first + k, :, :t] = prefilled.values[l][src]
            self.key_valid[l][first:first + k] = False
            self.key_valid[l][first:first + k, :t] = prefilled.key_valid[l][src]
            self.length[l, first:first + k] = t
        self.n += k
        return list(range(first, first + k))

    def remove(self, i: int) -> int | None:
        """Drop live row i; the last live row moves into its place. Returns the index that
        moved (now i), or None when i was the last."""
        last = self.n - 1
        moved = None
        if i != last:
            for l in range(self.num_layers):
                for buf in (self.keys[l], self.values[l], self.key_valid[l]):
                    buf[i] = buf[last]
            self.length[:, i] = self.length[:, last]
            moved = last
        self.n -= 1
        if self.n == 0:  # an idle pool holds no memory
            self._clear()
        return moved

    def _reserve(self, rows: int, capacity: list[int], like: torch.Tensor) -> None:
        """Grow the buffers (zero-filled) to at least `rows` rows and each layer's capacity."""
        if self.length is None:
            self.length = torch.zeros(self.num_layers, 0, dtype=torch.long, device=like.device)
        have = self.length.shape[1]
        if rows > have:  # room for a few more rows too: a pool that grows one row at a time copies less
            rows = rows if self.fixed_rows else -(-rows // _GROW_ROWS) * _GROW_ROWS
            self.length = torch.cat([self.length, self.length.new_zeros(self.num_layers, rows - have)], 1)
        for l in range(self.num_layers):
            cap = -(-capacity[l] // _GROW) * _GROW
            old = self.keys[l]
            if old is not None and old.shape[0] >= rows and old.shape[2] >= cap:
                continue
            h, d = like.shape[1], like.shape[3]
            r = max(rows, 0 if old is None else old.shape[0])
            c = max(cap, 0 if old is None else old.shape[2])
            keys, values = like.new_zeros(r, h, c, d), like.new_zeros(r, h, c, d)
            valid = torch.zeros(r, c, dtype=torch.bool, device=like.device)
            if old is not None:
                keys[:old.shape[0], :, :old.shape[2]] = old
                values[:old.shape[0], :, :old.shape[2]] = self.values[l]
                valid[:old.shape[0], :old.shape[2]] = self.key_valid[l]
            self.keys[l], self.values[l], self.key_valid[l] = keys, values, valid

    # ------------------------------------------------------------ what the decoder calls

    def mask(self, layer_idx: int, key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """One new token per live row, written at its own position: valid from now on; it may
        see every valid key of its row (nothing after it has been written)."""
        n = key_valid.shape[0]
        buf = self.key_valid[layer_idx]
        buf[torch.arange(n, device=buf.device), self.length[layer_idx, :n]] = True
        live = buf[:n]
        return torch.zeros(live.shape, dtype=dtype, device=live.device).masked_fill(
            ~live, torch.finfo(dtype).min)[:, None, None, :]

    def update(self, key, value, layer_idx, *args, **kwargs):
        n = key.shape[0]
        rows = torch.arange(n, device=key.device)
        at = self.length[layer_idx, :n]
        self.keys[layer_idx][rows, :, at] = key[:, :, 0]
        self.values[layer_idx][rows, :, at] = value[:, :, 0]
        return self.keys[layer_idx][:n], self.values[layer_idx][:n]

    def advance(self) -> None:
        self.length[:, :self.n] += 1

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.keys[layer_idx] is None else self.keys[layer_idx].shape[2]
