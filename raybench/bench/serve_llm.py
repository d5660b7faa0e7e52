"""The LLM-server load points of `raybench bench serve`: what continuous batching, streaming
and a bounded queue buy, each against its baseline in the same run.

    mixed lengths   closed loop at the top concurrency, answers of 4..64 tokens (ignore_eos
                    fixes each length), continuous batching vs `llm.scheduling: static`
                    (a batch decodes to its longest answer; every answer waits for it):
                    req/s, and the p99 of the shortest answers
    streaming       `stream: true`, STREAM_TOKENS tokens, at c=1 and the top concurrency:
                    time to the first content chunk vs to the last
    overload        open loop on the pipeline with its default `limits.max_queued_requests`,
                    at the sustainable rate (the batched pipeline's closed-loop req/s at the
                    top concurrency, measured earlier in the run) and OVERLOAD x it: how many
                    answers were 200, 429 or anything else, and the accepted ones' p99

The clients here time each request and keep its status; serve.py turns them into rows.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

MIXED_TOKENS = (4, 8, 16, 32, 64)
STREAM_TOKENS = 32
OVERLOAD = 4.0


def with_fields(bodies: list[bytes], **fields) -> list[bytes]:
    return [json.dumps({**json.loads(b), **fields}).encode() for b in bodies]


def mixed_bodies(bodies: list[bytes]) -> list[bytes]:
    """Each body at each length, interleaved, so every client sends every length."""
    return [b for n in range(len(bodies)) for b in with_fields(bodies[n:n + 1], max_tokens=MIXED_TOKENS[
        n % len(MIXED_TOKENS)], ignore_eos=True)]


async def _send(session, url: str, body: bytes) -> dict:
    """One request: its status, its max_tokens, seconds to the first content chunk (streamed)
    and to the end."""
    import aiohttp

    t0, first = time.perf_counter(), None
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            async for line in r.content:
                if first is None and line.startswith(b"data: ") and b'"content":"' in line \
                        and b'"content":""' not in line:
                    first = time.perf_counter() - t0
            status = r.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        status = 0
    return {"status": status, "max_tokens": json.loads(body).get("max_tokens"),
            "ttft_s": first, "e2e_s": time.perf_counter() - t0}


async def _closed(url: str, bodies: list[bytes], c: int, n: int, warmup: int) -> tuple[list[dict], float]:
    import aiohttp

    out: list[dict] = []
    counter = iter(range(n + warmup))
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=c), timeout=timeout) as session:
        async def client():
            for i in counter:
                r = await _send(session, url, bodies[i % len(bodies)])
                if i >= warmup:
                    out.append(r)
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(c)))
        return out, time.perf_counter() - t0


async def _open(url: str, bodies: list[bytes], rate: float, n: int) -> tuple[list[dict], float]:
    """`n` sends at `rate` per second whatever the server does; latency from each scheduled send."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        start = time.perf_counter() + 0.05

        async def one(i: int) -> dict:
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            r = await _send(session, url, bodies[i % len(bodies)])
            return {**r, "e2e_s": time.perf_counter() - scheduled}
        results = await asyncio.gather(*(one(i) for i in range(n)))
        return list(results), time.perf_counter() - start


def closed_loop(url: str, bodies: list[bytes], c: int, n: int) -> tuple[list[dict], float]:
    return asyncio.run(_closed(url, bodies, c, n, warmup=min(c, 8)))


def open_loop(url: str, bodies: list[bytes], rate: float, n: int) -> tuple[list[dict], float]:
    return asyncio.run(_open(url, bodies, rate, n))


def status_counts(results: list[dict]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(r["status"] for r in results).items())}


def p(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))] if v else float("nan")


# ------------------------------------------------------------------ goals (issue 31's bars)

def mixed_name(name: str) -> str:
    return f"{name}, mixed {MIXED_TOKENS[0]}-{MIXED_TOKENS[-1]} tokens"


def engine_name(static: bool) -> str:
    return mixed_name(f"LLM engine alone, {'static' if static else 'continuous'}")


def stream_name(name: str) -> str:
    return f"{name}, streamed {STREAM_TOKENS} tokens"


def overload_name(factor: float) -> str:
    return f"3-stage, bounded queue, open loop {factor:g}x sustainable"


