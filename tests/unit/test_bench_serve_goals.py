"""`bench serve`'s LLM-server goals (issue 31's bars) from result rows, Ray-free."""

from raybench.bench.serve_llm import engine_name, llm_goals, llm_lines, mixed_name, stream_name


def row(config, c, **kw):
    return {"config": config, "concurrency": c, **kw}


def test_the_floor_bounds_what_batching_could_give_and_each_ingress_count_is_judged():
    rows = [
        row(mixed_name("real ingress + payloads, no-op stages"), 32, req_per_s=66.0, short_p99_ms=540.0),
        row(mixed_name("3-stage, batched"), 32, req_per_s=40.0, short_p99_ms=600.0),
        row(mixed_name("3-stage, static batching"), 32, req_per_s=30.0, short_p99_ms=1200.0),
        row(engine_name(False), 32, req_per_s=160.0), row(engine_name(True), 32, req_per_s=100.0),
        row(stream_name("3-stage, batched"), 1, ttft_p50_ms=40.0, p50_ms=160.0),
        row(stream_name("3-stage, batched"), 32, ttft_p50_ms=500.0, p50_ms=1250.0),
        row(stream_name("3-stage, batched, 2 ingress replicas"), 1, ttft_p50_ms=39.0, p50_ms=160.0),
        row(stream_name("3-stage, batched, 2 ingress replicas"), 32, ttft_p50_ms=300.0, p50_ms=1250.0),
    ]
    g = llm_goals(rows, 32)
    assert round(g["mixed_continuous_over_static_req_s"], 3) == 1.333
    assert round(g["mixed_floor_over_static_req_s"], 3) == 2.2
    assert g["stream_ttft_over_e2e_top"] == 0.4 and g["stream2_ttft_over_e2e_top"] == 0.24

    lines = "\n".join(llm_lines(g, lambda ok: {True: "met", False: "not met", None: "?"}[ok],
                                lambda x: x == x, lambda x: f"{x:.1f}"))
    assert "2.2x static batching's req/s, shortest answers' p99 0.45x static's" in lines
    # 2x static = 60 req/s, 16.7 ms a request; the floor's 66 req/s, 15.2 ms; continuous 25 ms
    assert "would have 1.5 ms of the machine per request beyond the floor's; with continuous batching they take 9.8 ms" in lines
    assert "engine alone (no Serve, one torch thread, the same requests): continuous / static 1.60x; " \
        "continuous batching takes 6.2 ms a request there" in lines
    assert "2 ingress replicas: c=1 **0.24** (goal <= 0.25: met), top concurrency **0.24** (goal <= 0.25: met)" in lines
    assert "top concurrency **0.40** (goal <= 0.25: not met)" in lines


def test_without_the_floor_or_a_second_ingress_their_lines_are_left_out():
    rows = [row(mixed_name("3-stage, batched"), 32, req_per_s=40.0, short_p99_ms=600.0),
            row(mixed_name("3-stage, static batching"), 32, req_per_s=30.0, short_p99_ms=1200.0)]
    lines = "\n".join(llm_lines(llm_goals(rows, 32), str, lambda x: x == x, lambda x: f"{x:.1f}"))
    assert "compute nothing" not in lines and "2 ingress replicas" not in lines and "engine alone" not in lines


def test_the_model_free_pipeline_is_said_to_miss_an_overhead_bar_only_when_it_does():
    from raybench.bench.serve_report import _floor_bars

    both = "\n".join(_floor_bars(10.4, 0.67, 32))
    assert "+10.4 ms at c=1" in both and "0.67x the no-op floor's req/s at c=32" in both
    assert "0.67x" not in "\n".join(_floor_bars(10.4, 0.8, 32)) and _floor_bars(4.0, 0.8, 32) == []
