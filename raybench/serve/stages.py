"""The three model stages. Each is a plain class with one `@batch` method (serve/batching.py:
a batch forms when the model is free), so the same code runs as its own Serve deployment
(topology `pipeline`) or in-process inside one deployment (topology `single`):

    VisionStage.encode      image bytes -> decode, resize, normalize -> ViT patches + DeepStack taps
    ProjectionStage.project patches, taps -> visual embeds + DeepStack embeds (LLM space)
    LLMStage.generate       visual embeds + prompt ids -> prefill (injection, pruning) + KV-cache decode

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
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from raybench.data.loader import DataError, decode_rgb_uint8, normalize_pixels
from raybench.model.vlm import HybridVLM
from raybench.serve.batching import batch
from raybench.serve.payloads import GenOut, GenRequest, ProjectionOut, StageError, VisionOut
from raybench.serve.model_source import resolve_model_dir

log = logging.getLogger("ray.serve")


class _Stage:
    """Model loading, warm-up, batch-size accounting and `reconfigure` shared by the stages."""
    name = "stage"
    keep: tuple[str, ...] = ()         # HybridVLM submodules this stage needs

    def __init__(self, model_ref: str, tracking_uri: str | None = None, compile: bool = False,
                 torch_threads: int | None = None, batch: dict[str, Any] | None = None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        t0 = time.perf_counter()
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
        if batch:
            self.reconfigure(batch)
        self.warm_up()
        log.info("%s ready in %.1fs on %s (model %s, %d torch threads, compile=%s)", self.name,
                 time.perf_counter() - t0, self.device, self.model_dir, torch.get_num_threads(), compile)

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

    def warm_up(self) -> None:
        """One small batch at start-up so the first request does not pay first-call costs."""

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
        try:
            results = await asyncio.to_thread(fn, [items[i] for i in live])
        except Exception:
            if len(live) == 1:
                results = [self._internal_error(live[0], items)]
            else:
                results = []
                for i in live:
                    try:
                        results.extend(await asyncio.to_thread(fn, [items[i]]))
                    except Exception:
                        results.append(self._internal_error(i, items))
        for i, r in zip(live, results):
            if isinstance(r, (VisionOut, ProjectionOut, GenOut)):
                upstream = items[i][0] if isinstance(items[i], tuple) else items[i]
                r.batch_sizes = {**getattr(upstream, "batch_sizes", {}), self.name: len(live)}
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
        return [VisionOut(patches[i].clone(), [t[i].clone() for t in taps]) for i in range(len(arrays))]


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
        patches = torch.stack([f.patches for f in feats]).to(self.device)
        taps = [torch.stack([f.taps[k] for f in feats]).to(self.device) for k in range(len(feats[0].taps))]
        with torch.inference_mode():
            visual, deepstack = self.model.project(patches, taps)
            visual, deepstack = visual.cpu(), [d.cpu() for d in deepstack]
        return [ProjectionOut(visual[i].clone(), [d[i].clone() for d in deepstack]) for i in range(len(feats))]


class LLMStage(_Stage):
    """Greedy requests of a batch run together as one left-padded batch (the longest
    max_tokens; each row is cut to its own). Sampled requests run one at a time with their
    own generator, so a `seed` reproduces an answer whatever else was in the batch."""
    name, keep, batched_method = "llm", ("llm",), "generate"

    def warm_up(self) -> None:
        m = self.model
        n = m.config.num_image_tokens
        ids = torch.tensor([[m.pad_token_id + 1] + [m.image_token_id] * n + [m.pad_token_id + 1]] * 2,
                           device=self.device)
        z = torch.zeros(2, n, m.llm.config.hidden_size, device=self.device)
        with torch.inference_mode():
            m.generate_from_visual(ids, torch.ones_like(ids), z, [z] * len(m.config.deepstack_visual_indexes),
                                   max_new_tokens=2)

    @batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def generate(self, projected: list[ProjectionOut | StageError],
                       requests: list[GenRequest]) -> list[GenOut | StageError]:
        pairs = [p if isinstance(p, StageError) else (p, r) for p, r in zip(projected, requests)]
        return await self._run_batch(pairs, self._generate)

    def _generate(self, pairs: list[tuple[ProjectionOut, GenRequest]]) -> list[GenOut]:
        greedy = [i for i, (_, r) in enumerate(pairs) if r.temperature <= 0]
        out: list[GenOut | None] = [None] * len(pairs)
        if greedy:
            for i, g in zip(greedy, self._decode([pairs[i] for i in greedy])):
                out[i] = g
        for i, pair in enumerate(pairs):
            if out[i] is None:
                out[i] = self._decode([pair])[0]
        return out  # type: ignore[return-value]

    def _decode(self, pairs: list[tuple[ProjectionOut, GenRequest]]) -> list[GenOut]:
        m = self.model
        reqs = [r for _, r in pairs]
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), m.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding: every prompt's last token in the last column
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        visual = torch.stack([p.visual_embeds for p, _ in pairs]).to(self.device)
        deepstack = [torch.stack([p.deepstack_embeds[k] for p, _ in pairs]).to(self.device)
                     for k in range(len(pairs[0][0].deepstack_embeds))]
        r0 = reqs[0]
        generator = None
        if r0.temperature > 0 and r0.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(r0.seed)
        with torch.inference_mode():
            new = m.generate_from_visual(ids.to(self.device), mask.to(self.device), visual, deepstack,
                                         max_new_tokens=max(r.max_tokens for r in reqs),
                                         temperature=r0.temperature, top_p=r0.top_p, generator=generator).cpu()
        return [_finish(row.tolist()[: r.max_tokens], m.eos_token_id) for row, r in zip(new, reqs)]


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
