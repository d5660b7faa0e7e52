"""Synthetic VQA generation, Parquet loading and image decoding (no Ray)."""

from __future__ import annotations

import io
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raybench.data.loader import (REQUIRED_COLUMNS, DataError, decode_image, decode_images,
                                  parquet_files, read_split, validate_dataset)
from raybench.data.synthetic import (COLORS, COUNT_WORDS, GLYPHS, POSITIONS, QTYPES, SCHEMA, SHAPES,
                                     answer_vocabulary, chance_accuracy, generate, make_example,
                                     render_scene, sample_scene, write_synthetic)

SIZE = 32


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return generate(240, SIZE, seed=7, split="train")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    return write_synthetic(out, num_train=60, num_val=24, image_size=SIZE, seed=3)


# ------------------------------------------------------------------------ generator


def test_columns_and_types(table):
    assert table.column_names == list(REQUIRED_COLUMNS)
    assert table.schema.field("image").type == pa.binary()
    assert set(table["split"].to_pylist()) == {"train"}


def test_same_seed_is_byte_identical(table):
    again = generate(240, SIZE, seed=7, split="train")
    assert again.equals(table)
    assert again["image"].to_pylist() == table["image"].to_pylist()


def test_different_seed_gives_different_images(table):
    other = generate(240, SIZE, seed=8, split="train")
    same = sum(a == b for a, b in zip(other["image"].to_pylist(), table["image"].to_pylist()))
    assert same == 0


def test_prefix_stable(table):
    assert generate(30, SIZE, seed=7, split="train").equals(table.slice(0, 30))


def test_qtypes_balanced_and_answers_in_vocabulary(table):
    vocab = answer_vocabulary()
    assert set(vocab) == set(QTYPES)
    counts = Counter(table["qtype"].to_pylist())
    assert set(counts) == set(QTYPES) and len(set(counts.values())) == 1
    for q, a, t in zip(*(table[c].to_pylist() for c in ("question", "answer", "qtype"))):
        assert a in vocab[t], (q, a, t)
        assert a == a.lower() and " " not in a
        assert q == q.lower() and q.endswith("?")


def test_every_answer_of_a_qtype_occurs():
    big = generate(1200, 16, seed=1, split="train")
    seen: dict[str, set] = {}
    for a, t in zip(big["answer"].to_pylist(), big["qtype"].to_pylist()):
        seen.setdefault(t, set()).add(a)
    assert {t: sorted(s) for t, s in seen.items()} == {t: sorted(v) for t, v in answer_vocabulary().items()}


def test_requested_qtypes_only_and_unknown_rejected():
    t = generate(9, SIZE, seed=0, split="val", qtypes=["count", "glyph", "count"])
    assert t["qtype"].to_pylist() == ["count", "glyph"] * 4 + ["count"]
    assert set(t["split"].to_pylist()) == {"val"}
    with pytest.raises(ValueError, match="'colour'.*allowed: color, shape"):
        generate(4, SIZE, seed=0, split="train", qtypes=["colour"])


def test_chance_accuracy():
    assert chance_accuracy("shape") == pytest.approx(1 / 3)
    assert chance_accuracy("glyph") == pytest.approx(1 / len(GLYPHS))
    with pytest.raises(ValueError):
        chance_accuracy("nope")


def test_images_decode_to_rgb_of_the_right_size(table):
    for png in table["image"].to_pylist()[:24]:
        with Image.open(io.BytesIO(png)) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (SIZE, SIZE)
    x = decode_images(table["image"].to_pylist(), SIZE)
    assert x.shape == (len(table), 3, SIZE, SIZE) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < 0 < x.max()


