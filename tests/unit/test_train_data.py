"""Ray Data preprocessing without Ray: model-independent rows, expanded on the worker."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raybench.data.processor import VQAProcessor
from raybench.data.synthetic import generate
from raybench.data.tokenizer import build_tokenizer, save_tokenizer, tokenizer_corpus
from raybench.train.data import CollateNumpy, preprocess, to_model_batch

SIZE = 32


@pytest.fixture(scope="module")
def rows_and_tok(tmp_path_factory):
    table = generate(12, SIZE, seed=5, split="train")
    tok = build_tokenizer(tokenizer_corpus(table))
    tok_dir = save_tokenizer(tok, tmp_path_factory.mktemp("tok") / "tokenizer")
    rows = {k: np.array(v, dtype=object) for k, v in table.select(["image", "question", "answer", "qtype"])
            .to_pydict().items()}
    return rows, tok, tok_dir


@pytest.mark.parametrize("num_image_tokens", [1, 4, 18])
def test_worker_batch_equals_the_processor_layout(rows_and_tok, num_image_tokens):
    """One materialised data set serves every model: after expansion, a worker's batch is
    exactly what the processor builds for that model's image-token count."""
    rows, tok, tok_dir = rows_and_tok
    data = preprocess(rows, str(tok_dir), image_size=SIZE, max_length=40)
    assert data["input_ids"].shape[1] == 40  # fixed width in the object store
    batch = to_model_batch(CollateNumpy()(data), torch.device("cpu"), num_image_tokens)

    proc = VQAProcessor(tok, num_image_tokens, SIZE)
    want = proc.encode_train(list(rows["question"]), list(rows["answer"]))
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], want[key]), key
    assert (batch["input_ids"] == proc.image_token_id).sum(1).tolist() == [num_image_tokens] * 12
    assert torch.equal(batch["pixel_values"], proc.pixel_values(list(rows["image"])))
    assert batch["qtype"] == list(rows["qtype"])


def test_rows_about_one_image_encode_it_once(tmp_path):
    """questions_per_image > 1: the worker batch carries each image once and `image_index`,
    and the local collate builds the same batch from the Parquet rows."""
    table = generate(20, SIZE, seed=5, split="train", questions_per_image=4)
    tok = build_tokenizer(tokenizer_corpus(table))
    tok_dir = save_tokenizer(tok, tmp_path / "tokenizer")
    rows = {k: np.array(v, dtype=object) for k, v in table.select(["image", "question", "answer", "qtype"])
            .to_pydict().items()}
    images = list(rows["image"])
    distinct = [png for i, png in enumerate(images) if i == 0 or png != images[i - 1]]
    assert len(distinct) < len(images) == 20
    batch = to_model_batch(CollateNumpy()(preprocess(rows, str(tok_dir), image_size=SIZE, max_length=40)),
                           torch.device("cpu"), 4)
    proc = VQAProcessor(tok, 4, SIZE)
    assert torch.equal(batch["pixel_values"], proc.pixel_values(distinct))
    assert [distinct[i] for i in batch["image_index"].tolist()] == images
    local = proc.collate({k: list(v) for k, v in rows.items()})
    assert torch.equal(local["image_index"], batch["image_index"])
    assert torch.equal(local["pixel_values"], batch["pixel_values"])
    # One question per image: no image_index, the original layout.
    assert "image_index" not in proc.collate({k: list(v)[::4] for k, v in rows.items()})


def test_text_longer_than_max_length_is_refused(rows_and_tok):
    rows, _, tok_dir = rows_and_tok
    with pytest.raises(ValueError, match="max_length=8"):
        preprocess(rows, str(tok_dir), image_size=SIZE, max_length=8)


