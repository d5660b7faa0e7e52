"""The three model stages, plain classes, so the same code runs as its own Serve deployment
(topology `pipeline`) or in-process inside one deployment (topology `single`). Vision and
projection each have one `@batch` method (serve/batching.py: a batch forms when the model
is free); the LLM stage batches per decode step (serve/scheduler.py) and streams:

    VisionStage.encode      image bytes -> decode, resize, normalize -> ViT patches + DeepStack taps
    ProjectionStage.project patches, taps -> visual embeds + DeepStack embeds (LLM space)
    LLMStage.generate       visual embeds + prompt ids -> prefill (injection, pruning), then decode
                            steps shared with the other requests; yields tokens as decoded

A replica loads the whole model from safetensors and keeps only its stage's modules, on the
GPU when Ray gave it one (`num_gpus` > 0 makes CUDA visible to the replica; 0 hides it).
Tensors cross stages on the CPU (the object store), so stages may sit on different devices.
One bad item never fails its batch: an undecodable image becomes a `StageError` that the
later stages pass through, and if a batched call raises, its items are retried one by one.
Tensors between stages are one request's slices (no batch dimension): batches are formed
independently in each stage.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from typing import Any, AsyncIterator, Callable, Sequence

import torch

from raybench.data.loader import DataError, decode_rgb_uint8, normalize_pixels
from raybench.model.vlm import HybridVLM
from raybench.serve import metrics, torch_thread
from raybench.serve.batching import batch
from raybench.serve.compiled_decode import BUCKETS, CompiledDecode
from raybench.serve.engine import DecodeEngine, Row, StepResult
from raybench.serve.payloads import (GenOut, GenRequest, ProjectionOut, StageError, VisionOut, from_wire,
                                     to_wire)
from raybench.serve.model_source import resolve_model_dir
from raybench.serve.scheduler import Scheduler

log = logging.getLogger("ray.serve")
UNHEALTHY_AFTER_FAILURES = 3  # batches (decode steps) failing in a row


class _Stage:
    """Model loading, warm-up, batch-size accounting and `reconfigure` shared by the stages."""
    name = "stage"
    keep: tuple[str, ...] = ()         # HybridVLM submodules this stage needs

    def __init__(self, model_ref: str, tracking_uri: str | None = None, compile: bool = False,
                 torch_threads: int | None = None, batch: dict[str, Any] | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        t0 = time.perf_counter()
        torch_thread.call(self._load, model_ref, tracking_uri, compile, batch)
        log.info("%s ready in %.1fs on %s (model %s, %d torch threads, compile=%s)", self.name,
                 time.perf_counter() - t0, self.device, self.model_dir, torch.get_num_threads(), compile)

    def _load(self, model_ref: str, tracking_uri: str | None, compile: bool, batch: dict[str, Any] | None) -> None:
        """Load, set up and warm the model on the thread that will run it (serve/torch_thread.py;
        the thread count set above is the process's)."""
        self.model_dir = resolve_model_dir(model_ref, tracking_uri)
        model = HybridVLM.from_pretrained(self.model_dir).requires_grad_(False)
        for name in ("vision", "projector", "deepstack", "llm"):
            if name not in self.keep and getattr(model, name, None) is not None:
                setattr(model, name, None)  # free what other stages hold
        self.device = _device()
        self.model = model.to(self.device)
        self.compiled = compile
        if compile:
            self._compile()
        self.batch_sizes: Counter[int] = Counter()
        self.failed_batches = 0  # in a row: a model that fails every batch is unusable
        self.health_problem: str | None = None
        self._setup()
        if batch:
            self.reconfigure(batch)
        self.warm_up()

    def _compile(self) -> None:
        # In place and per block, as training does: wrapping `model.llm` in torch.compile
        # would never run compiled (the decoder calls its layers one by one).
        # dynamic=True: batch sizes vary from call to call; avoid a recompile per size.
        for unit in self.model.units(self.keep):
            unit.compile(dynamic=True)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's `user_config` (batch knobs), also live."""
        method = getattr(self, self.batched_method)
        if "max_batch_size" in user_config:
            method.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            method.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    def _setup(self) -> None:
        """What a stage builds around its model before `reconfigure` and `warm_up`."""

    def warm_up(self) -> None:
        """One small batch at start-up so the first request does not pay first-call costs."""

    def run_health_check(self) -> str | None:
        """Why the stage is unusable, or None: weights no longer finite (a corrupted load or
        device), or its last batches all failed. Remembered for `health`."""
        problem = None
        if self._failures() >= UNHEALTHY_AFTER_FAILURES:
            problem = f"{self.name}: the last {self._failures()} batches failed"
        else:
            with torch.inference_mode():
                bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
            if bad:
                problem = f"{self.name}: non-finite weights in {bad[:3]}"
        self.health_problem = problem
        return problem

    def _failures(self) -> int:
        return self.failed_batches

    def check_health(self) -> None:
        """Serve calls this every `health_check_period_s`: raising marks the replica unhealthy
        (Serve replaces it)."""
        problem = self.run_health_check()
        if problem:
            raise RuntimeError(problem)

    def health(self) -> str | None:
        """The last check's verdict, for the ingress's /health (cheap: no model work)."""
        return self.health_problem

    def stats(self) -> dict[str, Any]:
        n = sum(self.batch_sizes.values())
        return {"stage": self.name, "pid": os.getpid(), "batches": n,
                "requests": sum(k * v for k, v in self.batch_sizes.items()),
                "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "max_batch_size_seen": max(self.batch_sizes, default=0),
                "torch_threads": torch.get_num_threads(), "compiled": self.compiled, "device": str(self.device)}

    async def _run_batch(self, items: Sequence[Any], fn: Callable[[list[Any]], list[Any]]) -> list[Any]:
        """Run `fn` on the non-error items in a worker thread (the replica's event loop keeps
        queueing the next batch meanwhile); on an exception fall back to one item at a time."""
        live = [i for i, x in enumerate(items) if not isinstance(x, StageError)]
        out: list[Any] = list(items)
        if not live:
            return out
        self.batch_sizes[len(live)] += 1
        metrics.observe_batch(self.name, len(live), getattr(self, self.batched_method).queued())
        try:
            results = await torch_thread.run(fn, [items[i] for i in live])
        except Exception:
            if len(live) == 1:
                results = [self._internal_error(live[0], items)]
            else:
                results = []
                for i in live:
                    try:
                        results.extend(await torch_thread.run(fn, [items[i]]))
                    except Exception:
                        results.append(self._internal_error(i, items))
        failed = all(isinstance(r, StageError) for r in results)
        self.failed_batches = self.failed_batches + 1 if failed else 0
        for i, r in zip(live, results):
            if isinstance(r, (VisionOut, ProjectionOut)):
                r.batch_sizes = {**getattr(items[i], "batch_sizes", {}), self.name: len(live)}
            out[i] = r
        return out

    def _internal_error(self, i: int, items: Sequence[Any]) -> StageError:
        log.exception("%s failed on one request", self.name)
        return StageError(500, f"{self.name} failed on this request", "internal_error")


class VisionStage(_Stage):
    name, keep, batched_method = "vision", ("vision",), "encode"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_size = self.model.config.vision.image_size

    def warm_up(self) -> None:
        s = self.model.config.vision.image_size
        with torch.inference_mode():
            self.model.encode_images(torch.zeros(2, 3, s, s, device=self.device))

    @batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode(self, images: list[bytes]) -> list[VisionOut | StageError]:
        # Decode per item first: a bad image is that request's 400, not the batch's failure.
        decoded = await asyncio.to_thread(self._decode_all, images)
        return await self._run_batch(decoded, self._encode)

    def _decode_all(self, images: list[bytes]) -> list[Any]:
        decoded: list[Any] = []
        for data in images:
            try:
                decoded.append(decode_rgb_uint8(data, self.image_size))
            except DataError as err:
                decoded.append(StageError(400, str(err), "invalid_image"))
        return decoded

    def _encode(self, arrays: list) -> list[VisionOut]:
        pixels = normalize_pixels(torch.from_numpy(_stack_np(arrays)).to(self.device))
        with torch.inference_mode():
            patches, taps = self.model.encode_images(pixels)
            patches, taps = patches.cpu(), [t.cpu() for t in taps]
        return [VisionOut(to_wire(patches[i]), [to_wire(t[i]) for t in taps]) for i in range(len(arrays))]


class ProjectionStage(_Stage):
    name, keep, batched_method = "projection", ("projector", "deepstack"), "project"

    def warm_up(self) -> None:
        cfg = self.model.config
        p, hv = cfg.num_patches, cfg.vision.hidden_size
        z = torch.zeros(2, p, hv, device=self.device)
        with torch.inference_mode():
            self.model.project(z, [z] * len(cfg.deepstack_visual_indexes))

    @batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def project(self, features: list[VisionOut | StageError]) -> list[ProjectionOut | StageError]:
        return await self._run_batch(features, self._project)

    def _project(self, feats: list[VisionOut]) -> list[ProjectionOut]:
        patches = torch.stack([from_wire(f.patches) for f in feats]).to(self.device)
        taps = [torch.stack([from_wire(f.taps[k]) for f in feats]).to(self.device) for k in range(len(feats[0].taps))]
        with torch.inference_mode():
            visual, deepstack = self.model.project(patches, taps)
            visual, deepstack = visual.cpu(), [d.cpu() for d in deepstack]
        return [ProjectionOut(to_wire(visual[i]), [to_wire(d[i]) for d in deepstack]) for i in range(len(feats))]


class LLMStage(_Stage):
    """Continuous batching (serve/engine.py, serve/scheduler.py): requests join a pool of
    decode rows between steps and leave it when they end, so `max_batch_size` is the pool's
    size here, and `batch_wait_timeout_s` has nothing to wait for."""
    name, keep = "llm", ("llm",)

    def _setup(self) -> None:
        from raybench.data.processor import VQAProcessor
        from raybench.data.tokenizer import load_tokenizer

        cfg = self.model.config
        # The tokenizer only renders answers for stop strings; the ingress has its own.
        proc = VQAProcessor(load_tokenizer(self.model_dir), cfg.num_image_tokens, cfg.vision.image_size)
        compiled = CompiledDecode(self.model, BUCKETS[-1]) if self.compiled else None
        self.scheduler = Scheduler(DecodeEngine(self.model, self.device, proc.decode_answer, compiled), 16,
                                   on_step=self._count_step)
        self.stream_interval = 1  # llm.stream_interval, through reconfigure

    def _compile(self) -> None:
        """The decode step, compiled per batch-size bucket (`_setup`); prefill stays eager:
        its prompt lengths vary from batch to batch."""

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        if "max_batch_size" in user_config:
            n = int(user_config["max_batch_size"])
            if self.compiled and n > BUCKETS[-1]:
                raise ValueError(f"max_batch_size = {n}: a compiled LLM stage decodes at most {BUCKETS[-1]} rows")
            self.scheduler.set_max_rows(n)
        self.scheduler.set_static(user_config.get("scheduling", "continuous") == "static")
        self.stream_interval = int(user_config.get("stream_interval", 1))

    def warm_up(self) -> None:
        m = self.model
        n = m.config.num_image_tokens
        z = torch.zeros(n, m.llm.config.hidden_size)
        # Any real token will do; eos always has an embedding row (pad + 1 has none where
        # load_tokenizer added <pad> as the last token of an LLM without spare rows).
        t = m.eos_token_id
        engine = self.scheduler.engine

        def rows(k: int) -> list[Row]:
            return [Row(GenRequest([t] + [m.image_token_id] * n + [t], 2),
                        z, [z] * len(m.config.deepstack_visual_indexes)) for _ in range(k)]

        # Compiled: every bucket up to the pool's size, so no request waits for a compile.
        for k in ([b for b in BUCKETS if b <= self.scheduler.max_rows] if self.compiled else [2]):
            engine.step(rows(k))
            engine.step([])

    def _count_step(self, result: StepResult, seconds: float) -> None:
        if result.decoded:
            self.batch_sizes[result.decoded] += 1
        metrics.observe_decode_step(result.decoded, result.decoded + result.prefilled, seconds,
                                    self.scheduler.queued)

    async def generate(self, projected: ProjectionOut | StageError,
                       gen: GenRequest) -> AsyncIterator[list[int] | GenOut | StageError]:
        """Events for one request: token lists as decoded (with `gen.stream`; otherwise only
        the first, which says the request holds a slot), then the `GenOut`; or one StageError."""
        if isinstance(projected, StageError):
            yield projected
            return
        row = Row(gen, from_wire(projected.visual_embeds), [from_wire(d) for d in projected.deepstack_embeds])
        stream = self.scheduler.submit(row)
        tokens: list[int] = []
        held: list[int] = []  # streamed tokens not yet sent (stream_interval)
        async for chunk in stream.chunks():
            if not tokens or (gen.stream and len(held) + len(chunk) >= self.stream_interval):
                yield held + chunk  # the first token at once: it says the request holds a slot
                held = []
            elif gen.stream:
                held += chunk
            tokens += chunk
        if held:
            yield held
        if stream.finish == "error":
            yield StageError(500, "llm failed on this request", "internal_error")
            return
        yield GenOut(tokens, stream.finish, {**projected.batch_sizes, self.name: row.largest_batch})

    def _failures(self) -> int:
        return self.scheduler.engine.failed_steps

    def stats(self) -> dict[str, Any]:
        engine = self.scheduler.engine
        return {**super().stats(), "rows": self.scheduler.running, "queued": self.scheduler.queued,
                "cancelled_rows": engine.cancelled_rows}


def _device() -> torch.device:
    """The GPU Ray assigned to this replica (`num_gpus` > 0), else the CPU: never a GPU the
    replica did not reserve, even where Ray leaves CUDA visible to zero-GPU actors."""
    import ray

    try:
        assigned = ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - outside a Ray worker: no assignment
        assigned = []
    return torch.device("cuda" if assigned and torch.cuda.is_available() else "cpu")


def _finish(tokens: list[int], eos: int) -> GenOut:
    if eos in tokens:
        return GenOut(tokens[: tokens.index(eos) + 1], "stop")
    return GenOut(tokens, "length")


def _stack_np(arrays: list):
    import numpy as np

    return np.stack(arrays)
