"""The LLM stage's decode engine: iteration-level (continuous) batching, as Orca and vLLM.

`step(joining)` is one iteration over a pool of rows: rows whose client went away leave,
every live row decodes one token together (one `decode_step` over `SlotKVCache`, each row
at its own position), then the joining requests are prefilled together and take their
first token. Each row ends on its own (end-of-sequence, a stop string, `max_tokens`) and
leaves the pool in the same step, so a short answer never waits for a long one and a new
request never waits for a batch to drain.

Rows choose tokens each on its own: greedy rows by argmax, sampled rows with their own
temperature, top-p and generator (seeded by `seed`), so a seeded answer is the same
whatever shares its steps, and greedy and sampled requests share one decode batch.
Greedy rows give `HybridVLM.generate`'s tokens (the pool only masks keys a row does not own).

No asyncio and no Ray here: the stage runs `step` in a worker thread (serve/scheduler.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from raybench.model.llm import KVCache
from raybench.model.slot_cache import SlotKVCache
from raybench.model.vlm import HybridVLM, sample_next
from raybench.serve.payloads import GenRequest
from raybench.serve.stopping import cut_at_stop

log = logging.getLogger("ray.serve")


@dataclass(eq=False)  # rows are compared by identity (they hold tensors)
class Row:
    """One request in the engine."""
    req: GenRequest
    visual: torch.Tensor                  # [N_vis, D]
    deepstack: list[torch.Tensor]         # [N_vis, D] each
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None             # "stop" | "length" | "error" once ended
    cancelled: bool = False               # set from outside; the next step drops the row
    largest_batch: int = 0                # the most rows a step it took part in ran
    next_pos: int = 0                     # position of tokens[-1], not yet in the cache
    generator: torch.Generator | None = None


@dataclass
class StepResult:
    advanced: list[Row]                   # rows that took a token (or ended) this step
    decoded: int                          # rows in the decode step
    prefilled: int                        # rows prefilled


class DecodeEngine:
    """`compiled`: a `CompiledDecode` (serve/compiled_decode.py) that runs the decode step,
    and makes the pool's cache; None: the eager `model.decode_step` on a growing pool."""

    def __init__(self, model: HybridVLM, device: torch.device,
                 decode_text: Callable[[list[int]], str] | None = None, compiled=None):
        self.model, self.device = model, device
        self.decode_text = decode_text  # answer text so far, for stop strings
        self.compiled = compiled
        self.decode_step = compiled if compiled is not None else model.decode_step
        self.rows: list[Row] = []       # row i lives in the pool's slot i
        self.cache = self._new_cache()
        self.failed_steps = 0           # decode steps failing in a row (the stage's health)
        self.cancelled_rows = 0         # rows dropped because their caller went away
        # Static batching (a bench baseline: how LLM servers batched before Orca): finished
        # rows stay in the pool, decoding for nothing, until the whole batch has ended.
        self.hold_finished = False

    @torch.inference_mode()  # the pool's buffers too: they are written in place every step
    def step(self, joining: list[Row]) -> StepResult:
        gone = [i for i, r in enumerate(self.rows) if r.cancelled]
        self.cancelled_rows += len(gone)
        self._drop(gone)
        decoding = list(self.rows)
        if decoding:
            try:
                self._decode()
                self.failed_steps = 0
            except Exception:  # noqa: BLE001 - the pool's rows fail, the engine goes on
                self.failed_steps += 1
                log.exception("decode step failed; %d rows end with an error", len(decoding))
                for r in decoding:
                    r.finish = "error"
                self._drop(list(range(len(self.rows))))
        live = [r for r in joining if not r.cancelled]
        self._prefill_each_or_alone(live)
        return StepResult(decoding + live, len(decoding), len(live))

    def _decode(self) -> None:
        rows = self.rows
        token = torch.tensor([r.tokens[-1] for r in rows], device=self.device)
        pos = torch.tensor([r.next_pos for r in rows], device=self.device)
        logits = self.decode_step(token, pos, self.cache)
        self.cache.advance()
        for r in rows:
            r.next_pos += 1
            r.largest_batch = max(r.largest_batch, len(rows))
        self._take(logits, rows)
        ended = [i for i, r in enumerate(self.rows) if r.finish is not None]
        if not self.hold_finished or len(ended) == len(self.rows):
            self._drop(ended)

    def _prefill_each_or_alone(self, rows: list[Row]) -> None:
        """Prefill the joining rows together; if that raises, each alone (one bad request
        fails alone)."""
        if not rows:
            return
        try:
            self._prefill(rows)
            return
        except Exception:  # noqa: BLE001 - retried one by one below
            if len(rows) == 1:
                log.exception("prefill failed on one request")
                rows[0].finish = "error"
                return
        for r in rows:
            self._prefill_each_or_alone([r])

    def _prefill(self, rows: list[Row]) -> None:
        m = self.model
        width = max(len(r.req.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), m.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every prompt's last token in the last column
            ids[i, width - len(r.req.prompt_ids):] = torch.tensor(r.req.prompt_ids)
            mask[i, width - len(r.req.prompt_ids):] = 1
        visual = torch.stack([r.visual for r in rows]).to(self.device)
        deepstack = [torch.stack([r.deepstack[k] for r in rows]).to(self.device)
                     for k in range(len(rows[0].deepstack))]
        cache = KVCache(len(m.decoder_layers))
        logits, next_pos = m.prefill(ids.to(self.device), mask.to(self.device), visual, deepstack, cache)
        for r, p in zip(rows, next_pos.tolist()):
            r.next_pos = p
            r.largest_batch = max(r.largest_batch, 1)
            if r.req.temperature > 0 and r.req.seed is not None:
                r.generator = torch.Generator(device=self.device).manual_seed(r.req.seed)
        self._take(logits, rows)
        staying = [i for i, r in enumerate(rows) if r.finish is None]
        if staying:
            self.cache.admit(cache, staying, [rows[i].req.max_tokens for i in staying])
            self.rows.extend(rows[i] for i in staying)

    def _take(self, logits: torch.Tensor, rows: list[Row]) -> None:
        """Choose each row's next token and see whether the row ends with it."""
        m = self.model
        m.forbid_placeholders(logits)
        for i, r in enumerate(rows):
            if len(r.tokens) < r.req.min_tokens:
                logits[i, m.eos_token_id] = float("-inf")
        chosen = logits.argmax(-1).tolist()
        for i, r in enumerate(rows):
            if r.finish is not None:  # held by static batching: its answer is complete
                continue
            if r.req.temperature > 0:
                chosen[i] = int(sample_next(logits[i:i + 1], r.req.temperature, r.req.top_p, r.generator))
            r.tokens.append(chosen[i])
            r.finish = self._finish(r)

    def _finish(self, r: Row) -> str | None:
        if r.tokens[-1] == self.model.eos_token_id and not r.req.ignore_eos:
            return "stop"
        if (r.req.stop and self.decode_text is not None and len(r.tokens) >= r.req.min_tokens
                and cut_at_stop(self.decode_text(r.tokens), r.req.stop)[1]):
            return "stop"
        return "length" if len(r.tokens) >= r.req.max_tokens else None

    def _drop(self, indices: list[int]) -> None:
        """Remove pool rows (highest index first: removal moves the last row down)."""
        for i in sorted(indices, reverse=True):
            moved = self.cache.remove(i)
            if moved is not None:
                self.rows[i] = self.rows[moved]
            self.rows.pop()

    def _new_cache(self) -> SlotKVCache:
        if self.compiled is not None:
            return self.compiled.new_cache()
        return SlotKVCache(len(self.model.decoder_layers))

    def reset(self) -> None:
        self.rows, self.cache = [], self._new_cache()
