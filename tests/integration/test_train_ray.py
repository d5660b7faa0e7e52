"""Ray Train end to end on a real local Ray instance and real MLflow stores.

- 2 FSDP2 workers train the tiny hybrid preset, logging to a real `mlflow server`;
  parameters are sharded; the exported model reproduces the eval accuracy in a fresh process.
- A worker process is killed (SIGKILL to its real PID) mid-run: the run restarts from the
  last checkpoint and completes, continuing the same MLflow run.
- The driver is stopped (SIGINT) and started again: the resumed run's step-N loss equals an
  uninterrupted run's step-N loss.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from raybench.config import load_config
from raybench.track import RUN_ID_FILE, RUN_NAME_TAG
from raybench.train.trainer import fit, storage_path

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

STEPS, EVERY = 20, 10
# Long enough after the first checkpoint (step EVERY) that a driver SIGINT lands mid-run: at
# 20 steps the workers finished and exported the model before the driver's abort.
RESUME_STEPS = 6 * EVERY
# The long runs start with a stage on 1-object scenes and a frozen vision tower; the switch
# lands between checkpoints, so a resumed run crosses it after its restart and must still see
# the same batches and unfreeze the same modules.
STAGES = [{"name": "easy", "steps": 25, "train": ["projector", "deepstack", "llm"],
           "lr_scale": {"llm": 0.5}, "data": {"num_examples": 128, "max_objects": 1}},
          {"name": "main"}]


def write_config(tmp: Path, name: str, data_dir: Path, run_dir: str | None = None, **train) -> Path:
    cfg = {
        "name": name, "run_dir": run_dir or str(tmp / name),
        "model": {"preset": "hybrid", "size": "tiny"},
        "data": {"path": str(data_dir), "num_train": 512, "num_val": 64},
        "train": {"steps": STEPS, "batch_size": 16, "lr": 3e-3, "warmup_steps": 3, "eval_every": EVERY,
                  "eval_samples": 64, "log_every": 1, "num_workers": 2, "cpus_per_worker": 0.45,
                  "max_failures": 2, **train},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from raybench.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("data") / "synth"
    write_synthetic(out, num_train=512, num_val=64, image_size=32, seed=0)
    return out


def _runs_named(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name("raybench")
    return client.search_runs([exp.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{name}'")


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir, mlflow_server, ray_session):
    """One uninterrupted 2-worker FSDP run logging to the real `mlflow server`. The FSDP test
    checks it; the driver-stop test compares its resumed loss with this run's (same config
    but the name, so the same seeds, data order and LR schedule): one Ray run less."""
    uri, _ = mlflow_server
    tmp = tmp_path_factory.mktemp("straight")
    cfg_path = write_config(tmp, "fsdp", data_dir, steps=RESUME_STEPS, stages=STAGES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        result = fit(load_config(cfg_path))
    client = MlflowClient(uri)
    (run,) = _runs_named(client, "fsdp")
    return {"cfg_path": cfg_path, "result": result, "client": client, "run": run}


def test_fsdp_training_logs_to_mlflow_server_and_exports_a_reproducible_model(straight):
    cfg_path, result, client, run = straight["cfg_path"], straight["result"], straight["client"], straight["run"]
    cfg = load_config(cfg_path)
    assert result.error is None
    assert result.metrics["step"] == RESUME_STEPS

    assert run.info.status == "FINISHED"
    assert run.data.params["model.preset"] == "hybrid"
    loss = _history(client, run.info.run_id, "train_loss")
    assert sorted(loss) == list(range(1, RESUME_STEPS + 1))
    # Easy scenes for the first 25 steps (generated into the run dir), then the training set.
    assert _history(client, run.info.run_id, "stage_end/easy") == {25: 25.0}
    assert (cfg.stage_path(cfg.train.stages[0]) / "curriculum.parquet").exists()
    stage = _history(client, run.info.run_id, "stage")
    assert {s for s, v in stage.items() if v == 0} == set(range(1, 26))
    assert sum(loss[s] for s in range(RESUME_STEPS - 4, RESUME_STEPS + 1)) < sum(loss[s] for s in range(1, 6))
    # Each of the 2 ranks holds about half of the parameters (FSDP2 pads uneven shards).
    local = _history(client, run.info.run_id, "params_local")[0]
    full = _history(client, run.info.run_id, "params_full")[0]
    assert 0.45 * full <= local <= 0.55 * full
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {
        "model/model.safetensors", "model/config.json", "model/tokenizer.json"}

    # The exported weights, loaded in a fresh process, reproduce the sharded eval.
    out = subprocess.run([sys.executable, "-m", "raybench.cli", "eval", "--config", str(cfg_path),
                          "--model", str(cfg.run_path / "model")], capture_output=True, text=True, check=True)
    fresh = json.loads(out.stdout)
    assert fresh["accuracy"] == pytest.approx(result.metrics["accuracy"], abs=1e-9)
    assert fresh["val_loss"] == pytest.approx(result.metrics["val_loss"], rel=1e-4)


def _registered_checkpoint(storage: Path) -> bool:
    """True once the Train controller has registered a checkpoint (not merely a directory
    being uploaded): its snapshot names the latest checkpoint result."""
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False  # not written yet, or caught mid-write
    return bool(snapshot.get("latest_checkpoint_result"))


def _worker_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors]


def test_killed_worker_restarts_from_checkpoint_and_run_completes(tmp_path, data_dir, ray_session, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # A relative run_dir, like the default `runs/<name>`: workers run in Ray's own directory.
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write_config(tmp_path, "killed", data_dir, run_dir="runs/killed", steps=40))
    storage = Path(storage_path(cfg)) / cfg.name
    killed: list[int] = []

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if _registered_checkpoint(storage):
                pids = _worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    result = fit(cfg)
    killer.join(timeout=5)
    assert killed, "no worker was killed"
    assert result.error is None
    assert result.metrics["step"] == 40

    client = MlflowClient(f"sqlite:///{cfg.run_path.resolve() / 'mlflow.db'}")
    (run,) = _runs_named(client, "killed")  # one MLflow run, continued after the restart
    assert (tmp_path / "runs" / "killed" / RUN_ID_FILE).read_text().strip() == run.info.run_id
    resumed = _history(client, run.info.run_id, "resumed_from_step")
    assert resumed and all(s % EVERY == 0 and s > 0 for s in resumed.values())
    steps = sorted(_history(client, run.info.run_id, "train_loss"))
    assert steps[-1] == 40 and steps[0] == 1
    assert max(b - a for a, b in zip(steps, steps[1:])) <= EVERY


def _train_cli(cfg_path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "raybench.cli", "train", "--config", str(cfg_path)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def test_resume_after_driver_stops_matches_uninterrupted_loss(tmp_path, data_dir, straight):
    # Each driver below starts (and stops) a local Ray of its own, beside the session's.
    cfg_path = write_config(tmp_path, "interrupted", data_dir, steps=RESUME_STEPS, stages=STAGES)
    cfg = load_config(cfg_path)
    storage = Path(storage_path(cfg)) / "interrupted"
    proc = _train_cli(cfg_path, tmp_path / "interrupted.log")
    deadline = time.monotonic() + 300
    while not _registered_checkpoint(storage) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert not (cfg.run_path / "model").exists(), "the interrupted run should not have finished"
    proc = _train_cli(cfg_path, tmp_path / "interrupted-resumed.log")
    assert proc.wait(timeout=400) == 0, (tmp_path / "interrupted-resumed.log").read_text()[-3000:]
    client = MlflowClient(f"sqlite:///{cfg.run_path.resolve() / 'mlflow.db'}")
    (run,) = _runs_named(client, "interrupted")
    assert _history(client, run.info.run_id, "resumed_from_step")
    resumed = _history(client, run.info.run_id, "train_loss")
    baseline = _history(straight["client"], straight["run"].info.run_id, "train_loss")
    assert resumed[RESUME_STEPS] == pytest.approx(baseline[RESUME_STEPS], rel=1e-5)
