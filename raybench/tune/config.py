"""The sweep config section (`sweep:` in a run config): the search space over config fields,
the searcher (Optuna TPE or grid), the ASHA scheduler and where the champion is registered.

Light (pydantic only) so a config validates without Ray.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from raybench.schema import Strict


class Dimension(Strict):
    """One search-space dimension over a config field (`sweep.space` maps field path -> this).

    choice: `values`; uniform / loguniform: float `low`..`high`; int / logint: integers.
    """
    type: Literal["choice", "uniform", "loguniform", "int", "logint"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None


class ASHAConfig(Strict):
    grace_period: int = Field(1, ge=1)  # in evaluations (x train.eval_every steps)
    reduction_factor: float = Field(2.0, gt=1)


class TPEConfig(Strict):
    # Optuna's default of 10 random trials first makes any sweep of <= 10 trials random
    # search; None: a quarter of num_samples, 2 to 10 (raybench.tune.searcher).
    n_startup_trials: int | None = Field(None, ge=1)
    multivariate: bool = True  # model the dimensions jointly: vocab size x injections interact


class SweepConfig(Strict):
    # optuna: TPE samples `num_samples` trials; grid: every combination of the (choice / int)
    # dimensions once - the exhaustive baseline a search is measured against.
    search: Literal["optuna", "grid"] = "optuna"
    num_samples: int = Field(8, ge=1)  # optuna only
    max_concurrent_trials: int = Field(1, ge=1)  # 1 on a 2-core machine (ray#54305)
    objective: Literal["accuracy", "pareto"] = "accuracy"
    # pareto: accuracy (max) x inference cost (min): FLOPs or measured prefill latency per sample
    cost_metric: Literal["gflops_per_sample", "prefill_ms_per_sample"] = "gflops_per_sample"
    scheduler: Literal["asha", "fifo"] = "asha"  # ASHA needs a single objective
    asha: ASHAConfig = Field(default_factory=ASHAConfig)
    tpe: TPEConfig = Field(default_factory=TPEConfig)
    seed: int = 0
    # Leading `scene` stages (the tower's pretraining, the LLM side frozen) run once: a trial
    # whose config does not change them starts from the first trial's end state of them
    # (raybench/train/shared_stage.py). Off: every trial trains them itself.
    share_scene_stages: bool = True
    trial_max_failures: int = Field(1, ge=-1)  # Tune-level trial restarts
    driver_cpus: float = Field(0.01, gt=0)  # the per-trial driver function; 0 is refused by Tune
    # A finished trial's driver process runs the next trial (Tune's `reuse_actors`): the next
    # one skips the process start and the torch / Ray Train imports. None: on with the FIFO
    # scheduler only. A trial ASHA stops is still running its TorchTrainer when Tune hands its
    # process to the next trial, and Tune then fails that next trial instead of starting it
    # afresh ("Could not re-use actor"), so ASHA refuses it.
    reuse_trial_drivers: bool | None = None
    storage: str | None = None  # Optuna RDB URL; None: sqlite:///<run_dir>/optuna.db
    registered_model: str = Field("raybench-vlm", min_length=1)
    alias: str = Field("champion", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    space: dict[str, Dimension] = Field(default_factory=dict)
    # Configs Optuna tries first, before TPE proposes (Tune's `points_to_evaluate`): each
    # maps space dimensions to values; a dimension a point leaves out takes this config's
    # own value, so `[{}]` makes trial 1 the config as written - a known-good start that
    # the champion can only improve on. Optuna search only.
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _reuse_needs_fifo(self) -> SweepConfig:
        if self.reuse_trial_drivers and self.scheduler == "asha":
            raise ValueError("sweep.reuse_trial_drivers = true needs sweep.scheduler = fifo: a trial ASHA "
                             "stops is still training when Tune would hand its driver to the next trial")
        return self

    @property
    def reuses_drivers(self) -> bool:
        return self.scheduler == "fifo" if self.reuse_trial_drivers is None else self.reuse_trial_drivers
