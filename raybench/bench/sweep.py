"""`raybench bench sweep`: what a sweep pays besides training.

Runs a real sweep (tiny preset, FIFO so every trial runs to the end) and reports, per trial,
the fixed start-up cost (trial launch -> first training step: Train controller, worker
group, process group, Ray Data materialise and split, model build/shard) against its
training time, and the sweep's wall time against the sum of its trials' training time.
All figures come from the same run.

The baseline for start-up is Ray Train V2 itself: an empty 2-worker `TorchTrainer.fit()`
(no data, no model, a train function that only notes the time), launched the same way,
in the same run. No trial can start faster than that while it fits a `TorchTrainer` of
its own, so it tells what part of a trial's start-up raybench can still remove.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import yaml


def _config(out: Path, quick: bool) -> dict:
    return {
        "name": "bench-sweep", "run_dir": str(out / "bench-sweep-run"),
        "model": {"preset": "hybrid", "size": "tiny"},
        "data": {"num_train": 512, "num_val": 64},
        "train": {"steps": 20 if quick else 60, "batch_size": 16, "eval_every": 10 if quick else 20,
                  "eval_samples": 64, "log_every": 5},
        "sweep": {"num_samples": 2 if quick else 4, "scheduler": "fifo", "seed": 0, "space": {
            "model.fusion.vet.vocab_size": {"type": "logint", "low": 32, "high": 256},
            "train.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}}},
    }


def _note_entry(config: dict) -> None:
    """The empty trainer's train function: tells the driver when rank 0 got here, and, with
    `tracking_uri`, when it had also imported what a trial's workers import (the model code;
    on rank 0 MLflow's client and its store, as a trial's tracker opens them)."""
    entered = time.time()
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    if config.get("tracking_uri"):
        import raybench.train.worker  # noqa: F401 (the import is what is timed)

        if rank == 0:
            from mlflow.tracking import MlflowClient

            MlflowClient(config["tracking_uri"]).search_experiments(max_results=1)
    if rank == 0:
        config["queue"].put((entered, time.time()))


def empty_trainer_floor(out: Path, repeats: int, num_workers: int, cpus_per_worker: float,
                        tracking_uri: str | None = None) -> dict:
    """Seconds from `TorchTrainer(...).fit()` to rank 0 entering its train function, and to
    `fit()` returning, for an empty trainer: Train V2's own per-fit cost (controller, worker
    group, gloo process group), the floor under every sweep trial's start-up. With
    `tracking_uri`, the train function also imports what a trial's workers import
    (`imported_s`: when rank 0 was done): the floor for a trial that needs that code."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from raybench.runtime import init_ray

    init_ray(include_dashboard=False)
    queue = Queue()
    entry, imported, fit_s = [], [], []
    tag = "imports" if tracking_uri else "empty"
    for i in range(repeats):
        trainer = TorchTrainer(_note_entry, train_loop_config={"queue": queue, "tracking_uri": tracking_uri},
                               scaling_config=ScalingConfig(num_workers=num_workers,
                                                            resources_per_worker={"CPU": cpus_per_worker}),
                               run_config=RunConfig(name=f"{tag}-{i}",
                                                    storage_path=str((out / "empty-trainer").resolve())))
        t0 = time.time()
        trainer.fit()
        fit_s.append(time.time() - t0)
        entered, done = queue.get(timeout=60)
        entry.append(entered - t0)
        imported.append(done - t0)
    floor = {"repeats": repeats, "num_workers": num_workers, "train_fn_entry_s": statistics.median(entry),
             "fit_s": statistics.median(fit_s), "samples": {"train_fn_entry_s": entry, "fit_s": fit_s}}
    if tracking_uri:
        floor["imported_s"] = statistics.median(imported)
        floor["samples"]["imported_s"] = imported
    return floor


