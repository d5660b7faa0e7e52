"""raybench.track against a real MLflow sqlite store in tmp_path (no Ray, no server)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raybench.track import (
    PARENT_RUN_TAG,
    RUN_ID_FILE,
    RUN_NAME_TAG,
    ParamConflictError,
    Tracker,
    _experiment_id,
    metric_key,
    param_value,
    tracking_uri,
)

CONFIG = {"model": {"llm": {"hidden_size": 128, "arch": "qwen3"}, "taps": [1, 3]}, "lr": 1e-3}


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's shell may point at a server; these tests own their stores.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store shared by the tests that don't test the embedded default.

    Each fresh store costs ~1 s of MLflow schema migrations; run names keep tests apart.
    """
    return tracking_uri(tmp_path_factory.mktemp("store"))


def _runs_named(client: MlflowClient, name: str) -> list:
    exp = client.get_experiment_by_name("raybench")
    return client.search_runs([exp.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{name}'")


def test_open_log_finish_then_resume_same_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    tracker = Tracker.open(run_dir, "smoke", params=CONFIG, flush_every=3)
    assert tracking_uri(run_dir) == f"sqlite:///{run_dir.resolve()}/mlflow.db"
    assert (run_dir / "mlflow.db").is_file()
    assert (run_dir / RUN_ID_FILE).read_text().strip() == tracker.run_id

    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "acc/color": step / 10}, step=step)
    tracker.finish()

    client = MlflowClient(tracking_uri(run_dir))
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.llm.hidden_size"] == "128"
    assert run.data.params["model.taps"] == "[1, 3]"
    assert run.data.params["lr"] == "0.001"
    assert run.data.tags[RUN_NAME_TAG] == "smoke"
    assert run.info.run_name == "smoke"
    history = client.get_metric_history(tracker.run_id, "acc/color")
    assert [m.step for m in history] == list(range(5))

    # A restart: same run dir and name -> same run; same config is accepted, metrics continue.
    again = Tracker.open(run_dir, "smoke", params=CONFIG)
    assert again.run_id == tracker.run_id
    assert client.get_run(again.run_id).info.status == "RUNNING"
    assert again.last_step("acc/color") == 4
    again.log_metrics({"acc/color": 0.9}, step=5)
    assert again.last_step("acc/color") == 5  # last_step flushes the buffer first
    again.finish("KILLED")
    assert client.get_run(again.run_id).info.status == "KILLED"
    assert len(_runs_named(client, "smoke")) == 1

    # Run directory lost (restart on another node) but the store is the same: found by tag.
    (run_dir / RUN_ID_FILE).unlink()
    assert Tracker.open(run_dir, "smoke").run_id == tracker.run_id
    assert (run_dir / RUN_ID_FILE).read_text().strip() == tracker.run_id

    # Another name in the same run dir is another run.
    other = Tracker.open(run_dir, "other")
    assert other.run_id != tracker.run_id
    assert len(_runs_named(client, "smoke")) == 1


def test_resume_with_changed_config_names_the_keys(tmp_path: Path, store: str) -> None:
    first = Tracker.open(tmp_path, "r", params=CONFIG, uri=store)
    first.finish("FAILED")
    changed = {**CONFIG, "lr": 3e-4, "model": {**CONFIG["model"], "taps": [2]}}
    with pytest.raises(ParamConflictError, match=r"lr: '0.001' -> '0.0003'") as err:
        Tracker.open(tmp_path, "r", params=changed, uri=store)
    assert "model.taps" in str(err.value)
    assert "model.llm.hidden_size" not in str(err.value)
    client = MlflowClient(store)
    assert client.get_run(first.run_id).info.status == "FAILED"  # refused resume: untouched
    # Nothing of the bad config was logged; new keys on a resumed run are fine.
    tracker = Tracker.open(tmp_path, "r", params={**CONFIG, "extra": {"seed": 7}}, uri=store)
    assert tracker.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    params = client.get_run(first.run_id).data.params
    assert params["lr"] == "0.001" and params["extra.seed"] == "7"


def test_many_long_params_respect_mlflow_limits(tmp_path: Path, store: str) -> None:
    params = {f"p{i:03d}": i for i in range(250)} | {"long": "x" * 10_000}
    tracker = Tracker.open(tmp_path, "big", params=params, uri=store)
    logged = MlflowClient(store).get_run(tracker.run_id).data.params
    assert len(logged) == 251 and len(logged["long"]) == 6000
    Tracker.open(tmp_path, "big", params=params, uri=store)  # the truncated value compares equal


def test_env_uri_overrides_embedded_store(tmp_path: Path, store: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    shared = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", shared)
    assert tracking_uri(tmp_path / "run") == shared
    with Tracker.open(tmp_path / "run", "env", params={"a": 1}) as tracker:
        tracker.log_metrics({"loss": 0.5}, step=0)
    assert not (tmp_path / "run" / "mlflow.db").exists()
    run = MlflowClient(shared).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 0.5


def test_parent_child_and_model_dir_artifacts(tmp_path: Path, store: str) -> None:
    parent = Tracker.open(tmp_path / "sweep", "sweep", uri=store)
    child_dir = tmp_path / "sweep" / "trial_0"
    child = Tracker.open(child_dir, "trial_0", parent_run_id=parent.run_id, tags={"trial": 0},
                         uri=store)
    client = MlflowClient(store)
    run = client.get_run(child.run_id)
    assert run.data.tags[PARENT_RUN_TAG] == parent.run_id
    assert run.data.tags["trial"] == "0"

    model = tmp_path / "export"
    (model / "tokenizer").mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    (model / "config.json").write_text("{}")
    (model / "tokenizer" / "tokenizer.json").write_text("{}")
    child.log_model_dir(model)
    top = {a.path for a in client.list_artifacts(child.run_id, "model")}
    assert top == {"model/model.safetensors", "model/config.json", "model/tokenizer"}
    assert [a.path for a in client.list_artifacts(child.run_id, "model/tokenizer")] == [
        "model/tokenizer/tokenizer.json"
    ]
    # A local sqlite store keeps artifacts next to its db file, not in the cwd.
    db_dir = Path(store.removeprefix("sqlite:///")).parent
    assert list((db_dir / "mlartifacts" / child.run_id).rglob("model.safetensors"))

    with pytest.raises(FileNotFoundError):
        child.log_model_dir(tmp_path / "missing")
    with pytest.raises(RuntimeError):
        with child:
            raise RuntimeError("boom")
    assert client.get_run(child.run_id).info.status == "FAILED"


def test_experiment_creation_race_is_tolerated(store: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient(store)
    exp_id = client.create_experiment("race")
    real_get = client.get_experiment_by_name
    calls = []

    def lagging_get(name: str):  # the first look happens before the other process created it
        calls.append(name)
        return None if len(calls) == 1 else real_get(name)

    monkeypatch.setattr(client, "get_experiment_by_name", lagging_get)
    assert _experiment_id(client, "race", None) == exp_id
    assert len(calls) == 2


def test_helpers() -> None:
    assert metric_key("acc/color") == "acc/color"
    assert metric_key("loss@lr=3e-4") == "loss_lr_3e-4"
    assert metric_key("/a//b/../c/") == "a/b/_/c"
    assert param_value([1, "a"]) == '[1, "a"]'
    assert param_value(None) == "None"
    with pytest.raises(ValueError):
        Tracker.open("/tmp/never-used", "a'b\"c")
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(Tracker(client=None, run_id="x"))  # type: ignore[arg-type]