def test_group_shuffle_moves_whole_images_and_is_seeded(tmp_path):
    """The Ray workers' shuffle for questions_per_image > 1: every row once, each image's
    rows still consecutive (so `to_model_batch` encodes it once), the same order for the
    same seed (exact resume) and another one for the next epoch's seed."""
    from raybench.train.data import group_shuffled

    table = generate(60, SIZE, seed=5, split="train", questions_per_image=3)
    tok = build_tokenizer(tokenizer_corpus(table))
    tok_dir = save_tokenizer(tok, tmp_path / "tokenizer")
    rows = {k: np.array(v, dtype=object) for k, v in table.select(["image", "question", "answer", "qtype"])
            .to_pydict().items()}
    data = CollateNumpy()(preprocess(rows, str(tok_dir), image_size=SIZE, max_length=40))
    data["row"] = torch.arange(60)  # to follow the rows through the shuffle
    chunks = [{k: v[i:i + 24] for k, v in data.items()} for i in range(0, 60, 24)]  # 24 + 24 + 12 rows

    def order(seed):
        batches = list(group_shuffled(chunks, batch_size=8, seed=seed))
        assert all(len(b["row"]) == 8 and len(b["qtype"]) == 8 for b in batches)
        return batches, torch.cat([b["row"] for b in batches]).tolist()

    batches, rows0 = order(0)
    assert len(batches) == 3 + 3 + 1  # the 12-row chunk gives one whole batch; 4 rows dropped
    assert len(set(rows0)) == len(rows0) and rows0 != sorted(rows0)
    assert order(0)[1] == rows0 and order(1)[1] != rows0
    images = list(rows["image"])
    for a, b in zip(rows0, rows0[1:]):  # consecutive rows of one image stay consecutive
        if images[b] == images[a]:
            assert b == a + 1
    for b in batches:
        assert b["qtype"] == [rows["qtype"][i] for i in b["row"].tolist()]
        assert torch.equal(b["pixels"], data["pixels"][b["row"]])
    # Within each batch, each image appears once (no image split into two runs).
    first = batches[0]
    model_batch = to_model_batch({k: v for k, v in first.items() if k != "row"}, torch.device("cpu"), 4)
    assert len(model_batch["pixel_values"]) == len({images[i] for i in first["row"].tolist()}) < 8


@pytest.mark.parametrize("num_image_tokens", [1, 4])
def test_special_token_text_in_a_question_stays_text(rows_and_tok, num_image_tokens):
    """A Parquet question (or a served one) that spells "<image>" or "</s>" gets ordinary
    tokens: the rows still hold exactly the model's placeholders and one eos per answer."""
    rows, tok, tok_dir = rows_and_tok
    rows = {k: v.copy() for k, v in rows.items()}
    rows["question"][0] = "is <image> the </s> <s> square <pad>?"
    rows["answer"][0] = "<image>"
    batch = to_model_batch(CollateNumpy()(preprocess(rows, str(tok_dir), image_size=SIZE, max_length=60)),
                           torch.device("cpu"), num_image_tokens)
    proc = VQAProcessor(tok, num_image_tokens, SIZE)
    assert (batch["input_ids"] == proc.image_token_id).sum(1).tolist() == [num_image_tokens] * 12
    assert (batch["labels"] == proc.eos_id).sum(1).tolist() == [1] * 12
    assert (batch["input_ids"][0] == proc.bos_id).sum() == 1
    assert tok.decode(proc.text_ids(rows["question"][0])) == rows["question"][0]
    ids, labels = proc.conversation_ids([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<image>"}])
    assert proc.decode_answer([t for t in labels if t != -100]) == "<image>"


def test_scene_targets_ride_along_only_into_a_scene_stage_batch(tmp_path):
    from raybench.data.synthetic import scene_targets

    table = generate(12, SIZE, seed=2, split="train", qtypes=["describe", "color"])
    tok_dir = save_tokenizer(build_tokenizer(tokenizer_corpus(table)), tmp_path / "tokenizer")
    rows = {k: np.array(v, dtype=object) for k, v in table.select(["image", "question", "answer", "qtype"])
            .to_pydict().items()}
    data = CollateNumpy()(preprocess(rows, str(tok_dir), image_size=SIZE, max_length=80))
    for qtype, answer, targets in zip(rows["qtype"], rows["answer"], data["scene_targets"].tolist()):
        assert targets == (scene_targets(answer) if qtype == "describe" else [-100] * 9)
    assert "scene_targets" not in to_model_batch(data, torch.device("cpu"), 4)
    assert torch.equal(to_model_batch(data, torch.device("cpu"), 4, scene=True)["scene_targets"],
                       data["scene_targets"])