def run_sweep_bench(out: Path, quick: bool) -> dict:
    import shutil

    import ray

    from raybench.track import tracking_uri
    from raybench.tune.sweep import load_sweep, run_sweep

    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "bench-sweep.yaml"
    cfg = _config(out, quick)
    shutil.rmtree(cfg["run_dir"], ignore_errors=True)
    cfg_path.write_text(yaml.safe_dump(cfg))
    sweep = load_sweep(cfg_path, [])
    owned = not ray.is_initialized()  # else: a Ray this process runs in (a test session) stays up
    t0 = time.perf_counter()
    try:
        run_sweep(sweep)
        wall = time.perf_counter() - t0
        # The same Ray instance, after the sweep: nothing else is running.
        repeats, workers, cpw = 1 if quick else 3, sweep.cfg.train.num_workers, sweep.cfg.train.cpus_per_worker
        floor = empty_trainer_floor(out, repeats, workers, cpw)
        floor_imports = empty_trainer_floor(out, repeats, workers, cpw, tracking_uri=tracking_uri(sweep.run_dir))
    finally:
        if owned:
            ray.shutdown()
    trials = []
    for tdir in sorted((sweep.experiment_dir).glob("run_trial_*")):
        lines = [json.loads(x) for x in (tdir / "result.json").read_text().splitlines() if x.strip()]
        last = lines[-1]
        startup = lines[0].get("startup_s", float("nan"))
        # Tune's clock starts when the trial's function does (the driver's own process start
        # and Tune set-up, `startup_trial_s`, come before it): training = first step -> end.
        training = last["time_total_s"] - (startup - lines[0].get("startup_trial_s", 0.0))
        trials.append({"trial_id": last["trial_id"], "startup_s": startup, "total_s": startup + training,
                       "training_s": training, "accuracy": last.get("accuracy"),
                       # seconds from launch at which each start-up phase was done
                       "phases": {k: lines[0][k] for k in PHASES if k in lines[0]}})
    training = sum(t["training_s"] for t in trials)
    startup = [t["startup_s"] for t in trials]
    result = {
        "bench": "sweep", "quick": quick, "config": cfg, "trials": trials,
        "phases_median_s": {k: statistics.median(t["phases"].get(k, float("nan")) for t in trials)
                            for k in PHASES},
        "command": "raybench bench sweep" + (" --quick" if quick else ""),
        "startup_s": {"median": statistics.median(startup), "min": min(startup), "max": max(startup),
                      "samples": startup},
        "sweep_wall_s": wall, "sum_training_s": training, "empty_trainer": floor,
        "empty_trainer_imports": floor_imports,
        "over_floor_s": statistics.median(startup) - floor["train_fn_entry_s"],
        "wall_over_training": wall / training if training else float("nan"),
    }
    return result


PHASES = ("startup_trial_s", "startup_driver_s", "startup_train_fn_s", "startup_workers_s", "startup_model_s",
          "startup_s")
PHASE_NAMES = {"startup_trial_s": "trial driver process started, Ray imported, Tune set up",
               "startup_driver_s": "trial driver ready (torch + Ray Train imported; data come from the sweep)",
               "startup_train_fn_s": "Train controller + worker group + gloo group up, train function entered",
               "startup_workers_s": "workers imported the model code (transformers, tokenizers)",
               "startup_model_s": "model built, FSDP-sharded, MLflow run open",
               "startup_s": "first batch through (Ray Data split + iterator) = first step"}


def markdown_row(r: dict) -> str:
    s = r["startup_s"]
    return (f"| sweep ({len(r['trials'])} trials, tiny) | per-trial start-up {s['median']:.1f} s "
            f"(min {s['min']:.1f}, max {s['max']:.1f}) | wall {r['sweep_wall_s']:.0f} s vs "
            f"{r['sum_training_s']:.0f} s of training = {r['wall_over_training']:.2f}x |")


OVER_FLOOR_GOAL_S = 2.0  # median start-up minus the empty trainer's floor (issue 20)


