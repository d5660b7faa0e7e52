"""`raybench bench serve`: what serving costs, against the same model in one run.

Closed-loop HTTP load (keep-alive aiohttp clients on 127.0.0.1, each sending its next
request when the last returns) at concurrency 1, 8, 32; p50 / p99 latency and req/s for:

    in-process            the model call itself (decode image, tokenize, generate, detokenize),
                          unbatched (one request at a time) and batched (c requests, one batch)
    plain FastAPI no-op   uvicorn without Serve: the HTTP floor
    Serve no-op, 1 hop    FastAPI ingress deployment that answers at once
    Serve no-op, 3 hops   ingress -> 3 no-op deployments chained by DeploymentResponse: the
                          framework's own floor for our pipeline's shape
    single deployment     all three stages in the ingress replica (topology single), batched
    3-stage pipeline      batched, unbatched (max_batch_size 1), and batched with each stage's
                          result awaited in the ingress (values, not chained responses)
    throughput-optimized  the 3-hop no-op and the batched pipeline again on a fresh Ray with
                          RAY_SERVE_THROUGHPUT_OPTIMIZED=1

The LLM-server points (raybench/bench/serve_llm.py): mixed answer lengths, continuous vs
static batching; streaming, time to first token vs end to end; overload past a bounded queue.

Then an open loop (raybench/bench/load.py) on the batched and unbatched pipeline: fixed
arrival rates at 2x and 4x what the unbatched pipeline sustained closed-loop at the top
concurrency, so saturation is measured rather than self-limited; and the top concurrency
again with DECODE_TOKENS per answer, where the LLM stage, not Serve, is the bottleneck. Every
load point counts the batch sizes each stage ran its requests in (histogram and median per
stage); at the top concurrency each Serve process's share of the cores is recorded too.

Goals from the serving issue, computed in the same run: the pipeline adds <= 3 ms p50 over
(in-process + 3-hop no-op floor) at concurrency 1; batched >= 4x unbatched req/s at 32.
The load generator shares the 2 cores with the server; its own cost is in every Serve row.

No `from __future__ import annotations`: FastAPI must resolve the `Request` annotation.
"""

import asyncio
import base64
import io
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastapi import FastAPI, Request
from ray import serve

from raybench.bench.cpu import cores_between, cpu_snapshot
from raybench.bench import serve_llm
from raybench.bench.load import (BATCH_HEADER, batch_histograms, median_batch, open_loop_point, parse_batch_sizes,
                                 serve_part)
# markdown_section too: `bench report` finds each bench's section as raybench.bench.<name>.markdown_section
from raybench.bench.serve_report import (CONCURRENCY, DECODE_TOKENS, goals, markdown_row,  # noqa: F401
                                         markdown_section, markdown_table, plot_rows)
from raybench.net import free_port, wait_http

MAX_TOKENS = 4
PATH = "/v1/chat/completions"

# ------------------------------------------------------------------ no-op apps (the floor)

noop_api = FastAPI()
plain_api = FastAPI()  # run by uvicorn in a subprocess: HTTP without Serve


@plain_api.post(PATH)
async def _plain(request: Request):
    await request.body()
    return {"ok": True}


