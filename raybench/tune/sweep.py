"""`raybench sweep`: Ray Tune + Optuna (TPE) over the config's `sweep.space`.

Layout of a sweep's run directory (`runs/<name>`, one folder to inspect or delete):

    sweep.yaml      the raw config it started from (what `--resume` rebuilds trials from)
    data/ tokenizer/    shared by every trial
    optuna.db       the Optuna study (`optuna-dashboard sqlite:///.../optuna.db`)
    mlflow.db mlartifacts/  MLflow: one parent run, one child run per trial
    tune/<name>/    Tune's experiment state (`Tuner.restore`)
    trials/<id>/    each trial's Train checkpoints and final model
    shared-stages/  the leading scene stages' end state, run once for all trials (shared_stage.py)
    summary/        trials table, best config, plots (also on the parent MLflow run)

Single objective (`accuracy`): OptunaSearch + ASHA on the per-eval validation accuracy.
`objective: pareto`: accuracy (max) x inference cost (min) - Optuna's multi-objective TPE,
no early stopping (Optuna ignores intermediate results there), and the Pareto front is
reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from raybench.config import ConfigError, RunConfig, dump_config, flatten, load_raw, validate_config
from raybench.tune.space import grid_space, grid_values, optuna_space, resolve_points, validate_space

SWEEP_FILE = "sweep.yaml"


@dataclass
class Sweep:
    raw: dict[str, Any]
    cfg: RunConfig

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_path.resolve()

    @property
    def experiment_dir(self) -> Path:
        return self.run_dir / "tune" / self.cfg.name

    @property
    def study_storage(self) -> str:
        return self.cfg.sweep.storage or f"sqlite:///{self.run_dir / 'optuna.db'}"

    @property
    def num_trials(self) -> int:
        s = self.cfg.sweep
        if s.search == "optuna":
            return s.num_samples
        return math.prod(len(grid_values(d)) for d in s.space.values())

    @property
    def metrics(self) -> tuple[list[str], list[str]]:
        if self.cfg.sweep.objective == "pareto":
            return ["accuracy", self.cfg.sweep.cost_metric], ["max", "min"]
        return ["accuracy"], ["max"]


def load_sweep(config: str | Path | None, overrides: list[str]) -> Sweep:
    """Load and check everything a sweep needs, before Ray starts."""
    from raybench.train.trainer import check_distributed

    raw = load_raw(config, overrides)
    cfg = validate_config(raw)
    if not cfg.sweep.space:
        raise ConfigError("sweep.space = {}: a sweep needs at least one dimension, e.g.\n"
                          "  sweep:\n    space:\n      model.fusion.vet.vocab_size: "
                          "{type: logint, low: 1024, high: 32768}")
    if cfg.sweep.objective == "pareto" and cfg.sweep.scheduler == "asha":
        cfg.sweep.scheduler = "fifo"  # ASHA ranks one metric; Optuna ignores intermediates here
    validate_space(raw, cfg)
    check_distributed(cfg)
    return Sweep(raw, cfg)


def load_resume(directory: str | Path) -> Sweep:
    run_dir = Path(directory)
    if (run_dir / SWEEP_FILE).is_file() is False and (run_dir.parent.parent / SWEEP_FILE).is_file():
        run_dir = run_dir.parent.parent  # given tune/<name> itself
    path = run_dir / SWEEP_FILE
    if not path.is_file():
        raise ConfigError(f"--resume {directory}: no {SWEEP_FILE} there; pass the sweep's run "
                          "directory (runs/<name>)")
    raw = yaml.safe_load(path.read_text())
    raw["run_dir"] = str(run_dir.resolve())  # the folder may have been moved or copied
    sweep = Sweep(raw, validate_config(raw))
    if sweep.cfg.sweep.objective == "pareto":
        sweep.cfg.sweep.scheduler = "fifo"
    return sweep


def _tuner(sweep: Sweep, trainable, resume: bool):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from raybench.tune.distinct_search import DistinctOptunaSearch

    s = sweep.cfg.sweep
    if resume:
        if not tune.Tuner.can_restore(str(sweep.experiment_dir)):
            raise ConfigError(f"--resume: no Tune experiment to restore in {sweep.experiment_dir}")
        # Finished trials stay finished; unfinished and errored ones continue from their checkpoints.
        return tune.Tuner.restore(str(sweep.experiment_dir), trainable=trainable,
                                  resume_unfinished=True, resume_errored=True)
    metrics, modes = sweep.metrics
    single = len(metrics) == 1
    # Rungs in training steps, not reports: a trial that starts after shared scene stages
    # skips their evals, and must still be compared with the others at the same step.
    every = sweep.cfg.train.checkpoint_every or sweep.cfg.train.eval_every
    scheduler = (ASHAScheduler(time_attr="step", metric="accuracy", mode="max",
                               max_t=sweep.cfg.train.steps, grace_period=s.asha.grace_period * every,
                               reduction_factor=s.asha.reduction_factor)
                 if s.scheduler == "asha" else FIFOScheduler())
    run_config = tune.RunConfig(name=sweep.cfg.name, storage_path=str(sweep.experiment_dir.parent),
                                failure_config=tune.FailureConfig(max_failures=s.trial_max_failures))
    if s.search == "grid":  # every combination once; the summary writes them into the study
        return tune.Tuner(trainable, param_space=grid_space(s.space), run_config=run_config,
                          tune_config=tune.TuneConfig(scheduler=scheduler, num_samples=1,
                                                      max_concurrent_trials=s.max_concurrent_trials,
                                                      reuse_actors=s.reuses_drivers))
    searcher = DistinctOptunaSearch(
        s, space=optuna_space(s.space), metric=metrics[0] if single else metrics,
        mode=modes[0] if single else modes, study_name=sweep.cfg.name,
        storage=optuna.storages.RDBStorage(sweep.study_storage),
        points_to_evaluate=resolve_points(sweep.cfg) or None,  # enqueued: Optuna's first trials
    )
    return tune.Tuner(
        trainable, run_config=run_config,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=s.num_samples,
                                    max_concurrent_trials=s.max_concurrent_trials,
                                    reuse_actors=s.reuses_drivers),
    )


def run_sweep(sweep: Sweep, resume: bool = False):
    """Prepare shared inputs, open the parent MLflow run, fit the Tuner, then summarise."""
    from ray import tune

    from raybench.data.prepare import ensure_data, ensure_tokenizer, tokenizer_dir
    from raybench.track import Tracker, tracking_uri
    from raybench.runtime import init_ray
    from raybench.train.trainer import build_datasets, check_cluster_fits
    from raybench.tune.report import summarize
    from raybench.tune.trial import run_trial

    cfg, run_dir = sweep.cfg, sweep.run_dir
    if not resume:
        if tune.Tuner.can_restore(str(sweep.experiment_dir)):
            raise ConfigError(f"sweep {cfg.name!r} already ran in {run_dir}: continue it with "
                              f"`raybench sweep --resume {run_dir}`, or pick a new name/run_dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / SWEEP_FILE).write_text(yaml.safe_dump(sweep.raw, sort_keys=False))
    ensure_data(cfg)
    ensure_tokenizer(cfg)
    uri = tracking_uri(run_dir)
    parent = Tracker.open(run_dir, cfg.name, params=flatten(dump_config(cfg)), uri=uri,
                          tags={"raybench.kind": "sweep", "raybench.objective": cfg.sweep.objective})
    init_ray()
    check_cluster_fits(cfg, reserved=cfg.sweep.driver_cpus)  # per trial (max_concurrent_trials: 1 here)
    ctx = {"raw": sweep.raw, "name": cfg.name, "run_dir": str(run_dir),
           "data_path": str(cfg.data_path.resolve()), "tokenizer": str(tokenizer_dir(cfg).resolve()),
           "tracking_uri": uri, "parent_run_id": parent.run_id, "cost_metric": cfg.sweep.cost_metric,
           "driver_cpus": cfg.sweep.driver_cpus,
           # The tower's pretraining (leading scene stages) once: later trials start after it.
           "share_scene_stages": cfg.sweep.share_scene_stages,
           # Each stage's own scenes, made once: a trial whose stage asks for the same scenes
           # reads these instead of rendering its own.
           "stage_scenes": {st.name: {"path": str(cfg.stage_path(st).resolve()),
                                      "key": st.data.model_dump(exclude={"path"})}
                            for st in cfg.train.stages or [] if st.data is not None and st.data.path is None},
           # Read, decode and tokenise once for every trial (the data don't depend on the
           # model); a trial whose data settings differ builds its own.
           "datasets": build_datasets(cfg, tokenizer_dir(cfg).resolve())}
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"CPU": cfg.sweep.driver_cpus})
    print(f"[raybench] sweep {cfg.name}: {sweep.num_trials} trials ({cfg.sweep.search}), objective {cfg.sweep.objective}, "
          f"scheduler {cfg.sweep.scheduler}; MLflow run {parent.run_id} at {uri}", flush=True)
    try:
        grid = _tuner(sweep, trainable, resume).fit()
    except BaseException:
        parent.finish("KILLED")
        raise
    return summarize(sweep, grid, parent)
