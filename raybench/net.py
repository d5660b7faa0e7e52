"""Local networking helpers: a free port, and waiting until an HTTP server answers."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from typing import Callable


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it; another process may still take
    it before the caller binds, which is why callers pass it straight to their server)."""
    with socket.socket() as s:
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