def markdown_section(r: dict) -> str:
    from raybench.bench.common import markdown_table as table
    from raybench.bench.report import claim, finite, heading

    c, s = r["config"], r["startup_s"]
    t = c["train"]
    lines = [heading(r, f"{len(r['trials'])} trials, {c['model']['preset']} `{c['model']['size']}`, "
                     f"{t['steps']} steps, {c['sweep']['scheduler'].upper()}"), "",
             table([{"trial": tr["trial_id"], "startup": f"{tr['startup_s']:.1f} s",
                     "training": f"{tr['training_s']:.1f} s",
                     "accuracy": f"{tr['accuracy']:.3f}" if tr.get("accuracy") is not None else ""}
                    for tr in r["trials"]],
                   {"trial": "trial", "startup": "start-up (launch → first step)",
                    "training": "training + evals + checkpoints", "accuracy": "accuracy"})]
    floor = r.get("empty_trainer")
    over = f" (**{r['over_floor_s']:.1f} s** over the empty trainer's floor below, against the goal of <= " \
        f"{OVER_FLOOR_GOAL_S:.0f} s: {claim(r['over_floor_s'] <= OVER_FLOOR_GOAL_S)})" if "over_floor_s" in r else ""
    reused = sum(1 for tr in r["trials"] if tr["phases"].get("startup_trial_s", 1.0) == 0.0)
    lines += ["",
              f"Sweep wall time {r['sweep_wall_s']:.0f} s vs {r['sum_training_s']:.0f} s of training in its "
              f"trials: **{r['wall_over_training']:.1f}x**. Per-trial start-up median {s['median']:.1f} s "
              f"(min {s['min']:.1f}, max {s['max']:.1f}){over}. {reused} of {len(r['trials'])} trials ran in "
              "a driver process that Tune reused from a finished trial (`sweep.reuse_trial_drivers`): their "
              "driver phase is the config and the trainer's set-up only.", ""]
    phases = r.get("phases_median_s") or {}
    if phases:
        lines += ["Where start-up goes (median over trials, seconds since the trial's launch; each phase "
                  "ends when the named step is done):", "",
                  table([{"phase": PHASE_NAMES[k], "at": f"{phases[k]:.1f} s"} for k in PHASES
                         if finite(phases.get(k))], {"phase": "phase", "at": "done at"}), ""]
    lines += ["The sweep driver reads, decodes and tokenises the data once and hands the materialised "
              "blocks to every trial (rows carry one `<image>` placeholder, expanded on the workers, so "
              "the data don't depend on the model). What is left: Ray Train's own per-trial cost (a "
              "controller, a worker group and a gloo process group per `TorchTrainer.fit()`, which Train "
              "V2 does not reuse across fits), the workers' import of the model code, and the model build."]
    if floor:
        train_v2 = phases.get("startup_train_fn_s", float("nan")) - phases.get("startup_driver_s", float("nan"))
        lines += ["", f"Baseline, same run: an **empty** {floor['num_workers']}-worker `TorchTrainer` (no data, no "
                  f"model; its train function only notes the time) reaches its train function "
                  f"**{floor['train_fn_entry_s']:.1f} s** after `fit()` is called, and `fit()` returns after "
                  f"{floor['fit_s']:.1f} s (median of {floor['repeats']}); in the trials, the same stretch "
                  f"(driver ready → train function entered) took {train_v2:.1f} s. A trial that fits a "
                  "`TorchTrainer` of its own (Train V2's Tune pattern, which `raybench sweep` uses) cannot "
                  "start faster than the empty one."]
    imports = r.get("empty_trainer_imports")
    if imports and floor:
        rest = s["median"] - imports["imported_s"]
        lines += ["", f"The same empty trainer, its workers also importing what a trial's workers import (the "
                  "model code: transformers, FSDP2, Ray Data; on rank 0 MLflow's client and its sqlite store), "
                  f"is done at **{imports['imported_s']:.1f} s** (median of {imports['repeats']}; it entered its "
                  f"train function at {imports['train_fn_entry_s']:.1f} s): "
                  f"{imports['imported_s'] - imports['train_fn_entry_s']:.1f} s of import on top of the floor. "
                  f"That leaves {rest:.1f} s of a trial's median start-up for the trial driver, the model build "
                  "and sharding, the tracker's run and the first batch."]
    if r.get("search"):
        from raybench.bench.search import grid_section as search_section
        lines += ["", search_section(r["search"])]
    return "\n".join(lines) + "\n"


def main(args) -> int:
    from raybench.bench.common import write_result

    from raybench.bench.search import plot as search_plot, run_search_bench

    out = Path(args.out)
    result = run_sweep_bench(out, args.quick)
    if not args.quick:  # grid vs TPE+ASHA: a few dozen trials, minutes here
        (out / "sweep.json").write_text(json.dumps(result, indent=2))  # kept if the search fails
        result["search"] = run_search_bench(out)
        search_plot(result["search"], out / "search.png")
    write_result(out, "sweep", result, markdown_row(result), _plot)
    return 0


def _plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = [t["trial_id"] for t in r["trials"]]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(ids, [t["startup_s"] for t in r["trials"]], label="start-up (launch -> first step)")
    ax.barh(ids, [t["training_s"] for t in r["trials"]], left=[t["startup_s"] for t in r["trials"]],
            label="training + evals + checkpoints")
    ax.set_xlabel("seconds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
