"""Conversations through the chat template: the synthetic layout unchanged, the loss on
assistant turns only, prompts equal to the training prefix, both templates, both trainers'
batch layouts, per-turn accuracy, and data without qtype / split."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raybench.data.conversation import dumps, one_turn
from raybench.data.loader import read_split, validate_dataset
from raybench.data.processor import IGNORE_INDEX, VQAProcessor
from raybench.data.synthetic import generate
from raybench.data.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer, tokenizer_corpus
from raybench.train.data import CollateNumpy, preprocess, to_model_batch
from raybench.train.loop import merge_counts, turn_exact_match
from hf_checkpoints import write_tokenizer

SIZE = 16
CHAT = [{"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "what colour is the square?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and the <image> </s> <|im_end|> circle?"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "how many objects?"},
        {"role": "assistant", "content": "two"}]


@pytest.fixture(scope="module")
def synthetic():
    return generate(12, SIZE, seed=3, split="train")


@pytest.fixture(scope="module")
def own_tok(synthetic, tmp_path_factory):
    d = save_tokenizer(build_tokenizer(tokenizer_corpus(synthetic)), tmp_path_factory.mktemp("own"))
    return load_tokenizer(d), d


@pytest.fixture(scope="module")
def hf_tok(synthetic, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    write_tokenizer(d, list(tokenizer_corpus(synthetic)) + [m["content"] for m in CHAT])
    return load_tokenizer(d), d


def test_a_synthetic_row_renders_exactly_the_vqa_layout_it_always_trained_on(synthetic, own_tok):
    tok, _ = own_tok
    proc = VQAProcessor(tok, 4, SIZE)
    for q, a in zip(synthetic["question"].to_pylist(), synthetic["answer"].to_pylist()):
        plain = lambda t: tok.encode(t, add_special_tokens=False, split_special_tokens=True)  # noqa: E731
        prompt = [tok.bos_token_id] + [proc.image_token_id] * 4 + plain(q.strip())
        answer = plain(" " + a.strip()) + [tok.eos_token_id]
        ids, labels = proc.conversation_ids(one_turn(q, a))
        assert ids == prompt + answer
        assert labels == [IGNORE_INDEX] * len(prompt) + answer
        assert proc.prompt_ids(q) == prompt


@pytest.mark.parametrize("which", ["own_tok", "hf_tok"])
def test_loss_falls_on_assistant_turns_and_every_prompt_is_the_training_prefix(which, request):
    tok, _ = request.getfixturevalue(which)
    proc = VQAProcessor(tok, 3, SIZE)
    ids, labels = proc.conversation_ids(CHAT)
    assert ids.count(proc.image_token_id) == 3
    learned = [t for t in labels if t != IGNORE_INDEX]
    # Each assistant text, then the end of its turn: the model learns to stop there.
    expect = []
    for m in CHAT:
        if m["role"] == "assistant":
            text = (" " if proc.template.name == "raybench" else "") + m["content"]
            expect += proc.text_ids(text) + [proc.eos_id]
    assert learned == expect
    assert proc.decode_answer(learned) == "red"
    # The user's literal markup stays text: no stray image, eos or end-of-turn tokens.
    assert proc.tokenizer.decode(ids, skip_special_tokens=False).count("<image>") == 4  # 3 + the literal
    for k in (2, 4, 6):  # the prompt for each assistant turn is the ids before it, token for token
        prompt = proc.conversation_prompt_ids(CHAT[:k])
        assert ids[:len(prompt)] == prompt
        assert labels[len(prompt)] != IGNORE_INDEX and labels[len(prompt) - 1] == IGNORE_INDEX


def test_the_tokenizer_s_own_template_frames_the_turns_and_the_image_opens_the_first_user_turn(hf_tok):
    tok, _ = hf_tok
    proc = VQAProcessor(tok, 2, SIZE)
    assert proc.template.name == "tokenizer"
    prompt = proc.conversation_prompt_ids(CHAT[:2])
    text = tok.decode(prompt, skip_special_tokens=False)
    assert text == ("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\n<image><image>"
                    "what colour is the square?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("which", ["own_tok", "hf_tok"])
def test_ray_data_rows_expand_to_the_processor_s_layout_wherever_the_image_sits(which, request, synthetic):
    tok, tok_dir = request.getfixturevalue(which)
    n = 5
    convs = [CHAT, one_turn("what shape?", "circle"), CHAT[1:5]]
    rows = {"image": np.array(synthetic["image"].to_pylist()[:3], dtype=object),
            "messages": np.array([dumps(c) for c in convs], dtype=object),
            "qtype": np.array(["", "", ""], dtype=object)}
    batch = to_model_batch(CollateNumpy()(preprocess(rows, str(tok_dir), image_size=SIZE, max_length=120)),
                           torch.device("cpu"), n)
    proc = VQAProcessor(tok, n, SIZE)
    want = proc.collate({k: list(v) for k, v in rows.items()})
    width = int(want["attention_mask"].sum(1).max())
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key][:, :width], want[key][:, :width]), key


def test_per_turn_accuracy_splits_first_answers_from_follow_ups():
    labels = torch.tensor([[-100, 5, 6, -100, -100, 7, -100, 8],
                           [-100, -100, 5, 6, -100, -100, -100, -100]])
    logits = torch.zeros(2, 8, 10)
    right = labels.clamp(min=0)
    logits.scatter_(2, right.unsqueeze(-1), 1.0)
    logits[0, 5, 3] = 2.0  # row 0, turn 2 wrong
    assert turn_exact_match(logits, labels, []) == [[True, False, True], [True]]
    metrics = merge_counts([{"loss_sum": 0.0, "n": 2, "hits": {"": [1, 2]},
                             "turns": {"turn1": [1, 1], "followup": [1, 2]}}])
    assert metrics["accuracy"] == 0.5 and metrics["acc/turn1"] == 1.0 and metrics["acc/followup"] == 0.5
    assert not any(k == "acc/" for k in metrics)


def test_a_conversation_set_without_qtype_or_split_is_split_by_image(tmp_path, synthetic):
    images = synthetic["image"].to_pylist()
    rows = [images[i // 2] for i in range(24)]  # two conversations per image
    pq.write_table(pa.table({"image": pa.array(rows, pa.binary()),
                             "messages": [dumps(CHAT[1:3])] * 24}), tmp_path / "chat.parquet")
    counts = validate_dataset(tmp_path, splits=())
    assert sum(counts.values()) == 24 and set(counts) <= {"train", "val"}
    for split in counts:
        t = read_split(tmp_path, split, columns=["image", "messages", "qtype", "answer", "question"])
        assert t["qtype"].to_pylist() == [""] * t.num_rows
        assert t["answer"].to_pylist() == ["red"] * t.num_rows
        assert t["question"].to_pylist() == ["what colour is the square?"] * t.num_rows
        got = t["image"].to_pylist()
        assert all(got.count(img) == 2 for img in got)  # both rows of an image in one split
