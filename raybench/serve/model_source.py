"""Where served weights come from: a model directory or an MLflow registry URI.

    /path/to/model                 a directory with model.safetensors, config.json, tokenizer.json
    models:/raybench-vlm@champion  a registered model's alias (MLflow 3: aliases, not stages)
    models:/raybench-vlm/3         a registered model's version

A registered version is an MLflow pyfunc (`raybench.pyfunc`) whose artifact `model` holds
the model directory, or (versions registered before that) the model directory itself.

`check_model_ref` runs in `raybench deploy` before Ray starts (a wrong path or alias fails
in a second) and pins an alias to its version, so a replica restarted later loads the same
weights even after the alias moves. `resolve_model_dir` runs in every replica: a registry
URI is downloaded once per node into a cache keyed by name, version and artifact URI.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from raybench.config import ConfigError
from raybench.pyfunc import model_files

REQUIRED_FILES = ("model.safetensors", "config.json", "tokenizer.json")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
CACHE_ENV = "RAYBENCH_MODEL_CACHE"


def is_registry_uri(ref: str) -> bool:
    return ref.startswith("models:/")


def parse_models_uri(ref: str) -> tuple[str, str | None, str | None]:
    m = _MODELS_URI.match(ref)
    if not m:
        raise ConfigError(f"model = {ref!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return m.group("name"), m.group("alias"), m.group("version")


def check_model_dir(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"model directory does not exist: {p}")
    p = model_files(p)  # a downloaded MLflow model (raybench.pyfunc) holds it under artifacts/model
    missing = [f for f in REQUIRED_FILES if not (p / f).is_file()]
    if missing:
        raise ConfigError(f"{p} is not a served model directory: missing {', '.join(missing)} "
                          f"(needs {', '.join(REQUIRED_FILES)}; `raybench train` writes them)")
    return p.resolve()


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
                        registry_uri=tracking_uri or os.environ.get("MLFLOW_REGISTRY_URI")
                        or os.environ.get("MLFLOW_TRACKING_URI"))


def _model_version(ref: str, tracking_uri: str | None):
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_models_uri(ref)
    client = _client(tracking_uri)
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except MlflowException as err:
        raise ConfigError(f"model = {ref!r}: not found in the registry at "
                          f"{client._registry_uri}: {err.message}") from None


def check_model_ref(ref: str, tracking_uri: str | None = None) -> str:
    """A validated reference; an alias URI comes back pinned as `models:/NAME/VERSION`."""
    if not is_registry_uri(ref):
        return str(check_model_dir(ref))
    mv = _model_version(ref, tracking_uri)
    return f"models:/{mv.name}/{mv.version}"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "raybench" / "models")


def resolve_model_dir(ref: str, tracking_uri: str | None = None) -> Path:
    """A local directory holding the model files (downloading a registry model once per node)."""
    if not is_registry_uri(ref):
        return check_model_dir(ref)
    import mlflow.artifacts

    mv = _model_version(ref, tracking_uri)
    source = _client(tracking_uri).get_model_version_download_uri(mv.name, mv.version)
    # Keyed by the artifact's URI too: two registries (two sweeps) both have `raybench-vlm/1`.
    key = f"{mv.version}-{hashlib.sha1(source.encode()).hexdigest()[:12]}"
    dest = cache_root() / mv.name / key
    if all((model_files(dest) / f).is_file() for f in REQUIRED_FILES):
        return model_files(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Replicas of three stages start together on a node: one downloads, the others wait.
    with open(dest.parent / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all((model_files(dest) / f).is_file() for f in REQUIRED_FILES):
            return model_files(dest)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{key}-"))
        try:
            # The version's own artifact URI, not `models:/...`: MLflow resolves a models: URI
            # against the process-global registry URI, ignoring `tracking_uri` here.
            got = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(tmp),
                tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")))
            check_model_dir(model_files(got))
            shutil.rmtree(dest, ignore_errors=True)
            got.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return model_files(dest)
