"""Conversations: the one shape every training row, eval prompt, `raybench ask` and chat
request takes before the chat template renders it (`raybench.data.chat_template`).

A conversation is a list of `{"role": ..., "content": ...}` messages with text content:
an optional first `system` message, then `user` and `assistant` turns alternating, starting
with `user`. A training row's conversation ends with an `assistant` turn (the loss falls on
every assistant turn); a prompt's ends with `user`. The row's one image belongs to the first
user turn and is not written in the text: the template places it (so a literal "<image>" in
a message is only ever text).

In Parquet the conversation is the `messages` column, a JSON string (one type that Ray
Data, pandas and pyarrow all read as plain strings). Rows with `question` / `answer`
columns instead are one-turn conversations: `one_turn(question, answer)`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

MESSAGES_COLUMN = "messages"
ROLES = ("system", "user", "assistant")


def one_turn(question: str, answer: str | None = None) -> list[dict[str, str]]:
    """A synthetic VQA row (or a bare question when `answer` is None) as a conversation."""
    msgs = [{"role": "user", "content": question}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def conversation_errors(messages, *, for_training: bool = True) -> list[str]:
    """What is wrong with `messages` (empty when nothing): roles, order, empty turns."""
    if not isinstance(messages, list) or not messages:
        return ["messages must be a non-empty list of {role, content}"]
    errors: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            errors.append(f"message {i}: needs exactly the keys role and content")
            return errors
        if m["role"] not in ROLES:
            errors.append(f"message {i}: role {m['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            errors.append(f"message {i}: content must be text")
    if errors:
        return errors
    start = 1 if messages[0]["role"] == "system" else 0
    turns = messages[start:]
    for i, m in enumerate(turns):
        want = "assistant" if i % 2 else "user"
        if m["role"] != want:
            return errors + [f"message {start + i}: expected {'an' if i % 2 else 'a'} {want} turn, got {m['role']!r} "
                             "(after an optional system message, user and assistant alternate)"]
        if not m["content"].strip():
            errors.append(f"message {start + i}: empty {want} turn")
    if not turns:
        errors.append("messages: no user turn")
    elif for_training and turns[-1]["role"] != "assistant":
        errors.append("messages: a training conversation ends with an assistant turn")
    elif not for_training and turns[-1]["role"] != "user":
        errors.append("messages: a prompt ends with a user turn")
    return errors


def dumps(messages: Sequence[dict[str, str]]) -> str:
    """The `messages` column's JSON (compact, key order fixed, non-ASCII kept)."""
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages],
                      ensure_ascii=False, separators=(",", ":"))


def loads(text: str) -> list[dict[str, str]]:
    """A `messages` cell back to a conversation; ValueError with the reason when malformed."""
    try:
        messages = json.loads(text)
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"messages is not JSON: {err}") from None
    errors = conversation_errors(messages)
    if errors:
        raise ValueError("; ".join(errors))
    return messages


def assistant_turns(messages: Sequence[dict[str, str]]) -> list[tuple[list[dict[str, str]], str]]:
    """Each assistant turn as (the conversation before it, its reference text): what eval
    asks, turn by turn, with the reference answers of earlier turns in the history."""
    return [(list(messages[:i]), m["content"]) for i, m in enumerate(messages) if m["role"] == "assistant"]


def stable_split(key: bytes, val_fraction: float) -> str:
    """"val" for a stable `val_fraction` of keys, else "train" (sha256, not Python's hash,
    so every process and every run agrees). Key on the image so all conversations about
    one image land in one split."""
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2 ** 64
    return "val" if bucket < val_fraction else "train"
