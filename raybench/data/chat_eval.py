"""Conversations answered as a chat is served: turn by turn, each follow-up asked with the
model's own earlier answers in the history, not the references.

The teacher-forced accuracy the trainers report (`acc/turn1`, `acc/followup`) puts the
reference answers in the history; a follow-up that the history alone answers ("Is it odd?"
after "seven") then measures reading, not seeing. Here a wrong first answer carries into
its follow-ups, as it would for a user.
"""

from __future__ import annotations

from typing import Sequence

from raybench.data.conversation import loads


def served_turn_accuracy(model, proc, images: Sequence[bytes], conversations: Sequence[str],
                         batch_size: int = 64, max_new_tokens: int = 8) -> dict[str, float]:
    """Greedy answers to every assistant turn of `conversations` (`messages` JSON), earlier
    turns answered by the model itself: accuracy of first turns, of follow-ups, and of
    whole conversations. `model` is a HybridVLM, `proc` its VQAProcessor (passed in: this
    module stays below the model layer)."""
    import torch

    hits = {"turn1": [0, 0], "followup": [0, 0], "conversation": [0, 0]}
    for start in range(0, len(conversations), batch_size):
        convs = [loads(c) for c in conversations[start:start + batch_size]]
        pixels = proc.pixel_values(list(images[start:start + batch_size]))
        asked = [[m for m in c if m["role"] != "assistant"] for c in convs]  # system + user turns
        refs = [[m["content"] for m in c if m["role"] == "assistant"] for c in convs]
        history = [[m for m in a if m["role"] == "system"] for a in asked]
        right = [True] * len(convs)
        for turn in range(max(map(len, refs))):
            rows = [i for i, r in enumerate(refs) if turn < len(r)]
            for i in rows:
                history[i].append([m for m in asked[i] if m["role"] == "user"][turn])
            prompt = proc.encode_prompt_conversations([history[i] for i in rows])
            with torch.no_grad():
                out = model.generate(prompt["input_ids"], prompt["attention_mask"], pixels[rows],
                                     max_new_tokens=max_new_tokens)
            for i, ids in zip(rows, out):
                answer = proc.decode_answer(ids.tolist())
                ok = answer == refs[i][turn].strip()
                cell = hits["turn1" if turn == 0 else "followup"]
                cell[0] += ok
                cell[1] += 1
                right[i] &= ok
                history[i].append({"role": "assistant", "content": answer})
        hits["conversation"][0] += sum(right)
        hits["conversation"][1] += len(right)
    return {f"served/{k}": h / n for k, (h, n) in hits.items() if n}
