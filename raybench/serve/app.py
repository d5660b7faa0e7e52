"""The Serve application: an OpenAI-compatible FastAPI ingress in front of the stages.

    POST /v1/chat/completions   OpenAI chat completions (image as a data URI; stream -> SSE)
    GET  /v1/models             the served model
    GET  /v1/stats              per-stage, per-replica batch-size histograms
    GET  /health, /healthz      liveness (no auth)

`build_app(args)` is the Serve builder (`serve run raybench.serve.app:build_app`, or
`import_path` in a Serve config / RayService); `args` is a `ServeConfig` as a dict.

Topology `pipeline`: ingress -> VisionStage -> ProjectionStage -> LLMStage, composed with
DeploymentHandles. The ingress passes each stage's DeploymentResponse straight into the
next call, so tensors go stage to stage and never back through the ingress.

Faults: a stage replica that dies mid-request surfaces as an actor error in the ingress,
which retries the whole (idempotent) pipeline call a few times with back-off; Serve routes
the retry to a live replica or queues it until the replacement is up. Bad input never
reaches a stage; an image that passes the header check but fails to decode comes back as
a `StageError` (400). Every error leaves as OpenAI's `{"error": {...}}` JSON.

No `from __future__ import annotations` here: FastAPI must see the real `Request` type on
the route methods Serve re-wraps, not a string it cannot resolve.
"""


import asyncio
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from raybench.config import ConfigError, ModelConfig
from raybench.serve.config import (DEPLOYMENT_NAMES, ServeConfig, api_key, batch_user_config,
                                   deployment_options, validate_serve_config)
from raybench.serve.model_source import resolve_model_dir
from raybench.serve.schemas import (APIError, chat_chunk, chat_completion, completion_id, models_list,
                                    parse_chat_request, sse)
from raybench.serve.stages import GenOut, GenRequest, LLMStage, ProjectionStage, StageError, VisionStage

log = logging.getLogger("ray.serve")
BATCH_HEADER = "x-raybench-batch-sizes"

api = FastAPI(title="raybench", description="OpenAI-compatible hybrid-fusion VLM server")


