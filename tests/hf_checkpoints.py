"""Tiny transformers checkpoints with the quirks of the real ones `model.size: gpu` loads
(google/siglip-base-patch16-224, Qwen/Qwen3-0.6B), written offline with `save_pretrained`:

* the vision directory is a whole `SiglipModel` (vision and text towers), as published;
* the LLM ties its input and output embeddings and has more embedding rows than its
  tokenizer has tokens (Qwen3-0.6B: 151936 rows), and its rope_theta is not the tiny
  preset's, so a reload that rebuilt the LLM from the run config would change the logits;
* its tokenizer (byte-level BPE, a transformers fast tokenizer) has a chat template and an
  eos token but no bos, no pad and no `<image>`.

Sizes match `model.size: tiny`, so a run config needs only the two `pretrained_path`s.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EXTRA_ROWS = 61  # embedding rows past the tokenizer's last token (Qwen3-0.6B has 267)
ROPE_THETA = 1_000_000.0  # Qwen3's, not the tiny preset's


def write_tokenizer(out: Path, texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    return tok


def write_siglip(out: Path) -> None:
    import torch
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(1)
    config = SiglipConfig(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64),
        text_config=dict(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=16,
                         pad_token_id=1, bos_token_id=97, eos_token_id=98),
    )
    SiglipModel(config).save_pretrained(str(out))


def write_qwen3(out: Path, num_tokens: int) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(2)
    config = Qwen3Config(vocab_size=num_tokens + EXTRA_ROWS, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.06,
                         rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    lm = Qwen3ForCausalLM(config)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    lm.save_pretrained(str(out))


def write_checkpoints(root: Path, texts: list[str]) -> tuple[Path, Path]:
    """(SigLIP directory, Qwen3 directory with its tokenizer) under `root`."""
    vision, llm = Path(root) / "siglip", Path(root) / "qwen3"
    write_siglip(vision)
    tok = write_tokenizer(llm, texts)
    write_qwen3(llm, len(tok))
    return vision, llm
