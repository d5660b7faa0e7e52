"""The cluster files parse and carry what KubeRay and the Ray cluster launcher require."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from raybench.config import load_config

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"


def _load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), path
    return doc


def _check_pod(template: dict, where: str) -> None:
    containers = template["spec"]["containers"]
    assert containers, where
    for c in containers:
        assert c["image"], where
        assert c.get("resources", {}).get("limits"), f"{where}: containers need resource limits"


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == "2.60.0"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: keep Ray's token auth on"
    _check_pod(spec["headGroupSpec"]["template"], f"{where} head")
    assert "rayStartParams" in spec["headGroupSpec"]
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        _check_pod(g["template"], f"{where} worker {g['groupName']}")


def test_raycluster():
    doc = _load(KUBERAY / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(doc["spec"], "RayCluster")


def test_rayjob_runs_the_sweep_entrypoint_with_a_valid_config():
    doc = _load(KUBERAY / "rayjob-sweep.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    _check_cluster_spec(spec["rayClusterSpec"], "RayJob")
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/sweep.py"] and (ROOT / argv[1]).is_file()
    config = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    load_config(ROOT / config, overrides)  # the job's config validates as submitted
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayservice_imports_the_real_serve_app():
    doc = _load(KUBERAY / "rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    _check_cluster_spec(doc["spec"]["rayClusterConfig"], "RayService")
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert app["route_prefix"] == "/"
    names = {d["name"] for d in app.get("deployments", [])}
    assert {"VisionStage", "ProjectionStage", "LLMStage"} <= names


def test_cluster_launcher_yaml():
    doc = _load(ROOT / "cluster" / "launcher-aws-gpu.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in doc, key
    assert doc["head_node_type"] in doc["available_node_types"]
    for name, node in doc["available_node_types"].items():
        assert "node_config" in node and "max_workers" in node, name
    assert doc["docker"]["image"]


def test_dockerfile_builds_on_the_official_ray_image():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_TAG=2\.60\.0-\S+-cpu$", text, re.M)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_TAG\}$", text, re.M)
    assert "HF_HUB_OFFLINE=1" in text


@pytest.mark.parametrize("name", ["train", "sweep", "deploy", "pipeline"])
def test_job_entrypoints_exist(name):
    text = (ROOT / "jobs" / f"{name}.py").read_text()
    assert f'main(["{name}", *sys.argv[1:]])' in text


@pytest.mark.parametrize("name", ["smoke", "default", "gpu"])
def test_shipped_configs_validate(name):
    from raybench.tune.sweep import load_sweep

    load_sweep(ROOT / "jobs" / "configs" / f"{name}.yaml", [])
