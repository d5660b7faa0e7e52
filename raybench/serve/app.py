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

The LLM stage answers through a streaming handle: its first event is the first token (the
request holds a decode slot), so the ingress knows which requests still wait. Beyond
`limits.max_queued_requests` waiting it answers 429 with Retry-After at once; a request
without its answer (streaming: its first token) within `limits.request_timeout_s` is 504;
either way, and when a client disconnects, closing the stream cancels the row, which the
LLM stage drops at its next decode step.

Faults: a stage replica that dies before anything reached the client (a streamed answer's
first token, or a whole answer) surfaces as an actor error in the ingress, which retries the
whole (idempotent) pipeline call a few times with back-off;
Serve routes the retry to a live replica or queues it until the replacement is up. Bad input never
reaches a stage; an image that passes the header check but fails to decode comes back as
a `StageError` (400). Every error leaves as OpenAI's `{"error": {...}}` JSON.

No `from __future__ import annotations` here: FastAPI must see the real `Request` type on
the route methods Serve re-wraps, not a string it cannot resolve.
"""


import asyncio
import functools
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator, Callable

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
from raybench.serve import metrics
from raybench.serve.payloads import GenOut, GenRequest, StageError
from raybench.serve.schemas import (APIError, ChatRequest, chat_chunk, chat_completion, completion_id,
                                    models_list, parse_chat_request, sse, usage_chunk)
from raybench.serve.stages import LLMStage, ProjectionStage, VisionStage
from raybench.serve.stopping import AnswerStream, cut_at_stop

log = logging.getLogger("ray.serve")
BATCH_HEADER = "x-raybench-batch-sizes"
HEALTH_TIMEOUT_S = 5.0

api = FastAPI(title="raybench", description="OpenAI-compatible hybrid-fusion VLM server")


@api.exception_handler(APIError)
async def _api_error(_: Request, err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer", **err.headers} if err.status == 401 else err.headers
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


# Defined before the ingress class: `@serve.ingress` pickles the routes when the class is
# defined, with the module globals that exist at that moment.

async def _within(deadline: float, awaitable):
    """`awaitable` by `deadline` (perf_counter), else 504: the request's time is up."""
    try:
        return await asyncio.wait_for(awaitable, max(deadline - time.perf_counter(), 0.001))
    except asyncio.TimeoutError:
        raise APIError(504, "the request timed out before its answer was ready (limits.request_timeout_s); "
                       "the server is busy: retry later", code="timeout", type="server_error") from None


async def _final(events: AsyncIterator[Any]) -> GenOut | StageError:
    async for event in events:
        if not isinstance(event, list):
            return event
    raise RuntimeError("the LLM stage ended without an answer")


def _stage_error(err: StageError, req: ChatRequest) -> APIError:
    return APIError(err.status, err.message, code=err.code,
                    param=req.image_param if err.code == "invalid_image" else err.param,
                    type="invalid_request_error" if err.status < 500 else "server_error")


class PipelineBackend:
    """Three deployments through DeploymentHandles; the LLM stage answers as a stream."""

    def __init__(self, vision, projection, llm, chain_responses: bool):
        self.vision, self.projection = vision, projection
        self.llm = llm.options(stream=True)
        self.stages = {"vision": vision, "projection": projection, "llm": llm}
        self.chain = chain_responses

    async def events(self, image: bytes, gen: GenRequest) -> AsyncIterator[Any]:
        if self.chain:  # the handles resolve each response where the next stage runs
            projected = self.projection.project.remote(self.vision.encode.remote(image))
        else:
            projected = await self.projection.project.remote(await self.vision.encode.remote(image))
        response = self.llm.generate.remote(projected, gen)
        try:
            async for event in response:
                yield event
        finally:
            response.cancel()  # a client gone or out of time: its row leaves at the next step

    async def stats(self) -> dict[str, Any]:
        out = {}
        for name, handle in self.stages.items():
            results = await handle.broadcast("stats").results_async(timeout_s=10, return_exceptions=True)
            out[name] = [r if isinstance(r, dict) else {"error": repr(r)} for r in results]
        return out

    async def health(self) -> dict[str, str]:
        """Each stage's last `check_health` verdict (one replica per stage answers), or the
        error its call raised; empty when all are healthy. A stage too busy to answer in time
        counts as healthy: a health check that fails under load would take a loaded server
        out of its load balancer (overload is the 429's job)."""
        async def ask(handle) -> str | None:
            try:
                return await asyncio.wait_for(handle.health.remote(), HEALTH_TIMEOUT_S)
            except asyncio.TimeoutError:
                return None
            except Exception as err:  # noqa: BLE001 - a stage that cannot answer is unhealthy
                return f"no answer: {type(err).__name__}"
        verdicts = await asyncio.gather(*(ask(h) for h in self.stages.values()))
        return {name: v for name, v in zip(self.stages, verdicts) if v}


