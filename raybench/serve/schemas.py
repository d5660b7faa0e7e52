"""OpenAI chat-completions shapes and request validation (no Ray, no torch).

`parse_chat_request(body, limits, model_name)` turns raw request bytes into a
`ChatRequest` (a conversation, one image's bytes, generation parameters) or raises
`APIError`, which the ingress renders as OpenAI's error shape:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "...", "code": "..."}}

The conversation is the whole request: system (and developer) messages before the first
user turn, then every user and assistant turn, rendered by the chat template the model was
trained with (`raybench.data.chat_template`), so history reaches the model. The image is the
one `image_url` part across the user messages; it belongs to the first user turn.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raybench.serve.config import LimitsConfig


class APIError(Exception):
    """A request the server refuses; `status` is the HTTP code (4xx; 429 / 503 / 504 when
    overloaded, unavailable or out of time); `headers` go with the answer (Retry-After)."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------ request shapes

class _Lenient(BaseModel):
    # OpenAI clients send fields we do not use (user, stream_options, ...): ignore them.
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL | str  # some clients send the URL string directly


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the newer OpenAI name for max_tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    # vLLM's extra sampling parameters (load tests fix the answer length with them).
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    # vLLM's: the response carries the prompt's and the answer's token ids.
    return_token_ids: bool = False
    # Accepted by the shape, refused by the server (400 naming the field): see _unsupported.
    logprobs: bool | None = None
    top_logprobs: int | None = None
    top_k: int | None = None


@dataclass
class ChatRequest:
    """What the pipeline needs from one validated request."""
    messages: list[dict[str, str]]  # the conversation (raybench.data.conversation), ending with user
    image: bytes
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    model: str
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    include_usage: bool = False    # stream_options.include_usage: a last chunk with the usage
    return_token_ids: bool = False
    image_param: str = "messages"  # where the image was, for errors found while decoding it


# ------------------------------------------------------------------ validation

def parse_chat_request(body: bytes, limits: LimitsConfig, served_model_name: str,
                       default_temperature: float = 0.0) -> ChatRequest:
    if len(body) > limits.max_body_bytes:
        raise APIError(413, f"request body is {len(body)} bytes; at most {limits.max_body_bytes} allowed",
                       code="request_too_large")
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None
    except RecursionError:  # Python's parser gives up near 1000 levels: a client error, not ours
        raise APIError(400, f"request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                       code="invalid_json") from None
    if _depth(raw) > MAX_JSON_DEPTH:
        # Parsed, but deep enough that validation or an error message's repr could recurse out.
        raise APIError(400, f"request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                       code="invalid_json")
    if not isinstance(raw, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(raw).__name__}",
                       code="invalid_json")
    try:
        req = ChatCompletionRequest.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        param = ".".join(str(p) for p in e["loc"]) or None
        raise APIError(400, f"{param or 'body'}: {e['msg']} (got {_short(e.get('input'))})",
                       param=param, code="invalid_value") from None
    if req.model not in (None, "", served_model_name):
        raise APIError(404, f"model {req.model!r} does not exist; this server serves {served_model_name!r}",
                       param="model", code="model_not_found", type="not_found_error")
    _unsupported(req)
    if len(req.messages) > limits.max_messages:
        raise APIError(400, f"{len(req.messages)} messages; at most {limits.max_messages} allowed",
                       param="messages", code="invalid_value")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = limits.default_max_tokens
    elif not 1 <= max_tokens <= limits.max_tokens:
        raise APIError(400, f"{param} = {max_tokens}: must be between 1 and {limits.max_tokens}",
                       param=param, code="invalid_value")
    if req.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens = {req.min_tokens} must be <= {param} = {max_tokens}",
                       param="min_tokens", code="invalid_value")
    messages, image, where = _conversation_and_image(req.messages, limits)
    temperature = default_temperature if req.temperature is None else req.temperature
    return ChatRequest(messages=messages, image=image, return_token_ids=req.return_token_ids, max_tokens=max_tokens, temperature=temperature,
                       top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stream=req.stream,
                       model=served_model_name, image_param=where, stop=_stop_strings(req.stop),
                       ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
                       include_usage=bool(req.stream_options and req.stream_options.include_usage))


MAX_STOP_STRINGS = 4  # OpenAI's limit


