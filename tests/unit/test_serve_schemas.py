"""Request validation, response shapes and the serve config: Ray-free and fast."""

from __future__ import annotations

import base64
import io
import json
import random

import logging

import pytest
import yaml
from PIL import Image

from raybench.config import ConfigError
from raybench.serve.config import LimitsConfig, ServeConfig, batch_user_config, load_serve_config, serve_config_yaml
from raybench.serve.model_source import check_model_dir, parse_models_uri
from raybench.serve.schemas import (APIError, chat_chunk, chat_completion, parse_chat_request, sse)

MODEL = "raybench-vlm"
LIMITS = LimitsConfig()


def png(size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def body(content=None, **kw) -> bytes:
    if content is None:
        content = [{"type": "text", "text": "what color is the circle?"},
                   {"type": "image_url", "image_url": {"url": data_uri(png())}}]
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}).encode()


def parse(raw: bytes, limits: LimitsConfig = LIMITS):
    return parse_chat_request(raw, limits, MODEL)


def refused(raw: bytes, limits: LimitsConfig = LIMITS) -> APIError:
    with pytest.raises(APIError) as info:
        parse(raw, limits)
    err = info.value
    assert 400 <= err.status < 500
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    return err


# ------------------------------------------------------------------ accepted requests

def test_parses_text_and_image_parts():
    req = parse(body(max_tokens=5, temperature=0))
    assert req.messages == [{"role": "user", "content": "what color is the circle?"}]
    assert req.image == png()
    assert (req.max_tokens, req.temperature, req.top_p, req.stream) == (5, 0.0, 1.0, False)
    assert req.image_param == "messages.0.content.1.image_url"


def test_defaults_and_aliases():
    req = parse(body())
    assert req.max_tokens == LIMITS.default_max_tokens and req.temperature == 0.0  # greedy by default
    assert parse(body(max_completion_tokens=3)).max_tokens == 3
    assert parse(body(stream=True, top_p=0.5, seed=7)).stream


def test_system_and_earlier_turns_reach_the_model_as_one_conversation():
    raw = json.dumps({"messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(png())}},
                                     {"type": "text", "text": "first question"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "  and the shape?  "},
        {"role": "user", "content": "quickly"},
    ], "user": "ignored-field"}).encode()
    req = parse(raw)
    assert req.messages == [{"role": "system", "content": "You are a helpful assistant.\nAnswer in one word."},
                            {"role": "user", "content": "first question"},
                            {"role": "assistant", "content": "red"},
                            {"role": "user", "content": "and the shape?\nquickly"}]
    assert req.image == png()


def _image_q() -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(png())}},
                                        {"type": "text", "text": "q"}]}


