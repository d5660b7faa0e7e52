"""Local networking helpers: a free port, and waiting until an HTTP server answers."""

from __future__ import annotations

import random
import socket
import time
import urllib.error
import urllib.request
from typing import Callable


# Ports the OS never hands out for bind(0)/connect() (below Linux's default ephemeral range,
# 32768-60999) and that Ray leaves alone (its workers take 10002-19999). A port from the
# ephemeral range can be free when picked yet taken a second later by one of the dozens of
# sockets a starting Ray opens, before the caller's server binds it: CI once lost a deploy
# test that way ("Failed to bind to address '127.0.0.1:39355'").
_QUIET_PORTS = range(20000, 32768)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now, outside the ranges the OS and Ray draw from, so
    that it is still free when the caller's server binds it a few seconds later."""
    rng = random.Random()
    for _ in range(64):
        port = rng.choice(_QUIET_PORTS)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every try taken: fall back to the OS's pick
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 60.0, *, data: bytes | None = None, status: int | None = None,
              interval_s: float = 0.2, check: Callable[[], None] | None = None) -> None:
    """Return once `url` answers, else raise TimeoutError after `timeout_s`.

    "Answers" is any HTTP response when `status` is None (a 404 or 422 still means the server
    is up), else exactly that status. `data` makes it a POST. `check` runs before every try and
    may raise to stop waiting early (e.g. the server process already exited).
    """
    deadline = time.monotonic() + timeout_s
    method = "POST" if data is not None else "GET"
    while True:
        if check is not None:
            check()
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=2) as r:
                if status is None or r.status == status:
                    return
        except urllib.error.HTTPError as err:  # an HTTP status: the server is up
            if status is None or err.code == status:
                return
        except OSError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer{f' {status}' if status else ''} within {timeout_s:g} s")
        time.sleep(interval_s)