@api.exception_handler(APIError)
async def _api_error(_: Request, err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return JSONResponse(APIError(err.status_code, str(err.detail), type=kind).body(), status_code=err.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse(APIError(400, str(err.errors()[:1])).body(), status_code=400)


@api.exception_handler(Exception)
async def _internal_error(_: Request, err: Exception) -> JSONResponse:
    log.exception("unhandled error in the ingress")
    return JSONResponse(APIError(500, f"internal error: {type(err).__name__}", type="server_error",
                                 code="internal_error").body(), status_code=500)


def _retryable(err: BaseException) -> bool:
    """A replica (or the object it held) vanished: the request itself was fine."""
    import ray.exceptions as rex
    from ray.serve.exceptions import ReplicaUnavailableError

    transient = (rex.RayActorError, rex.ObjectLostError, rex.OwnerDiedError, ReplicaUnavailableError)
    # Serve wraps an upstream stage's death while resolving a chained DeploymentResponse in
    # a RayServeException whose __cause__ is the ActorDiedError; Ray wraps in RayTaskError.cause.
    for _ in range(8):
        if err is None or isinstance(err, transient):
            return err is not None
        err = err.cause if isinstance(err, rex.RayTaskError) else err.__cause__
    return False


class PipelineBackend:
    """Three deployments through DeploymentHandles."""

    def __init__(self, vision, projection, llm, chain_responses: bool):
        self.vision, self.projection, self.llm = vision, projection, llm
        self.chain = chain_responses

    async def run(self, image: bytes, gen: GenRequest) -> GenOut | StageError:
        if self.chain:  # the handles resolve each response where the next stage runs
            features = self.vision.encode.remote(image)
            return await self.llm.generate.remote(self.projection.project.remote(features), gen)
        features = await self.vision.encode.remote(image)
        projected = await self.projection.project.remote(features)
        return await self.llm.generate.remote(projected, gen)

    async def stats(self) -> dict[str, Any]:
        out = {}
        for name, handle in (("vision", self.vision), ("projection", self.projection), ("llm", self.llm)):
            results = await handle.broadcast("stats").results_async(timeout_s=10, return_exceptions=True)
            out[name] = [r if isinstance(r, dict) else {"error": repr(r)} for r in results]
        return out


class LocalBackend:
    """Topology `single`: the same stage classes in this process, each with its batch queue."""

    def __init__(self, cfg: ServeConfig):
        args = (cfg.model, cfg.tracking_uri, cfg.compile, cfg.torch_threads)
        self.vision = VisionStage(*args, batch=batch_user_config(cfg.vision))
        self.projection = ProjectionStage(*args, batch=batch_user_config(cfg.projection))
        self.llm = LLMStage(*args, batch=batch_user_config(cfg.llm))

    async def run(self, image: bytes, gen: GenRequest) -> GenOut | StageError:
        features = await self.vision.encode(image)
        return await self.llm.generate(await self.projection.project(features), gen)

    async def stats(self) -> dict[str, Any]:
        return {s.name: [s.stats()] for s in (self.vision, self.projection, self.llm)}


@serve.deployment(name=DEPLOYMENT_NAMES["ingress"])
@serve.ingress(api)
class ChatIngress:
    def __init__(self, config: dict[str, Any], vision=None, projection=None, llm=None):
        from raybench.data.processor import VQAProcessor
        from raybench.data.tokenizer import load_tokenizer

        self.cfg = ServeConfig.model_validate(config)
        model_dir = resolve_model_dir(self.cfg.model, self.cfg.tracking_uri)
        model_cfg = ModelConfig.model_validate(json.loads((model_dir / "config.json").read_text())["model"])
        self.proc = VQAProcessor(load_tokenizer(model_dir), model_cfg.num_image_tokens,
                                 model_cfg.vision.image_size)
        self.max_positions = model_cfg.llm.max_position_embeddings
        self.backend = (PipelineBackend(vision, projection, llm, self.cfg.chain_responses)
                        if vision is not None else LocalBackend(self.cfg))
        # Read once at start-up from the replica's environment; never part of the config.
        # require_api_key without a key fails the replica (fail closed), else an open server warns.
        self.api_key = api_key(self.cfg)
        self.created = int(time.time())

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", type="authentication_error")

    @api.get("/health")
    @api.get("/healthz")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return models_list(self.cfg.served_model_name, self.created)

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"topology": self.cfg.topology, "stages": await self.backend.stats()}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        limits = self.cfg.limits
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise APIError(413, f"request body is {declared} bytes; at most {limits.max_body_bytes} allowed",
                           code="request_too_large")
        req = parse_chat_request(await request.body(), limits, self.cfg.served_model_name,
                                 self.cfg.default_temperature)
        prompt_ids = self.proc.prompt_ids(req.question)
        if len(prompt_ids) + req.max_tokens > self.max_positions:
            raise APIError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({req.max_tokens}) exceeds "
                           f"the model's context of {self.max_positions} tokens", param="messages",
                           code="context_length_exceeded")
        out = await self._generate(req.image, GenRequest(prompt_ids, req.max_tokens, req.temperature,
                                                         req.top_p, req.seed))
        if isinstance(out, StageError):
            raise APIError(out.status, out.message, code=out.code,
                           param=req.image_param if out.code == "invalid_image" else out.param,
                           type="invalid_request_error" if out.status < 500 else "server_error")
        headers = {BATCH_HEADER: ",".join(f"{k}={v}" for k, v in out.batch_sizes.items())}
        cid = completion_id()
        if req.stream:
            return StreamingResponse(self._stream(cid, req.model, out), media_type="text/event-stream",
                                     headers={**headers, "Cache-Control": "no-cache"})
        return JSONResponse(chat_completion(cid, req.model, self.proc.decode_answer(out.tokens),
                                            out.finish_reason, len(prompt_ids), len(out.tokens)),
                            headers=headers)

    async def _generate(self, image: bytes, gen: GenRequest) -> GenOut | StageError:
        deadline = time.monotonic() + self.cfg.retry_timeout_s
        for attempt in range(self.cfg.retries + 1):
            try:
                return await self.backend.run(image, gen)
            except Exception as err:  # noqa: BLE001 - sorted into retry / 503 / re-raise below
                if not _retryable(err):
                    raise
                if attempt == self.cfg.retries or time.monotonic() > deadline:
                    raise APIError(503, "the model pipeline is unavailable (a stage replica died and no "
                                   "replacement answered in time); retry later", code="service_unavailable",
                                   type="server_error") from None
                log.warning("stage replica lost (%s); retry %d/%d", type(err).__name__, attempt + 1,
                            self.cfg.retries)
                await asyncio.sleep(min(0.1 * 2**attempt, 1.0))
        raise AssertionError("unreachable")

    async def _stream(self, cid: str, model: str, out: GenOut) -> AsyncIterator[bytes]:
        """SSE chunks: the role, then the answer token by token, then finish_reason and [DONE].
        The text of each chunk is the growth of the decoded prefix, so the chunks concatenate
        to exactly the non-streamed answer (multi-byte characters wait for their last byte)."""
        created = int(time.time())
        yield sse(chat_chunk(cid, model, created, {"role": "assistant", "content": ""}))
        sent = ""
        for k in range(1, len(out.tokens) + 1):
            text = self.proc.decode_answer(out.tokens[:k])
            if text.startswith(sent) and len(text) > len(sent) and not text.endswith("\ufffd"):
                yield sse(chat_chunk(cid, model, created, {"content": text[len(sent):]}))
                sent = text
            await asyncio.sleep(0)
        yield sse(chat_chunk(cid, model, created, {}, out.finish_reason))
        yield sse("[DONE]")


# ------------------------------------------------------------------ building the application

def build_application(cfg: ServeConfig, ingress_env: dict[str, str] | None = None) -> Application:
    """The bound application for validated settings. `ingress_env` (e.g. the API key) goes
    into the ingress's runtime_env only: never into the config or a written YAML."""
    if cfg.model is None:
        raise ConfigError("model: required - a model directory or models:/NAME@ALIAS")
    ingress_opts = deployment_options(cfg.ingress)
    if ingress_env:
        ingress_opts["ray_actor_options"]["runtime_env"] = {"env_vars": dict(ingress_env)}
    config = cfg.model_dump(mode="json")
    if cfg.topology == "single":
        return ChatIngress.options(name=DEPLOYMENT_NAMES["single"], **ingress_opts).bind(config)
    stage_args = (cfg.model, cfg.tracking_uri, cfg.compile, cfg.torch_threads)
    stages = [serve.deployment(cls, name=DEPLOYMENT_NAMES[key]).options(**deployment_options(getattr(cfg, key)))
              .bind(*stage_args) for key, cls in (("vision", VisionStage), ("projection", ProjectionStage),
                                                  ("llm", LLMStage))]
    return ChatIngress.options(**ingress_opts).bind(config, *stages)


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder: `args` is a ServeConfig as a dict (nested or flat
    `llm.max_batch_size=8` keys, as `serve run ... key=value` passes strings)."""
    from raybench.config import apply_overrides

    flat = {k: v for k, v in args.items() if "." in k}
    nested = apply_overrides({k: v for k, v in args.items() if "." not in k},
                             [f"{k}={v}" for k, v in flat.items()])
    return build_application(validate_serve_config(nested))
