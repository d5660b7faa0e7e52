"""Per-format parsing for `raybench data import`: one source record to a `Parsed` record
(its conversation with the `<image>` tags still in the text, its image references, its own
`qtype` and `split`), then `checked_conversation` turns that into a raybench conversation
(`raybench.data.conversation`) with the tags removed, or raises `BadRecord` with the reason.

Formats (the record shapes the VLM trainers users know take):
- `messages` (LLaMA-Factory "openai" style, ms-swift, TRL):
  `{"messages": [{"role": "user", "content": "<image>Who is this?"}, ...], "images": [...]}`;
  `content` may be a TRL content list, `[{"type": "image"}, {"type": "text", "text": "..."}]`,
  where an image item stands for one `<image>` tag at its place.
- `sharegpt` (LLaMA-Factory): `{"conversations": [{"from": "human", "value": "..."}, ...],
  "images": [...], "system": "optional system prompt"}`.
- `llava`: `{"id": ..., "image": "a/x.jpg", "conversations": [{"from": "human", "value":
  "<image>\\n..."}, {"from": "gpt", "value": "..."}]}`.

An image reference is left as found (bytes, a `{bytes, path}` dict, a `data:` URI or a
path); `raybench.data.importer` resolves it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raybench.data.conversation import conversation_errors

IMAGE_TAG = "<image>"
# One tag and one adjacent space or newline (the one before it when it ends a line's text).
_TAG_RE = re.compile(r"[\n ]<image>(?=$|\n)|<image>[\n ]?")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


class BadRecord(ValueError):
    """A record that cannot become a training row; the message is the reason."""


@dataclass
class Parsed:
    messages: list[dict[str, str]]            # content still holds the <image> tags
    images: list[Any] = field(default_factory=list)
    qtype: str = ""
    split: str | None = None


def _record_fields(record: Any) -> tuple[str, str | None]:
    if not isinstance(record, dict):
        raise BadRecord(f"a record is a JSON object, got {type(record).__name__}")
    qtype = record.get("qtype")
    split = record.get("split")
    if split is not None and not isinstance(split, str):
        raise BadRecord(f"split must be a string, got {split!r}")
    return ("" if qtype is None else str(qtype)), (split or None)


def _image_list(record: dict, *keys: str) -> list[Any]:
    """The record's images under the first of `keys` present: a list, or one reference."""
    for key in keys:
        value = record.get(key)
        if value is None:
            continue
        return list(value) if isinstance(value, (list, tuple)) else [value]
    return []


def _content_text(content: Any, where: str, inline_images: list[Any]) -> str:
    """A message's content as text; a TRL content list's image items become `<image>` tags
    (an item that carries its image inline adds it to `inline_images`)."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, (list, tuple)):
        raise BadRecord(f"{where}: content must be text or a list of content items, "
                        f"got {type(content).__name__}")
    parts = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            parts.append(item.get("text") or "")
        elif kind in ("image", "image_url"):
            parts.append(IMAGE_TAG)
            ref = item.get("image") if kind == "image" else (item.get("image_url") or {})
            if isinstance(ref, dict) and kind == "image_url":
                ref = ref.get("url")
            if ref is not None:
                inline_images.append(ref)
        else:
            raise BadRecord(f"{where}: content item {item!r} is not supported "
                            "(text and image items are)")
    return "".join(parts)


def parse_messages(record: Any) -> Parsed:
    qtype, split = _record_fields(record)
    messages = record.get("messages")
    if isinstance(messages, str):  # a JSON string column, as raybench writes it
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as err:
            raise BadRecord(f"messages is not JSON: {err}") from None
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRecord("no messages: the messages format needs a non-empty \"messages\" list")
    inline: list[Any] = []
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise BadRecord(f"message {i}: needs a role and a content")
        out.append({"role": m["role"], "content": _content_text(m.get("content"), f"message {i}", inline)})
    return Parsed(out, inline + _image_list(record, "images", "image"), qtype, split)


def _from_value_turns(record: dict, key: str) -> list[dict[str, str]]:
    turns = record.get(key)
    if not isinstance(turns, (list, tuple)) or not turns:
        raise BadRecord(f"no conversation: this format needs a non-empty \"{key}\" list")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t:
            raise BadRecord(f"turn {i}: needs \"from\" and \"value\"")
        role = SHAREGPT_ROLES.get(t["from"])
        if role is None:
            raise BadRecord(f"turn {i}: from {t['from']!r} is not one of {', '.join(SHAREGPT_ROLES)}")
        value = t.get("value")
        if value is not None and not isinstance(value, str):
            raise BadRecord(f"turn {i}: value must be text")
        out.append({"role": role, "content": value or ""})
    return out


def parse_sharegpt(record: Any) -> Parsed:
    qtype, split = _record_fields(record)
    messages = _from_value_turns(record, "conversations")
    system = record.get("system")
    if system:
        messages.insert(0, {"role": "system", "content": str(system)})
    return Parsed(messages, _image_list(record, "images", "image"), qtype, split)


def parse_llava(record: Any) -> Parsed:
    qtype, split = _record_fields(record)
    return Parsed(_from_value_turns(record, "conversations"), _image_list(record, "image", "images"),
                  qtype, split)


FORMATS: dict[str, Callable[[Any], Parsed]] = {
    "messages": parse_messages, "sharegpt": parse_sharegpt, "llava": parse_llava}


def strip_image_tag(text: str) -> str:
    """`text` without its `<image>` tags, each with one adjacent space or newline:
    "<image>\\nWhich digit?" -> "Which digit?"."""
    return _TAG_RE.sub("", text)


def checked_conversation(parsed: Parsed) -> list[dict[str, str]]:
    """The record's conversation without image tags; BadRecord when raybench cannot train
    on it (image count, tag placement, roles and turns)."""
    n_images = len(parsed.images)
    tags = [(i, m["content"].count(IMAGE_TAG)) for i, m in enumerate(parsed.messages)
            if isinstance(m["content"], str)]
    n_tags = sum(n for _, n in tags)
    if n_images == 0:
        raise BadRecord("no image (raybench trains on one image per conversation)" if n_tags == 0
                        else f"{n_tags} <image> tag(s) but no image")
    if n_images > 1:
        raise BadRecord(f"{n_images} images: multi-image records are not supported: "
                        "raybench's model takes one image per conversation")
    if n_tags > 1:
        raise BadRecord(f"{n_tags} <image> tags but 1 image")
    first_user = next((i for i, m in enumerate(parsed.messages) if m["role"] == "user"), None)
    for i, n in tags:
        if n and i != first_user:
            raise BadRecord(f"message {i} ({parsed.messages[i]['role']}) has the <image> tag: "
                            "the image belongs to the first user turn")
    messages = [{"role": m["role"], "content": strip_image_tag(m["content"]) if i == first_user
                 else m["content"]} for i, m in enumerate(parsed.messages)]
    errors = conversation_errors(messages)
    if errors:
        raise BadRecord("; ".join(errors))
    return messages