@pytest.mark.parametrize("qtype", QTYPES)
def test_answers_match_the_scene(qtype):
    for i in range(40):
        _, question, answer, scene = make_example(5, i, SIZE, qtype)
        colors = [o.color for o in scene.objects]
        assert len(set(colors)) == len(colors) and scene.background not in colors
        assert len({o.cell for o in scene.objects} | ({scene.glyph_cell} - {None})) == \
            len(scene.objects) + (scene.glyph is not None)
        if qtype == "count":
            assert answer == COUNT_WORDS[len(scene.objects) - 1]
        elif qtype == "glyph":
            assert scene.glyph is not None and answer == scene.glyph.lower() and answer.isalpha()
            assert len(scene.objects) <= 2
        elif qtype == "background":
            assert answer == scene.background
        else:
            assert scene.glyph is None and 1 <= len(scene.objects) <= 4
            if qtype == "color":
                shape = question.removeprefix("what color is the ").removesuffix("?")
                (obj,) = [o for o in scene.objects if o.shape == shape]  # unique
                assert answer == obj.color
            elif qtype == "shape":
                color = question.removeprefix("what shape is ").removesuffix("?")
                (obj,) = [o for o in scene.objects if o.color == color]
                assert answer == obj.shape
            else:
                (obj,) = [o for o in scene.objects if f"{o.color} {o.shape}" in question]
                assert answer == POSITIONS[obj.cell]
                col, row = ("right" in answer), ("bottom" in answer)
                x0, y0, x1, y1 = obj.box
                assert (x0 >= 0.5) == col and (x1 <= 0.5) != col
                assert (y0 >= 0.5) == row and (y1 <= 0.5) != row


def test_questions_per_image_ask_about_the_same_scene():
    """Each image's first row is `make_example`'s own; the others are distinct question types
    about that scene, answered from it."""
    k = 4
    table = generate(300, SIZE, seed=5, split="train", questions_per_image=k)
    rows = table.to_pylist()
    assert len(rows) == 300 and table.schema == SCHEMA
    i, image = 0, 0
    seen = Counter()
    while i < len(rows):
        qtype = QTYPES[image % len(QTYPES)]
        png, question, answer, scene = make_example(5, image, SIZE, qtype)
        group = [rows[i]]
        while i + len(group) < len(rows) and rows[i + len(group)]["image"] == png:
            group.append(rows[i + len(group)])
        assert (group[0]["question"], group[0]["answer"], group[0]["image"]) == (question, answer, png)
        assert len(group) <= k and len({r["qtype"] for r in group}) == len(group)
        for r in group[1:]:
            seen[r["qtype"]] += 1
            objs = scene.objects
            if r["qtype"] == "background":
                assert r["answer"] == scene.background
            elif r["qtype"] == "count":
                assert scene.glyph is None and r["answer"] == COUNT_WORDS[len(objs) - 1]
            elif r["qtype"] == "color":
                shape = r["question"].removeprefix("what color is the ").removesuffix("?")
                (obj,) = [o for o in objs if o.shape == shape]
                assert r["answer"] == obj.color
            elif r["qtype"] == "shape":
                (obj,) = [o for o in objs if o.color == r["question"].split()[-1].rstrip("?")]
                assert r["answer"] == obj.shape
            else:
                assert r["qtype"] == "position"
                (obj,) = [o for o in objs if f"{o.color} {o.shape}" in r["question"]]
                assert r["answer"] == POSITIONS[obj.cell]
        i, image = i + len(group), image + 1
    assert set(seen) == set(QTYPES) - {"glyph"}  # a letter is only asked about its own scene
    # One question per image: row i is example i, as before questions_per_image existed.
    for i, row in enumerate(generate(12, SIZE, seed=5, split="train", questions_per_image=1).to_pylist()):
        png, question, answer, _ = make_example(5, i, SIZE, QTYPES[i % len(QTYPES)])
        assert (row["image"], row["question"], row["answer"]) == (png, question, answer)


@pytest.mark.parametrize("max_objects", [1, 2])
def test_max_objects_caps_every_scene(max_objects):
    seen = Counter()
    for qtype in QTYPES:
        for i in range(30):
            _, question, answer, scene = make_example(7, i, SIZE, qtype, max_objects=max_objects)
            things = len(scene.objects) + (scene.glyph is not None)
            assert 1 <= things <= max_objects
            seen[things] += 1
    assert set(seen) == set(range(1, max_objects + 1))  # a cap, not a fixed count
    with pytest.raises(ValueError, match="max_objects"):
        sample_scene(random.Random(0), "color", max_objects=5)


def test_curriculum_split_is_easy_and_not_training_images(tmp_path):
    from raybench.data.synthetic import write_curriculum

    write_synthetic(tmp_path / "d", num_train=60, num_val=12, image_size=SIZE, seed=0)
    out = write_curriculum(tmp_path / "c", num_examples=60, image_size=SIZE, seed=0, max_objects=1)
    assert validate_dataset(out, splits=("curriculum",)) == {"curriculum": 60}
    cur = read_split(out, "curriculum")
    # Every count question of a 1-object scene has the answer "one".
    counts = [a for a, q in zip(cur["answer"].to_pylist(), cur["qtype"].to_pylist()) if q == "count"]
    assert counts and set(counts) == {"one"}
    train = set(read_split(tmp_path / "d", "train")["image"].to_pylist())
    assert not train & set(cur["image"].to_pylist())


