"""bench/load.py: the open-loop load generator against a real (slow, serial) HTTP server."""

import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from raybench.bench.load import batch_histograms, median_batch, open_loop_point, parse_batch_sizes
from raybench.net import free_port

SERVICE_S = 0.05  # one request at a time: the server answers at most 20 per second


class _Slow(BaseHTTPRequestHandler):
    # HTTP/1.0 (the default): the connection closes after each answer, so the serial server
    # moves on to the next one instead of waiting on a kept-alive connection.

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(SERVICE_S)
        self.send_response(200)
        self.send_header("x-raybench-batch-sizes", "vision=1,llm=2")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


class _Serial(HTTPServer):
    request_queue_size = 64  # every waiting connection is accepted in turn, none refused


@pytest.fixture
def slow_server():
    port = free_port()
    httpd = _Serial(("127.0.0.1", port), _Slow)  # not threading: requests queue
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}/"
    httpd.shutdown()
    httpd.server_close()


def test_batch_sizes_parse_and_count_per_stage():
    assert parse_batch_sizes("vision=3, llm=5") == {"vision": 3, "llm": 5}
    assert parse_batch_sizes("") == {}
    hist = batch_histograms([{"llm": 5}, {"llm": 1, "vision": 2}, {"llm": 5}])
    assert hist == {"llm": {1: 1, 5: 2}, "vision": {2: 1}}
    assert median_batch(hist["llm"]) == 5


def test_open_loop_keeps_sending_when_the_server_falls_behind(slow_server):
    # 40/s offered to a server that does 20/s: a closed loop would slow down with it; an open
    # loop keeps its arrivals, so later requests wait longer and the achieved rate is the server's.
    n = 24
    p = open_loop_point(slow_server, [b"{}"], rate=40.0, n=n)
    assert p["errors"] == 0 and len(p["lat"]) == n
    assert n / p["elapsed"] < 25  # the server's rate, not the offered 40
    assert max(p["lat"]) > 3 * min(p["lat"])  # the queue grew
    assert batch_histograms(p["answers"]) == {"vision": {1: n}, "llm": {2: n}}
