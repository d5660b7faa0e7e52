"""The cluster files are checked against the repository and against each other, offline:
what a manifest runs (entrypoint, config, --set, import_path) exists and validates; every
/models or /shared path a job's config names is mounted in every pod of its cluster (the
sweep driver on the head reads the tokenizer, workers read checkpoints); the sweep's trials
fit the cluster that runs them; the launcher YAML validates against the schema Ray ships;
the RayService serves with auth or not at all; the Dockerfile builds what it says."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from raybench.config import flatten
from raybench.serve.config import validate_serve_config
from raybench.tune.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"
LAUNCHER = ROOT / "cluster" / "launcher-aws-gpu.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
MOUNTED_ROOTS = ("/models", "/shared")  # where configs point at storage outside the image
RAY_UID_GID = "1000:100"  # the `ray` user and `users` group of the rayproject/ray images
HEAD_PORTS = {6379, 8265, 10001}  # GCS, dashboard (jobs API), Ray Client


def _load(path: Path) -> dict:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), path
    return doc


def _pods(cluster_spec: dict) -> dict[str, dict]:
    """Pod templates of a KubeRay cluster spec by role: head, worker groups."""
    pods = {"head": cluster_spec["headGroupSpec"]["template"]}
    pods.update({f"worker {g['groupName']}": g["template"] for g in cluster_spec["workerGroupSpecs"]})
    return pods


def _ray_container(pod: dict) -> dict:
    (c,) = [c for c in pod["spec"]["containers"] if c["name"].startswith("ray-")]
    return c


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == "2.60.0"
    assert spec.get("authOptions", {}).get("mode") == "token", f"{where}: keep Ray's token auth on"
    assert "rayStartParams" in spec["headGroupSpec"]
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], where
    for role, pod in _pods(spec).items():
        for c in pod["spec"]["containers"]:
            assert c["image"], f"{where} {role}"
            assert c.get("resources", {}).get("limits"), f"{where} {role}: containers need resource limits"


def _manifests() -> dict[str, tuple[dict, dict]]:
    """name -> (manifest, its KubeRay cluster spec)."""
    cluster = _load(KUBERAY / "raycluster.yaml")
    job = _load(KUBERAY / "rayjob-sweep.yaml")
    service = _load(KUBERAY / "rayservice.yaml")
    return {"raycluster": (cluster, cluster["spec"]), "rayjob": (job, job["spec"]["rayClusterSpec"]),
            "rayservice": (service, service["spec"]["rayClusterConfig"])}


def _job_sweep():
    """The RayJob's entrypoint as the head runs it: script, config and --set, loaded."""
    spec = _load(KUBERAY / "rayjob-sweep.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/sweep.py"] and (ROOT / argv[1]).is_file(), argv
    config = ROOT / argv[argv.index("--config") + 1]
    assert config.is_file(), config
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return spec, load_sweep(config, overrides)  # unknown fields and bad values raise here


def _config_paths(cfg) -> set[str]:
    values = [*flatten(cfg.model_dump(mode="json")).values(), str(cfg.run_path), str(cfg.data_path)]
    return {v for v in values if isinstance(v, str) and v.startswith(MOUNTED_ROOTS)}


def _mounted(path: str, mount_paths: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mount_paths)


# ------------------------------------------------------------------ KubeRay

