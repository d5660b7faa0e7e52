"""raybench.net: the one free-port and wait-until-it-answers helper (servers, Serve, MLflow)."""

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from raybench.net import free_port, wait_http


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def do_POST(self):  # noqa: N802
        self.send_response(422)  # a validation error still means the server is up
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    port = free_port()
    httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    httpd.shutdown()
    httpd.server_close()


def test_any_http_answer_counts_unless_a_status_is_asked_for(server):
    wait_http(f"{server}/health", 5, status=200)
    wait_http(f"{server}/missing", 5)  # 404: up
    wait_http(f"{server}/v1/chat/completions", 5, data=b"{}")  # POST, 422: up
    with pytest.raises(TimeoutError, match="did not answer 200"):
        wait_http(f"{server}/missing", 0.3, status=200, interval_s=0.05)


def test_nothing_listening_times_out_and_check_stops_early():
    url = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(TimeoutError, match="did not answer within"):
        wait_http(url, 0.3, interval_s=0.05)
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("server exited")

    with pytest.raises(RuntimeError, match="server exited"):
        wait_http(url, 30, interval_s=0.01, check=check)
    assert len(calls) == 3


def test_free_port_stays_out_of_the_ranges_the_os_and_ray_draw_from():
    ports = {free_port() for _ in range(20)}
    assert all(20000 <= p < 32768 for p in ports)  # not ephemeral (32768+), not Ray's workers (10002-19999)
    assert len(ports) > 1  # picked at random, so two callers rarely collide
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # and free
