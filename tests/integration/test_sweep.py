"""Sweeps end to end: real local Ray (Tune + Train), real Optuna sqlite storage, real MLflow.

- A 2-trial sweep on the tiny preset: 1 parent + 2 child MLflow runs with the sampled
  params, the champion alias points at the best trial's model, which loads and answers;
  `optuna.load_study` sees every trial with its value.
- The sweep driver is SIGKILLed (with the local Ray it started) after the first trial
  completes; `raybench sweep --resume` finishes the study without re-running that trial.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from raybench.cost import inference_cost
from raybench.pyfunc import model_files
from raybench.serve.model_source import resolve_model_dir
from raybench.model.vlm import HybridVLM
from raybench.track import RUN_NAME_TAG
from raybench.tune.sweep import load_sweep, run_sweep

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

SPACE = {
    "model.fusion.vet.vocab_size": {"type": "logint", "low": 32, "high": 256},
    "model.fusion.deepstack.num_injections": {"type": "int", "low": 0, "high": 2},
    "model.fusion.sparsity.schedule": {"type": "choice", "values": ["constant", "linear", "exponential", "step"]},
    "train.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from raybench.data.synthetic import write_synthetic

    out = tmp_path_factory.mktemp("sweepdata") / "synth"
    write_synthetic(out, num_train=256, num_val=32, image_size=32, seed=0)
    return out


def write_config(tmp: Path, name: str, data_dir: Path, num_samples: int, stages=None,
                 points_to_evaluate=()) -> Path:
    cfg = {
        "name": name, "run_dir": str(tmp / name),
        "model": {"preset": "hybrid", "size": "tiny"},
        "data": {"path": str(data_dir)},
        "train": {"steps": 12, "batch_size": 16, "warmup_steps": 2, "eval_every": 6, "eval_samples": 32,
                  "log_every": 1, "num_workers": 2, "stages": stages},
        "sweep": {"num_samples": num_samples, "seed": 0, "space": SPACE,
                  "points_to_evaluate": list(points_to_evaluate)},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _client(run_dir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")


def _children(client: MlflowClient, parent_id: str):
    exp_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_sweep_tracks_every_trial_and_registers_a_champion_that_answers(tmp_path, data_dir, ray_session,
                                                                      monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # The tower's own stage at its own lr: no searched value changes it, so it runs once.
    stages = [{"name": "easy", "steps": 4, "objective": "scene", "train": ["vision"], "lr": 0.005,
               "data": {"num_examples": 64}}, {"name": "main"}]
    # Trial 1 is the config as written (its own model/train values), then TPE proposes.
    sweep = load_sweep(write_config(tmp_path, "sw", data_dir, num_samples=2, stages=stages,
                                    points_to_evaluate=[{}]), [])
    summary = run_sweep(sweep)
    run_dir = sweep.run_dir
    assert summary["trials"] == 2 and summary["completed"] + summary["pruned"] == 2

    client = _client(run_dir)
    exp = client.get_experiment_by_name("raybench")
    parents = client.search_runs([exp.experiment_id], "tags.`raybench.kind` = 'sweep'")
    assert [p.info.run_id for p in parents] == [summary["run_id"]]
    assert parents[0].info.status == "FINISHED"
    children = _children(client, summary["run_id"])
    assert len(children) == 2
    rows = {r["trial_id"]: r for r in json.loads((run_dir / "summary" / "trials.json").read_text())}
    for child in children:
        row = rows[child.data.tags["raybench.trial_id"]]
        assert child.data.tags[RUN_NAME_TAG] == f"sw-{row['trial_id']}"
        assert child.data.tags["raybench.trial_state"] == row["state"]
        for key, value in row["params"].items():  # the sampled values are what the trial trained
            assert child.data.params[key] == str(value)
        assert "gflops_per_sample" in child.data.metrics
        # Every trial starts on the sweep's one set of first-stage scenes, made once.
        easy = sweep.cfg.train.stages[0]
        assert child.data.params["train.stages.0.data.path"] == str(sweep.cfg.stage_path(easy).resolve())
    assert not list((run_dir / "trials").glob("*/easy-*"))
    # The first trial trained the scene stage and left its end state; the other started there.
    first, second = sorted(children, key=lambda c: c.info.start_time)
    (shared,) = (run_dir / "shared-stages").glob("easy-*")
    assert json.loads((shared / "shared_stage.json").read_text())["trial"] == first.data.tags[RUN_NAME_TAG]
    assert first.data.tags["raybench.shared_stage"] == f"saved {shared}"
    assert first.data.metrics["stage_end/easy"] == 4
    assert second.data.tags["raybench.shared_stage"] == f"loaded {shared}"
    assert "stage_end/easy" not in second.data.metrics
    assert [m.step for m in client.get_metric_history(first.info.run_id, "train_loss")][:1] == [1]
    assert min(m.step for m in client.get_metric_history(second.info.run_id, "train_loss")) == 5
    assert min(m.step for m in client.get_metric_history(second.info.run_id, "accuracy")) == 6

    # The champion alias points at the best completed trial's exported model.
    champion = summary["champion"]
    completed = [r for r in rows.values() if r["state"] == "completed"]
    assert champion["accuracy"] == max(r["accuracy"] for r in completed)
    version = client.get_model_version_by_alias("raybench-vlm", "champion")
    assert version.run_id == champion["run_id"]
    mlflow.set_tracking_uri(client.tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/raybench-vlm@champion",
                                                     dst_path=str(tmp_path / "champion")))
    assert (local / "MLmodel").is_file()  # registered as an MLflow model (pyfunc, models-from-code)
    files = model_files(local)
    trained = run_dir / "trials" / champion["trial_id"] / "model" / "model.safetensors"
    downloaded, original = load_file(files / "model.safetensors"), load_file(trained)
    assert downloaded.keys() == original.keys()
    assert all(torch.equal(downloaded[k], original[k]) for k in original)
    # What every Serve replica of `raybench deploy --model models:/...` loads: the same files.
    monkeypatch.setenv("RAYBENCH_MODEL_CACHE", str(tmp_path / "model_cache"))  # not the user's cache
    served = resolve_model_dir("models:/raybench-vlm@champion", client.tracking_uri)
    assert load_file(served / "model.safetensors").keys() == original.keys()
    model = HybridVLM.from_pretrained(files)
    assert model.config.fusion.vet.vocab_size == champion["params"]["model.fusion.vet.vocab_size"]
    # The inference cost its rank 0 measured and reported is this config's (FLOPs: deterministic).
    (champion_run,) = [c for c in children if c.info.run_id == champion["run_id"]]
    assert champion_run.data.metrics["gflops_per_sample"] == pytest.approx(
        inference_cost(model.config, "gflops_per_sample"), rel=1e-9)
    image, question = _an_image(tmp_path, data_dir), "what color is the shape?"
    asked = subprocess.run(
        [sys.executable, "-m", "raybench.cli", "ask", "--model", str(files), "--question", question,
         "--image", str(image)], capture_output=True, text=True, check=True).stdout.removesuffix("\n")
    # A fresh process that knows only the registry: pyfunc.load_model(alias).predict, and the
    # JSON body `mlflow models serve` takes, answer as `raybench ask` does.
    loaded = subprocess.run([sys.executable, "-c", PYFUNC_CLIENT, client.tracking_uri, str(image), question],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.splitlines()[-1]) == {"predict": asked, "serving": asked}, loaded.stdout

    # The persisted study: every trial, each with its value.
    study = optuna.load_study(study_name="sw", storage=f"sqlite:///{run_dir / 'optuna.db'}")
    assert len(study.trials) == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE and t.value is not None for t in study.trials)
    assert study.trials[0].params == {"model.fusion.vet.vocab_size": 64, "model.fusion.deepstack.num_injections": 2,
                                      "model.fusion.sparsity.schedule": "exponential", "train.lr": 0.003}
    assert study.best_value == pytest.approx(champion["accuracy"])

    artifacts = {a.path for a in client.list_artifacts(summary["run_id"], "summary")}
    assert {"summary/summary.md", "summary/trials.csv", "summary/optimization_history.png"} <= artifacts


PYFUNC_CLIENT = """
import base64, json, sys
import mlflow, pandas as pd
from mlflow.models import validate_serving_input
uri, image, question = sys.argv[1:]
mlflow.set_tracking_uri(uri)
data = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
model = mlflow.pyfunc.load_model("models:/raybench-vlm@champion")
predicted = model.predict(pd.DataFrame([{"image": data, "question": question}]))["answer"][0]
body = json.dumps({"dataframe_records": [{"image": data, "question": question}], "params": {"max_tokens": 8}})
served = validate_serving_input("models:/raybench-vlm@champion", body)["answer"][0]
print(json.dumps({"predict": predicted, "serving": served}))  # one line, whatever the answer holds
"""


def _an_image(tmp: Path, data_dir: Path) -> Path:
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(data_dir.glob("*.parquet"))[0], columns=["image"])
    path = tmp / "q.png"
    path.write_bytes(table.column("image")[0].as_py())
    return path


def _terminated_trials(exp_dir: Path) -> set[str]:
    """Trials Tune has recorded as TERMINATED in its experiment state (what a restore sees)."""
    done = set()
    for f in glob.glob(str(exp_dir / "experiment_state-*.json")):
        try:
            state = json.loads(Path(f).read_text())
        except (OSError, ValueError):
            continue  # caught mid-write
        for trial_json, _ in state.get("trial_data", []):
            trial = json.loads(trial_json)
            if trial.get("status") == "TERMINATED":
                done.add(trial["trial_id"])
    return done


def _study_size(db: Path) -> int:
    """Optuna trials in the study's sqlite file, read-only while the sweep writes it."""
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            return con.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
    except sqlite3.Error:
        return 0  # not created yet