@serve.deployment(name="NoopStage", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
class NoopStage:
    async def __call__(self, x):
        return x


@serve.deployment(name="NoopIngress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(noop_api)
class NoopIngress:
    def __init__(self, *stages):
        self.stages = stages

    @noop_api.post(PATH)
    async def chat(self, request: Request):
        await request.body()
        response = b"x" * 64  # a small payload handed stage to stage, as our pipeline chains
        for stage in self.stages:
            response = stage.remote(response)
        if self.stages:
            await response
        return {"ok": True}


# ------------------------------------------------------------------ the model and its requests

def build_model(size: str, out: Path) -> Path:
    """An untrained hybrid model (timings do not depend on the weights) with a real tokenizer."""
    import torch

    from raybench.config import validate_config
    from raybench.data.synthetic import QTYPES, sample_scene
    from raybench.data.tokenizer import build_tokenizer, save_tokenizer
    from raybench.model.vlm import HybridVLM

    rng = random.Random(0)
    texts = []
    for i in range(400):
        _, q, a = sample_scene(rng, QTYPES[i % len(QTYPES)])
        texts += [q, " " + a]
    tok = build_tokenizer(texts, vocab_size=384)
    torch.manual_seed(0)
    cfg = validate_config({"model": {"preset": "hybrid", "size": size}})
    HybridVLM.for_tokenizer(cfg.model, tok).save_pretrained(out)
    save_tokenizer(tok, out)
    return out


def make_requests(image_size: int, n: int = 16) -> list[bytes]:
    from raybench.data.synthetic import QTYPES, render_scene, sample_scene

    rng, bodies = random.Random(1), []
    for i in range(n):
        scene, question, _ = sample_scene(rng, QTYPES[i % len(QTYPES)])
        buf = io.BytesIO()
        render_scene(scene, image_size).save(buf, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        bodies.append(json.dumps({"max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": [
            {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": uri}}]}]}).encode())
    return bodies


def _summary(latencies_ms: list[float], elapsed_s: float, errors: int, extra: dict | None = None) -> dict:
    lat = sorted(latencies_ms)
    p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))] if lat else float("nan")
    stats = {"median": statistics.median(lat), "min": lat[0], "max": lat[-1]} if lat else \
        {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"p50_ms": stats["median"], "p99_ms": p99,
            "req_per_s": len(lat) / elapsed_s if elapsed_s > 0 else 0.0, "requests": len(lat),
            "errors": errors, "latency_ms": {**stats, "samples": latencies_ms}, **(extra or {})}


# ------------------------------------------------------------------ in-process

def in_process(model_dir: Path, bodies: list[bytes], concurrency: int, n: int, batched: bool) -> dict:
    """The model call without any server: parse the same request bodies, generate, decode.
    Unbatched: requests one after another, so at concurrency c a request waits for the c-1
    ahead of it. Batched: c requests as one batch (ideal batching, no framework)."""
    import torch

    # One torch thread, as in a stage replica (Ray sets OMP_NUM_THREADS=1 for a fractional
    # CPU share): the in-process rows get the compute budget one stage gets.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _in_process(model_dir, bodies, concurrency, n, batched)
    finally:
        torch.set_num_threads(threads)


def _in_process(model_dir: Path, bodies: list[bytes], concurrency: int, n: int, batched: bool) -> dict:
    import torch

    from raybench.data.processor import VQAProcessor
    from raybench.data.tokenizer import load_tokenizer
    from raybench.model.vlm import HybridVLM
    from raybench.serve.config import LimitsConfig
    from raybench.serve.schemas import parse_chat_request

    model = HybridVLM.from_pretrained(model_dir)
    proc = VQAProcessor(load_tokenizer(model_dir), model.config.num_image_tokens, model.config.vision.image_size)
    limits = LimitsConfig()

    def serve_batch(raw: list[bytes]) -> list[str]:
        reqs = [parse_chat_request(b, limits, "raybench-vlm") for b in raw]
        prompt = proc.encode_prompt_conversations([r.messages for r in reqs])
        with torch.inference_mode():
            out = model.generate(prompt["input_ids"], prompt["attention_mask"],
                                 proc.pixel_values([r.image for r in reqs]), max_new_tokens=MAX_TOKENS)
        return [proc.decode_answer(row.tolist()) for row in out]

    group = concurrency if batched else 1
    serve_batch(bodies[:group])  # warm-up
    lat, t0, done = [], time.perf_counter(), 0
    while done < n:
        t = time.perf_counter()
        serve_batch([bodies[(done + i) % len(bodies)] for i in range(group)])
        call_ms = (time.perf_counter() - t) * 1000
        lat += [call_ms] * group
        done += group
    elapsed = time.perf_counter() - t0
    if not batched and concurrency > 1:  # closed loop of c clients on one serial server
        lat = [ms * concurrency for ms in lat]
    return _summary(lat, elapsed, 0, {"batch": group})


# ------------------------------------------------------------------ HTTP load

async def _load(url: str, bodies: list[bytes], concurrency: int, n: int, warmup: int) -> dict:
    import aiohttp

    lat: list[float] = []
    answers: list[dict[str, int]] = []
    errors, counter = 0, iter(range(n + warmup))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def client():
            nonlocal errors
            for i in counter:
                t = time.perf_counter()
                try:
                    async with session.post(url, data=bodies[i % len(bodies)],
                                            headers={"Content-Type": "application/json"}) as r:
                        await r.read()
                        ok = r.status == 200
                        sizes = r.headers.get(BATCH_HEADER, "")
                except aiohttp.ClientError:
                    ok, sizes = False, ""
                if i < warmup:
                    continue
                if not ok:
                    errors += 1
                    continue
                lat.append((time.perf_counter() - t) * 1000)
                answers.append(parse_batch_sizes(sizes))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return _summary(lat, elapsed, errors, _batches(answers))


def _batches(answers: list[dict[str, int]]) -> dict:
    """The stages' batch sizes over a load point's answers: a histogram and the median per
    stage, and the largest anywhere."""
    hist = batch_histograms(answers)
    largest = max((size for h in hist.values() for size in h), default=0)
    return {"largest_batch": largest or None, "batch_histograms": hist,
            "median_batch": {stage: median_batch(h) for stage, h in hist.items()}}


def http_point(url: str, bodies: list[bytes], concurrency: int, n: int) -> dict:
    return asyncio.run(_load(url, bodies, concurrency, n, warmup=min(2 * concurrency, 16)))


def n_requests(concurrency: int, quick: bool, repeats: int) -> int:
    if quick:
        return 16 if concurrency == 1 else concurrency * 3
    return 10 * repeats if concurrency == 1 else concurrency * repeats


# ------------------------------------------------------------------ the run

def _serve_apps(model_dir: Path) -> dict:
    from raybench.bench.serve_payload import payload_app
    from raybench.serve.app import ChatIngress, build_application
    from raybench.serve.config import deployment_options, validate_serve_config

    stage = {"num_cpus": 0.2, "max_batch_size": 32, "max_ongoing_requests": 64}
    unbatched = {"num_cpus": 0.2, "max_batch_size": 1, "max_ongoing_requests": 64}
    # Unbounded waiting (no 429s) everywhere but the overload point: the other points measure
    # how much each configuration serves, queueing included, as they always did.
    base = {"model": str(model_dir), "ingress": {"num_cpus": 0.1, "max_ongoing_requests": 256},
            "limits": {"max_queued_requests": 10**6}}

    def pipeline(**kw):
        return lambda: build_application(validate_serve_config(
            {**base, "vision": stage, "projection": stage, "llm": stage, **kw}))

    return {
        "serve no-op, 1 hop": lambda: NoopIngress.bind(),
        "serve no-op, 3 hops": lambda: NoopIngress.bind(NoopStage.options(name="Noop1").bind(),
                                                        NoopStage.options(name="Noop2").bind(),
                                                        NoopStage.options(name="Noop3").bind()),
        # The real ingress and hops with real payloads, stages that compute nothing.
        PAYLOAD_APP: lambda: payload_app(ChatIngress.options(**deployment_options(validate_serve_config(base).ingress)),
                                         validate_serve_config(base).model_dump(mode="json"), str(model_dir)),
        "single deployment, batched": lambda: build_application(validate_serve_config(
            {**base, "topology": "single", "vision": stage, "projection": stage, "llm": stage})),
        # unbatched first: its closed-loop rate sets the open loop's arrival rates
        "3-stage, unbatched": pipeline(vision=unbatched, projection=unbatched, llm=unbatched),
        "3-stage, batched": pipeline(),
        # The ingress is the busiest process when 32 clients stream: a second replica
        # (Anyscale's RayLLM router starts two) for the streamed points.
        TWO_INGRESS_APP: pipeline(ingress={**base["ingress"], "num_replicas": 2}),
        "3-stage, batched, values via ingress": pipeline(chain_responses=False),
        "3-stage, static batching": pipeline(llm={**stage, "scheduling": "static"}),
        # last: its rates come from the batched pipeline's closed loop
        BOUNDED_APP: pipeline(limits={}),
    }


BOUNDED_APP = "3-stage, bounded queue"  # the default limits.max_queued_requests
PAYLOAD_APP = "real ingress + payloads, no-op stages"
TWO_INGRESS_APP = "3-stage, batched, 2 ingress replicas"


def _run_serve_configs(names: list[str], apps: dict, port: int, bodies, quick, repeats, rows, tag=""):
    for name in names:
        serve.run(apps[name](), name="bench", route_prefix="/")
        url = f"http://127.0.0.1:{port}{PATH}"
        if name in LLM_CONFIGS and not tag:
            _run_llm_points(name, url, bodies, quick, rows)
        if name in (BOUNDED_APP, TWO_INGRESS_APP):
            serve.delete("bench")
            continue
        for c in CONCURRENCY:
            rows.append({"config": name + tag, "concurrency": c,
                         **_measured_point(url, bodies, c, n_requests(c, quick, repeats))})
            _print_row(rows[-1])
        if name in OPEN_LOOP_CONFIGS and not tag:  # on the same deployment: no second start
            _run_open_loop(name, url, bodies, quick, rows)
            c = max(CONCURRENCY)
            rows.append({"config": f"{name}, {DECODE_TOKENS} tokens", "concurrency": c,
                         **_measured_point(url, with_max_tokens(bodies, DECODE_TOKENS), c,
                                           n_requests(c, quick, repeats))})
            _print_row(rows[-1])
        serve.delete("bench")


def _measured_point(url: str, bodies: list[bytes], c: int, n: int) -> dict:
    """A closed-loop point; at the top concurrency also the cores each process used meanwhile."""
    if c != max(CONCURRENCY):
        return http_point(url, bodies, c, n)
    before, t0 = cpu_snapshot(), time.perf_counter()
    r = http_point(url, bodies, c, n)
    return {**r, "cpu_cores": cores_between(before, cpu_snapshot(), time.perf_counter() - t0, serve_part(os.getpid()))}


def with_max_tokens(bodies: list[bytes], n: int) -> list[bytes]:
    return [json.dumps({**json.loads(b), "max_tokens": n}).encode() for b in bodies]


# The mixed point on the payload app is the floor: what a pipeline whose models cost nothing
# serves on this mix, so floor / static bounds what any batching of the models could give.
MIXED_CONFIGS = (PAYLOAD_APP, "3-stage, batched", "3-stage, static batching")
STREAM_CONFIGS = ("3-stage, batched", TWO_INGRESS_APP)
LLM_CONFIGS = (*MIXED_CONFIGS, TWO_INGRESS_APP, BOUNDED_APP)


def _run_llm_points(name: str, url: str, bodies: list[bytes], quick: bool, rows: list[dict]) -> None:
    """serve_llm.py's points: mixed lengths (continuous and static), streaming (continuous),
    overload (the bounded queue, at rates from the batched pipeline's closed loop)."""
    top = max(CONCURRENCY)
    points = []
    if name == BOUNDED_APP:
        sustainable = next(r["req_per_s"] for r in rows
                           if r["config"] == "3-stage, batched" and r["concurrency"] == top)
        for k in (1.0, serve_llm.OVERLOAD):
            rate = round(sustainable * k, 1)
            n = 16 if quick else int(min(400, max(24, rate * OPEN_LOOP_SECONDS)))
            points.append((serve_llm.overload_name(k), f"{rate:g}/s", serve_llm.open_loop(url, bodies, rate, n)))
    if name in MIXED_CONFIGS:
        mixed = serve_llm.mixed_bodies(bodies)
        n = top * (2 if quick else 8)
        points.append((serve_llm.mixed_name(name), top, serve_llm.closed_loop(url, mixed, top, n)))
    if name in STREAM_CONFIGS:
        streamed = serve_llm.with_fields(bodies, max_tokens=serve_llm.STREAM_TOKENS, ignore_eos=True, stream=True)
        for c in (1, top):
            n = (8 if c == 1 else top) * (1 if quick else 4)
            points.append((serve_llm.stream_name(name), c, serve_llm.closed_loop(url, streamed, c, n)))
    for config, c, (results, elapsed) in points:
        rows.append({"config": config, "concurrency": c, **_llm_row(results, elapsed)})
        _print_row(rows[-1])


def _engine_points(model_dir: Path, bodies: list[bytes], quick: bool, rows: list[dict]) -> None:
    """The mixed point on the LLM stage's engine alone, continuous and static (serve_engine.py)."""
    from raybench.bench.serve_engine import engine_mixed

    top = max(CONCURRENCY)
    for static in (False, True):
        results, elapsed = engine_mixed(model_dir, serve_llm.mixed_bodies(bodies), top, top * (2 if quick else 8),
                                        pool=top, static=static)
        rows.append({"config": serve_llm.engine_name(static), "concurrency": top, **_llm_row(results, elapsed)})
        _print_row(rows[-1])


def _llm_row(results: list[dict], elapsed: float) -> dict:
    """A row from timed requests: latency over the 200s; a 429 is a refusal, not an error."""
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["ttft_s"] * 1000 for r in ok if r["ttft_s"] is not None]
    short = [r["e2e_s"] * 1000 for r in ok if r["max_tokens"] == serve_llm.MIXED_TOKENS[0]]
    errors = sum(r["status"] not in (200, 429) for r in results)
    return _summary([r["e2e_s"] * 1000 for r in ok], elapsed, errors, {
        "statuses": serve_llm.status_counts(results), "ttft_p50_ms": serve_llm.p(ttft, 0.5),
        "ttft_p99_ms": serve_llm.p(ttft, 0.99), "short_p99_ms": serve_llm.p(short, 0.99)})


OPEN_LOOP_CONFIGS = ("3-stage, unbatched", "3-stage, batched")
OPEN_LOOP_RATES = (2.0, 4.0)  # x the unbatched pipeline's closed-loop req/s at the top concurrency
OPEN_LOOP_SECONDS = 4.0  # of arrivals per point (bounded: 24 to 240 requests)


def open_loop_rates(rows: list[dict], quick: bool) -> list[float]:
    """Arrival rates past what the unbatched pipeline sustains (measured in this run, closed
    loop at the top concurrency), so an unbatched queue grows and a batched one can batch."""
    base = next(r["req_per_s"] for r in rows
                if r["config"] == "3-stage, unbatched" and r["concurrency"] == max(CONCURRENCY))
    return [round(base * k, 1) for k in (OPEN_LOOP_RATES[:1] if quick else OPEN_LOOP_RATES)]


def _run_open_loop(name: str, url: str, bodies, quick: bool, rows: list[dict]) -> None:
    for rate in open_loop_rates(rows, quick):
        n = 16 if quick else int(min(240, max(24, rate * OPEN_LOOP_SECONDS)))
        p = open_loop_point(url, bodies, rate, n)
        rows.append({"config": f"{name}, open loop", "concurrency": f"{rate:g}/s", "offered_req_s": rate,
                     **_summary(p["lat"], p["elapsed"], p["errors"], _batches(p["answers"]))})
        _print_row(rows[-1])


def _print_row(r: dict) -> None:
    print(f"  {r['config']:>48} c={r['concurrency']!s:<3} p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms  "
          f"{r['req_per_s']:7.1f} req/s  errors {r['errors']}"
          + (f"  largest batch {r['largest_batch']}" if r.get("largest_batch") else "")
          + (f"  LLM median batch {r['median_batch']['llm']:g}" if "llm" in r.get("median_batch", {}) else "")
          + (f"  TTFT p50 {r['ttft_p50_ms']:.2f} ms" if math.isfinite(r.get("ttft_p50_ms", math.nan)) else "")
          + (f"  statuses {r['statuses']}" if "statuses" in r else ""),
          flush=True)


def _start_ray(port: int, throughput_optimized: bool) -> bool:
    """Serve on `port` in a fresh local Ray, or in the Ray this process already runs in (a test
    session; Serve must not be running there yet). True when this call started Ray."""
    from raybench.runtime import init_ray

    if throughput_optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"  # read by every Serve process at start
    else:
        os.environ.pop("RAY_SERVE_THROUGHPUT_OPTIMIZED", None)
    owned = init_ray("local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return owned


def _stop_ray(owned: bool) -> None:
    import ray

    serve.shutdown()
    if owned:
        ray.shutdown()
    os.environ.pop("RAY_SERVE_THROUGHPUT_OPTIMIZED", None)


def run_serve_bench(out_dir: Path, size: str = "small", quick: bool = False, repeats: int = 7) -> dict:
    import ray

    if not quick and ray.is_initialized():
        # RAY_SERVE_THROUGHPUT_OPTIMIZED is read when Ray starts: the full run starts its own.
        raise RuntimeError("bench serve (full) starts its own local Rays: run it outside a running Ray")
    if quick:
        size, repeats = "tiny", 2
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(size, Path(tmp) / "model")
        from raybench.model.vlm import HybridVLM
        image_size = HybridVLM.from_pretrained(model_dir).config.vision.image_size
        bodies = make_requests(image_size)
        print(f"[bench serve] hybrid/{size}, {image_size}px, max_tokens {MAX_TOKENS}", flush=True)
        for batched in (False, True):
            for c in CONCURRENCY:
                r = in_process(model_dir, bodies, c, n_requests(c, quick, repeats), batched)
                rows.append({"config": f"in-process, {'batched' if batched else 'unbatched'}",
                             "concurrency": c, **r})
                _print_row(rows[-1])
        _engine_points(model_dir, bodies, quick, rows)
        rows += _plain_fastapi(bodies, quick, repeats)
        port = free_port()
        apps = _serve_apps(model_dir)
        # --quick: the rows the goals need, one Ray start; the full run adds the floor-lowering
        # variants (values via the ingress, a fresh Ray in throughput-optimized mode).
        names = [n for n in apps if not (quick and n in ("3-stage, batched, values via ingress", PAYLOAD_APP,
                                                        TWO_INGRESS_APP))]
        owned = _start_ray(port, throughput_optimized=False)
        try:
            _run_serve_configs(names, apps, port, bodies, quick, repeats, rows)
        finally:
            _stop_ray(owned)
        if not quick:
            owned = _start_ray(port, throughput_optimized=True)
            try:
                _run_serve_configs(["serve no-op, 3 hops", "3-stage, batched"], apps, port, bodies, quick,
                                   repeats, rows, tag=" [THROUGHPUT_OPTIMIZED]")
            finally:
                _stop_ray(owned)
    from raybench.bench.common import write_result

    report = {"bench": "serve", "quick": quick, "size": size, "max_tokens": MAX_TOKENS, "repeats": repeats,
              "command": f"raybench bench serve --size {size}" + (" --quick" if quick else ""),
              "config": {"size": size, "max_tokens": MAX_TOKENS, "repeats": repeats,
                         "concurrency": list(CONCURRENCY)},
              "rows": rows, "goals": goals(rows)}
    table = markdown_table(rows, report["goals"])
    (out_dir / "serve.md").write_text(table + "\n")
    write_result(out_dir, "serve", report, markdown_row(report), lambda r, path: plot_rows(r["rows"], path))
    print(table)
    return report


def _plain_fastapi(bodies, quick, repeats) -> list[dict]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "raybench.bench.serve:plain_api", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"])
    rows = []
    try:
        wait_http(f"http://127.0.0.1:{port}{PATH}", data=b"{}")
        for c in CONCURRENCY:
            r = http_point(f"http://127.0.0.1:{port}{PATH}", bodies, c, n_requests(c, quick, repeats))
            rows.append({"config": "plain FastAPI no-op (uvicorn)", "concurrency": c, **r})
            _print_row(rows[-1])
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return rows


def main(args) -> int:
    report = run_serve_bench(Path(args.out), size=args.size, quick=args.quick, repeats=args.repeats)
    if getattr(args, "write_benchmarks_md", False) and not args.quick:
        from raybench.bench.report import splice_section
        from raybench.bench.serve_report import markdown_section

        splice_section(Path("BENCHMARKS.md"), "## Serving", markdown_section(report))
    return 0
