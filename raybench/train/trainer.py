"""`raybench train`: the driver that launches a Ray Train `TorchTrainer` (Train V2).

Everything that can be wrong with the input is checked here, before Ray starts a worker:
the config, the data path and its columns, empty splits, a batch that can't be split
across the workers. A run is resumable by name: starting it again with the same
`name` and storage continues from the latest checkpoint (and the same MLflow run).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from raybench.config import ConfigError, RunConfig, dump_config
from raybench.data.prepare import ensure_data, ensure_tokenizer, tokenizer_dir
from raybench.runtime import init_ray


def check_distributed(cfg: RunConfig) -> None:
    t = cfg.train
    if t.batch_size < t.num_workers:
        raise ConfigError(f"train.batch_size = {t.batch_size}: smaller than train.num_workers = "
                          f"{t.num_workers}; every worker needs at least one sample per step")
    if t.batch_size % t.num_workers:
        raise ConfigError(f"train.batch_size = {t.batch_size}: must be a multiple of train.num_workers = "
                          f"{t.num_workers} (each worker takes batch_size / num_workers)")


DATA_TASK_CPUS = 1.0  # Ray Data's read/split tasks ask for a whole CPU each


def check_cluster_fits(cfg: RunConfig, reserved: float = 0.0) -> None:
    """Workers + one CPU for Ray Data must fit the cluster, or training waits forever on a
    `_split_single_block` task no node can schedule. Checked after Ray starts, before any
    worker does. `reserved`: CPUs already held by the caller (a Tune trial's driver)."""
    import ray

    t = cfg.train
    total = ray.cluster_resources().get("CPU", 0.0)
    need = t.num_workers * t.cpus_per_worker + DATA_TASK_CPUS + reserved
    if need <= total + 1e-9:
        return
    fit_cpw = max((total - DATA_TASK_CPUS - reserved) / t.num_workers, 0.0)
    msg = (f"train.cpus_per_worker = {t.cpus_per_worker}: {t.num_workers} workers x {t.cpus_per_worker} CPU "
           f"+ {DATA_TASK_CPUS:g} CPU for Ray Data{f' + {reserved:g} reserved' if reserved else ''} = {need:g} "
           f"> the cluster's {total:g} CPUs; use train.cpus_per_worker <= {int(fit_cpw * 100) / 100:g} "
           f"or fewer train.num_workers")
    if os.environ.get("RAY_ADDRESS"):  # a cluster may still scale up: say so, don't refuse
        print(f"[raybench] warning: {msg}", flush=True)
        return
    raise ConfigError(msg)


def storage_path(cfg: RunConfig) -> str:
    """Where Ray Train keeps checkpoints: `train.storage_path` exactly as written (a URI such
    as s3://bucket/x or file:///abs reaches Ray unchanged), else `<run_dir>/ray`."""
    return cfg.train.storage_path or str((cfg.run_path / "ray").resolve())


def stage_data(cfg: RunConfig) -> tuple[tuple[str, str], ...]:
    """(dataset name, path) of every stage that trains on its own scenes (a local path made
    absolute; a URI as it is)."""
    return tuple((f"stage-{st.name}", str(cfg.stage_path(st).resolve()))
                 for st in cfg.train.stages or [] if st.data is not None)


def dataset_key(cfg: RunConfig, tokenizer: Path | None = None) -> tuple:
    """What the materialised train/val data depend on (not the model: see train/data.py).
    The data path: a local one absolute, a URI as it is (`URI.resolve` is itself)."""
    tok_dir = Path(tokenizer or tokenizer_dir(cfg)).resolve()
    return (str(cfg.data_path.resolve()), str(tok_dir), cfg.model.vision.image_size, cfg.data.max_length,
            cfg.train.eval_samples, stage_data(cfg))


def build_datasets(cfg: RunConfig, tokenizer: Path | None = None) -> dict:
    """Materialised train/val (and each stage's own scenes) Ray Datasets, keyed by
    `dataset_key` (a sweep shares them)."""
    import ray.data

    from raybench.train.data import build_dataset

    # Ray Data's per-dataset progress bars drown Tune's table and the per-eval lines.
    ray.data.DataContext.get_current().enable_progress_bars = False
    key = dataset_key(cfg, tokenizer)
    path, tok_dir, image_size, max_length, eval_samples, stages = key
    common = dict(tokenizer_dir=Path(tok_dir), image_size=image_size, max_length=max_length)
    # The paths stay strings: a URI (s3://bucket/x) through Path would be s3:/bucket/x.
    out = {"key": key,
           "train": build_dataset(path, "train", **common),
           "val": build_dataset(path, "val", limit=eval_samples, **common)}
    for name, stage_path in stages:
        out[name] = build_dataset(stage_path, "curriculum", **common)
    return out


def build_trainer(cfg: RunConfig, callbacks: list | None = None, *, tracking_uri: str | None = None,
                  parent_run_id: str | None = None, tags: dict | None = None,
                  tokenizer: Path | None = None,
                  launched_at: float | None = None, driver_entered_at: float | None = None,
                  cost_metric: str | None = None, datasets: dict | None = None,
                  shared_stage: dict | None = None):
    """A `TorchTrainer` for `cfg`. A sweep trial passes its Tune callback, the sweep's MLflow
    store and parent run, the inference-cost metric its workers measure and report with every
    eval (a Pareto sweep's second objective), the sweep's already materialised `datasets`
    (used when their `key` matches this config) and where its shared scene stages' end state
    is or goes (raybench/train/shared_stage.py)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raybench.train.data import DeterministicSplit

    t = cfg.train
    launched_at = launched_at or time.time()
    use_gpu = ray.cluster_resources().get("GPU", 0) >= t.num_workers
    tok_dir = Path(tokenizer or tokenizer_dir(cfg)).resolve()
    if datasets is None or datasets["key"] != dataset_key(cfg, tok_dir):
        datasets = build_datasets(cfg, tok_dir)
    return TorchTrainer(
        train_loop_per_worker,
        # run_dir made absolute: Train workers run in Ray's session directory, so a relative
        # one (the default `runs/<name>`) would put the MLflow run-id file there.
        train_loop_config={"cfg": dump_config(cfg.model_copy(update={"run_dir": str(cfg.run_path.resolve())})),
                           "tokenizer_dir": str(tok_dir), "use_gpu": use_gpu,
                           "model_dir": str((cfg.run_path / "model").resolve()),
                           "tracking_uri": tracking_uri or _default_tracking_uri(cfg),
                           "parent_run_id": parent_run_id, "tags": tags or {},
                           "cost_metric": cost_metric, "shared_stage": shared_stage,
                           # wall clock when this run (or sweep trial) was launched: the worker
                           # reports `startup_s`, the fixed cost before the first step
                           "launched_at": launched_at, "driver_entered_at": driver_entered_at,
                           "driver_ready_at": time.time()},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker},
                                     placement_strategy=t.placement_strategy),
        run_config=RayRunConfig(
            name=cfg.name, storage_path=storage_path(cfg), callbacks=callbacks or [],
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints,
                                               checkpoint_score_attribute="accuracy",
                                               checkpoint_score_order="max"),
        ),
        datasets={k: v for k, v in datasets.items() if k != "key"},
        dataset_config=DeterministicSplit(),
    )


def train_loop_per_worker(config: dict) -> None:
    """The workers' entry point. The import happens on the workers: the driver (a sweep
    trial's, every trial) need not load the model code, transformers and MLflow just to name
    the function (what the import costs: `startup_train_fn_s` in BENCHMARKS.md's sweep section)."""
    entered_at = time.time()  # Train V2's part of the start-up ends here, the import is ours
    from raybench.train.worker import train_loop_per_worker as run

    run({**config, "train_fn_entered_at": entered_at})


def _default_tracking_uri(cfg: RunConfig) -> str:
    from raybench.track import tracking_uri

    return tracking_uri(cfg.run_path.resolve())


def fit(cfg: RunConfig, **trainer_kwargs):
    """Validate, prepare data and tokenizer on the driver, then run the TorchTrainer."""
    check_distributed(cfg)
    ensure_data(cfg)
    if trainer_kwargs.get("tokenizer") is None:
        ensure_tokenizer(cfg)
    init_ray()
    check_cluster_fits(cfg, reserved=trainer_kwargs.pop("reserved_cpus", 0.0))
    return build_trainer(cfg, **trainer_kwargs).fit()


def model_dir(cfg: RunConfig) -> Path:
    return cfg.run_path / "model"
