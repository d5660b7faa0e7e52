"""raybench.track against a real `mlflow server` subprocess (the cluster set-up).

The server keeps runs in sqlite and proxies artifacts (`mlflow-artifacts:/` URIs): the
client never touches the artifact directory itself, exactly as a Ray worker on another
node would not.
"""

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
from mlflow.tracking import MlflowClient

from raybench.track import RUN_NAME_TAG, Tracker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

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


@pytest.fixture(scope="module")
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


def test_tracker_logs_to_server(mlflow_server: tuple[str, Path], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    uri, art_dir = mlflow_server
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model = tmp_path / "export"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\x01" * 128)
    (model / "config.json").write_text('{"hidden_size": 128}')
    (model / "tokenizer.json").write_text("{}")

    config = {"model": {"hidden_size": 128}, "lr": 1e-3}
    tracker = Tracker.open(tmp_path / "run", "server-run", params=config, uri=uri)
    for step in range(4):
        tracker.log_metrics({"loss": 1.0 - step / 10, "acc/color": step / 4}, step=step)
    tracker.log_model_dir(model)
    tracker.finish()
    # Nothing but the run id file is written locally when a server is in charge.
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["mlflow_run_id"]

    # Resume through the server: same run, metrics continue.
    again = Tracker.open(tmp_path / "run", "server-run", params=config, uri=uri)
    assert again.run_id == tracker.run_id
    assert again.last_step("acc/color") == 3
    again.log_metrics({"acc/color": 1.0}, step=4)
    again.finish()

    client = MlflowClient(uri)  # a separate client: what arrived at the server
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"model.hidden_size": "128", "lr": "0.001"}
    assert run.data.tags[RUN_NAME_TAG] == "server-run"
    history = client.get_metric_history(run.info.run_id, "acc/color")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75),
                                                     (4, 1.0)]
    exp = client.get_experiment(run.info.experiment_id)
    assert len(client.search_runs([exp.experiment_id],
                                  f"tags.`{RUN_NAME_TAG}` = 'server-run'")) == 1

    # Artifacts went through the server's proxy into --artifacts-destination.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    listed = {a.path: a.file_size for a in client.list_artifacts(run.info.run_id, "model")}
    assert listed == {f"model/{f.name}": f.stat().st_size for f in model.iterdir()}
    fetched = Path(client.download_artifacts(run.info.run_id, "model", str(tmp_path / "dl")))
    assert (fetched / "model.safetensors").read_bytes() == b"\x01" * 128
    assert list(art_dir.rglob("model.safetensors"))
