"""What a model gets right about synthetic scenes, by how many objects each holds.

Accuracy alone hides *why* colour, shape and position questions fail. A model that sees
every colour in an image but cannot tell which object "the square" is answers with some
colour that is in the image: right on every 1-object scene and on ~1/n of n-object scenes.
One that cannot see shapes at all is at chance even when only one object is drawn. This
splits each answer into right / another object's attribute (seen but not bound to the
object the question names) / neither, and accuracy by object count.

Scenes are not stored in the Parquet, so each validation row's scene is regenerated from
the data seed and kept only if its PNG, question and answer are the row's own: a data set
that was not synthesised with that seed gets no breakdown rather than a wrong one.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from raybench.data.synthetic import POSITIONS, Scene, derived_seed, make_example

OUTCOMES = ("right", "another_object", "neither")


def val_scenes(rows: dict[str, Sequence], seed: int, image_size: int, split: str = "val"
               ) -> list[Scene | None]:
    """The scene behind each row (columns image, question, answer, qtype, in generation
    order), or None where regenerating from `seed` does not give that row back."""
    split_seed = derived_seed(seed, split)
    out: list[Scene | None] = []
    for i, (png, q, a, qtype) in enumerate(zip(rows["image"], rows["question"], rows["answer"],
                                               rows["qtype"])):
        try:
            png2, q2, a2, scene = make_example(split_seed, i, image_size, qtype)
        except ValueError:  # a qtype the generator does not know: not our data
            out.append(None)
            continue
        out.append(scene if (png2, q2, a2) == (png, q, a) else None)
    return out


def classify(qtype: str, scene: Scene, answer: str, prediction: str) -> str:
    """right, another_object (names an attribute some other object in the image has), or
    neither (an attribute nothing in the image has, or any miss on a non-object question)."""
    if prediction == answer:
        return "right"
    present = {"color": {o.color for o in scene.objects},
               "shape": {o.shape for o in scene.objects},
               "position": {POSITIONS[o.cell] for o in scene.objects}}.get(qtype, set())
    return "another_object" if prediction in present else "neither"


def scene_report(qtypes: Sequence[str], scenes: Sequence[Scene | None], answers: Sequence[str],
                 predictions: Sequence[str]) -> dict:
    """Per question type: outcome shares and accuracy by object count, over matched rows."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(OUTCOMES, 0))
    by_n: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    unmatched = 0
    for qtype, scene, answer, pred in zip(qtypes, scenes, answers, predictions):
        if scene is None:
            unmatched += 1
            continue
        outcome = classify(qtype, scene, answer, pred)
        counts[qtype][outcome] += 1
        cell = by_n[qtype][len(scene.objects)]
        cell[0] += outcome == "right"
        cell[1] += 1
    report: dict = {"matched": len(qtypes) - unmatched, "unmatched": unmatched, "qtypes": {}}
    for qtype in sorted(counts):
        n = sum(counts[qtype].values())
        report["qtypes"][qtype] = {
            **{k: v / n for k, v in counts[qtype].items()},
            "n": n,
            "accuracy_by_objects": {k: h / m for k, (h, m) in sorted(by_n[qtype].items())},
        }
    return report


def format_report(report: dict) -> str:
    lines = [f"scenes matched: {report['matched']} (unmatched {report['unmatched']})"]
    for qtype, r in report["qtypes"].items():
        by = " ".join(f"{k}obj={v:.2f}" for k, v in r["accuracy_by_objects"].items())
        lines.append(f"{qtype:>10}: right {r['right']:.2f} | another object's {r['another_object']:.2f} "
                     f"| neither {r['neither']:.2f} | by objects: {by}")
    return "\n".join(lines)


def greedy_scene_report(model, proc, rows: dict[str, Sequence], seed: int, image_size: int,
                        batch_size: int = 80) -> dict:
    """Greedy answers (as served: `model.generate`) to validation `rows`, then
    `scene_report` over the scenes regenerated from the data `seed`. `model` is a HybridVLM,
    `proc` its VQAProcessor (passed in: this module stays below the model layer)."""
    import torch

    predictions = []
    for start in range(0, len(rows["question"]), batch_size):
        end = start + batch_size
        prompt = proc.encode_prompts(rows["question"][start:end])
        with torch.no_grad():
            out = model.generate(prompt["input_ids"], prompt["attention_mask"],
                                 proc.pixel_values(rows["image"][start:end]), max_new_tokens=8)
        predictions += [proc.decode_answer(ids.tolist()) for ids in out]
    scenes = val_scenes(rows, seed, image_size)
    return scene_report(rows["qtype"], scenes, rows["answer"], predictions)
