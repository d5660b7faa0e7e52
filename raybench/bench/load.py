"""Open-loop HTTP load and the stages' batch sizes, for `raybench bench serve`.

A closed loop of c clients never offers more than c requests at once and slows down with
the server, so it cannot show saturation: when the server (or the client sharing its cores)
is slow, the offered load drops with it. An open loop sends at a fixed arrival rate whatever
the server does; latency is taken from each request's *scheduled* send time, so time a
request spent waiting for the client to get to it counts too (no coordinated omission).

`serve_part` names the Serve part each process is (proxy, ingress, each stage, the load
client), so `raybench.bench.cpu` can say which saturates first during a load point.

Each answer carries the batch size every stage ran it in (`x-raybench-batch-sizes:
vision=3,projection=3,llm=5`); `batch_histograms` counts them per stage.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter

BATCH_HEADER = "x-raybench-batch-sizes"


def parse_batch_sizes(header: str) -> dict[str, int]:
    """`vision=3,llm=5` -> {"vision": 3, "llm": 5}; an absent or empty header -> {}."""
    out = {}
    for kv in filter(None, (header or "").split(",")):
        stage, _, size = kv.partition("=")
        out[stage.strip()] = int(size)
    return out


def batch_histograms(answers: list[dict[str, int]]) -> dict[str, dict[int, int]]:
    """Per stage, how many requests ran in a batch of each size (sizes ascending)."""
    counts: dict[str, Counter] = {}
    for sizes in answers:
        for stage, size in sizes.items():
            counts.setdefault(stage, Counter())[size] += 1
    return {stage: dict(sorted(c.items())) for stage, c in counts.items()}


def median_batch(histogram: dict[int, int]) -> float:
    """The batch size the median request ran in."""
    sizes = [size for size, n in histogram.items() for _ in range(n)]
    return float(statistics.median(sizes)) if sizes else float("nan")


async def _open_loop(url: str, bodies: list[bytes], rate: float, n: int, warmup: int) -> dict:
    import aiohttp

    lat: list[float] = []
    answers: list[dict[str, int]] = []
    errors = 0
    done_at: list[float] = []
    # No client-side cap on connections: the arrival rate, not the pool, sets the load.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def one(i: int, scheduled: float) -> None:
            nonlocal errors
            try:
                async with session.post(url, data=bodies[i % len(bodies)],
                                        headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    ok, sizes = r.status == 200, r.headers.get(BATCH_HEADER, "")
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok, sizes = False, ""
            if i < warmup:
                return
            if not ok:
                errors += 1
                return
            now = time.perf_counter()
            lat.append((now - scheduled) * 1000)
            done_at.append(now)
            answers.append(parse_batch_sizes(sizes))

        start = time.perf_counter() + 0.05
        tasks = []
        for i in range(n + warmup):
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i, scheduled)))
        await asyncio.gather(*tasks)
    first = start + warmup / rate  # the measured requests' first scheduled send
    elapsed = (max(done_at) - first) if done_at else 0.0
    return {"lat": lat, "elapsed": elapsed, "errors": errors, "answers": answers}


def open_loop_point(url: str, bodies: list[bytes], rate: float, n: int) -> dict:
    """`n` requests (after a few warm-up ones) sent at `rate` per second, whatever the server
    does; the raw latencies, the time from the first measured send to the last answer, the
    errors and each answer's batch sizes."""
    return asyncio.run(_open_loop(url, bodies, rate, n, warmup=min(8, n)))


# ------------------------------------------------------------------ where the CPU goes

def serve_part(client_pid: int):
    """Names the Serve part a process is (for `cpu.cores_between`): replicas by deployment
    name, the proxy, the load client, and every other process on the machine together
    (Ray's daemons mostly)."""
    def part(pid: int, cmd: str) -> str:
        if pid == client_pid:
            return "load client"
        if cmd.startswith("ray::ServeReplica:"):
            return cmd.split()[0].rsplit(":", 1)[-1]  # ray::ServeReplica:<app>:<deployment>
        return "proxy" if cmd.startswith("ray::ProxyActor") else "other"
    return part
