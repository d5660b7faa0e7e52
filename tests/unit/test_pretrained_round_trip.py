"""A model fine-tuned from real-style transformers checkpoints (tests/hf_checkpoints.py: a
whole SiglipModel, a Qwen3 with tied embeddings and spare embedding rows, a tokenizer with
no bos, pad or `<image>`) trains, saves, and loads again in a fresh offline process with
the same logits, its embeddings still tied and every embedding row kept."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hf_checkpoints import write_checkpoints

from raybench.config import validate_config
from raybench.data.processor import VQAProcessor
from raybench.data.synthetic import generate
from raybench.data.tokenizer import load_tokenizer, tokenizer_corpus
from raybench.model.vlm import HybridVLM
from raybench.train.loop import build_optimizer, build_scheduler, train_step

QUESTION = "What shape is in the top-left?"

# Runs in a fresh interpreter: nothing from this process (modules, caches, the hub) helps
# it. It also saves what it loaded and loads that: a reload must save as well as the original.
RELOAD = """
import sys, torch
from raybench.data.processor import VQAProcessor
from raybench.data.tokenizer import load_tokenizer
from raybench.model.vlm import HybridVLM
model_dir, inputs, out = sys.argv[1:]
model = HybridVLM.from_pretrained(HybridVLM.from_pretrained(model_dir).save_pretrained(model_dir + "-again"))
proc = VQAProcessor(load_tokenizer(model_dir), model.config.num_image_tokens, model.config.vision.image_size)
x = torch.load(inputs)
with torch.no_grad():
    logits = model(x["input_ids"], x["attention_mask"], x["pixel_values"], return_logits=True).logits
lm = model.llm
torch.save({"logits": logits, "prompt_ids": proc.prompt_ids(x["question"]),
            "tied": lm.lm_head.weight is lm.get_input_embeddings().weight,
            "rows": lm.get_input_embeddings().num_embeddings}, out)
"""


@pytest.fixture(scope="module")
def texts():
    return list(tokenizer_corpus(generate(60, 32, 0, "train")))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, texts):
    return write_checkpoints(tmp_path_factory.mktemp("hf"), texts)


def _config(vision, llm):
    return validate_config({"model": {"preset": "hybrid", "size": "tiny",
                                      "vision": {"pretrained_path": str(vision)},
                                      "llm": {"pretrained_path": str(llm)}},
                            "train": {"steps": 3, "warmup_steps": 1, "lr": 0.003}})


def _train(model: HybridVLM, proc: VQAProcessor, cfg) -> None:
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    rows = generate(8, proc.image_size, 0, "train").to_pydict()
    for _ in range(cfg.train.steps):
        train_step(model, proc.collate(rows), optimizer, scheduler, cfg.train.grad_clip)
    model.eval()


def _fixed_input(proc: VQAProcessor) -> dict:
    x = proc.encode_prompts([QUESTION])
    size = proc.image_size
    x["pixel_values"] = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    x["question"] = QUESTION
    return x


def _logits(model: HybridVLM, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(x["input_ids"], x["attention_mask"], x["pixel_values"], return_logits=True).logits


def test_fine_tuned_from_real_style_checkpoints_reloads_in_a_fresh_process(texts, tmp_path):
    vision, llm = write_checkpoints(tmp_path / "hf", texts)  # deleted before the reload
    cfg = _config(vision, llm)
    tok = load_tokenizer(llm)
    torch.manual_seed(0)
    model = HybridVLM.for_tokenizer(cfg.model, tok)
    embeddings = model.llm.get_input_embeddings()
    rows = json.loads((llm / "config.json").read_text())["vocab_size"]
    assert embeddings.num_embeddings == rows > len(tok)  # the spare rows stay
    assert model.llm.lm_head.weight is embeddings.weight
    before = embeddings.weight.detach().clone()
    proc = VQAProcessor(tok, cfg.model.num_image_tokens, cfg.model.vision.image_size)
    _train(model, proc, cfg)
    assert not torch.equal(before, embeddings.weight)
    assert model.llm.lm_head.weight is embeddings.weight  # still one tensor

    x = _fixed_input(proc)
    expected = _logits(model, x)
    out = model.save_pretrained(tmp_path / "model")  # as train_local saves
    tok.save_pretrained(str(out))
    torch.save(x, tmp_path / "inputs.pt")
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["vision"]["pretrained_path"] is None and saved["llm"]["pretrained_path"] is None
    shutil.rmtree(tmp_path / "hf")  # the saved model is whole without them

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(tmp_path / "inputs.pt"),
                          str(tmp_path / "reloaded.pt")], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "reloaded.pt")
    assert got["prompt_ids"] == proc.prompt_ids(QUESTION)
    assert got["tied"] and got["rows"] == rows == expected.shape[-1]
    assert torch.equal(got["logits"], expected)


@pytest.mark.parametrize("wrap", ["root", "block"])  # the CPU and the GPU default
def test_the_fsdp_export_of_tied_embeddings_loads_again(checkpoints, one_rank, wrap, tmp_path):
    """What a Ray Train worker exports: the gathered full state dict, which names the tied
    tensor twice, written by `save_pretrained(state_dict=...)`."""
    from raybench.train.checkpoint import full_state_dict
    from raybench.train.parallel import mixed_precision, parallelize

    vision, llm = checkpoints
    cfg = _config(vision, llm)
    tok = load_tokenizer(llm)
    torch.manual_seed(0)
    model = parallelize(HybridVLM.for_tokenizer(cfg.model, tok), one_rank, mixed_precision("cpu"), wrap=wrap)
    assert model.llm.lm_head.weight is model.llm.get_input_embeddings().weight
    proc = VQAProcessor(tok, cfg.model.num_image_tokens, cfg.model.vision.image_size)
    _train(model, proc, cfg)
    x = _fixed_input(proc)
    expected = _logits(model, x)
    out = model.save_pretrained(tmp_path / "model", state_dict=full_state_dict(model))

    loaded = HybridVLM.from_pretrained(out)
    assert loaded.llm.lm_head.weight is loaded.llm.get_input_embeddings().weight
    assert torch.equal(_logits(loaded, x), expected)


def test_answers_can_end_with_a_tokenizer_that_has_no_pad_token(checkpoints):
    """Generation and eval forbid the pad token; were it eos (a pad borrowed from eos), no
    answer could ever end and every exact match would fail."""
    vision, llm = checkpoints
    tok = load_tokenizer(llm)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    model = HybridVLM.for_tokenizer(_config(vision, llm).model, tok)
    logits = torch.zeros(1, model.llm.get_input_embeddings().num_embeddings)
    logits[0, tok.eos_token_id] = 1.0
    model.forbid_placeholders(logits)
    assert logits.argmax(-1).item() == tok.eos_token_id
