"""`raybench sweep`: registered into the main CLI by `raybench.cli`."""

from __future__ import annotations

import argparse
import json


def _cmd_sweep(args) -> int:
    from raybench.tune.sweep import load_resume, load_sweep, run_sweep

    if args.resume:
        if args.config or args.overrides:
            from raybench.config import ConfigError
            raise ConfigError("--resume continues a sweep with the config it started with; "
                              "drop --config/--set")
        sweep = load_resume(args.resume)
    else:
        sweep = load_sweep(args.config, args.overrides)  # every check before Ray starts
    summary = run_sweep(sweep, resume=bool(args.resume))
    run_dir = sweep.run_dir
    print(json.dumps({k: summary[k] for k in ("trials", "completed", "pruned", "error", "model_uri")}, indent=2))
    print("\nWhere to look:\n"
          f"  MLflow:          mlflow ui --backend-store-uri sqlite:///{run_dir}/mlflow.db\n"
          f"  optuna-dashboard: optuna-dashboard {sweep.study_storage}\n"
          f"  summary:         {summary['summary_dir']}/summary.md\n"
          "  Ray dashboard:   http://127.0.0.1:8265 while the sweep runs", flush=True)
    return 0 if summary["model_uri"] else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="architecture search: Ray Tune + Optuna over sweep.space")
    p.add_argument("--config", "-c", help="YAML config with a `sweep:` section")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set sweep.num_samples=4 (repeatable)")
    p.add_argument("--resume", metavar="DIR", help="continue the sweep in this run directory")
    p.set_defaults(fn=_cmd_sweep)
