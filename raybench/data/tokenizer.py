"""An offline byte-level BPE tokenizer, trained on the dataset's own text.

Built with the `tokenizers` library and wrapped as a `transformers` fast tokenizer, so it
saves and loads with `save_pretrained` / `from_pretrained` from a local directory and never
touches a model hub.

Conventions the rest of raybench relies on:

* Special tokens: `<pad>`, `<s>` (bos), `</s>` (eos), `<unk>` and the image placeholder
  `<image>`, with ids 0..4 in that order on a freshly built tokenizer. `image_token_id(tok)`
  finds `<image>` on any tokenizer (ours, or a real LLM's after `load_tokenizer` added it).
* Nothing is added on encode: callers use `tok.encode(text, add_special_tokens=False)` and
  place bos / `<image>` / eos by hand (see `raybench.data.processor`).
* Leading space: an answer follows its question as a new word, so it is encoded as
  `" " + answer`; the training corpus (`tokenizer_corpus`) holds answers in that same form.
  Words are pre-tokenized GPT-2 style (a word carries its leading space) except that
  hyphenated words stay whole, so with the default vocabulary every question word and every
  answer of the synthetic set (" red", " top-left", " a") is a single token.
* Byte-level: the 256 byte symbols are always in the vocabulary, so any text (unseen
  characters, accents, emoji) encodes and decodes losslessly; `<unk>` is never produced.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import pyarrow as pa
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:  # imported where used: ~0.9 s that a Ray Train driver never needs
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
IMAGE_TOKEN = "<image>"
PAD_TOKEN = SPECIAL_TOKENS["pad_token"]

# GPT-2's split rule with one change: `\p{L}+(?:-\p{L}+)*` keeps "top-left" one word.
_WORDS = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+(?:-\p{L}+)*| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_WORDS), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most `vocab_size` tokens on `texts` (deterministic)."""
    from transformers import PreTrainedTokenizerFast

    specials = [*SPECIAL_TOKENS.values(), IMAGE_TOKEN]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size = {vocab_size}: must be >= {len(alphabet) + len(specials)} "
                         "(256 byte symbols + special tokens)")
    # No unk_token in the model: with every byte in the alphabet nothing is unknown.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = _pre_tokenizer()
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS,
                                   extra_special_tokens={"image_token": IMAGE_TOKEN})


def tokenizer_corpus(table_or_tables: pa.Table | Iterable[pa.Table]) -> Iterator[str]:
    """Every message's text from one or more tables (`messages`, or `question` / `answer`
    columns): user and system text as is, assistant text with a leading space (as the
    raybench chat template encodes it)."""
    from raybench.data.conversation import loads, one_turn

    tables = [table_or_tables] if isinstance(table_or_tables, pa.Table) else table_or_tables
    for table in tables:
        if "messages" in table.column_names:
            conversations = (loads(m) for m in table.column("messages").to_pylist() if m is not None)
        else:
            conversations = (one_turn(q, a) for q, a in zip(table.column("question").to_pylist(),
                                                            table.column("answer").to_pylist()))
        for messages in conversations:
            for m in messages:
                if m["content"] is not None:
                    yield (" " if m["role"] == "assistant" else "") + m["content"].strip()


def image_token_id(tok) -> int:
    """The id of `<image>`; ValueError if the tokenizer does not have it."""
    tid = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    # An unknown token maps to unk (or None), which never converts back to "<image>".
    if tid is None or tok.convert_ids_to_tokens(tid) != IMAGE_TOKEN:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token; load it with "
                         "raybench.data.tokenizer.load_tokenizer, which adds one")
    return int(tid)


def save_tokenizer(tok, directory: str | os.PathLike) -> Path:
    """Write the tokenizer files (tokenizer.json, tokenizer_config.json) into `directory`."""
    out = Path(directory).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out


def load_tokenizer(directory: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A tokenizer from a local directory: one saved by `save_tokenizer`, or a real LLM's.

    Never downloads. A tokenizer without `<image>` gets it as an added special token (the
    caller resizes the embeddings to `len(tok)`, when the LLM has fewer rows); one without a
    pad token gets `<pad>` the same way; one without a bos token reuses eos for it, as the
    processor needs one.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(directory).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory does not exist: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        # A bare tokenizer.json without a config the Auto classes can resolve.
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"no loadable tokenizer in {path}: {err}") from None
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        # Not eos (a common stand-in): generation and eval forbid the pad token, and with
        # pad == eos no answer could end. Qwen3 has a pad; Llama 3 and many others don't.
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    if tok.bos_token is None and tok.eos_token is not None:
        tok.bos_token = tok.eos_token
    return tok