def test_rendering_shows_the_scene():
    """Each object's centre has its colour, the corner has the background's, letters have ink."""
    size = 64
    rng = random.Random(0)
    for qtype in ("count", "glyph") * 10:
        scene, _, _ = sample_scene(rng, qtype)
        px = np.asarray(render_scene(scene, size)).astype(int)
        assert np.abs(px[0, 0] - COLORS[scene.background]).max() <= 2
        for obj in scene.objects:
            assert obj.shape in SHAPES
            x0, y0, x1, y1 = obj.box
            cx, cy = int((x0 + x1) / 2 * size), int((y0 + y1) / 2 * size)
            assert np.abs(px[cy, cx] - COLORS[obj.color]).max() <= 2
        if scene.glyph is not None:
            r, c = scene.glyph_cell // 2, scene.glyph_cell % 2
            half = size // 2
            cell = px[r * half:(r + 1) * half, c * half:(c + 1) * half]
            ink = np.abs(cell - COLORS[scene.background]).max(axis=-1) > 60
            assert 8 <= ink.sum() <= half * half // 4  # drawn, and small


# ----------------------------------------------------------------------------- parquet


def test_write_then_read_round_trip(dataset):
    assert sorted(p.name for p in parquet_files(dataset)) == ["train.parquet", "val.parquet"]
    assert validate_dataset(dataset) == {"train": 60, "val": 24}
    train = read_split(dataset, "train")
    assert train.equals(generate(60, SIZE, seed=3, split="train"))
    val = read_split(dataset, "val", columns=["image", "answer"])
    assert val.column_names == ["image", "answer"] and val.num_rows == 24
    # val comes from a derived seed: none of its images is a train image
    assert not set(val["image"].to_pylist()) & set(train["image"].to_pylist())


def test_read_single_file_and_mixed_splits(tmp_path):
    t = pa.concat_tables([generate(5, SIZE, 1, "train"), generate(3, SIZE, 2, "val")])
    pq.write_table(t, tmp_path / "mine.parquet")
    assert validate_dataset(tmp_path / "mine.parquet") == {"train": 5, "val": 3}
    assert read_split(tmp_path, "val")["split"].to_pylist() == ["val"] * 3


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist: .*nowhere"):
        validate_dataset(tmp_path / "nowhere")


def test_directory_without_parquet(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=f"no .parquet files under {tmp_path}"):
        parquet_files(tmp_path)


def test_missing_column_is_named(tmp_path):
    t = generate(4, SIZE, 0, "train").drop_columns(["answer"])
    pq.write_table(t, tmp_path / "bad.parquet")
    with pytest.raises(DataError) as info:
        validate_dataset(tmp_path)
    msg = str(info.value)
    assert "bad.parquet" in msg and "missing column(s) answer" in msg
    assert "image, and messages or question + answer" in msg


def test_wrong_column_type(tmp_path):
    t = generate(2, SIZE, 0, "train").set_column(0, "image", pa.array(["x", "y"]))
    pq.write_table(t, tmp_path / "t.parquet")
    with pytest.raises(DataError, match="image is string, expected binary"):
        validate_dataset(tmp_path)