def _unsupported(req: ChatCompletionRequest) -> None:
    """Fields a client may send that this server cannot honour: a 400 naming the field,
    never an answer that silently ignores what was asked."""
    refused = [
        ("n", req.n != 1, f"n = {req.n}: only n = 1 is supported"),
        ("logprobs", bool(req.logprobs), "logprobs are not supported by this server"),
        ("top_logprobs", bool(req.top_logprobs), "top_logprobs are not supported by this server"),
        # vLLM's "no top-k" values are accepted; a real top-k is not implemented.
        ("top_k", req.top_k not in (None, -1, 0), f"top_k = {req.top_k}: not supported (use top_p)"),
        ("stream_options", req.stream_options is not None and not req.stream,
         "stream_options is only allowed with stream: true"),
        ("return_token_ids", req.return_token_ids and req.stream,
         "return_token_ids is supported without stream only"),
    ]
    for param, bad, message in refused:
        if bad:
            raise APIError(400, message, param=param, code="unsupported_parameter"
                           if param not in ("stream_options", "return_token_ids") else "invalid_value")


def _stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} non-empty strings", param="stop",
                       code="invalid_value")
    return stops


# A chat request is ~5 levels deep (messages[i].content[j].image_url.url); tools' JSON
# schemas go deeper. 64 leaves room for both and keeps every later step far from recursion limits.
MAX_JSON_DEPTH = 64


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _message_texts(msg: Message, i: int, images: list[tuple[str, str]]) -> list[str]:
    """A message's text parts; its image parts are appended to `images` as (param, url)."""
    if isinstance(msg.content, str):
        return [msg.content]
    texts = []
    for j, part in enumerate(msg.content or []):
        where = f"messages.{i}.content.{j}"
        kind = part.get("type")
        if kind == "text":
            texts.append(_validated(TextPart, part, where).text)
        elif kind == "image_url":
            if msg.role != "user":
                raise APIError(400, f"{where}: images are only accepted in user messages",
                               param=where, code="invalid_value")
            p = _validated(ImagePart, part, where)
            images.append((f"{where}.image_url", p.image_url if isinstance(p.image_url, str) else p.image_url.url))
        else:
            raise APIError(400, f"{where}: unsupported content part type {kind!r}; "
                           "allowed: 'text', 'image_url'", param=f"{where}.type", code="unsupported_content_type")
    return texts


def _conversation_and_image(messages: list[Message], limits: LimitsConfig
                            ) -> tuple[list[dict[str, str]], bytes, str]:
    """The request's conversation (system text first, then user / assistant turns, ending
    with the user's question; consecutive messages of one role joined by a newline) and
    its one image."""
    images: list[tuple[str, str]] = []  # (param path, url)
    system: list[str] = []
    turns: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        texts = _message_texts(msg, i, images)
        text = " ".join(t.strip() for t in texts if t.strip())
        if msg.role == "tool":
            raise APIError(400, f"messages.{i}: role 'tool' is not supported (this model calls no tools)",
                           param=f"messages.{i}.role", code="unsupported_value")
        if msg.role in ("system", "developer"):
            if turns:
                raise APIError(400, f"messages.{i}: a {msg.role} message after the conversation started; "
                               "system and developer messages go before the first user message",
                               param=f"messages.{i}.role", code="invalid_value")
            if text:
                system.append(text)
            continue
        if not turns and msg.role == "assistant":
            raise APIError(400, f"messages.{i}: the conversation starts with an assistant message; "
                           "it starts with a user message (after any system messages)",
                           param=f"messages.{i}.role", code="invalid_value")
        if turns and turns[-1]["role"] == msg.role:
            turns[-1]["content"] = "\n".join(t for t in (turns[-1]["content"], text) if t)
        else:
            turns.append({"role": msg.role, "content": text})
    if not turns:
        raise APIError(400, "messages: needs a user message", param="messages", code="invalid_value")
    if turns[-1]["role"] != "user":
        raise APIError(400, "the last message must be a user message (the question to answer)",
                       param=f"messages.{len(messages) - 1}.role", code="invalid_value")
    for k, turn in enumerate(turns):
        if not turn["content"]:
            what = "the last user message has no text (the question about the image)" if k == len(turns) - 1 \
                else f"an empty {turn['role']} turn (turn {k + 1})"
            raise APIError(400, what, param="messages", code="invalid_value")
    conversation = ([{"role": "system", "content": "\n".join(system)}] if system else []) + turns
    chars = sum(len(m["content"]) for m in conversation)
    if chars > limits.max_prompt_chars:
        raise APIError(400, f"the conversation is {chars} characters; at most "
                       f"{limits.max_prompt_chars} allowed", param="messages", code="invalid_value")
    if not images:
        raise APIError(400, "no image: add a user content part {\"type\": \"image_url\", \"image_url\": "
                       "{\"url\": \"data:image/png;base64,...\"}}", param="messages", code="missing_image")
    if len(images) > limits.max_images:
        raise APIError(400, f"{len(images)} images; at most {limits.max_images} per request "
                       "(the model answers about one image)", param=images[-1][0], code="too_many_images")
    where, url = images[0]
    return conversation, decode_image_url(url, where, limits), where