def llm_goals(rows: list[dict], top: int) -> dict:
    at = {(r["config"], r["concurrency"]): r for r in rows}
    by_config = {r["config"]: r for r in rows}

    def get(config, c, key):
        r = at.get((config, c)) if c is not None else by_config.get(config)
        return r.get(key, float("nan")) if r else float("nan")

    cont, static = mixed_name("3-stage, batched"), mixed_name("3-stage, static batching")
    floor = mixed_name("real ingress + payloads, no-op stages")
    stream, stream2 = stream_name("3-stage, batched"), stream_name("3-stage, batched, 2 ingress replicas")
    hot, calm = by_config.get(overload_name(OVERLOAD)), by_config.get(overload_name(1.0))
    return {
        "mixed_continuous_over_static_req_s": get(cont, top, "req_per_s") / get(static, top, "req_per_s"),
        "mixed_goal": 2.0,
        "mixed_floor_over_static_req_s": get(floor, top, "req_per_s") / get(static, top, "req_per_s"),
        "engine_continuous_over_static_req_s": get(engine_name(False), top, "req_per_s")
        / get(engine_name(True), top, "req_per_s"),
        "engine_ms_per_request": 1000 / get(engine_name(False), top, "req_per_s"),
        "mixed_floor_short_p99_ratio": get(floor, top, "short_p99_ms") / get(static, top, "short_p99_ms"),
        # Closed loop at saturation, a request takes 1 / rate of the machine: what 2x static
        # batching's rate leaves the models beyond the model-free floor's, and what they take now.
        "mixed_model_budget_ms": 1000 / (2 * get(static, top, "req_per_s")) - 1000 / get(floor, top, "req_per_s"),
        "mixed_model_cost_ms": 1000 / get(cont, top, "req_per_s") - 1000 / get(floor, top, "req_per_s"),
        "mixed_short_p99_ratio": get(cont, top, "short_p99_ms") / get(static, top, "short_p99_ms"),
        "short_p99_goal": 0.5,
        "stream_ttft_over_e2e_c1": get(stream, 1, "ttft_p50_ms") / get(stream, 1, "p50_ms"),
        "stream_ttft_over_e2e_top": get(stream, top, "ttft_p50_ms") / get(stream, top, "p50_ms"),
        "stream2_ttft_over_e2e_c1": get(stream2, 1, "ttft_p50_ms") / get(stream2, 1, "p50_ms"),
        "stream2_ttft_over_e2e_top": get(stream2, top, "ttft_p50_ms") / get(stream2, top, "p50_ms"),
        "ttft_goal": 0.25,
        "overload_statuses": (hot or {}).get("statuses"),
        "overload_only_200_429": None if hot is None else set(hot["statuses"]) <= {"200", "429"},
        "overload_p99_ratio": get(overload_name(OVERLOAD), None, "p99_ms") / (calm or {}).get("p99_ms", float("nan")),
        "overload_p99_goal": 3.0,
    }


def _floor_line(g: dict, num) -> list[str]:
    x = g.get("mixed_floor_over_static_req_s", float("nan"))
    if x != x:  # nan: no payload app in this run (--quick, or results from before it)
        return []
    return [f"  - the same mix on the real ingress and payloads with stages that compute nothing (the "
            f"most any batching of the models could reach here): {num(x)}x static batching's req/s, "
            f"shortest answers' p99 {g['mixed_floor_short_p99_ratio']:.2f}x static's. At 2x static's rate the "
            f"models would have {g['mixed_model_budget_ms']:.1f} ms of the machine per request beyond the floor's; "
            f"with continuous batching they take {g['mixed_model_cost_ms']:.1f} ms"]


def _engine_line(g: dict, num) -> list[str]:
    x = g.get("engine_continuous_over_static_req_s", float("nan"))
    if x != x:  # results from before the engine point
        return []
    return [f"  - the LLM stage's engine alone (no Serve, one torch thread, the same requests): continuous / "
            f"static {x:.2f}x; continuous batching takes {num(g['engine_ms_per_request'])} ms a request there, "
            "before vision and projection"]


def llm_lines(g: dict, claim, finite, num) -> list[str]:
    """The LLM-server bars, for BENCHMARKS.md (absent in results from before them)."""
    if "mixed_continuous_over_static_req_s" not in g:
        return []

    def bar(x, goal, below=False):
        ok = None if not finite(x) else (x <= goal if below else x >= goal)
        value = f"**{x:.2f}**" if finite(x) else num(x)
        return f"{value} (goal {'<=' if below else '>='} {goal:g}: {claim(ok)})"
    ok_codes = g["overload_only_200_429"]
    return [
        f"- mixed {MIXED_TOKENS[0]}-{MIXED_TOKENS[-1]} tokens, closed loop: continuous / static batching req/s "
        f"{bar(g['mixed_continuous_over_static_req_s'], g['mixed_goal'])}; the shortest answers' p99, "
        f"continuous / static {bar(g['mixed_short_p99_ratio'], g['short_p99_goal'], below=True)}",
        *_floor_line(g, num), *_engine_line(g, num),
        f"- streamed {STREAM_TOKENS} tokens: time to first token / end-to-end, p50 at c=1 "
        f"{bar(g['stream_ttft_over_e2e_c1'], g['ttft_goal'], below=True)} and at the top concurrency "
        f"{bar(g['stream_ttft_over_e2e_top'], g['ttft_goal'], below=True)}",
        *([] if not finite(g.get("stream2_ttft_over_e2e_top", float("nan"))) else [
            f"- the same with 2 ingress replicas: c=1 {bar(g['stream2_ttft_over_e2e_c1'], g['ttft_goal'], below=True)}, "
            f"top concurrency {bar(g['stream2_ttft_over_e2e_top'], g['ttft_goal'], below=True)}"]),
        f"- {OVERLOAD:g}x the sustainable rate: statuses {g['overload_statuses']} (only 200 / 429: "
        f"{claim(ok_codes)}); accepted p99 / p99 at the sustainable rate "
        f"{bar(g['overload_p99_ratio'], g['overload_p99_goal'], below=True)}",
    ]
