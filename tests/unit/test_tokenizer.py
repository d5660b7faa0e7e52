"""The offline BPE tokenizer: special tokens, lossless byte-level encoding, one token per
synthetic answer word, deterministic training and an offline save/load round trip."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from raybench.data.synthetic import answer_vocabulary, generate
from raybench.data.tokenizer import (IMAGE_TOKEN, SPECIAL_TOKENS, build_tokenizer, image_token_id,
                                     load_tokenizer, save_tokenizer, tokenizer_corpus)

TEXTS = ["héllo wörld", "digits 0123456789", "tabs\tand\nnewlines", "emoji 🙂 and 中文", "a-b c--d  e"]


@pytest.fixture(scope="module")
def table():
    return generate(300, 16, seed=0, split="train")


@pytest.fixture(scope="module")
def tok(table):
    return build_tokenizer(tokenizer_corpus(table))


def _ids(t, text: str) -> list[int]:
    return t.encode(text, add_special_tokens=False)


def test_special_tokens(tok):
    assert tok.image_token_id == image_token_id(tok) == tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert _ids(tok, IMAGE_TOKEN) == [image_token_id(tok)]
    assert IMAGE_TOKEN in tok.all_special_tokens
    ids = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, image_token_id(tok)]
    assert ids == [0, 1, 2, 3, 4]
    for name, text in SPECIAL_TOKENS.items():
        assert getattr(tok, name) == text


def test_encode_adds_nothing(tok):
    assert _ids(tok, "what") == [tok.convert_tokens_to_ids("what")]
    assert tok.encode("what", add_special_tokens=True) == _ids(tok, "what")


@pytest.mark.parametrize("text", TEXTS)
def test_any_text_round_trips(tok, text):
    ids = _ids(tok, text)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_synthetic_words_are_single_tokens(tok, table):
    for qtype, answers in answer_vocabulary().items():
        for answer in answers:
            assert len(_ids(tok, " " + answer)) == 1, (qtype, answer)
    for question in set(table["question"].to_pylist()):
        words = question.removesuffix("?").split(" ")
        assert len(_ids(tok, question)) == len(words) + 1, question  # + the "?"


def test_decode_skips_specials(tok):
    ids = [tok.bos_token_id, image_token_id(tok), *_ids(tok, "what color"), tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "what color"


def test_corpus_has_answers_with_a_leading_space(table):
    corpus = list(tokenizer_corpus([table.slice(0, 2), table.slice(2, 1)]))
    assert corpus == [table["question"][0].as_py(), " " + table["answer"][0].as_py(),
                      table["question"][1].as_py(), " " + table["answer"][1].as_py(),
                      table["question"][2].as_py(), " " + table["answer"][2].as_py()]


def test_build_is_deterministic(tok, table):
    again = build_tokenizer(tokenizer_corpus(table))
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert len(tok) <= 512


def test_vocab_size_bounds():
    small = build_tokenizer(["aa bb cc dd ee"] * 3, vocab_size=262)
    assert len(small) == 262
    with pytest.raises(ValueError, match="vocab_size = 100"):
        build_tokenizer(["x"], vocab_size=100)


def test_save_load_offline(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    out = save_tokenizer(tok, tmp_path / "tok")
    assert (out / "tokenizer.json").exists()
    loaded = load_tokenizer(out)
    assert len(loaded) == len(tok)
    assert image_token_id(loaded) == image_token_id(tok)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == \
        (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    for text in [*TEXTS, "where is the blue circle?", " top-left", IMAGE_TOKEN]:
        assert _ids(loaded, text) == _ids(tok, text)


def test_load_foreign_tokenizer_adds_image_token(tmp_path, monkeypatch):
    """A real LLM's tokenizer (here: a stand-in with only an eos token) gets `<image>` and a pad."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["hello world"] * 3, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    foreign = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    with pytest.raises(ValueError, match="no <image> token"):
        image_token_id(foreign)
    foreign.save_pretrained(tmp_path)

    loaded = load_tokenizer(tmp_path)
    assert len(loaded) == len(foreign) + 2  # <image> and <pad>: the caller resizes embeddings to this
    assert image_token_id(loaded) == len(foreign)
    assert _ids(loaded, "hello " + IMAGE_TOKEN)[-1] == image_token_id(loaded)
    assert loaded.bos_token_id == loaded.eos_token_id
    assert loaded.pad_token == "<pad>"  # never eos, which generation must be free to emit
    assert _ids(loaded, "hello world") == _ids(foreign, "hello world")


def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