def test_not_a_parquet_file(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        validate_dataset(tmp_path)


def test_empty_dataset_and_empty_split(tmp_path):
    pq.write_table(generate(0, SIZE, 0, "train"), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="is empty: 0 rows"):
        validate_dataset(tmp_path)
    with pytest.raises(DataError, match="0 rows with split == 'train'"):
        read_split(tmp_path, "train")
    pq.write_table(generate(3, SIZE, 0, "train"), tmp_path / "train.parquet")
    with pytest.raises(DataError, match=r"0 rows with split == 'val' \(rows per split: 'train': 3\)"):
        validate_dataset(tmp_path)
    assert validate_dataset(tmp_path, splits=("train",)) == {"train": 3}


def test_unknown_column_requested(dataset):
    with pytest.raises(DataError, match="no column.* label"):
        read_split(dataset, "train", columns=["image", "label"])


# ------------------------------------------------------------------------------ images


def _png(arr: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_image_normalizes_to_minus_one_one():
    arr = np.zeros((4, 4, 3), dtype=np.uint8)
    arr[..., 0] = 255
    arr[..., 1] = 0
    arr[..., 2] = 128
    x = decode_image(_png(arr), 4)
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    assert torch.all(x[0] == 1.0) and torch.all(x[1] == -1.0)
    assert torch.allclose(x[2], torch.full((4, 4), 128 / 127.5 - 1), atol=1e-6)


def test_decode_image_resizes_and_converts_mode():
    grey = np.full((50, 30), 200, dtype=np.uint8)  # non-square, greyscale
    x = decode_image(_png(grey, "L"), 16)
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x, torch.full_like(x, 200 / 127.5 - 1), atol=1e-6)
    assert decode_images([_png(grey, "L")] * 2, 8).shape == (2, 3, 8, 8)
    assert decode_images([], 8).shape == (0, 3, 8, 8)


@pytest.mark.parametrize("data", [b"", b"\x80\x04K\x01.", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_bad_image_bytes(data):
    with pytest.raises(DataError, match="image is not a decodable image"):
        decode_image(data, 8)
    with pytest.raises(DataError, match="image is not a decodable image"):
        decode_images([_png(np.zeros((2, 2, 3), np.uint8)), data], 8)


def test_describe_captions_every_object_in_reading_order():
    from raybench.data.synthetic import DESCRIBE, Scene, SceneObject, describe_scene, make_group

    scene = Scene("green", (SceneObject("square", "blue", 3, (0.6, 0.6, 0.9, 0.9)),
                            SceneObject("circle", "red", 0, (0.1, 0.1, 0.3, 0.3))), "K", 1, (0.75, 0.25))
    assert describe_scene(scene) == ("green background, red circle top-left, letter k top-right, "
                                     "blue square bottom-right")
    for i in range(20):  # asked about any scene, alongside the one-word questions
        _, group = make_group(3, i, SIZE, "color", k=7, kinds=(*QTYPES, DESCRIBE))
        (caption,) = [a for t, _, a in group if t == DESCRIBE]
        assert caption.split(", ")[0].endswith(" background")
        count = [a for t, _, a in group if t == "count"]
        if count:  # one clause per object after the background
            assert len(caption.split(", ")) - 1 == COUNT_WORDS.index(count[0]) + 1
    assert chance_accuracy(DESCRIBE) == 0.0


def test_scene_targets_invert_the_caption():
    from raybench.data.synthetic import COLORS, describe_scene, sample_scene, scene_targets

    rng = random.Random(0)
    for i in range(60):
        scene, _, _ = sample_scene(rng, QTYPES[i % len(QTYPES)])
        t = scene_targets(describe_scene(scene))
        assert t[0] == list(COLORS).index(scene.background)
        for o in scene.objects:
            assert (t[1 + o.cell], t[5 + o.cell]) == (1 + SHAPES.index(o.shape), 1 + list(COLORS).index(o.color))
        if scene.glyph is not None:
            assert (t[1 + scene.glyph_cell], t[5 + scene.glyph_cell]) == (4 + GLYPHS.index(scene.glyph), 0)
        empty = {0, 1, 2, 3} - {o.cell for o in scene.objects} - {scene.glyph_cell}
        assert all(t[1 + c] == 0 and t[5 + c] == 0 for c in empty)


def test_letter_share_sets_how_many_captions_hold_a_letter():
    from raybench.data.synthetic import DESCRIBE, generate

    def letters(table) -> float:
        return sum("letter " in a for a in table.column("answer").to_pylist()) / table.num_rows

    default = generate(600, 32, 0, "curriculum", [DESCRIBE])
    # None keeps the old draw, scene for scene: existing stage data is unchanged.
    assert generate(600, 32, 0, "curriculum", [DESCRIBE], letter_share=None).equals(default)
    assert 0.10 < letters(default) < 0.24  # one in six
    assert 0.42 < letters(generate(600, 32, 0, "curriculum", [DESCRIBE], letter_share=0.5)) < 0.58
    assert letters(generate(60, 32, 0, "curriculum", [DESCRIBE], letter_share=1.0)) == 1.0
    assert letters(generate(60, 32, 0, "curriculum", [DESCRIBE], letter_share=0.0)) == 0.0
