"""Ray Serve end to end: a real local Ray, real Serve, plain HTTP on 127.0.0.1.

One Ray instance for the module, two applications on one Serve HTTP port:
- `/`      the 3-stage pipeline serving a tiny trained model from its directory;
- `/auth`  the single-deployment topology serving the same weights through the MLflow
           registry (`models:/raybench-vlm@champion`, real sqlite store), with bearer auth.
Then `raybench deploy` itself runs as a subprocess with its own local Ray.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
import yaml

from raybench.config import load_config
from raybench.net import free_port
from raybench.data.synthetic import render_scene, sample_scene

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

MAX_TOKENS = 8
API_KEY_ENV, API_KEY = "RAYBENCH_TEST_API_KEY", "s3cret-token"
LIMITS = {"max_body_bytes": 256 * 1024, "max_image_pixels": 256 * 256, "max_tokens": 32}
AUTH_QUEUE, LONG = 2, 900  # the /auth app: requests it lets wait, and a long answer (of a 1024 context)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def png(seed: int, qtype: str) -> tuple[bytes, str]:
    scene, question, _ = sample_scene(random.Random(seed), qtype)
    buf = io.BytesIO()
    render_scene(scene, 32).save(buf, format="PNG")
    return buf.getvalue(), question


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat_body(image: bytes, question: str, **kw) -> dict:
    return {"model": "raybench-vlm", "max_tokens": MAX_TOKENS, **kw, "messages": [{"role": "user", "content": [
        {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": data_uri(image)}}]}]}


CASES = [png(seed, q) for seed, q in enumerate(["shape", "color", "position", "count", "shape", "glyph"])]


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny hybrid model trained for 60 steps (~10 s): it answers, mostly wrongly, but not blank."""
    from raybench.train.local import train_local

    run = tmp_path_factory.mktemp("serve_model") / "run"
    cfg = load_config(Path(__file__).parents[2] / "jobs/configs/smoke.yaml",
                      [f"run_dir={run}", "train.steps=60", "train.eval_every=1000", "train.eval_samples=32"])
    train_local(cfg, log=lambda *_: None)
    return run / "model"


@pytest.fixture(scope="module")
def expected(model_dir):
    """The model's own `generate()` per case: (answer text, completion tokens incl. eos, finish reason)."""
    from raybench.data.processor import VQAProcessor
    from raybench.data.tokenizer import load_tokenizer
    from raybench.model.vlm import HybridVLM

    model = HybridVLM.from_pretrained(model_dir)
    proc = VQAProcessor(load_tokenizer(model_dir), model.config.num_image_tokens, model.config.vision.image_size)
    out = []
    for image, question in CASES:
        p = proc.encode_prompts([question])
        with torch.no_grad():
            ids = model.generate(p["input_ids"], p["attention_mask"], proc.pixel_values([image]),
                                 max_new_tokens=MAX_TOKENS)[0].tolist()
        stop = proc.eos_id in ids
        out.append((proc.decode_answer(ids), ids.index(proc.eos_id) + 1 if stop else len(ids),
                    "stop" if stop else "length"))
    assert any(text for text, _, _ in out), "the fixture model answers blank everywhere: a weak test"
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory, model_dir):
    """A real sqlite MLflow registry with the model as `raybench-vlm@champion` (as a sweep registers it)."""
    from mlflow.tracking import MlflowClient

    from raybench.track import register_champion

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("serve-test", artifact_location=str(root / "artifacts"))
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    register_champion(uri, run.info.run_id)  # an MLflow pyfunc whose artifact holds the model dir
    return uri, root


