"""The cluster path: a real two-node Ray cluster (cluster/local-cluster.sh), the smoke
pipeline submitted with the real `ray job submit`, logging to a real `mlflow server`.

Checks: the job SUCCEEDS; Train workers ran on both nodes; MLflow (the server) has the
sweep; the Serve endpoint the job left running answers over HTTP; a job with a bad config
fails fast with the config error in `ray job logs`; after `stop` nothing is left running.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raybench.net import free_port
from raybench.pipeline import ask_endpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "local-cluster.sh"


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes() and int(cmdline.parent.name) != os.getpid():
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass
    return pids


@pytest.fixture
def cluster(tmp_path):
    # A short state dir: Ray's unix socket paths must stay under 107 characters.
    state = Path(tempfile.mkdtemp(prefix="rbc", dir="/tmp"))
    env = {**os.environ, "STATE_DIR": str(state), "GCS_PORT": str(free_port()),
           "DASHBOARD_PORT": str(free_port()), "HEAD_AGENT_PORT": str(free_port()),
           "WORKER_AGENT_PORT": str(free_port()), "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    try:
        subprocess.run(["bash", str(SCRIPT), "start"], env=env, check=True, timeout=180)
        yield {**env, "RAY_ADDRESS": f"http://127.0.0.1:{env['DASHBOARD_PORT']}", "RAY_AUTH_MODE": "token"}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, timeout=120)
        deadline = time.monotonic() + 30
        while _processes_mentioning(str(state)) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _processes_mentioning(str(state))
        shutil.rmtree(state, ignore_errors=True)
        assert not left, f"processes outlived the cluster: {left}"


def _submit(env: dict, *args: str, runtime_env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--working-dir", str(ROOT)]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    deadline = time.monotonic() + 90
    while True:
        done = subprocess.run([*cmd, "--", "python", *args], env=env, capture_output=True, text=True, timeout=720)
        # Right after `start` the head's job agent may not be registered yet; Ray says retry.
        if "No available agent to submit job" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


def test_pipeline_job_on_a_two_node_cluster(cluster, mlflow_server, tmp_path):
    uri, _ = mlflow_server
    serve_port = free_port()
    run_dir = tmp_path / "cluster-smoke"  # on this machine every node sees it (shared storage)
    job = _submit(
        cluster, "jobs/pipeline.py", "--config", "jobs/configs/smoke.yaml",
        "--set", f"run_dir={run_dir}", "--set", "name=cluster-smoke",
        "--set", "data.num_train=256", "--set", "data.num_val=32", "--set", "train.eval_samples=32",
        "--set", "train.steps=10", "--set", "train.eval_every=5", "--set", "train.batch_size=16",
        "--set", "train.placement_strategy=SPREAD", "--set", "sweep.num_samples=1",
        "--set", "data.questions_per_image=3",  # rows sharing an image, across two nodes
        "--serve-set", f"port={serve_port}",
        runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1"}},
    )
    assert job.returncode == 0 and "succeeded" in job.stderr + job.stdout, (job.stdout + job.stderr)[-4000:]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("raybench")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`raybench.run_name` = 'cluster-smoke'")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    (child,) = children  # one trial: the sweep, champion and Serve path, not the search (test_sweep.py)
    # SPREAD: the trial's two FSDP workers on different nodes
    assert len(child.data.tags["raybench.worker_nodes"].split(",")) == 2
    assert client.get_model_version_by_alias("raybench-vlm", "champion").run_id == child.info.run_id

    # The Serve application outlives the job: the endpoint answers over plain HTTP.
    result = json.loads((run_dir / "pipeline.json").read_text())
    image = next(iter(sorted((run_dir / "data").glob("*.parquet"))))
    import pyarrow.parquet as pq
    row = pq.read_table(image, columns=["image", "question"]).slice(0, 1).to_pylist()[0]
    base = f"http://127.0.0.1:{serve_port}"
    answer = ask_endpoint(base, row["image"], row["question"], "raybench-vlm", timeout=60)
    assert isinstance(answer, str)
    assert result["endpoint"] == f"{base}/v1/chat/completions"
    with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as resp:
        assert "raybench-vlm" in resp.read().decode()

    # A bad config fails in seconds, with the field error (not a worker stack trace) in the logs.
    bad = _submit(cluster, "jobs/train.py", "--config", "jobs/configs/smoke.yaml",
                  "--set", "model.fusion.sparsity.final_keep_ratio=1.5")
    assert bad.returncode != 0
    job_id = next(w.strip("'") for w in (bad.stdout + bad.stderr).split() if w.strip("'").startswith("raysubmit_"))
    logs = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "logs", job_id], env=cluster,
                          capture_output=True, text=True, timeout=60).stdout
    assert "model.fusion.sparsity.final_keep_ratio = 1.5" in logs
    assert "Traceback" not in logs
