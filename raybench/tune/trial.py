"""One sweep trial: a Tune driver function that builds and fits a `TorchTrainer`.

This is Ray Train V2's Tune pattern: Tune schedules the (tiny-CPU) driver, the driver
launches a Train controller + FSDP2 workers, and `TuneReportCallback` forwards each eval
report to Tune (so ASHA sees intermediate accuracy). The Train run is named after the
trial (`<sweep>-<trial_id>`), with storage in the trial's own directory, so a restarted
trial (Tune `FailureConfig`, or `raybench sweep --resume`) resumes from its checkpoints.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from raybench.config import validate_config
from raybench.tune.space import set_path, trial_raw


def trial_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


def trial_config(ctx: dict[str, Any], params: dict[str, Any], trial_id: str):
    raw = dict(trial_raw(ctx["raw"], params))  # a copy: the pops below must not touch ctx
    raw.pop("sweep", None)  # a trial is a plain training run
    raw["name"] = trial_name(ctx["name"], trial_id)
    raw["run_dir"] = str(Path(ctx["run_dir"]) / "trials" / trial_id)
    raw = set_path(raw, "data.path", ctx["data_path"])  # one data set for every trial
    return validate_config(raw)


def run_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raybench.bench.fusion import inference_cost
    from raybench.train.trainer import fit

    launched_at = time.time()
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(ctx, config, trial_id)
    # Reported with every eval so the Pareto objective and the MLflow compare view have it.
    cost = {ctx["cost_metric"]: inference_cost(cfg.model, ctx["cost_metric"])}
    result = fit(cfg, callbacks=[TuneReportCallback()], tracking_uri=ctx["tracking_uri"],
                 parent_run_id=ctx["parent_run_id"], tokenizer=Path(ctx["tokenizer"]),
                 tags={"raybench.sweep": ctx["name"], "raybench.trial_id": trial_id},
                 extra_metrics=cost, reserved_cpus=ctx["driver_cpus"], launched_at=launched_at,
                 datasets=ctx.get("datasets"))
    if result.error:
        raise result.error
