"""Real-style transformers checkpoints (tests/hf_checkpoints.py: a whole SiglipModel, a Qwen3
with tied embeddings and spare embedding rows, a tokenizer with no bos, pad or `<image>`)
fine-tuned by 2 Ray Train FSDP2 workers, exported, loaded again, deployed as the 3-stage
Serve pipeline and asked over HTTP (the Ray-free round trip: tests/unit/test_pretrained_round_trip.py)."""

from __future__ import annotations

import base64
import io
import json
import random

import pytest
import requests
import torch
from hf_checkpoints import write_checkpoints

from raybench.config import validate_config
from raybench.data.synthetic import generate, render_scene, sample_scene
from raybench.data.tokenizer import tokenizer_corpus
from raybench.net import free_port
from raybench.train.trainer import fit

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

STEPS = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("pretrained_ray")
    vision, llm = write_checkpoints(tmp / "hf", list(tokenizer_corpus(generate(60, 32, 0, "train"))))
    cfg = validate_config({
        "name": "pretrained", "run_dir": str(tmp / "run"),
        "model": {"preset": "hybrid", "size": "tiny", "vision": {"pretrained_path": str(vision)},
                  "llm": {"pretrained_path": str(llm)}},
        "data": {"num_train": 64, "num_val": 16},
        "train": {"steps": STEPS, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1, "eval_every": STEPS,
                  "eval_samples": 16, "num_workers": 2, "cpus_per_worker": 0.45, "max_failures": 0}})
    result = fit(cfg)
    assert result.error is None
    return cfg, result


def test_the_exported_model_keeps_its_checkpoint_quirks_and_reproduces_the_sharded_eval(trained):
    from raybench.data.loader import read_split
    from raybench.data.processor import VQAProcessor
    from raybench.data.tokenizer import load_tokenizer
    from raybench.model.vlm import HybridVLM
    from raybench.train.local import COLUMNS, val_batches
    from raybench.train.loop import evaluate

    cfg, result = trained
    out = cfg.run_path / "model"
    model = HybridVLM.from_pretrained(out)
    lm = model.llm
    assert lm.lm_head.weight is lm.get_input_embeddings().weight
    tok = load_tokenizer(out)
    assert lm.get_input_embeddings().num_embeddings > len(tok)  # the checkpoint's spare rows
    assert tok.pad_token_id != tok.eos_token_id
    proc = VQAProcessor(tok, model.config.num_image_tokens, model.config.vision.image_size)
    val = read_split(cfg.data_path, "val", columns=COLUMNS).slice(0, cfg.train.eval_samples)
    # In the workers' batches: the loss is a token mean per batch, and this tokenizer's
    # answers differ in length, so other batches would weigh the tokens differently.
    per_worker = cfg.train.batch_size // cfg.train.num_workers
    fresh = evaluate(model, val_batches(val, proc, per_worker), [proc.image_token_id, proc.pad_id])
    assert fresh["val_loss"] == pytest.approx(result.metrics["val_loss"], rel=1e-6)


def test_deployed_it_answers_over_http_as_generate_does(trained, tmp_path, capsys):
    """...and a conversation (a system message, two earlier turns, the question) reaches the
    served LLM stage as the very prompt ids `raybench ask --messages` and the trainer render."""
    from raybench.cli import main
    from ray import serve

    from raybench.data.processor import VQAProcessor
    from raybench.data.tokenizer import load_tokenizer
    from raybench.model.vlm import HybridVLM
    from raybench.serve.app import build_application
    from raybench.serve.config import validate_serve_config

    cfg, _ = trained
    out = cfg.run_path / "model"
    scene, question, _ = sample_scene(random.Random(0), "shape")
    buf = io.BytesIO()
    render_scene(scene, cfg.model.vision.image_size).save(buf, format="PNG")
    model = HybridVLM.from_pretrained(out)
    proc = VQAProcessor(load_tokenizer(out), model.config.num_image_tokens, model.config.vision.image_size)
    p = proc.encode_prompts([question])
    with torch.no_grad():
        ids = model.generate(p["input_ids"], p["attention_mask"], proc.pixel_values([buf.getvalue()]),
                             max_new_tokens=6)[0].tolist()

    port = free_port()
    stage = {"num_cpus": 0.05, "max_batch_size": 4}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = validate_serve_config({"model": str(out), "ingress": {"num_cpus": 0.05},
                                     "vision": stage, "projection": stage, "llm": stage})
        serve.run(build_application(app), name="pretrained", route_prefix="/")
        image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = {"model": "raybench-vlm", "max_tokens": 6, "messages": [{"role": "user", "content": [
            {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": image}}]}]}
        r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
        history = [{"role": "system", "content": "Answer in one word."},
                   {"role": "user", "content": "what colour is the circle?"}, {"role": "assistant", "content": "red"},
                   {"role": "user", "content": "and its position?"}, {"role": "assistant", "content": "top-left"},
                   {"role": "user", "content": question}]
        sent = [dict(m) for m in history]
        sent[1]["content"] = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": history[1]["content"]}]
        chat = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": "raybench-vlm", "max_tokens": 6, "messages": sent, "return_token_ids": True})
    finally:
        serve.shutdown()
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == proc.decode_answer(ids)
    assert chat.status_code == 200, chat.text
    served = chat.json()["prompt_token_ids"]
    (tmp_path / "chat.json").write_text(json.dumps(history))
    (tmp_path / "scene.png").write_bytes(buf.getvalue())
    capsys.readouterr()
    assert main(["ask", "--model", str(out), "--image", str(tmp_path / "scene.png"), "--messages",
                 str(tmp_path / "chat.json"), "--max-tokens", "6", "--print-ids"]) == 0
    ask_ids, ask_answer = capsys.readouterr().out.splitlines()[:2]
    trained_ids, labels = proc.conversation_ids(history + [{"role": "assistant", "content": "circle"}])
    answer_starts = max(i for i, lb in enumerate(labels) if lb == -100 and i + 1 < len(labels)
                        and labels[i + 1] != -100) + 1
    assert served == json.loads(ask_ids) == trained_ids[:answer_starts]
    assert served.count(proc.image_token_id) == model.config.num_image_tokens
    assert chat.json()["choices"][0]["message"]["content"] == ask_answer.strip()