class LocalBackend:
    """Topology `single`: the same stage classes in this process, each with its batch queue."""

    def __init__(self, cfg: ServeConfig):
        args = (cfg.model, cfg.tracking_uri, cfg.compile, cfg.torch_threads)
        self.vision = VisionStage(*args, batch=batch_user_config(cfg.vision))
        self.projection = ProjectionStage(*args, batch=batch_user_config(cfg.projection))
        self.llm = LLMStage(*args, batch=batch_user_config(cfg.llm))

    async def events(self, image: bytes, gen: GenRequest) -> AsyncIterator[Any]:
        projected = await self.projection.project(await self.vision.encode(image))
        async for event in self.llm.generate(projected, gen):
            yield event

    async def stats(self) -> dict[str, Any]:
        return {s.name: [s.stats()] for s in (self.vision, self.projection, self.llm)}

    async def health(self) -> dict[str, str]:
        out = {}
        for stage in (self.vision, self.projection, self.llm):
            stage.run_health_check()
            if stage.health():
                out[stage.name] = stage.health()
        return out


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
        self.waiting = 0  # admitted requests without a first token yet (limits.max_queued_requests)

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", type="authentication_error")

    @api.get("/health")
    @api.get("/healthz")
    async def health(self):
        """200 while every stage's model is usable (its last health check), else 503 naming why."""
        problems = await self.backend.health()
        if problems:
            return JSONResponse({"status": "unhealthy", "stages": problems}, status_code=503)
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
        t0 = time.perf_counter()
        try:
            return await self._chat(request, t0)
        except APIError as err:
            metrics.observe_request(err.status, False, None, None)
            raise

    async def _chat(self, request: Request, t0: float):
        self._authorize(request)
        limits = self.cfg.limits
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise APIError(413, f"request body is {declared} bytes; at most {limits.max_body_bytes} allowed",
                           code="request_too_large")
        req = parse_chat_request(await request.body(), limits, self.cfg.served_model_name,
                                 self.cfg.default_temperature)
        prompt_ids = self.proc.conversation_prompt_ids(req.messages)
        if len(prompt_ids) + req.max_tokens > self.max_positions:
            raise APIError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({req.max_tokens}) exceeds "
                           f"the model's context of {self.max_positions} tokens", param="messages",
                           code="context_length_exceeded")
        gen = GenRequest(prompt_ids, req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                         min_tokens=req.min_tokens, ignore_eos=req.ignore_eos, stop=req.stop, stream=req.stream)
        events, first, ttft = await self._start(req, gen, t0)
        cid = completion_id()
        if req.stream:
            return StreamingResponse(self._stream(cid, req, gen, events, first, (t0, ttft)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        out = first  # not streamed: the whole answer
        metrics.observe_request(200, False, ttft, time.perf_counter() - t0)
        headers = {BATCH_HEADER: ",".join(f"{k}={v}" for k, v in out.batch_sizes.items())}
        text = cut_at_stop(self.proc.decode_answer(out.tokens), gen.stop)[0]
        return JSONResponse(chat_completion(cid, req.model, text, out.finish_reason, len(prompt_ids),
                                            len(out.tokens), (gen.prompt_ids, out.tokens) if req.return_token_ids
                                            else None), headers=headers)

    async def _start(self, req: ChatRequest, gen: GenRequest, t0: float) -> tuple[Any, Any, float]:
        """Admission (429 beyond `limits.max_queued_requests` waiting for a first token), then
        the pipeline within the request's time (504): (events, first token) when streamed, else
        (None, the answer); and the seconds to the first token."""
        limits = self.cfg.limits
        if self.waiting >= limits.max_queued_requests:
            raise APIError(429, f"the server is at capacity ({self.waiting} requests waiting for a first "
                           f"token; limits.max_queued_requests = {limits.max_queued_requests}); retry after "
                           f"{limits.retry_after_s} s", code="rate_limit_exceeded", type="rate_limit_error",
                           headers={"Retry-After": str(limits.retry_after_s)})
        first_at: list[float] = []

        def holds_a_slot() -> None:  # the first token: no longer waiting
            if not first_at:
                first_at.append(time.perf_counter() - t0)
                self.waiting -= 1
                metrics.set_queue_length("ingress", self.waiting)
        self.waiting += 1
        metrics.set_queue_length("ingress", self.waiting)
        try:
            events, first = await _within(t0 + limits.request_timeout_s,
                                          self._attempts(req.image, gen, req.stream, holds_a_slot))
        finally:
            holds_a_slot()
        if isinstance(first, StageError):
            raise _stage_error(first, req)
        return events, first, first_at[0]

    async def _attempts(self, image: bytes, gen: GenRequest, stream: bool,
                        on_first: Callable[[], None]) -> tuple[Any, Any]:
        """Until something reaches the client (a streamed request's first token, or a whole
        answer), a stage replica that died is retried (the call is idempotent) with back-off,
        within the limits."""
        deadline = time.monotonic() + self.cfg.retry_timeout_s
        for attempt in range(self.cfg.retries + 1):
            events = self.backend.events(image, gen)
            try:
                first = await anext(events)
                on_first()
                if stream and isinstance(first, list):
                    return events, first
                final = first if not isinstance(first, list) else await _final(events)
                await events.aclose()
                return None, final
            except BaseException as err:
                await events.aclose()
                if not isinstance(err, Exception) or not _retryable(err):
                    raise
                if attempt == self.cfg.retries or time.monotonic() > deadline:
                    raise APIError(503, "the model pipeline is unavailable (a stage replica died and no "
                                   "replacement answered in time); retry later", code="service_unavailable",
                                   type="server_error") from None
                log.warning("stage replica lost (%s); retry %d/%d", type(err).__name__, attempt + 1,
                            self.cfg.retries)
                await asyncio.sleep(min(0.1 * 2**attempt, 1.0))
        raise AssertionError("unreachable")

    async def _stream(self, cid: str, req: ChatRequest, gen: GenRequest, events: AsyncIterator[Any],
                      first: list[int], times: tuple[float, float]) -> AsyncIterator[bytes]:
        """SSE chunks as the LLM stage decodes: the role, then the answer's growth (chunks
        concatenate to exactly the non-streamed answer: serve/stopping.py), then finish_reason,
        the usage with `stream_options.include_usage`, and [DONE]. The client going away
        cancels this generator, which cancels the row."""
        created, answer = int(time.time()), AnswerStream(self.proc.decode_answer, gen.stop)
        chunk = functools.partial(chat_chunk, cid, req.model, created)
        try:
            yield sse(chunk({"role": "assistant", "content": ""}))
            out: Any = first
            while isinstance(out, list):
                delta = answer.push(out)
                if delta:
                    yield sse(chunk({"content": delta}))
                out = await anext(events)
            if isinstance(out, StageError):
                yield sse(_stage_error(out, req).body())
                return
            delta = answer.finish()
            if delta:
                yield sse(chunk({"content": delta}))
            yield sse(chunk({}, out.finish_reason))
            if req.include_usage:
                yield sse(usage_chunk(cid, req.model, created, len(gen.prompt_ids), len(out.tokens)))
            yield sse("[DONE]")
            metrics.observe_request(200, True, times[1], time.perf_counter() - times[0])
        finally:
            await events.aclose()


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
