"""MLflow tracking for raybench: one `Tracker` per training run (rank 0 / driver only).

Where runs go:
    * embedded default: a sqlite store inside the run directory
      (`sqlite:///<run_dir>/mlflow.db`, artifacts in `<run_dir>/mlartifacts/<run_id>/`);
      any local sqlite URI keeps its artifacts next to the db file, never in the cwd;
    * `MLFLOW_TRACKING_URI` in the environment overrides it - on a cluster it names an
      `mlflow server`, because a sqlite file on the head is not reachable from workers;
    * an explicit `uri=` argument overrides both.

Why not `mlflow.start_run()`: the fluent API keeps one global "active run" per process, and
Ray may run several trainers / trials in one worker process. Every call here goes through
an explicit `MlflowClient(uri)` and an explicit run id instead.

A run is identified by its name. Re-opening the same name continues the same MLflow run
(a restarted training must not leave a duplicate run behind): the id is kept in
`<run_dir>/mlflow_run_id` and the run is tagged `raybench.run_name=<name>`, so it is found
even when the run directory did not survive (e.g. a restart on another node).

Metric names: MLflow 3 accepts `/` in metric and param names (`acc/color` is logged as is).
It rejects other characters and names that are not a normalised relative path (`a//b`,
`/a`, `a/../b`). `metric_key` makes any name legal - other characters (colon included, as
Windows refuses it) become `_`, empty segments are dropped, `.`/`..` segments become `_` -
so a training loop never dies on a metric name.

With an http tracking URI, MLflow itself writes the run's UI link to stdout when a run ends
(`MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=true` silences it).

The `Tracker` holds a live client and is meant to be created inside the process that logs
(a Ray worker); it refuses to be pickled rather than silently ship a half-working copy.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from raybench.config import flatten

RUN_NAME_TAG = "raybench.run_name"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests child runs under it
RUN_ID_FILE = "mlflow_run_id"
DB_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"

# MLflow limits (mlflow/utils/validation.py): longer param values are truncated by MLflow,
# so we truncate the same way *before* comparing with what a previous attempt logged.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

_STATUSES = ("FINISHED", "FAILED", "KILLED")
_ILLEGAL_NAME_CHARS = re.compile(r"[^/\w.\- ]")  # MLflow's rule minus the colon (Windows)


class ParamConflictError(ValueError):
    """A resumed run was given a config that differs from the one it started with."""


def tracking_uri(run_dir: Path | str) -> str:
    """`MLFLOW_TRACKING_URI` if set, else the embedded sqlite store of `run_dir`."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(run_dir).resolve() / DB_FILE).as_posix()}"


def metric_key(name: str) -> str:
    """A metric name MLflow accepts: illegal characters and path oddities become `_`."""
    name = _ILLEGAL_NAME_CHARS.sub("_", str(name))
    # MLflow also rejects names that are not a normalised relative path.
    parts = ["_" if p in (".", "..") else p for p in name.split("/") if p]
    return "/".join(parts) or "_"


