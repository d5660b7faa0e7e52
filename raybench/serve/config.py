"""The serving config: one pydantic model for `raybench deploy`, `build_app` and the
Serve config YAML written for `serve deploy` / KubeRay `RayService`.

Validated before Ray starts (`load_serve_config`), built on `raybench.schema` like the run
config, so it has the same `field = value: allowed` errors. Per-stage knobs map one-to-one
onto Serve deployment options (`num_replicas`, `max_ongoing_requests`, `autoscaling_config`,
`ray_actor_options.num_cpus/num_gpus`); batching knobs travel as the deployment's
`user_config`, so `serve deploy` can change them on live replicas (`reconfigure`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from raybench.schema import ConfigError, Strict, apply_overrides, load_yaml, validate_as

IMPORT_PATH = "raybench.serve.app:build_app"
STAGES = ("vision", "projection", "llm")
DEPLOYMENT_NAMES = {"ingress": "ChatIngress", "vision": "VisionStage", "projection": "ProjectionStage",
                    "llm": "LLMStage", "single": "VLMServer"}


class AutoscalingConfig(Strict):
    """Serve's `autoscaling_config` (the fields we expose; Serve's defaults otherwise)."""
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas = {self.min_replicas} must be <= max_replicas = {self.max_replicas}")
        return self


class DeploymentConfig(Strict):
    """Replicas and resources of one deployment. Fractional CPUs: three stages share 2 cores."""
    num_replicas: int | None = Field(None, ge=1)  # None: 1, or autoscaling when that is set
    num_cpus: float = Field(0.2, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    autoscaling_config: AutoscalingConfig | None = None

    @model_validator(mode="after")
    def _replicas_xor_autoscaling(self) -> "DeploymentConfig":
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        return self


class StageConfig(DeploymentConfig):
    """A model stage: a deployment plus its batching settings (serve/batching.py)."""
    max_batch_size: int = Field(16, ge=1, le=1024)
    # 0: no added wait. A batch is whatever queued while the previous one ran (the stage runs
    # one batch at a time), so batches grow with load and an idle server adds no latency.
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=10)

    @model_validator(mode="after")
    def _batch_fits_queue(self) -> "StageConfig":
        # A replica never holds more than max_ongoing_requests, so a bigger batch never fills.
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests = {self.max_ongoing_requests} must be >= "
                             f"max_batch_size = {self.max_batch_size} (a batch is drawn from the "
                             "requests a replica holds)")
        return self


class LLMStageConfig(StageConfig):
    """The LLM stage: `max_batch_size` is its pool of decode rows (continuous batching)."""
    # continuous: requests join and leave the pool between decode steps (as vLLM).
    # static: a batch is decoded until its longest answer ends before the next one joins, and
    # every answer waits for it (how LLM servers batched before Orca): a baseline for
    # `raybench bench serve`, never faster.
    scheduling: Literal["continuous", "static"] = "continuous"
    # Streamed answers: the first token goes out at once, then tokens go out this many at a
    # time (vLLM's `--stream-interval`): each chunk is a Serve stream item and an SSE event,
    # whose cost the ingress and the stage pay per chunk, however few tokens it carries.
    stream_interval: int = Field(1, ge=1, le=64)


class LimitsConfig(Strict):
    """What one request may ask for; anything beyond is a 4xx, never work for a replica."""
    max_body_bytes: int = Field(8 * 2**20, ge=1024)
    max_image_bytes: int = Field(4 * 2**20, ge=64)
    max_image_pixels: int = Field(4096 * 4096, ge=1)  # width x height, read from the header
    max_images: int = Field(1, ge=1, le=1)  # the model's prompt layout holds one image
    max_tokens: int = Field(64, ge=1)        # the largest max_tokens a request may ask for
    default_max_tokens: int = Field(16, ge=1)
    max_prompt_chars: int = Field(4000, ge=1)
    max_messages: int = Field(64, ge=1)
    # Requests one ingress replica holds that have no first token yet (in a stage's queue or
    # waiting for a decode slot); one more is answered 429 with Retry-After at once, so a
    # server past its rate keeps the accepted requests' latency bounded instead of queueing
    # without end. Per ingress replica: with k ingress replicas the server holds k times this.
    max_queued_requests: int = Field(64, ge=1)
    # A request not answered within this many seconds is answered 504 and its row dropped
    # (streaming: the first token must come within it).
    request_timeout_s: float = Field(60.0, gt=0)
    retry_after_s: int = Field(1, ge=1)  # the Retry-After header of a 429

    @model_validator(mode="after")
    def _default_in_range(self) -> "LimitsConfig":
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens = {self.default_max_tokens} must be <= "
                             f"max_tokens = {self.max_tokens}")
        return self


class ServeConfig(Strict):
    # What to serve: a model directory (safetensors + config.json + tokenizer.json) or a
    # registry URI `models:/NAME@ALIAS` / `models:/NAME/VERSION`, resolved by each replica.
    model: str | None = None
    tracking_uri: str | None = None  # for models:/ URIs; None: MLFLOW_TRACKING_URI on the replica
    served_model_name: str = "raybench-vlm"
    name: str = "raybench"          # Serve application name
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # pipeline: ingress -> VisionStage -> ProjectionStage -> LLMStage (three deployments);
    # single: one deployment runs all three stages in-process (no hops; for small models).
    topology: Literal["pipeline", "single"] = "pipeline"
    # Chain stage calls by passing each DeploymentResponse on (the tensors go stage to
    # stage); False awaits each stage in the ingress and passes the values (a bench knob).
    chain_responses: bool = True
    # torch.compile: the LLM stage's decode step once per batch-size bucket (1, 2, 4, ...,
    # compiled at start-up), the vision and projection stages per block.
    compile: bool = False
    torch_threads: int | None = Field(None, ge=1)  # None: Ray's default for the CPU share
    api_key_env: str = "RAYBENCH_API_KEY"  # bearer auth is on when this env var is set
    # As vLLM's --api-key: a key set means bearer auth, no key means an open server (with a
    # warning at start). require_api_key: true makes a missing key a start-up error instead,
    # for deployments where the key arrives from elsewhere (a Kubernetes Secret) and an empty
    # value must never silently mean "no auth".
    require_api_key: bool = False
    default_temperature: float = Field(0.0, ge=0, le=2)  # greedy unless a request asks
    # When a stage replica dies mid-request the ingress retries the pipeline call (it is
    # idempotent) with back-off 0.1 s .. 1 s, within both limits: long enough for Serve to
    # mark the replica dead and route to another one, or to start its replacement.
    retries: int = Field(8, ge=0, le=50)
    retry_timeout_s: float = Field(20.0, gt=0)
    ingress: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(num_cpus=0.1, max_ongoing_requests=256))
    vision: StageConfig = Field(default_factory=StageConfig)
    projection: StageConfig = Field(default_factory=StageConfig)
    llm: LLMStageConfig = Field(default_factory=LLMStageConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    @model_validator(mode="after")
    def _route(self) -> "ServeConfig":
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix = {self.route_prefix!r} must start with '/'")
        return self


def api_key(cfg: ServeConfig, environ=None) -> str | None:
    """The bearer key from `cfg.api_key_env`, or None for an open server (logged loudly).
    ConfigError when `require_api_key` is set and the variable is missing or empty."""
    import logging
    import os

    key = (os.environ if environ is None else environ).get(cfg.api_key_env) or None
    if key is None and cfg.require_api_key:
        raise ConfigError(f"require_api_key = true but {cfg.api_key_env} is not set (or empty): refusing to "
                          "serve without authentication; set the key (a Kubernetes Secret, an env var) or "
                          "set require_api_key=false")
    if key is None:
        logging.getLogger("ray.serve").warning(
            "serving WITHOUT authentication: anyone who can reach %s:%d can use the model; export %s=<key> "
            "to require 'Authorization: Bearer <key>' (and require_api_key=true to refuse to start without it)",
            cfg.host, cfg.port, cfg.api_key_env)
    return key


def validate_serve_config(raw: dict[str, Any]) -> ServeConfig:
    return validate_as(ServeConfig, raw, "serve config")


def load_serve_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      **fields: Any) -> ServeConfig:
    """YAML (optionally with a top-level `serve:` section) + `--set k=v` + explicit fields."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = load_yaml(path, "serve config")
        raw = raw.get("serve", raw) if isinstance(raw.get("serve"), dict) else raw
    # `--set serve.llm.max_batch_size=8` and `--set llm.max_batch_size=8` both work.
    overrides = [o[len("serve."):] if o.startswith("serve.") else o for o in (overrides or [])]
    raw = apply_overrides(raw, overrides)
    raw.update({k: v for k, v in fields.items() if v is not None})
    return validate_serve_config(raw)


