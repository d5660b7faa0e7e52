"""Integration fixtures: real servers started on 127.0.0.1 and always stopped.

`ray_session` is the one local Ray that every in-process integration test shares (Ray Train,
Tune, Serve); a test that needs a cluster of its own (a CLI driver in a subprocess, the
2-node cluster) starts it there and leaves this one alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from raybench.net import free_port, wait_http

STARTUP_TIMEOUT_S = 60


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
    port = free_port()
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

    def exited() -> None:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited ({proc.returncode}):\n" + (root / "server.log").read_text()[-3000:])

    try:
        try:
            wait_http(f"{uri}/health", STARTUP_TIMEOUT_S, status=200, interval_s=0.25, check=exited)
        except TimeoutError:
            pytest.fail(f"mlflow server not healthy after {STARTUP_TIMEOUT_S}s:\n"
                        + (root / "server.log").read_text()[-3000:])
        yield uri, root / "art"
    finally:
        _stop(proc, pgid)
        log.close()


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A local Ray for the whole session: 2 CPUs (the reference machine), dashboard on (the
    state API `list_actors` needs it). Ray processes inherit the environment at start, so
    what replicas and workers must see is set here, before `init`."""
    import ray

    from raybench.runtime import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("RAYBENCH_API_KEY", None)  # apps run without auth unless a test passes a key
    os.environ["RAYBENCH_MODEL_CACHE"] = str(tmp_path_factory.mktemp("model_cache"))  # registry downloads
    init_ray("local", num_cpus=2)
    try:
        yield
    finally:
        ray.shutdown()
