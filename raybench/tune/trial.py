"""One sweep trial: a Tune driver function that builds and fits a `TorchTrainer`.

This is Ray Train V2's Tune pattern: Tune schedules the (tiny-CPU) driver, the driver
launches a Train controller + FSDP2 workers, and `TuneReportCallback` forwards each eval
report to Tune (so ASHA sees intermediate accuracy). The Train run is named after the
trial (`<sweep>-<trial_id>`), with storage in the trial's own directory, so a restarted
trial (Tune `FailureConfig`, or `raybench sweep --resume`) resumes from its checkpoints.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from raybench.config import set_path, validate_config
from raybench.tune.space import trial_raw


def trial_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


def trial_config(ctx: dict[str, Any], params: dict[str, Any], trial_id: str):
    raw = dict(trial_raw(ctx["raw"], params))  # a copy: the pops below must not touch ctx
    raw.pop("sweep", None)  # a trial is a plain training run
    raw["name"] = trial_name(ctx["name"], trial_id)
    raw["run_dir"] = str(Path(ctx["run_dir"]) / "trials" / trial_id)
    raw = set_path(raw, ["data", "path"], ctx["data_path"])  # one data set for every trial
    cfg = validate_config(raw)
    # The sweep's stage scenes too, unless this trial's stage asks for other ones (a space
    # over train.stages.0.data.max_objects): those it renders in its own run_dir.
    shared = ctx.get("stage_scenes") or {}
    for i, st in enumerate(cfg.train.stages or []):
        same = shared.get(st.name)
        if st.data is not None and st.data.path is None and same \
                and st.data.model_dump(exclude={"path"}) == same["key"]:
            raw = set_path(raw, ["train", "stages", str(i), "data", "path"], same["path"])
    return validate_config(raw)


_TRIALS_RUN_HERE = 0  # trials this driver process has run (Tune reuses finished drivers)


def process_started_at() -> float:
    """Wall-clock time this process started. A trial that gets a fresh driver process is
    launched then: start-up counts the process, its imports and Tune's set-up too. From
    /proc's uptime-relative start (10 ms ticks); elsewhere, now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def run_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    entered_at = time.time()  # before the imports below (torch, Ray Train): they are start-up too
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raybench.train.trainer import fit
    from raybench.train.shared_stage import shared_stage

    global _TRIALS_RUN_HERE
    # A reused driver (`sweep.reuse_trial_drivers`) was launched for an earlier trial: this
    # one starts when Tune hands it the new config, i.e. here.
    launched_at = min(process_started_at(), entered_at) if _TRIALS_RUN_HERE == 0 else entered_at
    _TRIALS_RUN_HERE += 1
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(ctx, config, trial_id)
    # The inference cost (Pareto objective, MLflow compare view) is measured by rank 0 and
    # reported with every eval: the model code is loaded there anyway, not here.
    result = fit(cfg, callbacks=[TuneReportCallback()], tracking_uri=ctx["tracking_uri"],
                 parent_run_id=ctx["parent_run_id"], tokenizer=Path(ctx["tokenizer"]),
                 tags={"raybench.sweep": ctx["name"], "raybench.trial_id": trial_id},
                 cost_metric=ctx["cost_metric"], reserved_cpus=ctx["driver_cpus"], launched_at=launched_at,
                 driver_entered_at=entered_at,
                 datasets=ctx.get("datasets"),
                 shared_stage=shared_stage(cfg, Path(ctx["run_dir"])) if ctx.get("share_scene_stages") else None)
    if result.error:
        raise result.error