def param_value(value: Any) -> str:
    """How a config value is written as an MLflow param (lists/tuples as JSON)."""
    if isinstance(value, (list, tuple)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text[:MAX_PARAM_VALUE_LENGTH]


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a local sqlite store live next to the db file; a server decides itself."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.endswith(":memory:"):
        return None
    return (Path(uri[len(prefix):]).parent / ARTIFACT_DIR).resolve().as_uri()


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """Get or create the experiment; safe when several processes race to create it."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)  # another process won the race
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise MlflowException(
            f"MLflow experiment {name!r} is deleted: restore it or delete it permanently "
            "(`mlflow gc`) before logging to it again"
        )
    return exp.experiment_id


class Tracker:
    """One MLflow run, logged through an explicit client; metrics buffered.

    Use `Tracker.open(...)`; as a context manager it ends the run FINISHED, or FAILED /
    KILLED when the block raises.
    """

    def __init__(self, client: MlflowClient, run_id: str, flush_every: int = 20) -> None:
        self.client = client
        self.run_id = run_id
        self.flush_every = max(1, flush_every)
        self._buffer: list[Metric] = []
        self._calls_since_flush = 0

    @classmethod
    def open(
        cls,
        run_dir: Path | str,
        name: str,
        experiment: str = "raybench",
        params: Mapping[str, Any] | Any | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        uri: str | None = None,
        flush_every: int = 20,
    ) -> Tracker:
        """Open (create or continue) the run `name` of `run_dir` and log `params`.

        Raises `ParamConflictError` when continuing a run with params that differ from
        the ones it was started with. There is no lock: open a run from one process at a
        time (rank 0 / the driver), as two simultaneous first opens may create two runs.
        """
        if "'" in name and '"' in name:
            raise ValueError(f"run name {name!r} may not contain both ' and \"")
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        uri = uri or tracking_uri(run_dir)
        client = MlflowClient(uri)
        exp_id = _experiment_id(client, experiment, _artifact_location(uri))

        parent_run_id = parent_run_id or None
        run_id = _find_run(client, exp_id, run_dir / RUN_ID_FILE, name, parent_run_id)
        all_tags = {RUN_NAME_TAG: name, **(tags or {})}
        if parent_run_id:
            all_tags[PARENT_RUN_TAG] = parent_run_id
        str_tags = {k: str(v) for k, v in all_tags.items()}
        resumed = run_id is not None
        if run_id is None:
            run_id = client.create_run(exp_id, tags=str_tags, run_name=name).info.run_id

        tracker = cls(client, run_id, flush_every=flush_every)
        if params:
            tracker.log_params(params)  # a config conflict raises before the run is touched
        if resumed:
            client.update_run(run_id, status="RUNNING")  # it may have ended FAILED/KILLED
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in str_tags.items()])
        (run_dir / RUN_ID_FILE).write_text(run_id + "\n")
        return tracker

    # -- params ---------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        """Log a (nested) config as flat `a.b=value` params; re-logging equal values is a no-op.

        Accepts a dict or a pydantic model. Raises `ParamConflictError` listing every key
        whose value differs from the one already logged (MLflow params are write-once).
        """
        if hasattr(params, "model_dump"):
            params = params.model_dump(mode="json")
        new = {k: param_value(v) for k, v in flatten(dict(params)).items()}
        logged = self.client.get_run(self.run_id).data.params
        conflicts = sorted(k for k, v in new.items() if k in logged and logged[k] != v)
        if conflicts:
            details = "; ".join(f"{k}: {logged[k]!r} -> {new[k]!r}" for k in conflicts)
            raise ParamConflictError(
                f"MLflow run {self.run_id} was started with a different config; "
                f"changed keys: {details}. Use a new run name for a new config."
            )
        todo = [Param(k, v) for k, v in new.items() if k not in logged]
        for i in range(0, len(todo), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=todo[i : i + MAX_PARAMS_PER_BATCH])

    # -- metrics --------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer one step's metrics; written every `flush_every` calls (cheap per step)."""
        now = int(time.time() * 1000)
        self._buffer.extend(
            Metric(metric_key(k), float(v), now, int(step)) for k, v in metrics.items()
        )
        self._calls_since_flush += 1
        full = len(self._buffer) >= MAX_METRICS_PER_BATCH
        if full or self._calls_since_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write all buffered metrics (in batches MLflow accepts)."""
        buffer, self._buffer, self._calls_since_flush = self._buffer, [], 0
        for i in range(0, len(buffer), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=buffer[i : i + MAX_METRICS_PER_BATCH])

    def last_step(self, metric: str) -> int | None:
        """Highest step logged for `metric` (buffered ones included), None if never logged."""
        self.flush()
        history = self.client.get_metric_history(self.run_id, metric_key(metric))
        return max((m.step for m in history), default=None)

    # -- artifacts and status ---------------------------------------------------------------

    def log_model_dir(self, local_dir: Path | str, artifact_path: str = "model") -> None:
        """Upload a model directory (safetensors, config.json, tokenizer files) as artifacts."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"model directory not found: {local_dir}")
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """Flush metrics and end the run with `status` (FINISHED, FAILED or KILLED)."""
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {status!r}")
        self.flush()
        self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def __getstate__(self) -> dict[str, Any]:
        # A copy would hold a stale client and a forked metric buffer: open it where it logs.
        raise TypeError("Tracker is not picklable: call Tracker.open() inside the worker")


def _find_run(
    client: MlflowClient,
    exp_id: str,
    id_file: Path,
    name: str,
    parent_run_id: str | None,
) -> str | None:
    """The existing run for `name` (under `parent_run_id`), or None.

    First the id recorded in the run directory, then a tag search (the run directory may
    be new, e.g. after a restart on another node). Deleted runs do not count.
    """

    def matches(run: Any) -> bool:
        t = run.data.tags
        return (
            run.info.lifecycle_stage == "active"
            and run.info.experiment_id == exp_id
            and t.get(RUN_NAME_TAG) == name
            and t.get(PARENT_RUN_TAG) == parent_run_id
        )

    if id_file.is_file():
        run_id = id_file.read_text().strip()
        try:
            if matches(client.get_run(run_id)):
                return run_id
        except MlflowException as e:
            # Recorded by a store this run no longer logs to; anything else is a real error.
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
    # MLflow's filter grammar has no escapes: quote with the quote the name lacks.
    quote = '"' if "'" in name else "'"
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = {quote}{name}{quote}",
        run_view_type=ViewType.ACTIVE_ONLY,
        order_by=["attributes.start_time ASC"],
    )
    # The oldest match wins so that every later open agrees on the same run.
    return next((r.info.run_id for r in runs if matches(r)), None)


PYFUNC_ARTIFACT_PATH = "mlflow-model"


def register_champion(uri: str, run_id: str, name: str = "raybench-vlm", alias: str = "champion",
                      artifact_path: str = "model", tags: Mapping[str, Any] | None = None) -> str:
    """Register the run's model as a new version of `name`; point `alias` at it.

    What is registered is an MLflow model (pyfunc, models-from-code: `raybench.pyfunc`)
    built from `runs:/<run_id>/<artifact_path>` and logged to the same run, so
    `mlflow.pyfunc.load_model("models:/raybench-vlm@champion")` and `mlflow models serve`
    work, and `raybench deploy` serves the same version from its artifacts. MLflow 3 uses
    aliases, not stages: `models:/NAME@ALIAS` resolves to the version returned here.
    """
    import tempfile

    import mlflow.artifacts

    from raybench.pyfunc import save_pyfunc

    client = MlflowClient(uri, registry_uri=uri)
    with tempfile.TemporaryDirectory(prefix="raybench-pyfunc-") as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                    dst_path=tmp, tracking_uri=uri)
        client.log_artifacts(run_id, str(save_pyfunc(local, Path(tmp) / "pyfunc")), PYFUNC_ARTIFACT_PATH)
    try:
        client.create_registered_model(name, description="raybench HybridVLM: sweep champions")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, f"runs:/{run_id}/{PYFUNC_ARTIFACT_PATH}", run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()},
    )
    client.set_registered_model_alias(name, alias, version.version)
    return version.version