@pytest.fixture(scope="module")
def server(model_dir, registry, ray_session):
    """Both applications on the session's local Ray; yields the base URL."""
    from ray import serve

    from raybench.serve.app import build_application
    from raybench.serve.config import load_serve_config, validate_serve_config
    from raybench.serve.model_source import check_model_ref

    # ray_session: no RAYBENCH_API_KEY (the main app runs without auth), a RAYBENCH_MODEL_CACHE
    # of its own for the registry download (both inherited by the replicas).
    tracking_uri, _ = registry
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Small CPU reservations: the module's last tests run Ray Train and Ray Data (1-CPU tasks)
        # in this same 2-CPU Ray, beside both apps; 0.2 per replica left them waiting minutes.
        stage = {"num_cpus": 0.05, "max_batch_size": 16, "max_ongoing_requests": 64}
        raw = {"model": str(model_dir), "limits": LIMITS, "ingress": {"num_cpus": 0.05},
               "vision": stage, "projection": stage, "llm": stage}
        serve.run(build_application(validate_serve_config(raw)), name="raybench", route_prefix="/")
        pinned = check_model_ref("models:/raybench-vlm@champion", tracking_uri)
        # One decode slot and room for 2 waiting: the overload and cancellation tests fill it.
        auth = load_serve_config(None, [f"model={pinned}", f"tracking_uri={tracking_uri}", "topology=single",
                                        f"api_key_env={API_KEY_ENV}", "route_prefix=/auth", "name=auth",
                                        "ingress.num_cpus=0.05", "llm.num_cpus=0.05", "llm.max_batch_size=1",
                                        f"limits.max_queued_requests={AUTH_QUEUE}", f"limits.max_tokens={LONG}"])
        # The key reaches the replica as `raybench deploy` passes it: through runtime_env only.
        serve.run(build_application(auth, {API_KEY_ENV: API_KEY}), name="auth", route_prefix="/auth")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def post(url: str, body, session=None, **kw) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (session or requests).post(url + "/v1/chat/completions", data=data,
                                      headers={"Content-Type": "application/json", **kw.pop("headers", {})},
                                      timeout=60, **kw)


def stage_pids(server) -> dict[str, list[int]]:
    stats = requests.get(server + "/v1/stats", timeout=30).json()["stages"]
    return {k: sorted(r["pid"] for r in v) for k, v in stats.items()}


# ------------------------------------------------------------------ tests