@pytest.mark.parametrize("name", ["raycluster", "rayjob", "rayservice"])
def test_kuberay_manifest_shape_and_head_ports(name):
    doc, spec = _manifests()[name]
    assert doc["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(spec, name)
    ports = {p["containerPort"] for p in _ray_container(spec["headGroupSpec"]["template"]).get("ports", [])}
    assert HEAD_PORTS <= ports, f"{name} head declares no port {sorted(HEAD_PORTS - ports)}"


def test_rayjob_entrypoint_config_and_overrides_resolve():
    spec, sweep = _job_sweep()
    assert sweep.cfg.model.size == "gpu" and sweep.cfg.run_path == Path("/shared/runs/gpu-sweep")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    # The working_dir is the image's copy of the repository (docker/Dockerfile's WORKDIR).
    workdir = re.search(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    assert runtime_env["working_dir"] == workdir
    assert spec["shutdownAfterJobFinishes"] is True


def test_every_config_path_is_mounted_in_every_pod_of_the_job():
    """The driver (head) loads the tokenizer from model.llm.pretrained_path and writes the
    run dir; workers load both checkpoints and write checkpoints: all of it must be there."""
    spec, sweep = _job_sweep()
    paths = _config_paths(sweep.cfg)
    assert {"/models/Qwen3-0.6B", "/shared/ray"} <= paths  # the check sees what gpu.yaml names
    for role, pod in _pods(spec["rayClusterSpec"]).items():
        volumes = {v["name"] for v in pod["spec"].get("volumes", [])}
        mounts = _ray_container(pod).get("volumeMounts", [])
        assert {m["name"] for m in mounts} <= volumes, f"{role}: a volumeMount names no volume"
        missing = sorted(p for p in paths if not _mounted(p, [m["mountPath"] for m in mounts]))
        assert not missing, f"RayJob {role} pod reads {missing} but mounts no volume there"


def _pack(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> list[dict[str, float]] | None:
    """First-fit of resource bundles onto nodes; the nodes' leftovers, or None if one does not fit."""
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: (-b.get("GPU", 0), -b.get("CPU", 0))):
        node = next((n for n in free if all(n.get(k, 0) >= v - 1e-9 for k, v in b.items())), None)
        if node is None:
            return None
        for k, v in b.items():
            node[k] -= v
    return free


def _fits(sweep, nodes: list[dict[str, float]]) -> str | None:
    """Why the sweep's concurrent trials do not fit `nodes` (None: they fit). A trial is a
    driver function plus num_workers GPU workers (trainer.py: use_gpu when the cluster has
    one GPU per worker) plus Ray Data's one-CPU tasks."""
    from raybench.train.trainer import DATA_TASK_CPUS

    t, s = sweep.cfg.train, sweep.cfg.sweep
    workers = [{"CPU": t.cpus_per_worker, "GPU": 1.0}] * (t.num_workers * s.max_concurrent_trials)
    free = _pack(workers, nodes)
    if free is None:
        gpus = sum(n.get("GPU", 0) for n in nodes)
        return (f"{s.max_concurrent_trials} concurrent trials x {t.num_workers} workers "
                f"(1 GPU, {t.cpus_per_worker} CPU each) do not fit {len(nodes)} nodes with {gpus:g} GPUs")
    extra = [{"CPU": s.driver_cpus}, {"CPU": DATA_TASK_CPUS}] * s.max_concurrent_trials
    if _pack(extra, free) is None:
        return "no CPU left for the trial drivers and Ray Data tasks beside the workers"
    return None


def _pod_resources(group: dict) -> dict[str, float]:
    limits = _ray_container(group["template"])["resources"]["limits"]
    cpus = float(group.get("rayStartParams", {}).get("num-cpus", limits.get("cpu", 0)))
    return {"CPU": cpus, "GPU": float(limits.get("nvidia.com/gpu", 0))}


def test_the_jobs_sweep_fits_its_fixed_cluster():
    spec, sweep = _job_sweep()
    cluster = spec["rayClusterSpec"]
    nodes = [_pod_resources(cluster["headGroupSpec"])]
    for g in cluster["workerGroupSpecs"]:
        nodes += [_pod_resources(g)] * g["maxReplicas"]
    assert _fits(sweep, nodes) is None, _fits(sweep, nodes)


def test_rayservice_imports_the_real_serve_app_with_valid_args():
    doc = _load(KUBERAY / "rayservice.yaml")
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    cfg = validate_serve_config(app["args"])  # what build_app receives: no stale or unknown field
    assert cfg.model == "models:/raybench-vlm@champion" and app["route_prefix"] == "/"
    names = {d["name"] for d in app.get("deployments", [])}
    assert {"ChatIngress", "VisionStage", "ProjectionStage", "LLMStage"} <= names


def test_rayservice_auth_fails_closed():
    """An optional Secret that is missing served with no auth and no warning. The key must
    come from a required Secret in every pod that may run the ingress, and the app must
    refuse to start without it."""
    doc = _load(KUBERAY / "rayservice.yaml")
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    cfg = validate_serve_config(app["args"])
    assert cfg.require_api_key is True
    for role, pod in _pods(doc["spec"]["rayClusterConfig"]).items():
        env = {e["name"]: e for e in _ray_container(pod).get("env", [])}
        ref = env.get(cfg.api_key_env, {}).get("valueFrom", {}).get("secretKeyRef")
        assert ref, f"{role}: {cfg.api_key_env} does not come from a Secret"
        assert ref.get("optional", False) is False, f"{role}: an optional Secret fails open"


# ------------------------------------------------------------------ cluster launcher (AWS)

def test_launcher_validates_against_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    doc = _load(LAUNCHER)
    jsonschema.validate(doc, schema)
    assert doc["head_node_type"] in doc["available_node_types"] and doc["docker"]["image"]


def test_launcher_nodes_boot_an_image_and_mount_writable_shared_storage():
    doc = _load(LAUNCHER)
    for name, node in doc["available_node_types"].items():
        assert node["node_config"].get("ImageId"), f"{name}: no ImageId (Ray's default AMI predates the GPU)"
    init = "\n".join(doc["initialization_commands"])
    # Every host directory the containers see must be on the mounted shared file system.
    mounts = [o.split()[1].split(":") for o in doc["docker"]["run_options"] if o.startswith("-v ")]
    assert {container for _, container, *_ in mounts} >= set(MOUNTED_ROOTS)
    shared = re.search(r"mount -t nfs4?\b.*?(/mnt/\S+)\s*$", init, re.M | re.S)
    assert shared, "nothing mounts EFS/NFS on the hosts"
    for host, container, *_ in mounts:
        assert _mounted(host, [shared.group(1)]), f"{host} (-> {container}) is not on the shared mount"
    # The container runs as `ray`: root-owned directories keep MLflow and the runs from writing.
    assert re.search(rf"chown {RAY_UID_GID} {re.escape(shared.group(1))}\b", init), init


def test_launcher_pipeline_fits_the_largest_cluster():
    doc = _load(LAUNCHER)
    nodes = []
    for node in doc["available_node_types"].values():
        assert node["resources"] or node["max_workers"] == 0, "declare what a worker node offers"
        nodes += [{k: float(v) for k, v in node["resources"].items()}] * node["max_workers"]
    sweep = load_sweep(ROOT / "jobs" / "configs" / "gpu.yaml", [])
    assert _fits(sweep, nodes) is None, _fits(sweep, nodes)


# ------------------------------------------------------------------ image and job scripts

def test_dockerfile_cpu_variant_takes_the_cpu_wheel_and_gpu_the_cuda_build():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert re.search(r"^FROM rayproject/ray:2\.60\.0-py311-\$\{VARIANT\}$", text, re.M)
    assert "--index-url https://download.pytorch.org/whl/cpu" in text and '"torch==2.13.0+cpu"' in text
    assert "endswith('+cpu')" in text  # the build itself checks which torch it got
    # The WORKDIR exists (made by the image's user) before WORKDIR would create it as root.
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M)
    assert text.index(f"RUN mkdir -p {workdir.group(1)}") < workdir.start()
    assert "HF_HUB_OFFLINE=1" in text
    # Both variants' build commands are in the header, and the cluster files use the GPU tag.
    assert "--build-arg VARIANT=gpu -t ghcr.io/raybench/raybench:2.60.0-gpu" in text
    for path in [*KUBERAY.glob("*.yaml"), LAUNCHER]:
        for image in re.findall(r"image: (\S+)", path.read_text()):
            assert image == "ghcr.io/raybench/raybench:2.60.0-gpu", (path.name, image)


@pytest.mark.parametrize("name", ["train", "sweep", "deploy", "pipeline"])
def test_job_entrypoints_exist(name):
    text = (ROOT / "jobs" / f"{name}.py").read_text()
    assert f'main(["{name}", *sys.argv[1:]])' in text


@pytest.mark.parametrize("name", ["smoke", "default", "gpu"])
def test_shipped_configs_load_as_sweeps(name):
    sweep = load_sweep(ROOT / "jobs" / "configs" / f"{name}.yaml", [])
    assert sweep.cfg.name == name and sweep.cfg.sweep.space and sweep.num_trials >= 1
