"""bench/load.py: the open-loop load generator against a real HTTP server that holds every
answer until all requests are in: only a loop that keeps sending whatever the server does
(open) finishes; a closed loop would wait on its first answer for ever."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from raybench.bench.load import batch_histograms, median_batch, open_loop_point, parse_batch_sizes
from raybench.net import free_port


class _Gate(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, addr, expected: int):
        super().__init__(addr, _Held)
        self.expected, self.open, self.most_open, self.released = expected, 0, 0, False
        self.cond = threading.Condition()


class _Held(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers["Content-Length"]))
        gate = self.server
        with gate.cond:
            gate.open += 1
            gate.most_open = max(gate.most_open, gate.open)
            gate.cond.notify_all()
            # No answer until every request has arrived. A client that waits for answers would
            # hang here: after 10 s the gate opens for good and the test fails on most_open.
            if not gate.cond.wait_for(lambda: gate.released or gate.most_open >= gate.expected,
                                      timeout=10):
                gate.released = True
                gate.cond.notify_all()
        try:
            self.send_response(200)
            self.send_header("x-raybench-batch-sizes", "vision=1,llm=2")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
        finally:
            with gate.cond:
                gate.open -= 1

    def log_message(self, *args):
        pass


N, WARMUP, RATE = 12, 8, 200.0  # open_loop_point sends min(8, n) warm-up requests first


@pytest.fixture
def gate():
    httpd = _Gate(("127.0.0.1", free_port()), expected=N + WARMUP)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_batch_sizes_parse_and_count_per_stage():
    assert parse_batch_sizes("vision=3, llm=5") == {"vision": 3, "llm": 5}
    assert parse_batch_sizes("") == {}
    hist = batch_histograms([{"llm": 5}, {"llm": 1, "vision": 2}, {"llm": 5}])
    assert hist == {"llm": {1: 1, 5: 2}, "vision": {2: 1}}
    assert median_batch(hist["llm"]) == 5


def test_open_loop_keeps_sending_while_no_answer_comes(gate):
    p = open_loop_point(f"http://127.0.0.1:{gate.server_address[1]}/", [b"{}"], rate=RATE, n=N)
    assert gate.most_open == N + WARMUP  # every request was in flight before the first answer
    assert p["errors"] == 0 and len(p["lat"]) == N
    # Latency counts from the scheduled send: the first measured request waited at least until
    # the last one was sent, (N - 1) arrivals later (a lower bound: a slow machine only adds).
    assert max(p["lat"]) >= 0.9 * (N - 1) / RATE * 1000
    assert batch_histograms(p["answers"]) == {"vision": {1: N}, "llm": {2: N}}


def test_serve_part_names_replicas_by_deployment_and_the_rest_by_role():
    from raybench.bench.load import serve_part

    part = serve_part(client_pid=7)
    assert part(1, "ray::ServeReplica:bench:LLMStage") == "LLMStage"
    assert part(2, "ray::ProxyActor") == "proxy"
    assert part(7, "python bench.py") == "load client"
    assert part(3, "/x/raylet --foo") == "other"