def test_health_models_and_unknown_routes(server):
    for path in ("/health", "/healthz"):
        assert requests.get(server + path, timeout=10).json() == {"status": "ok"}
    models = requests.get(server + "/v1/models", timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "raybench-vlm"
    r = requests.get(server + "/v2/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = requests.get(server + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_answer_equals_generate(server, expected):
    """Sequential requests run unbatched (batch size 1 in every stage): exactly generate()'s tokens."""
    with requests.Session() as s:
        for (image, question), (text, n_tokens, finish) in zip(CASES, expected):
            r = post(server, chat_body(image, question), s)
            assert r.status_code == 200, r.text
            assert r.headers["x-raybench-batch-sizes"] == "vision=1,projection=1,llm=1"
            out = r.json()
            assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
            choice = out["choices"][0]
            assert choice["message"] == {"role": "assistant", "content": text}
            assert choice["finish_reason"] == finish
            assert out["usage"]["completion_tokens"] == n_tokens
            assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + n_tokens


def test_stream_is_sse_and_concatenates_to_the_answer(server, expected):
    image, question = CASES[1]
    r = requests.post(server + "/v1/chat/completions", json=chat_body(image, question, stream=True),
                      stream=True, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected[1][0]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def _truncated_png() -> bytes:
    data, _ = CASES[0]
    return data[: len(data) // 2]  # a valid PNG header, pixels cut off: only the real decode notices


def _bad_cases():
    good_image, q = CASES[0]
    text = {"type": "text", "text": q}
    img = {"type": "image_url", "image_url": {"url": data_uri(good_image)}}

    def with_parts(*parts, **kw):
        return {"messages": [{"role": "user", "content": list(parts)}], **kw}

    big = io.BytesIO()
    from PIL import Image
    Image.new("RGB", (300, 300)).save(big, format="PNG")
    return [
        ("malformed json", b'{"messages": [', 400, "invalid_json", "not valid JSON"),
        # Past Python's recursion limit the JSON parser itself raises RecursionError (was a 500).
        ("deeply nested json", b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "invalid_json",
         "nested too deeply"),
        ("missing image", with_parts(text), 400, "missing_image", "no image"),
        ("not an image", with_parts(text, {"type": "image_url", "image_url": {"url": data_uri(b"GIF? no, text")}}),
         400, "invalid_image", "not a decodable image"),
        ("truncated image", with_parts(text, {"type": "image_url", "image_url": {"url": data_uri(_truncated_png())}}),
         400, "invalid_image", "not a decodable image"),
        ("bad base64", with_parts(text, {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}),
         400, "invalid_base64", "not valid base64"),
        ("http url", with_parts(text, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}),
         400, "unsupported_image_url", "only data URIs"),
        ("oversized body", with_parts({"type": "text", "text": "x" * (300 * 1024)}, img), 413, "request_too_large",
         "at most 262144"),
        ("oversized image", with_parts(text, {"type": "image_url", "image_url": {"url": data_uri(big.getvalue())}}),
         413, "image_too_large", "300x300"),
        ("too many images", with_parts(text, img, img), 400, "too_many_images", "at most 1"),
        ("max_tokens 0", with_parts(text, img, max_tokens=0), 400, "invalid_value", "between 1 and 32"),
        ("max_tokens too big", with_parts(text, img, max_tokens=33), 400, "invalid_value", "between 1 and 32"),
        ("unsupported part", with_parts(text, img, {"type": "input_audio", "input_audio": {"data": ""}}), 400,
         "unsupported_content_type", "input_audio"),
    ]


def test_bad_input_is_a_4xx_json_error_and_the_server_lives_on(server, expected):
    pids = stage_pids(server)
    with requests.Session() as s:
        for name, body, status, code, words in _bad_cases():
            r = post(server, body, s)
            assert r.status_code == status, (name, r.status_code, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, name
            assert err["code"] == code and words in err["message"], (name, err)
            image, question = CASES[0]
            ok = post(server, chat_body(image, question), s)  # the next good request still succeeds
            assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == expected[0][0]
    assert stage_pids(server) == pids, "a replica was restarted by bad input"


def test_special_token_text_in_a_question_is_answered_as_text(server, model_dir):
    """A question that spells "<image>" (or "</s>") is text: the LLM stage used to see one
    placeholder too many and answer 500; now it answers exactly what generate() gives."""
    from raybench.data.processor import VQAProcessor
    from raybench.data.tokenizer import load_tokenizer
    from raybench.model.vlm import HybridVLM

    image, _ = CASES[1]
    question = "what color is <image> the </s> square?"
    model = HybridVLM.from_pretrained(model_dir)
    proc = VQAProcessor(load_tokenizer(model_dir), model.config.num_image_tokens, model.config.vision.image_size)
    p = proc.encode_prompts([question])
    with torch.no_grad():
        ids = model.generate(p["input_ids"], p["attention_mask"], proc.pixel_values([image]),
                             max_new_tokens=MAX_TOKENS)[0].tolist()
    r = post(server, chat_body(image, question))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == proc.decode_answer(ids)
    assert r.json()["usage"]["prompt_tokens"] == p["input_ids"].shape[1]


def _load(server, n_clients: int, n_requests: int, on_start=None) -> tuple[list, list]:
    """A closed loop: n_clients keep-alive sessions, each sends its next request when the last returns."""
    results, errors, lock = [], [], threading.Lock()
    counter = iter(range(n_requests))

    def client():
        with requests.Session() as s:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                image, question = CASES[i % len(CASES)]
                try:
                    r = post(server, chat_body(image, question), s)
                    with lock:
                        (results if r.status_code == 200 else errors).append((i, r))
                except requests.RequestException as err:
                    with lock:
                        errors.append((i, err))

    with ThreadPoolExecutor(n_clients) as pool:
        futures = [pool.submit(client) for _ in range(n_clients)]
        if on_start:
            on_start()
        for f in futures:
            f.result()
    return results, errors


def test_bounded_load_no_errors_and_real_batches(server, expected):
    t0 = time.monotonic()
    results, errors = _load(server, n_clients=24, n_requests=240)
    elapsed = time.monotonic() - t0
    assert not errors, [(i, getattr(e, "text", e)) for i, e in errors[:3]]
    sizes = [dict(kv.split("=") for kv in r.headers["x-raybench-batch-sizes"].split(",")) for _, r in results]
    largest = {stage: max(int(s[stage]) for s in sizes) for stage in ("vision", "projection", "llm")}
    assert all(v > 1 for v in largest.values()), largest
    # The stages' own counters agree that batches bigger than one ran.
    stats = requests.get(server + "/v1/stats", timeout=30).json()["stages"]
    assert all(max(r["max_batch_size_seen"] for r in stats[k]) > 1 for k in stats), stats
    # Batched greedy decoding gives the unbatched tokens on this model (left padding changes no result).
    mismatched = [i for i, r in results if r.json()["choices"][0]["message"]["content"] != expected[i % len(CASES)][0]]
    assert not mismatched, f"{len(mismatched)} batched answers differ from generate()"
    print(f"\n240 requests, 24 clients: {240 / elapsed:.1f} req/s, largest batches {largest}")


def test_replica_killed_under_load_is_replaced(server):
    from ray.util.state import list_actors

    def vision_replicas():
        return [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                if a.class_name.endswith(":raybench:VisionStage")]

    before = vision_replicas()
    assert len(before) == 1
    killed = before[0].pid

    def kill():
        time.sleep(1.0)  # mid-load
        os.kill(killed, signal.SIGKILL)

    results, errors = _load(server, n_clients=16, n_requests=200, on_start=kill)
    assert len(errors) <= 2, [(i, getattr(e, "text", e)) for i, e in errors[:3]]  # near zero: the ingress retries
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = vision_replicas()
        if len(now) == 1 and now[0].pid != killed:
            break
        time.sleep(0.5)
    else:
        pytest.fail("Serve did not replace the killed VisionStage replica within 60 s")
    image, question = CASES[0]
    assert post(server, chat_body(image, question)).status_code == 200
    print(f"\nkilled VisionStage pid {killed} under load: {len(errors)} of 200 requests failed",
          [(i, getattr(e, "status_code", None), getattr(e, "text", repr(e))[:300]) for i, e in errors])


def test_auth_and_registry_model(server, expected):
    url = server + "/auth"
    image, question = CASES[0]
    assert requests.get(url + "/health", timeout=10).status_code == 200  # health stays open
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = post(url, chat_body(image, question), headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(url + "/v1/models", timeout=10).status_code == 401
    r = post(url, chat_body(image, question), headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    # Same weights, loaded by the replica from models:/raybench-vlm/1 through the registry.
    assert r.json()["choices"][0]["message"]["content"] == expected[0][0]


def sse_events(r: requests.Response) -> list[tuple[float, str]]:
    """(arrival time, data) of each server-sent event, as the client reads them."""
    return [(time.monotonic(), line[len("data: "):]) for line in r.iter_lines(decode_unicode=True) if line]


def test_stream_sends_tokens_as_decoded_and_the_usage_when_asked(server):
    image, question = CASES[2]
    t0 = time.monotonic()
    with requests.post(server + "/v1/chat/completions", stream=True, timeout=60, json=chat_body(
            image, question, max_tokens=32, ignore_eos=True, stream=True,
            stream_options={"include_usage": True})) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1][1] == "[DONE]"
    chunks = [(t, json.loads(e)) for t, e in events[:-1]]
    usage = chunks[-1][1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 32  # ignore_eos: all 32
    assert chunks[-2][1]["choices"][0]["finish_reason"] == "length"
    # The role chunk goes out with the first token, long before the 32nd is decoded.
    first, last = chunks[0][0] - t0, chunks[-2][0] - t0
    assert first < last, (first, last)


def test_fields_the_server_cannot_honour_are_refused(server):
    image, question = CASES[0]
    for field, value in (("logprobs", True), ("top_k", 4), ("n", 2)):
        r = post(server, chat_body(image, question, **{field: value}))
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def _llm_stats(url: str) -> dict:
    return requests.get(url + "/v1/stats", headers=AUTH, timeout=30).json()["stages"]["llm"][0]


def test_a_client_that_disconnects_frees_its_slot(server):
    """/auth has one decode slot: a long streamed answer whose client goes away is dropped at
    the next decode step (counted as cancelled, never finished), and the slot serves the next."""
    url = server + "/auth"
    image, question = CASES[0]
    before = _llm_stats(url)["cancelled_rows"]
    with requests.post(url + "/v1/chat/completions", stream=True, timeout=60, headers=AUTH, json=chat_body(
            image, question, max_tokens=LONG, ignore_eos=True, stream=True)) as r:
        lines = r.iter_lines(decode_unicode=True)
        assert next(line for line in lines if line).startswith("data: ")  # the first token is out
    deadline = time.monotonic() + 30
    while (_llm_stats(url)["cancelled_rows"] == before or _llm_stats(url)["rows"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    stats = _llm_stats(url)
    assert stats["cancelled_rows"] == before + 1 and stats["rows"] == 0, stats
    assert post(url, chat_body(image, question), headers=AUTH).status_code == 200


def test_a_full_queue_answers_429_with_retry_after(server):
    """One slot, 2 waiting: of 10 long requests at once the rest are refused at once, and
    every request is answered 200 or 429."""
    url = server + "/auth"
    image, question = CASES[0]
    body = chat_body(image, question, max_tokens=64, ignore_eos=True)
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: post(url, body, headers=AUTH), range(10)))
    codes = sorted(r.status_code for r in answers)
    assert set(codes) == {200, 429} and codes.count(200) >= AUTH_QUEUE, codes
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and "max_queued_requests" in refused.text
    assert all(r.json()["usage"]["completion_tokens"] == 64 for r in answers if r.status_code == 200)


def test_metrics_are_exported_through_ray(server):
    """The server's own metrics reach Ray's Prometheus endpoint (what a scrape or the
    dashboard reads), tagged by Serve with the deployment."""
    import ray

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    image, question = CASES[0]
    assert post(server, chat_body(image, question)).status_code == 200
    wanted = ("ray_raybench_time_to_first_token_seconds_bucket", "ray_raybench_requests_total",
              "ray_raybench_inter_token_latency_seconds_bucket", "ray_raybench_generated_tokens_total",
              'ray_raybench_batch_size_bucket{', 'stage="llm"', 'stage="vision"', "ray_raybench_queue_length")
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    assert 'deployment="LLMStage"' in text


def test_gpu_check_dry_run_in_this_ray(server, tmp_path):
    """scripts/gpu-check.sh --dry-run's steps (tiny size, CPU) in this module's Ray and Serve, so
    the check adds no start-up: 2 Ray Train steps on one worker, the fusion subset, a compiled
    prefill (backend eager), and one request to its own 3-stage app, removed afterwards."""
    from raybench.gpu_check import FUSION_PRESETS, run_check

    out = tmp_path / "gpu-check"
    figures = run_check(out, dry_run=True, steps=2, port=int(server.rsplit(":", 1)[1]))
    assert figures["ok"], figures
    assert figures["train"]["steps"] == 2 and figures["train"]["gpu_workers"] is False
    assert [r["preset"] for r in figures["fusion"]] == list(FUSION_PRESETS)
    assert figures["compile"]["backend"] == "eager" and figures["compile"]["compiled_ms"] > 0
    assert figures["serve"]["stage_devices"] == {"vision": ["cpu"], "projection": ["cpu"], "llm": ["cpu"]}
    assert isinstance(figures["serve"]["answer"], str)
    assert json.loads((out / "gpu-check.json").read_text()) == figures
    assert requests.get(server + "/gpu-check/health", timeout=10).status_code == 404  # its app is gone


def test_serve_config_yaml_is_a_valid_serve_deploy_config(model_dir, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from raybench.cli import main
    from raybench.serve.app import build_app

    out = tmp_path / "serve_config.yaml"
    assert main(["deploy", "--checkpoint", str(model_dir), "--config", "jobs/configs/serve.yaml",
                 "--set", "llm.num_replicas=2", "--print-serve-config", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    schema = ServeDeploySchema.parse_obj(doc) if hasattr(ServeDeploySchema, "parse_obj") \
        else ServeDeploySchema.model_validate(doc)
    app = schema.applications[0]
    assert app.import_path == "raybench.serve.app:build_app"
    assert {d.name for d in app.deployments} == {"ChatIngress", "VisionStage", "ProjectionStage", "LLMStage"}
    build_app(app.args)  # what `serve deploy` calls on the cluster builds the application
    # `serve run raybench.serve.app:build_app model=... llm.max_batch_size=4` passes flat strings.
    build_app({"model": str(model_dir), "llm.max_batch_size": "4", "llm.max_ongoing_requests": "8"})


def test_deploy_validates_before_ray_starts(tmp_path):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "raybench.cli", "deploy", "--checkpoint", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "model directory does not exist" in r.stderr
    r = subprocess.run([sys.executable, "-m", "raybench.cli", "deploy", "--checkpoint", str(tmp_path),
                        "--set", "llm.max_batch_size=0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "llm.max_batch_size = 0" in r.stderr
    env = {k: v for k, v in os.environ.items() if k != "RAYBENCH_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "raybench.cli", "deploy", "--checkpoint", str(tmp_path),
                        "--set", "require_api_key=true"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and "refusing to serve without authentication" in r.stderr
    assert time.monotonic() - t0 < 30


def test_deploy_command_serves_until_interrupted(model_dir, expected, tmp_path):
    """`raybench deploy` as a user runs it: its own local Ray, the URL printed, Ctrl-C stops it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYBENCH_API_KEY")}
    log = (tmp_path / "deploy.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "raybench.cli", "deploy", "--checkpoint", str(model_dir),
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 150
        while "serving raybench-vlm" not in (tmp_path / "deploy.log").read_text():
            assert proc.poll() is None, (tmp_path / "deploy.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "deploy did not come up"
            time.sleep(0.5)
        assert f"{url}/v1/chat/completions" in (tmp_path / "deploy.log").read_text()
        image, question = CASES[0]
        r = post(url, chat_body(image, question))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected[0][0]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
    assert rc == 0, (tmp_path / "deploy.log").read_text()[-3000:]
    text = (tmp_path / "deploy.log").read_text()
    assert "stopping" in text
    assert "graceful_shutdown failed" not in text, "serve.shutdown() killed the controller mid-task"
