"""The per-scene breakdown of `raybench eval --by-objects`: scenes regenerate from the seed
only for the rows that really came from it, and answers split into right / another
object's / neither."""

import json

import pytest

from raybench.cli import main
from raybench.data import synthetic as S
from raybench.data.scene_eval import classify, scene_report, val_scenes

RED_SQUARE = S.SceneObject("square", "red", 0, (0.05, 0.05, 0.3, 0.3))
BLUE_CIRCLE = S.SceneObject("circle", "blue", 3, (0.6, 0.6, 0.9, 0.9))
TWO = S.Scene("green", (RED_SQUARE, BLUE_CIRCLE))


def _val_rows(seed: int, n: int = 18, size: int = 32) -> dict:
    return S.generate(n, size, S.derived_seed(seed, "val"), "val").to_pydict()


def test_scenes_regenerate_only_for_rows_of_that_seed():
    rows = _val_rows(3)
    scenes = val_scenes(rows, seed=3, image_size=32)
    assert all(s is not None for s in scenes)
    # The regenerated scene is the one asked about: its background answers that question.
    bg = [i for i, q in enumerate(rows["qtype"]) if q == "background"]
    assert [scenes[i].background for i in bg] == [rows["answer"][i] for i in bg]
    rows["answer"][4] = "nothing"
    rows["image"][5] = rows["image"][6]
    scenes = val_scenes(rows, seed=3, image_size=32)
    assert [i for i, s in enumerate(scenes) if s is None] == [4, 5]
    assert all(s is None for s in val_scenes(_val_rows(3), seed=4, image_size=32))


@pytest.mark.parametrize("qtype,answer,prediction,outcome", [
    ("color", "red", "red", "right"),
    ("color", "red", "blue", "another_object"),   # a colour in the image, the wrong object's
    ("color", "red", "green", "neither"),         # the background is not an object
    ("shape", "circle", "square", "another_object"),
    ("shape", "circle", "triangle", "neither"),
    ("position", "top-left", "bottom-right", "another_object"),
    ("position", "top-left", "top-right", "neither"),
    ("count", "two", "three", "neither"),
])
def test_answers_split_by_what_the_scene_holds(qtype, answer, prediction, outcome):
    assert classify(qtype, TWO, answer, prediction) == outcome


def test_report_shares_and_accuracy_by_object_count():
    one = S.Scene("green", (RED_SQUARE,))
    report = scene_report(
        ["color", "color", "color", "color", "shape"],
        [one, TWO, TWO, None, TWO],
        ["red", "red", "blue", "red", "circle"],
        ["red", "blue", "blue", "red", "triangle"])
    assert report["matched"] == 4 and report["unmatched"] == 1
    color = report["qtypes"]["color"]
    assert color["n"] == 3 and color["right"] == pytest.approx(2 / 3)
    assert color["another_object"] == pytest.approx(1 / 3) and color["neither"] == 0
    assert color["accuracy_by_objects"] == {1: 1.0, 2: 0.5}
    assert report["qtypes"]["shape"]["neither"] == 1.0


def test_eval_by_objects_agrees_with_teacher_forced_accuracy(tmp_path, capsys):
    from raybench.config import load_config
    from raybench.train.local import train_local

    overrides = [f"run_dir={tmp_path / 'run'}", "model.preset=hybrid", "model.size=tiny",
                 "data.num_train=96", "data.num_val=32", "train.steps=6", "train.batch_size=16",
                 "train.eval_every=3", "train.eval_samples=32", "train.warmup_steps=1"]
    cfg = load_config(None, overrides)
    train_local(cfg, log=lambda _: None)
    capsys.readouterr()
    args = [x for o in overrides for x in ("--set", o)]
    assert main(["eval", *args, "--model", str(cfg.run_path / "model"), "--by-objects"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)
    scenes = metrics["scenes"]
    assert scenes["matched"] == 32 and scenes["unmatched"] == 0
    # Greedy decoding (what Serve answers) and the teacher-forced exact match agree.
    for qtype, r in scenes["qtypes"].items():
        assert r["right"] == pytest.approx(metrics[f"acc/{qtype}"])
    assert "by objects:" in captured.err
