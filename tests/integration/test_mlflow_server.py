"""raybench.track against a real `mlflow server` subprocess (the cluster set-up).

The server keeps runs in sqlite and proxies artifacts (`mlflow-artifacts:/` URIs): the
client never touches the artifact directory itself, exactly as a Ray worker on another
node would not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raybench.track import RUN_NAME_TAG, Tracker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


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