def _session_processes(session: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if session.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass
    return pids


def test_killed_sweep_driver_resumes_without_rerunning_finished_trials(tmp_path, data_dir):
    # The CLI driver starts a local Ray of its own (beside the session's) and dies with it.
    cfg_path = write_config(tmp_path, "kill", data_dir, num_samples=2, points_to_evaluate=[{"train.lr": 0.002}])
    run_dir = tmp_path / "kill"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    log = (tmp_path / "first.log").open("w")
    before = {p.name for p in Path("/tmp/ray").glob("session_2*")}
    proc = subprocess.Popen([sys.executable, "-m", "raybench.cli", "sweep", "--config", str(cfg_path)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 400
    # Kill once the first trial is on record and Optuna has handed out the second: often before
    # Tune's next experiment-state save, the window that once left an orphan RUNNING trial.
    while not (_terminated_trials(run_dir / "tune" / "kill") and _study_size(run_dir / "optuna.db") >= 2) \
            and proc.poll() is None:
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    (first,) = _terminated_trials(run_dir / "tune" / "kill")
    # The driver and the local Ray it started (same process group) die at once: a lost machine.
    sessions = {p.name for p in Path("/tmp/ray").glob("session_2*")} - before  # the one it started
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for session in sessions:  # Ray's workers notice their raylet is gone and exit
        deadline = time.monotonic() + 60
        while _session_processes(session) and time.monotonic() < deadline:
            time.sleep(0.5)

    resumed = subprocess.run([sys.executable, "-m", "raybench.cli", "sweep", "--resume", str(run_dir)],
                             capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    study = optuna.load_study(study_name="kill", storage=f"sqlite:///{run_dir / 'optuna.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2
    assert [t.params["train.lr"] for t in done].count(0.002) == 1  # enqueued once, not again on resume
    assert done[0].params["train.lr"] == 0.002
    # Anything else was failed on purpose: a repeat TPE proposed, or a trial the killed driver
    # had asked Optuna for before Tune recorded it (the searcher's restore fails those).
    others = [t for t in study.trials if t not in done]
    assert all(t.state == optuna.trial.TrialState.FAIL and {"rejected", "orphaned"} & set(t.user_attrs)
               for t in others), [(t.state, t.user_attrs) for t in others]
    client = _client(run_dir)
    parent_id = (run_dir / "mlflow_run_id").read_text().strip()
    children = {c.data.tags["raybench.trial_id"]: c for c in _children(client, parent_id)}
    assert len(children) == 2  # no duplicate child for the finished trial
    history = client.get_metric_history(children[first].info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 13))  # trained once, not again
    assert not client.get_metric_history(children[first].info.run_id, "resumed_from_step")
