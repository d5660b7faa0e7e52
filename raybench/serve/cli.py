"""`raybench deploy`: registered into the main CLI by `raybench.cli`.

    raybench deploy --checkpoint runs/smoke/model
    raybench deploy --model models:/raybench-vlm@champion --run-dir runs/sweep
    raybench deploy --checkpoint DIR --config jobs/configs/serve.yaml --set llm.num_replicas=2
    raybench deploy --checkpoint DIR --print-serve-config serve_config.yaml   # for serve deploy / RayService

Everything is validated (config fields, model directory or registry alias) before Ray
starts. Serve runs on `RAY_ADDRESS` if set, else on a local Ray started here; the command
blocks until Ctrl-C / SIGTERM, then removes the application (and stops a local Ray).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from raybench.config import ConfigError


def _settings(args):
    from raybench.serve.config import load_serve_config

    if args.checkpoint and args.model:
        raise ConfigError("give --checkpoint DIR or --model models:/..., not both")
    tracking_uri = args.tracking_uri
    if tracking_uri is None and args.run_dir:
        from raybench.track import tracking_uri as run_tracking_uri
        tracking_uri = run_tracking_uri(args.run_dir)
    cfg = load_serve_config(args.config, args.overrides, model=args.checkpoint or args.model,
                            port=args.port, host=args.host, tracking_uri=tracking_uri)
    if cfg.model is None:
        raise ConfigError("no model: pass --checkpoint DIR or --model models:/raybench-vlm@champion "
                          "(or set `model:` in the serve config)")
    return cfg


def _cmd_deploy(args) -> int:
    from raybench.serve.config import api_key, serve_config_yaml
    from raybench.serve.model_source import check_model_ref, is_registry_uri

    cfg = _settings(args)
    if args.print_serve_config:
        text = serve_config_yaml(cfg)
        if args.print_serve_config == "-":
            sys.stdout.write(text)
        else:
            Path(args.print_serve_config).write_text(text)
            print(f"wrote {args.print_serve_config} (serve deploy {args.print_serve_config})")
        return 0
    if is_registry_uri(cfg.model) and not (cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise ConfigError(f"model = {cfg.model!r} needs a registry: pass --run-dir (the sweep's run "
                          "directory), --tracking-uri, or set MLFLOW_TRACKING_URI")
    api_key(cfg)  # a required key that is missing fails here, before Ray starts
    pinned = check_model_ref(cfg.model, cfg.tracking_uri)
    if pinned != cfg.model:
        print(f"[raybench] {cfg.model} -> {pinned}", flush=True)
    cfg = cfg.model_copy(update={"model": pinned})
    return serve_until_interrupted(cfg)


def check_capacity(cfg) -> None:
    """Fixed replicas that cannot all be placed would leave the deploy waiting forever."""
    import ray

    from raybench.serve.config import STAGES

    sections = [cfg.ingress] + ([] if cfg.topology == "single" else [getattr(cfg, s) for s in STAGES])
    need = sum(s.num_cpus * (s.num_replicas or 1) for s in sections if s.autoscaling_config is None)
    have = ray.cluster_resources().get("CPU", 0.0)
    if need > have + 1e-9:
        raise ConfigError(f"the deployments ask for {need:g} CPUs (num_cpus x num_replicas) but the Ray "
                          f"cluster has {have:g}; lower num_cpus / num_replicas")


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def serve_until_interrupted(cfg) -> int:
    import ray
    from ray import serve

    from raybench.runtime import init_ray
    from raybench.serve.app import build_application
    from raybench.serve.config import api_key

    init_ray(log_to_driver=False)
    try:
        check_capacity(cfg)
        key = api_key(cfg)
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build_application(cfg, {cfg.api_key_env: key} if key else None),
                  name=cfg.name, route_prefix=cfg.route_prefix)
        base = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
        print(f"[raybench] serving {cfg.served_model_name} ({cfg.model}) at {base}/v1/chat/completions"
              f"{' (bearer auth on)' if key else ''}\n[raybench] health: {base}/health   Ctrl-C to stop",
              flush=True)
        # SIGTERM (`kill`, a pod stop) and SIGINT exit the same clean way; SIGINT explicitly too,
        # as a shell starts background jobs with it ignored.
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("\n[raybench] stopping", flush=True)
    finally:
        # A second Ctrl-C (a terminal sends SIGINT to the whole group) must not cut the clean-up.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            # Not serve.shutdown() on our own local Ray: it kills Serve's controller with
            # ray.kill mid-task (a yellow "graceful_shutdown failed" line); ray.shutdown()
            # below stops the rest with the local Ray.
            serve.delete(cfg.name)
        finally:
            ray.shutdown()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="serve a model over OpenAI-compatible HTTP (Ray Serve, 3 stages)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="DIR", help="model directory (model.safetensors, config.json, "
                     "tokenizer.json)")
    src.add_argument("--model", metavar="URI", help="registry model, e.g. models:/raybench-vlm@champion")
    p.add_argument("--config", "-c", help="serve config YAML (e.g. jobs/configs/serve.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a serve setting, e.g. --set llm.max_batch_size=8 (repeatable)")
    p.add_argument("--run-dir", help="run directory whose MLflow store holds the registry (models:/ URIs)")
    p.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--host", default=None, help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument("--print-serve-config", nargs="?", const="-", metavar="PATH",
                   help="write a Serve config YAML (serve deploy / RayService serveConfigV2) and exit")
    p.set_defaults(fn=_cmd_deploy)
