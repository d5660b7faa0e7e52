"""The chat template: a conversation (`raybench.data.conversation`) -> token ids, and which
of them the loss falls on. Training, eval, `raybench ask` and serving all render through
here, so a prompt at serving time is token for token the prefix the model was trained on.

Two templates:

* `RaybenchTemplate`, for tokenizers without a chat template (raybench's own BPE):

      <s> [system]  <image> x N  user_1  " assistant_1" </s>  user_2  " assistant_2" </s> ...
                                          |---- loss ----|          |---- loss ----|

  A one-turn conversation is exactly the VQA layout raybench always trained on
  (`<s> <image>xN question " answer" </s>`), so synthetic runs are unchanged by it.

* `HFTemplate`, for a tokenizer that has one (a real LLM's `chat_template`): the Jinja
  template renders the conversation with a sentinel in place of every message's text, and
  the pieces between sentinels (the template's own markup, e.g. `<|im_start|>user\\n`) are
  tokenized with special tokens recognised, the messages' texts as plain text (a literal
  `<|im_end|>` or `<image>` typed by a user stays text). The image's tokens open the first
  user message. The loss falls on each assistant text and the template's markup after it up
  to its first special token (the end-of-turn token, so the model learns to stop).

A prompt is rendered as the conversation plus an assistant turn to be written, cut where
that turn's text would start: the same procedure as training, so the two agree by
construction whatever the template does around assistant turns (Qwen3's empty think block).
"""

from __future__ import annotations

from typing import Sequence

Conversation = Sequence[dict[str, str]]


def _sentinel(i: int) -> str:
    # Private-use code points: no template touches them and no tokenizer merges across them.
    return f"\ue000{i}\ue001"


class RaybenchTemplate:
    name = "raybench"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id

    def text_ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    def render(self, messages: Conversation, image_ids: list[int], prompt: bool
               ) -> tuple[list[int], list[bool]]:
        ids, loss = [self.bos_id], [False]
        turns = list(messages)
        if turns and turns[0]["role"] == "system":
            part = self.text_ids(turns.pop(0)["content"].strip())
            ids += part
            loss += [False] * len(part)
        ids += image_ids
        loss += [False] * len(image_ids)
        for m in turns:
            if m["role"] == "user":
                part, on = self.text_ids(m["content"].strip()), False
            else:  # a new word after the question: one token per synthetic answer
                part, on = self.text_ids(" " + m["content"].strip()) + [self.eos_id], True
            ids += part
            loss += [on] * len(part)
        return ids, loss


class HFTemplate:
    name = "tokenizer"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.special = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special}

    def render(self, messages: Conversation, image_ids: list[int], prompt: bool
               ) -> tuple[list[int], list[bool]]:
        msgs = [dict(role=m["role"], content=_sentinel(i)) for i, m in enumerate(messages)]
        if prompt:
            msgs.append({"role": "assistant", "content": _sentinel(len(messages))})
        text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        ids: list[int] = []
        loss: list[bool] = []
        first_user = True
        after_assistant = False
        for i, m in enumerate(msgs):
            head, sep, text = text.partition(_sentinel(i))
            if not sep:
                raise ValueError(f"the tokenizer's chat template dropped message {i} ({m['role']}); "
                                 "raybench needs every message rendered")
            markup = self.tok.encode(head, add_special_tokens=False)
            if after_assistant:  # the end of the previous assistant turn learns to stop
                k = next((j + 1 for j, t in enumerate(markup) if t in self.special), 0)
                loss += [True] * k + [False] * (len(markup) - k)
            else:
                loss += [False] * len(markup)
            ids += markup
            if prompt and i == len(messages):
                return ids, loss
            body = messages[i]["content"]
            part = self.tok.encode(body, add_special_tokens=False, split_special_tokens=True)
            if m["role"] == "user" and first_user:
                part, first_user = image_ids + part, False
            after_assistant = m["role"] == "assistant"
            ids += part
            loss += [after_assistant] * len(part)
        markup = self.tok.encode(text, add_special_tokens=False)
        k = next((j + 1 for j, t in enumerate(markup) if t in self.special), 0) if after_assistant else 0
        return ids + markup, loss + [True] * k + [False] * (len(markup) - k)


def chat_template_for(tokenizer):
    """The tokenizer's own chat template when it has one, else raybench's."""
    return HFTemplate(tokenizer) if getattr(tokenizer, "chat_template", None) else RaybenchTemplate(tokenizer)
