"""Integration fixtures: real servers started on 127.0.0.1 and always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _live_members(pgid: int) -> list[int]:
    """Processes of a process group that are still running (zombies don't count)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _stop(proc: subprocess.Popen, pgid: int) -> None:
    # The server forks uvicorn workers: signal the whole group it leads, not just the CLI.
    try:
        os.killpg(pgid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _live_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftovers = _live_members(pgid)
    if leftovers:
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"mlflow server processes outlived SIGTERM: {leftovers}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """URI of a fresh `mlflow server` and its artifact directory."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    mlflow_exe = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_exe), "server",
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",  # default 4 uvicorn workers: too many for a 2-core box
        "--backend-store-uri", f"sqlite:///{root / 'srv.db'}",
        "--artifacts-destination", str(root / "art"),
    ]
    env = {
        **os.environ,
        # Otherwise the server also starts a job runner with ~7 huey consumer processes.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    pgid = proc.pid  # start_new_session: the CLI leads its own process group
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({proc.returncode}):\n"
                            + (root / "server.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {STARTUP_TIMEOUT_S}s:\n"
                            + (root / "server.log").read_text()[-3000:])
            time.sleep(0.25)
        yield uri, root / "art"
    finally:
        _stop(proc, pgid)
        log.close()