def _validated(model: type[BaseModel], part: dict, where: str):
    try:
        return model.model_validate(part)
    except ValidationError as err:
        e = err.errors()[0]
        param = ".".join([where, *(str(p) for p in e["loc"])])
        raise APIError(400, f"{param}: {e['msg']}", param=param, code="invalid_value") from None


_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def decode_image_url(url: str, where: str, limits: LimitsConfig) -> bytes:
    """A `data:image/...;base64,` URI -> image bytes, checked to be a readable image that is
    not too large. Only the header is parsed here; the VisionStage decodes the pixels."""
    if re.match(r"^(https?|ftp|file)://", url, re.IGNORECASE):
        raise APIError(400, f"{where}: only data URIs (data:image/png;base64,...) are accepted; "
                       "this server does not fetch URLs", param=where, code="unsupported_image_url")
    m = _DATA_URI.match(url)
    if not m:
        raise APIError(400, f"{where}: not a data URI; expected data:image/png;base64,...",
                       param=where, code="invalid_image_url")
    if m.group("mime") and not m.group("mime").lower().startswith("image/"):
        raise APIError(400, f"{where}: media type {m.group('mime')!r} is not an image",
                       param=where, code="invalid_image")
    if not m.group("b64"):
        raise APIError(400, f"{where}: the data URI must be base64-encoded (;base64,)",
                       param=where, code="invalid_image_url")
    payload = url[m.end():]
    # base64 grows 4/3: refuse before decoding what cannot fit.
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
        raise APIError(413, f"{where}: image is about {len(payload) * 3 // 4} bytes; at most "
                       f"{limits.max_image_bytes} allowed", param=where, code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise APIError(400, f"{where}: the data URI's payload is not valid base64 ({err})",
                       param=where, code="invalid_base64") from None
    if not data:
        raise APIError(400, f"{where}: the image is empty", param=where, code="invalid_image")
    if len(data) > limits.max_image_bytes:
        raise APIError(413, f"{where}: image is {len(data)} bytes; at most {limits.max_image_bytes} allowed",
                       param=where, code="image_too_large")
    check_image_header(data, where, limits)
    return data


def check_image_header(data: bytes, where: str, limits: LimitsConfig) -> None:
    """Pillow reads only the header here (format and size): cheap, and it stops a
    decompression bomb before any replica spends memory on it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height, fmt = img.width, img.height, img.format
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise APIError(400, f"{where}: not a decodable image ({len(data)} bytes): {err}",
                       param=where, code="invalid_image") from None
    if width * height > limits.max_image_pixels:
        raise APIError(413, f"{where}: {fmt} image is {width}x{height} = {width * height} pixels; at most "
                       f"{limits.max_image_pixels} allowed", param=where, code="image_too_large")


# ------------------------------------------------------------------ response shapes

def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def chat_completion(cid: str, model: str, content: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int,
                    token_ids: tuple[list[int], list[int]] | None = None) -> dict[str, Any]:
    """A chat completion; `token_ids` (prompt ids, answer ids): vLLM's `return_token_ids`
    fields (`prompt_token_ids`, and `token_ids` on the choice)."""
    out = {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }
    if token_ids is not None:
        out["prompt_token_ids"] = list(token_ids[0])
        out["choices"][0]["token_ids"] = list(token_ids[1])
    return out


def chat_chunk(cid: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(cid: str, model: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last chunk with `stream_options.include_usage`: no choices, the request's usage."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: {json}` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def models_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "raybench"}]}