@pytest.mark.parametrize("messages, param", [
    ([_image_q(), {"role": "assistant", "content": "a"}], "messages.1.role"),
    ([{"role": "assistant", "content": "a"}, _image_q()], "messages.0.role"),
    ([_image_q(), {"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "messages.1.role"),
    ([_image_q(), {"role": "tool", "content": "{}"}, {"role": "user", "content": "q"}], "messages.1.role"),
])
def test_a_conversation_the_template_cannot_render_is_a_400_naming_the_message(messages, param):
    err = refused(json.dumps({"messages": messages}).encode())
    assert err.status == 400 and err.param == param


def test_return_token_ids_is_vllm_s_and_refused_with_stream():
    assert parse(body(return_token_ids=True)).return_token_ids
    assert refused(body(return_token_ids=True, stream=True)).param == "return_token_ids"


def test_image_url_as_plain_string_and_jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    req = parse(body([{"type": "text", "text": "q"}, {"type": "image_url", "image_url": data_uri(buf.getvalue(), "image/jpeg")}]))
    assert req.image == buf.getvalue()


# ------------------------------------------------------------------ refused requests

@pytest.mark.parametrize("raw, code", [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe", "invalid_json"),
    (b"[1, 2]", "invalid_json"),
    (b"{}", "invalid_value"),
    (json.dumps({"messages": []}).encode(), "invalid_value"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "invalid_value"),
])
def test_malformed_bodies(raw, code):
    err = refused(raw)
    assert (err.status, err.code) == (400, code)


@pytest.mark.parametrize("depth", [65, 900, 5000, 100_000])
def test_deeply_nested_json_is_a_400_not_a_recursion_error(depth):
    # Below Python's limit (900) it parses; past it (5000) the parser itself recurses out.
    nested = "[" * depth + "]" * depth
    raw = ('{"messages": [{"role": "user", "content": "hi"}], "user": %s}' % nested).encode()
    err = refused(raw)
    assert (err.status, err.code) == (400, "invalid_json") and "nested too deeply" in err.message


def test_missing_image():
    err = refused(body("what color is the circle?"))
    assert (err.status, err.code) == (400, "missing_image")
    assert "image_url" in err.message


def test_too_many_images():
    part = {"type": "image_url", "image_url": {"url": data_uri(png())}}
    err = refused(body([{"type": "text", "text": "q"}, part, part]))
    assert (err.status, err.code, err.param) == (400, "too_many_images", "messages.0.content.2.image_url")


def test_not_an_image():
    err = refused(body([{"type": "text", "text": "q"},
                        {"type": "image_url", "image_url": {"url": data_uri(b"hello, not a png")}}]))
    assert (err.status, err.code) == (400, "invalid_image")
    assert "not a decodable image" in err.message


def test_bad_base64():
    err = refused(body([{"type": "text", "text": "q"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!not base64!!!"}}]))
    assert (err.status, err.code) == (400, "invalid_base64")


@pytest.mark.parametrize("url, code", [
    ("https://example.com/cat.png", "unsupported_image_url"),
    ("http://127.0.0.1/cat.png", "unsupported_image_url"),
    ("data:image/png,rawbytes", "invalid_image_url"),
    ("data:text/plain;base64,aGVsbG8=", "invalid_image"),
    ("cat.png", "invalid_image_url"),
])
def test_only_base64_image_data_uris(url, code):
    err = refused(body([{"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": url}}]))
    assert (err.status, err.code) == (400, code)
    if code == "unsupported_image_url":
        assert "only data URIs" in err.message


def test_oversized_body_image_bytes_and_pixels():
    small = LimitsConfig(max_body_bytes=2048, max_image_bytes=1024, max_image_pixels=32 * 32)
    err = refused(body([{"type": "text", "text": "q" * 3000},
                        {"type": "image_url", "image_url": {"url": data_uri(png())}}]), small)
    assert (err.status, err.code) == (413, "request_too_large")
    noisy = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))  # incompressible
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    err = refused(body([{"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": data_uri(buf.getvalue())}}]),
                  LimitsConfig(max_image_bytes=1024))
    assert (err.status, err.code) == (413, "image_too_large")
    err = refused(body([{"type": "text", "text": "q"}, {"type": "image_url", "image_url": {"url": data_uri(png((64, 64)))}}]),
                  small.model_copy(update={"max_body_bytes": 2**20}))
    assert (err.status, err.code) == (413, "image_too_large")
    assert "64x64" in err.message


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("max_tokens", 10_000), ("max_completion_tokens", -1)])
def test_max_tokens_out_of_range(field, value):
    err = refused(body(**{field: value}))
    assert (err.status, err.param) == (400, field)
    assert f"between 1 and {LIMITS.max_tokens}" in err.message


def test_unsupported_content_type():
    err = refused(body([{"type": "text", "text": "q"}, {"type": "input_audio", "input_audio": {}}]))
    assert (err.status, err.code, err.param) == (400, "unsupported_content_type", "messages.0.content.1.type")


def test_other_parameters():
    assert refused(body(temperature=3)).param == "temperature"
    assert refused(body(n=2)).param == "n"
    err = refused(body(model="gpt-4o"))
    assert (err.status, err.code) == (404, "model_not_found")
    assert refused(body([{"type": "image_url", "image_url": {"url": data_uri(png())}}])).code == "invalid_value"


def test_vllm_extra_parameters_stop_and_stream_options():
    req = parse(body(max_tokens=8, stop="\n", ignore_eos=True, min_tokens=3, stream=True,
                     stream_options={"include_usage": True}))
    assert (req.stop, req.ignore_eos, req.min_tokens, req.include_usage) == (["\n"], True, 3, True)
    assert parse(body(stop=["a", "b"], top_k=-1)).stop == ["a", "b"]  # vLLM's "no top-k" is fine
    assert parse(body()).stop == [] and not parse(body()).include_usage
    assert refused(body(max_tokens=4, min_tokens=5)).param == "min_tokens"
    assert refused(body(stop=["a", "b", "c", "d", "e"])).param == "stop"
    assert refused(body(stop=[""])).param == "stop"
    assert refused(body(stream_options={"include_usage": True})).param == "stream_options"


@pytest.mark.parametrize("field, value", [("logprobs", True), ("top_logprobs", 2), ("top_k", 5), ("n", 3)])
def test_fields_the_server_cannot_honour_are_a_400_naming_them(field, value):
    err = refused(body(**{field: value}))
    assert (err.status, err.param, err.code) == (400, field, "unsupported_parameter")
    assert field in err.message


# ------------------------------------------------------------------ response shapes

def test_response_shapes():
    done = chat_completion("chatcmpl-1", MODEL, "red", "stop", 12, 2)
    assert done["object"] == "chat.completion"
    assert done["choices"][0]["message"] == {"role": "assistant", "content": "red"}
    assert done["usage"] == {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
    chunk = chat_chunk("chatcmpl-1", MODEL, 1, {"content": "red"})
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["finish_reason"] is None
    assert sse(chunk).startswith(b"data: {") and sse(chunk).endswith(b"\n\n")
    assert sse("[DONE]") == b"data: [DONE]\n\n"


# ------------------------------------------------------------------ serve config

def test_serve_config_errors_name_field_value_and_allowed():
    with pytest.raises(ConfigError, match=r"llm.num_cpus = -1"):
        load_serve_config(overrides=["llm.num_cpus=-1"])
    with pytest.raises(ConfigError, match=r"max_ongoing_requests = 4 must be >= max_batch_size = 8"):
        load_serve_config(overrides=["vision.max_batch_size=8", "vision.max_ongoing_requests=4"])
    with pytest.raises(ConfigError, match="not both"):
        load_serve_config(overrides=["llm.num_replicas=2", "llm.autoscaling_config={max_replicas: 3}"])
    with pytest.raises(ConfigError, match=r"topology = 'mesh'"):
        load_serve_config(overrides=["topology=mesh"])
    with pytest.raises(ConfigError, match=r"vision.max_batchsize"):
        load_serve_config(overrides=["vision.max_batchsize=3"])  # a typo is an error, not ignored


def test_overload_limits_and_llm_scheduling_are_settable_with_set():
    cfg = load_serve_config(overrides=["limits.max_queued_requests=8", "limits.request_timeout_s=5",
                                       "llm.scheduling=static"])
    assert (cfg.limits.max_queued_requests, cfg.limits.request_timeout_s) == (8, 5.0)
    assert batch_user_config(cfg.llm)["scheduling"] == "static"
    assert "scheduling" not in batch_user_config(load_serve_config().llm)  # the default is continuous
    with pytest.raises(ConfigError, match=r"limits.max_queued_requests = 0"):
        load_serve_config(overrides=["limits.max_queued_requests=0"])
    with pytest.raises(ConfigError, match=r"llm.scheduling = 'fifo'"):
        load_serve_config(overrides=["llm.scheduling=fifo"])


def test_serve_config_file_overrides_and_yaml(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"serve": {"llm": {"max_batch_size": 8, "num_replicas": 2}}}))
    cfg = load_serve_config(path, ["serve.vision.num_cpus=0.3"], model="/models/m", port=9000)
    assert (cfg.llm.max_batch_size, cfg.llm.num_replicas, cfg.vision.num_cpus, cfg.port) == (8, 2, 0.3, 9000)
    doc = yaml.safe_load(serve_config_yaml(cfg))
    app = doc["applications"][0]
    assert app["import_path"] == "raybench.serve.app:build_app"
    assert ServeConfig.model_validate(app["args"]) == cfg  # the args round-trip
    deps = {d["name"]: d for d in app["deployments"]}
    assert set(deps) == {"ChatIngress", "VisionStage", "ProjectionStage", "LLMStage"}
    assert deps["LLMStage"]["num_replicas"] == 2
    assert deps["LLMStage"]["user_config"] == {"max_batch_size": 8, "batch_wait_timeout_s": 0.0}
    assert deps["VisionStage"]["ray_actor_options"]["num_cpus"] == 0.3
    single = yaml.safe_load(serve_config_yaml(cfg.model_copy(update={"topology": "single"})))
    assert [d["name"] for d in single["applications"][0]["deployments"]] == ["VLMServer"]


