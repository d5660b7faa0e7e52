"""The server's Prometheus metrics, through Ray Serve's metrics API (`ray.serve.metrics`).

Serve tags each with the deployment, replica and application; Ray exports them, prefixed
`ray_`, on each node's metrics endpoint (what the Ray dashboard's Grafana panels and a
Prometheus scrape read). Outside a Ray worker (unit tests, `raybench ask`) the same calls
record nothing and cost little. docs/serving.md lists them.
"""

from __future__ import annotations

import functools
from typing import Any

# Seconds: from a few ms (one decode step of a small model) to a long queue wait.
LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@functools.cache
def _metrics() -> dict[str, Any]:
    from ray.serve import metrics as m

    return {
        "ttft": m.Histogram("raybench_time_to_first_token_seconds", boundaries=LATENCY_S, tag_keys=("stream",),
                            description="Request arrival at the ingress to its first answer token"),
        "latency": m.Histogram("raybench_request_latency_seconds", boundaries=LATENCY_S, tag_keys=("stream",),
                               description="Request arrival at the ingress to its last answer token"),
        "requests": m.Counter("raybench_requests_total", tag_keys=("code",),
                              description="Chat completion requests answered, by HTTP status"),
        "itl": m.Histogram("raybench_inter_token_latency_seconds", boundaries=LATENCY_S,
                           description="One decode step of the LLM stage: the time between two tokens "
                                       "of every row in it"),
        "tokens": m.Counter("raybench_generated_tokens_total",
                            description="Answer tokens decoded by the LLM stage (rate(): tokens/s)"),
        "queue": m.Gauge("raybench_queue_length", tag_keys=("stage",),
                         description="Requests waiting: for a first token (ingress), a batch (vision, "
                                     "projection) or a decode slot (llm)"),
        "batch": m.Histogram("raybench_batch_size", boundaries=BATCH_SIZES, tag_keys=("stage",),
                             description="Requests per batch of a stage (llm: rows per decode step)"),
    }


def observe_request(code: int, stream: bool, ttft_s: float | None, latency_s: float | None) -> None:
    m, tag = _metrics(), {"stream": str(stream).lower()}
    m["requests"].inc(1, tags={"code": str(code)})
    if ttft_s is not None:
        m["ttft"].observe(ttft_s, tags=tag)
    if latency_s is not None:
        m["latency"].observe(latency_s, tags=tag)


def observe_batch(stage: str, size: int, queued: int) -> None:
    m = _metrics()
    m["batch"].observe(size, tags={"stage": stage})
    m["queue"].set(queued, tags={"stage": stage})


def observe_decode_step(rows: int, new_tokens: int, seconds: float, queued: int) -> None:
    m = _metrics()
    if rows:
        m["itl"].observe(seconds)
        m["batch"].observe(rows, tags={"stage": "llm"})
    m["tokens"].inc(new_tokens)
    m["queue"].set(queued, tags={"stage": "llm"})


def set_queue_length(stage: str, n: int) -> None:
    _metrics()["queue"].set(n, tags={"stage": stage})