def deployment_options(d: DeploymentConfig) -> dict[str, Any]:
    """Serve deployment options (`.options(**...)` and the YAML `deployments:` entries)."""
    opts: dict[str, Any] = {
        "max_ongoing_requests": d.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
    }
    if d.autoscaling_config is not None:
        opts["autoscaling_config"] = d.autoscaling_config.model_dump(exclude_none=True)
    else:
        opts["num_replicas"] = d.num_replicas or 1
    if isinstance(d, StageConfig):
        opts["user_config"] = batch_user_config(d)
    return opts


def batch_user_config(s: StageConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s}
    if isinstance(s, LLMStageConfig) and s.scheduling != "continuous":
        out["scheduling"] = s.scheduling  # only when set: the default's user_config stays as it was
    if isinstance(s, LLMStageConfig) and s.stream_interval != 1:
        out["stream_interval"] = s.stream_interval
    return out


def serve_config_yaml(cfg: ServeConfig) -> str:
    """A Serve config file (`serve deploy`, KubeRay `serveConfigV2`) for these settings.

    `args` is the whole validated config (what `build_app` reads); `deployments` repeats the
    per-deployment options because that is where Serve users look for them, and entries
    there override what the code sets (Serve's own precedence).
    """
    names = (["single"] if cfg.topology == "single" else ["ingress", *STAGES])
    deployments = []
    for key in names:
        section = cfg.ingress if key in ("ingress", "single") else getattr(cfg, key)
        deployments.append({"name": DEPLOYMENT_NAMES[key], **deployment_options(section)})
    doc = {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [{
            "name": cfg.name, "route_prefix": cfg.route_prefix, "import_path": IMPORT_PATH,
            "args": cfg.model_dump(mode="json"), "deployments": deployments,
        }],
    }
    header = ("# Ray Serve config written by `raybench deploy --print-serve-config`.\n"
              "# serve deploy <this file>   |   KubeRay RayService: spec.serveConfigV2\n"
              f"# Bearer auth: set {cfg.api_key_env} in the Ray nodes' environment (never in this file);\n"
              "# with require_api_key: true a replica without it refuses to start instead of serving open.\n")
    return header + yaml.safe_dump(doc, sort_keys=False)
