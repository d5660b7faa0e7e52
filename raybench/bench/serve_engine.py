"""The LLM stage's decode engine without Serve: `bench serve`'s mixed-length point in process.

The same requests (each body's prompt, its image through vision and projection once up
front), c closed-loop clients on one `Scheduler` + `DecodeEngine`, continuous or static,
with one torch thread as a stage replica has (or `threads`). What continuous batching gives where nothing
but the LLM step costs, and what the step costs a request: the models' share of the served
mixed point is read against it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path


def engine_mixed(model_dir: Path, bodies: list[bytes], c: int, n: int, pool: int, static: bool,
                 threads: int = 1) -> tuple[list[dict], float]:
    """`n` requests from `c` clients; results as the HTTP points give them (status, max_tokens,
    seconds to the first token and to the end), and the seconds the whole loop took. The model
    loads where a stage's does (serve/torch_thread.py), with `threads` torch threads."""
    import torch

    from raybench.serve import torch_thread

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, requests = torch_thread.call(_requests, model_dir, bodies)
        return asyncio.run(_closed(model, requests, c, n, pool, static))
    finally:
        torch.set_num_threads(before)


def _requests(model_dir: Path, bodies: list[bytes]) -> tuple:
    """The model, and (GenRequest, visual embeds, DeepStack embeds) per body."""
    import torch

    from raybench.data.processor import VQAProcessor
    from raybench.data.tokenizer import load_tokenizer
    from raybench.model.vlm import HybridVLM
    from raybench.serve.config import LimitsConfig
    from raybench.serve.payloads import GenRequest
    from raybench.serve.schemas import parse_chat_request

    model = HybridVLM.from_pretrained(model_dir).requires_grad_(False)
    proc = VQAProcessor(load_tokenizer(model_dir), model.config.num_image_tokens, model.config.vision.image_size)
    out = []
    for body in bodies:
        req = parse_chat_request(body, LimitsConfig(), "raybench-vlm")
        with torch.inference_mode():
            visual, deepstack = model.project(*model.encode_images(proc.pixel_values([req.image])))
        gen = GenRequest(proc.conversation_prompt_ids(req.messages), req.max_tokens, ignore_eos=req.ignore_eos)
        out.append((gen, visual[0], [d[0] for d in deepstack]))
    return model, out


async def _closed(model, requests: list[tuple], c: int, n: int, pool: int, static: bool
                  ) -> tuple[list[dict], float]:
    import torch

    from raybench.serve.engine import DecodeEngine, Row
    from raybench.serve.scheduler import Scheduler

    scheduler = Scheduler(DecodeEngine(model, torch.device("cpu")), pool)
    scheduler.set_static(static)
    results: list[dict] = []
    counter = iter(range(n))

    async def client():
        for i in counter:
            gen, visual, deepstack = requests[i % len(requests)]
            t0, first = time.perf_counter(), None
            async for _ in scheduler.submit(Row(gen, visual, deepstack)).chunks():
                first = first or time.perf_counter() - t0
            results.append({"status": 200, "max_tokens": gen.max_tokens, "ttft_s": first,
                            "e2e_s": time.perf_counter() - t0})
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(c)))
    return results, time.perf_counter() - t0
