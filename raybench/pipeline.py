"""`raybench pipeline`: the whole platform in one command.

    data (generated if absent) -> sweep (Tune + Optuna, Train FSDP2 trials, MLflow)
    -> champion registered (models:/raybench-vlm@champion) -> Serve pipeline deployed
    -> one real HTTP request -> the answer, the endpoint, and where to look.

Everything (run config, sweep space, serve settings) is validated before Ray starts.
On a cluster (`ray job submit`, RAY_ADDRESS set) the Serve application stays up after the
job ends; on the embedded local Ray it stops with the process unless `--keep-serving`.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path


def _val_example(cfg) -> tuple[bytes, str, str]:
    """The first validation row's image and its first question and answer (the question a
    conversation opens with: a question asked without history)."""
    from raybench.data.conversation import assistant_turns, loads
    from raybench.data.loader import read_split

    row = read_split(cfg.data_path, "val", columns=["image", "messages"]).slice(0, 1).to_pylist()[0]
    history, answer = assistant_turns(loads(row["messages"]))[0]
    return row["image"], history[-1]["content"], answer


def ask_endpoint(base_url: str, image: bytes, question: str, model: str, api_key: str | None = None,
                 timeout: float = 120.0) -> str:
    """One OpenAI-style chat completion over plain HTTP; retried while replicas come up."""
    body = json.dumps({
        "model": model, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
            {"type": "text", "text": question}]}],
    }).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    deadline = time.monotonic() + timeout
    while True:
        req = urllib.request.Request(f"{base_url}/v1/chat/completions", data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())["choices"][0]["message"]["content"]
        except (urllib.error.URLError, ConnectionError) as err:
            status = getattr(err, "code", None)
            if (status is not None and status < 500) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def run_pipeline(config: str | Path | None, overrides: list[str], serve_config: str | None = None,
                 serve_overrides: list[str] | None = None, keep_serving: bool = False) -> dict:
    from raybench.serve.config import load_serve_config
    from raybench.track import tracking_uri
    from raybench.tune.sweep import load_sweep, run_sweep

    sweep = load_sweep(config, overrides)
    s = sweep.cfg.sweep
    uri = tracking_uri(sweep.run_dir)
    model_uri = f"models:/{s.registered_model}@{s.alias}"
    serve_cfg = load_serve_config(serve_config, serve_overrides or [], model=model_uri, tracking_uri=uri,
                                  served_model_name=s.registered_model)

    if serve_cfg.require_api_key:
        from raybench.serve.config import api_key
        api_key(serve_cfg)  # a required key that is missing fails now, not after an hour of sweep
    summary = run_sweep(sweep)  # starts (or joins) Ray, registers the champion
    if not summary.get("model_uri"):
        raise RuntimeError("the sweep produced no champion (every trial failed or was pruned); see "
                           f"{summary['summary_dir']}/summary.md")
    base = _deploy(serve_cfg)
    image, question, gold = _val_example(sweep.cfg)
    key = os.environ.get(serve_cfg.api_key_env)
    answer = ask_endpoint(base, image, question, serve_cfg.served_model_name, key)
    # On a cluster the application outlives this driver; locally it lives as long as the
    # local Ray this process started: until Ctrl-C with --keep-serving, else stopped now.
    state = "cluster" if os.environ.get("RAY_ADDRESS") else ("kept" if keep_serving else "stopped")
    result = {"endpoint": f"{base}/v1/chat/completions", "endpoint_live": state != "stopped",
              "serve_again": serve_again_command(model_uri, sweep.run_dir, serve_config),
              "model_uri": model_uri, "model_version": summary["model_version"],
              "champion": summary["champion"]["trial_id"], "champion_accuracy": summary["champion"]["accuracy"],
              "question": question, "answer": answer, "expected": gold}
    (sweep.run_dir / "pipeline.json").write_text(json.dumps(result, indent=2))
    if state == "stopped":
        _shutdown_local(serve_cfg)  # first, so what is printed next is what is still running
    print(where_to_look(result, state, uri, sweep.study_storage, sweep.run_dir), flush=True)
    if state == "kept":
        _block_until_interrupted(serve_cfg)
    return result


def serve_again_command(model_uri: str, run_dir: Path, serve_config: str | None) -> str:
    """The one command that serves the registered champion again (the registry is in the run dir)."""
    return (f"raybench deploy --model {model_uri} --run-dir {run_dir}"
            + (f" --config {serve_config}" if serve_config else ""))


def _deploy(cfg) -> str:
    from ray import serve

    from raybench.serve.app import build_application
    from raybench.serve.cli import check_capacity

    from raybench.serve.config import api_key

    check_capacity(cfg)
    key = api_key(cfg)
    # One HTTP proxy, on the head: several nodes of one machine can't share a port, and the
    # printed endpoint is the head's.
    serve.start(proxy_location="HeadOnly", http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_application(cfg, {cfg.api_key_env: key} if key else None), name=cfg.name,
              route_prefix=cfg.route_prefix)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def where_to_look(result: dict, state: str, uri: str, study_storage: str, run_dir: Path) -> str:
    """The closing lines: the answer, what is still running (state: "stopped", "kept" until
    Ctrl-C, or "cluster" where the app outlives the job) and where to look next."""
    lines = [f"\n[raybench] pipeline done: champion {result['champion']} (val accuracy "
             f"{result['champion_accuracy']:.3f}) registered as {result['model_uri']} (version "
             f"{result['model_version']})",
             f"[raybench] asked:    {result['question']!r}",
             f"[raybench] answered: {result['answer']!r}   (expected {result['expected']!r})"]
    if state == "stopped":
        lines += ["[raybench] Serve and the local Ray this command started are stopped: nothing is running now.",
                  f"[raybench] serve the champion again: {result['serve_again']}",
                  "[raybench] (or run the pipeline with --keep-serving to keep its endpoint up until Ctrl-C)"]
    else:
        lines += [f"[raybench] endpoint: {result['endpoint']}   (up "
                  + ("until Ctrl-C here)" if state == "kept" else "on the cluster after this job ends; "
                     "serve shutdown to stop it)"),
                  "  Ray dashboard:    http://127.0.0.1:8265"]
    lines += ["Where to look:",
              f"  MLflow UI:        mlflow ui --backend-store-uri {uri}",
              f"  optuna-dashboard: optuna-dashboard {study_storage}",
              f"  sweep summary:    {run_dir / 'summary' / 'summary.md'}"]
    return "\n".join(lines)


def _block_until_interrupted(cfg) -> None:
    print("[raybench] serving until Ctrl-C", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("\n[raybench] stopping", flush=True)
    _shutdown_local(cfg)


def _shutdown_local(cfg) -> None:
    """Remove the application (its replicas stop gracefully), then stop the local Ray with
    everything in it. No serve.shutdown(): it kills Serve's controller with ray.kill while
    its own graceful_shutdown task runs, and the raylet prints that as a failure."""
    import ray
    from ray import serve

    serve.delete(cfg.name)
    ray.shutdown()


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="data -> sweep -> champion -> Serve -> one real request")
    p.add_argument("--config", "-c", help="run config with a `sweep:` section (e.g. jobs/configs/smoke.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--serve-config", help="serve settings YAML (e.g. jobs/configs/serve.yaml)")
    p.add_argument("--serve-set", dest="serve_overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--keep-serving", action="store_true", help="keep the endpoint up until Ctrl-C")

    def _cmd(args) -> int:
        result = run_pipeline(args.config, args.overrides, args.serve_config, args.serve_overrides,
                              args.keep_serving)
        print(json.dumps(result, indent=2))
        return 0

    p.set_defaults(fn=_cmd)
