"""`raybench data import` (issue 30 item 2) and the digits example's data script (item 5); no Ray."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raybench.cli import main
from raybench.data.conversation import loads, stable_split
from raybench.data.import_formats import strip_image_tag
from raybench.data.importer import (
    REPORT_NAME,
    SCHEMA,
    StrictImportError,
    import_dataset,
)
from raybench.data.loader import DataError

ROOT = Path(__file__).resolve().parents[2]


def _png(seed: int, size: int = 12, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _read(out: Path) -> list[dict]:
    table = pq.read_table(out)  # the report's "_" name keeps plain pyarrow reads working
    assert table.schema.equals(SCHEMA)
    return sorted(table.to_pylist(), key=lambda r: r["source_index"])


# ------------------------------------------------------------------- the same conversations

# (system, [(user, assistant), ...], image key, qtype, split): a multi-turn one with a system
# message, images as relative paths (PNG and JPEG), a data: URI and bytes in a struct.
CONVERSATIONS = [
    ("You are terse.", [("What colour is it?", "red"), ("And its shape?", "a circle")], "a", None, None),
    (None, [("How many?", "three")], "b", "count", None),
    (None, [("Which letter?", "Q")], "c", None, "val"),
    (None, [("Describe it.", "noise"), ("Is it bright?", "no")], "d", "", None),
]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("src")
    (root / "imgs").mkdir()
    data = {"a": _png(1), "b": _png(2), "c": _png(3, fmt="JPEG"), "d": _png(4)}
    for key, blob in data.items():
        (root / "imgs" / f"{key}.{'jpg' if key == 'c' else 'png'}").write_bytes(blob)
    return root, data


def _ref(key: str, blob: bytes, parquet: bool):
    path = f"imgs/{key}.{'jpg' if key == 'c' else 'png'}"
    if key == "b":  # a data: URI (in Parquet: the bytes in a struct whose path is a name only)
        uri = "data:image/png;base64," + base64.b64encode(blob).decode()
        return {"bytes": blob, "path": "b.png"} if parquet else uri
    if key == "d":  # bytes in a struct; its path does not exist and the bytes win
        return {"bytes": blob, "path": "nowhere/d.png"} if parquet else path
    return {"bytes": None, "path": path} if parquet else path


def _record(fmt: str, conv, blob: bytes, parquet: bool, trl: bool = False) -> dict:
    system, turns, key, qtype, split = conv
    ref = _ref(key, blob, parquet)
    rec: dict = {}
    if fmt == "messages":
        msgs = [{"role": "system", "content": system}] if system else []
        for i, (q, a) in enumerate(turns):
            if i == 0 and trl:
                content = [{"type": "image"}, {"type": "text", "text": q}]
            else:
                content = f"<image>{q}" if i == 0 else q
            msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
        rec = {"messages": msgs, "images": [ref]}
    else:
        turns_out = []
        for i, (q, a) in enumerate(turns):
            turns_out += [{"from": "human", "value": f"<image>\n{q}" if i == 0 else q},
                          {"from": "gpt", "value": a}]
        if fmt == "sharegpt":
            rec = {"conversations": turns_out, "images": [ref]}
            if system:
                rec["system"] = system
        else:
            if system:
                turns_out.insert(0, {"from": "system", "value": system})
            rec = {"id": key, "image": ref, "conversations": turns_out}
    if qtype is not None:
        rec["qtype"] = qtype
    if split is not None:
        rec["split"] = split
    return rec


def _write_source(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(records))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        keys = list(dict.fromkeys(k for r in records for k in r))  # from_pylist reads row 0's only
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records]), path)
    return path


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "llava"])
def test_formats_and_sources_import_to_identical_tables(images, tmp_path, fmt):
    root, data = images
    expected = None
    for suffix in (".json", ".jsonl", ".parquet"):
        parquet = suffix == ".parquet"
        records = [_record(fmt, c, data[c[2]], parquet, trl=fmt == "messages" and i == 1 and not parquet)
                   for i, c in enumerate(CONVERSATIONS)]
        src = _write_source(root / f"{fmt}{suffix}", records)
        out = tmp_path / f"out{suffix}"
        report = import_dataset(src, fmt, out, val_fraction=0.5)
        assert report.bad == [] and report.records == 4
        rows = _read(out)
        if expected is None:
            expected = rows
            continue
        for column in ("messages", "qtype", "split", "source_index"):
            assert [r[column] for r in rows] == [r[column] for r in expected], (fmt, suffix, column)
        assert [r["image"] for r in rows] == [r["image"] for r in expected], (fmt, suffix)
    # ... and every format gives the same rows: check against the conversations themselves
    for row, (system, turns, key, qtype, split) in zip(expected, CONVERSATIONS):
        want = [{"role": "system", "content": system}] if system else []
        for q, a in turns:
            want += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        assert loads(row["messages"]) == want
        assert row["image"] == data[key]  # the bytes as found, JPEG included
        assert row["qtype"] == (qtype or "")
        assert row["split"] == (split or stable_split(data[key], 0.5))


def test_trl_content_lists_in_parquet(images, tmp_path):
    """A TRL dataset in Parquet: every content a list of {type, text} structs."""
    root, data = images
    records = [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image", "text": None},
                                     {"type": "text", "text": " what is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "noise"}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}],
        "images": [{"bytes": data["a"], "path": None}]}]
    src = _write_source(root / "trl.parquet", records)
    import_dataset(src, "messages", tmp_path / "out")
    (row,) = _read(tmp_path / "out")
    assert loads(row["messages"]) == [{"role": "user", "content": "Look: what is it?"},
                                      {"role": "assistant", "content": "noise"},
                                      {"role": "user", "content": "Sure?"},
                                      {"role": "assistant", "content": "yes"}]
    assert row["image"] == data["a"]


@pytest.mark.parametrize("text,want", [
    ("<image>\nWhich digit?", "Which digit?"), ("<image>Who is this?", "Who is this?"),
    ("Which digit?\n<image>", "Which digit?"), ("Who <image> is this?", "Who is this?"),
    ("no tag", "no tag")])
def test_strip_image_tag(text, want):
    assert strip_image_tag(text) == want


# ------------------------------------------------------------------------- bad records


def _msgs(user="<image>Q?", answer="A", **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            **extra}


BAD_SOURCE = [  # (line, the bad reason's key words or None for a good record)
    (json.dumps(_msgs(images=["imgs/a.png"])), None),
    (json.dumps(_msgs(images=["imgs/missing.png"])), "not found"),
    (json.dumps(_msgs(images=["imgs/b.png"], qtype="t")), None),
    ('{"messages": [', "not JSON"),
    (json.dumps(_msgs(images=["imgs/garbage.png"])), "cannot be decoded"),
    (json.dumps(_msgs("<image><image>Q?", images=["imgs/a.png"])), "2 <image> tags but 1 image"),
    (json.dumps(_msgs(images=["imgs/a.png", "imgs/b.png"])), "multi-image records are not supported"),
    (json.dumps(_msgs("Q?")), "no image"),
    (json.dumps(_msgs("Q?", "<image>A", images=["imgs/a.png"])), "first user turn"),
    (json.dumps(_msgs(answer=" ", images=["imgs/a.png"])), "empty assistant turn"),
    (json.dumps(_msgs(images=["https://example.com/x.png"])), "remote images are not fetched"),
    (json.dumps(_msgs(images=["imgs/c.jpg"], split="val")), None),
    (json.dumps({"messages": [{"role": "assistant", "content": "A"}], "images": ["imgs/a.png"]}),
     "expected a user turn"),
    (json.dumps(_msgs("Q?", images=["imgs/d.png"])), None),  # 0 tags, 1 image: fine
    (json.dumps(_msgs("<image>Q?")), "tag(s) but no image"),
    (json.dumps(_msgs("<image>", images=["imgs/a.png"])), "empty user turn"),
]


@pytest.fixture
def bad_source(images) -> Path:
    root, _ = images
    (root / "imgs" / "garbage.png").write_bytes(b"\x89PNG not really")
    src = root / "bad.jsonl"
    src.write_text("\n".join(line for line, _ in BAD_SOURCE[:5]) + "\n\n"  # a blank line: skipped
                   + "\n".join(line for line, _ in BAD_SOURCE[5:]) + "\n")
    return src


def test_bad_records_reported_by_number_and_the_rest_kept(bad_source, tmp_path):
    out = tmp_path / "out"
    report = import_dataset(bad_source, "messages", out, split="train")
    want_bad = {i: why for i, (_, why) in enumerate(BAD_SOURCE) if why}
    assert [i for i, _ in report.bad] == sorted(want_bad)
    for i, reason in report.bad:
        assert want_bad[i] in reason, (i, reason)
    assert report.records == len(BAD_SOURCE)
    rows = _read(out)
    assert [r["source_index"] for r in rows] == [i for i, (_, why) in enumerate(BAD_SOURCE) if not why]
    assert [r["split"] for r in rows] == ["train", "train", "val", "train"]
    assert [r["qtype"] for r in rows] == ["", "t", "", ""]
    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved["bad_count"] == len(want_bad)
    assert [b["record"] for b in saved["bad"]] == sorted(want_bad)
    assert saved["rows"] == {"train": 3, "val": 1}


def test_strict_stops_at_the_first_bad_record_and_writes_nothing(bad_source, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(StrictImportError, match=r"record 1: image file not found") as err:
        import_dataset(bad_source, "messages", out, strict=True)
    assert err.value.index == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temp directory left either


def test_refusals(images, bad_source, tmp_path):
    root, _ = images
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        import_dataset(bad_source, "messages", out)
    with pytest.raises(DataError, match="more than a previous import"):  # --overwrite never eats files
        import_dataset(bad_source, "messages", out, overwrite=True)
    (out / "notes.txt").unlink()
    import_dataset(bad_source, "messages", out)  # an empty directory is fine
    report = import_dataset(bad_source, "messages", out, overwrite=True, rows_per_file=3)
    assert sorted(p.name for p in out.iterdir()) == [REPORT_NAME, "data-00000.parquet", "data-00001.parquet"]
    assert report.files == ["data-00000.parquet", "data-00001.parquet"] and len(_read(out)) == 4
    all_bad = _write_source(root / "all_bad.json", [_msgs("Q?"), _msgs(images=["imgs/missing.png"])])
    with pytest.raises(DataError, match="no good records.*record 0: no image"):
        import_dataset(all_bad, "messages", tmp_path / "none")
    assert not (tmp_path / "none").exists()


# ------------------------------------------------------------------------------ split


def test_split_record_field_then_option_then_hash_by_image(images, tmp_path):
    root, _ = images
    shared = root / "shared"
    shared.mkdir()
    records = []
    for i in range(24):  # each image file used by two records, the second without its tag
        (shared / f"{i}.png").write_bytes(_png(100 + i))
        records += [{"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                                            {"from": "gpt", "value": "A"}]},
                    {"image": f"{i}.png", "conversations": [{"from": "human", "value": "Other?"},
                                                            {"from": "gpt", "value": "B"}]}]
    records[0]["split"] = "test"
    src = _write_source(root / "split.json", records)
    rows = _read(import_dataset(src, "llava", tmp_path / "hash", image_root=shared, val_fraction=0.5).out)
    assert rows[0]["split"] == "test"
    for a, b in zip(rows[2::2], rows[3::2]):  # the two conversations of one image: one split
        assert a["image"] == b["image"] and a["split"] == b["split"] == stable_split(a["image"], 0.5)
    assert {r["split"] for r in rows[2:]} == {"train", "val"}
    rows = _read(import_dataset(src, "llava", tmp_path / "opt", image_root=shared, split="train").out)
    assert [r["split"] for r in rows] == ["test"] + ["train"] * 47


# -------------------------------------------------------------------------------- CLI


def test_cli_end_to_end(bad_source, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["data", "import", "--format", "messages", str(bad_source), "--out", str(out),
                 "--val-fraction", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert f"read {len(BAD_SOURCE)} records" in printed and "record 1: image file not found" in printed
    assert f"train on it with --set data.path={out}" in printed
    assert len(_read(out)) == 4
    assert main(["data", "import", "--format", "messages", str(bad_source), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["data", "import", "--format", "messages", str(bad_source), "--out", str(out),
                 "--overwrite", "--strict"]) == 2
    assert "record 1: image file not found" in capsys.readouterr().err
    assert len(_read(out)) == 4  # the failed --strict run left the previous import alone


# ----------------------------------------------------------------------------- digits


def test_digits_example_imports_with_an_80_20_split(tmp_path):
    sys.path.insert(0, str(ROOT / "examples" / "digits"))
    try:
        import make_digits
    finally:
        sys.path.pop(0)
    from sklearn.datasets import load_digits

    assert make_digits.main(["--out", str(tmp_path / "src"), "--limit", "600"]) == 0
    report = import_dataset(tmp_path / "src" / "digits.json", "llava", tmp_path / "data", val_fraction=0.2)
    assert report.bad == [] and report.records == 600
    assert abs(report.rows["val"] / 600 - 0.2) < 0.04
    targets = load_digits().target
    for row in _read(tmp_path / "data"):
        msgs = loads(row["messages"])
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert len(answers) == 3 and msgs[0]["content"] == "Which digit is this?"
        assert answers[0] == make_digits.WORDS[targets[row["source_index"]]]
        with Image.open(io.BytesIO(row["image"])) as img:
            assert img.size == (32, 32) and img.format == "PNG"
