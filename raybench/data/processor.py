"""Rows -> model tensors. One place decides the sequence layout, so training, evaluation,
generation and serving agree: every row is a conversation (`raybench.data.conversation`)
rendered by the chat template (`raybench.data.chat_template`); a synthetic VQA row is the
one-turn conversation

    <s> <image> x num_image_tokens  question tokens | " answer" tokens </s>
    |------------------- prompt (labels -100) -------|---- loss here ----|

Training batches are right-padded (labels line up at the end); generation prompts are
left-padded (the last column is every prompt's last token, where decoding starts).
"""

from __future__ import annotations

from typing import Sequence

import torch

from raybench.data.chat_template import chat_template_for
from raybench.data.conversation import MESSAGES_COLUMN, loads, one_turn
from raybench.data.loader import decode_images
from raybench.data.tokenizer import image_token_id

IGNORE_INDEX = -100


def shared_images(same_as_previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that ask about the image of the row before them ([N-1] bools) -> (the first row
    of each distinct image [M], each row's image among those M [N]). Only consecutive rows
    share: a batch cut through a group merely encodes that image twice."""
    first = torch.cat([torch.ones(1, dtype=torch.bool), ~same_as_previous.bool()])
    return first.nonzero().flatten(), first.long().cumsum(0) - 1


def group_rows(first: torch.Tensor, num_rows: int, order: Sequence[int]) -> torch.Tensor:
    """Row indices of whole groups (those starting at rows `first`, as `shared_images` gives
    them), taken in `order` (group numbers): a shuffle that keeps each image's rows together."""
    ends = torch.cat([first[1:], torch.tensor([num_rows])])
    return torch.cat([torch.arange(int(first[g]), int(ends[g])) for g in order])


class VQAProcessor:
    def __init__(self, tokenizer, num_image_tokens: int, image_size: int):
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_size = image_size
        self.image_token_id = image_token_id(tokenizer)
        self.pad_id, self.bos_id, self.eos_id = (tokenizer.pad_token_id, tokenizer.bos_token_id,
                                                 tokenizer.eos_token_id)
        self.template = chat_template_for(tokenizer)

    def text_ids(self, text: str) -> list[int]:
        """Message text as plain text, as both templates encode it: a literal "<image>" or
        "</s>" in a question (a request or a Parquet row) is spelled out in ordinary tokens,
        never turned into the special token, so the placeholder count always matches the
        visual tokens and no answer ends early."""
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def conversation_ids(self, messages, num_image_tokens: int | None = None) -> tuple[list[int], list[int]]:
        """A training conversation -> (token ids, labels: the id where the loss falls, else -100)."""
        n = self.num_image_tokens if num_image_tokens is None else num_image_tokens
        ids, loss = self.template.render(messages, [self.image_token_id] * n, prompt=False)
        return ids, [t if on else IGNORE_INDEX for t, on in zip(ids, loss)]

    def conversation_prompt_ids(self, messages, num_image_tokens: int | None = None) -> list[int]:
        """A conversation ending with a user turn -> the prompt the assistant's answer follows
        (token for token the prefix that answer had in training)."""
        n = self.num_image_tokens if num_image_tokens is None else num_image_tokens
        return self.template.render(messages, [self.image_token_id] * n, prompt=True)[0]

    def prompt_ids(self, question: str) -> list[int]:
        return self.conversation_prompt_ids(one_turn(question))

    def encode_train(self, questions: Sequence[str], answers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Right-padded input_ids / attention_mask / labels (loss on answer + eos only)."""
        return self.encode_conversations([one_turn(q, a) for q, a in zip(questions, answers)])

    def encode_conversations(self, conversations: Sequence, num_image_tokens: int | None = None
                             ) -> dict[str, torch.Tensor]:
        """Right-padded input_ids / attention_mask / labels (loss on the assistant turns)."""
        rendered = [self.conversation_ids(c, num_image_tokens) for c in conversations]
        width = max(len(ids) for ids, _ in rendered)
        ids = torch.full((len(rendered), width), self.pad_id, dtype=torch.long)
        lab = torch.full((len(rendered), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rendered), width), dtype=torch.long)
        for i, (s, lb) in enumerate(rendered):
            ids[i, : len(s)] = torch.tensor(s)
            lab[i, : len(lb)] = torch.tensor(lb)
            mask[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": lab}

    def encode_prompts(self, questions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Left-padded prompts for `HybridVLM.generate`."""
        return self.encode_prompt_conversations([one_turn(q) for q in questions])

    def encode_prompt_conversations(self, conversations: Sequence) -> dict[str, torch.Tensor]:
        """Left-padded prompts (conversations ending with a user turn) for `HybridVLM.generate`."""
        seqs = [self.conversation_prompt_ids(c) for c in conversations]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def pixel_values(self, images: Sequence[bytes]) -> torch.Tensor:
        return decode_images(list(images), self.image_size)

    def collate(self, rows: dict[str, Sequence]) -> dict[str, torch.Tensor]:
        """A columnar batch (image bytes, and messages or question + answer) -> training
        tensors. Consecutive
        rows about the same image (`data.questions_per_image`) decode it once and carry
        `image_index`, so the model runs the vision tower once per image."""
        if MESSAGES_COLUMN in rows:
            batch = self.encode_conversations([loads(m) for m in rows[MESSAGES_COLUMN]])
        else:
            batch = self.encode_train(rows["question"], rows["answer"])
        images = list(rows["image"])
        first, image_index = shared_images(torch.tensor([a == b for a, b in zip(images[1:], images)],
                                                        dtype=torch.bool))
        batch["pixel_values"] = self.pixel_values([images[i] for i in first.tolist()])
        if len(first) < len(images):
            batch["image_index"] = image_index
        return batch

    def decode_answer(self, token_ids: Sequence[int]) -> str:
        ids = list(token_ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