def test_example_serve_config_is_valid():
    from pathlib import Path

    cfg = load_serve_config(Path(__file__).parents[2] / "jobs/configs/serve.yaml")
    assert cfg.topology == "pipeline"


def test_model_refs(tmp_path):
    assert parse_models_uri("models:/raybench-vlm@champion") == ("raybench-vlm", "champion", None)
    assert parse_models_uri("models:/raybench-vlm/3") == ("raybench-vlm", None, "3")
    with pytest.raises(ConfigError, match="expected models:/NAME@ALIAS"):
        parse_models_uri("models:/raybench-vlm")
    with pytest.raises(ConfigError, match="does not exist"):
        check_model_dir(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="missing model.safetensors, tokenizer.json"):
        check_model_dir(tmp_path)


def test_api_key_required_but_missing_refuses_to_start_open_server_warns(caplog):
    from raybench.serve.config import api_key

    cfg = ServeConfig(api_key_env="K")
    assert api_key(cfg, {"K": "s3cret"}) == "s3cret"
    # Once Ray is imported its loggers stop propagating to the root: listen on the logger itself.
    logger = logging.getLogger("ray.serve")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger="ray.serve"):
            assert api_key(cfg, {}) is None  # vLLM without --api-key: open, but never silently
    finally:
        logger.removeHandler(caplog.handler)
    assert "WITHOUT authentication" in caplog.text
    required = ServeConfig(api_key_env="K", require_api_key=True)
    for env in ({}, {"K": ""}):  # an optional Secret that is absent arrives as nothing or ""
        with pytest.raises(ConfigError, match="require_api_key = true but K is not set"):
            api_key(required, env)
    assert api_key(required, {"K": "s3cret"}) == "s3cret"
