"""Read rows from Parquet: our synthetic set, a set `raybench data import` wrote, or a
user's own files with the same columns.

A dataset is one `.parquet` file or a directory of them (searched recursively; names
starting with `.` or `_` are skipped, as `pyarrow.dataset` does), local or a URI that
`pyarrow.fs.FileSystem.from_uri` takes (`file:///abs`, `s3://bucket/prefix`, `gs://...`;
credentials from the usual environment), read through that filesystem and never turned
into a local path. Every file has the same
columns: `image` (encoded bytes: PNG, JPEG, ... decoded with Pillow, never unpickled), the
text as either `messages` (a conversation, JSON: see `raybench.data.conversation`) or
`question` + `answer` (one turn), and optionally `qtype` (what eval reports accuracy by)
and `split` ("train" / "val" / ...). Without `split`, a stable hash of each row's image
puts `VAL_FRACTION` of the images in "val" (`stable_split`), the same in every process.

Problems a user can fix (a wrong path, a missing column, an empty split, an undecodable
image; for a URI also a missing bucket or credentials) raise `DataError` with a message that
names the file (or URI), column or split.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image

from raybench.config import uri_scheme
from raybench.data.conversation import MESSAGES_COLUMN, dumps, loads, one_turn, stable_split

# The synthetic set's columns (every one of them); a dataset needs `image` and one text form.
REQUIRED_COLUMNS = ("image", "question", "answer", "qtype", "split")
TEXT_FORMS = ((MESSAGES_COLUMN,), ("question", "answer"))
KNOWN_COLUMNS = ("image", MESSAGES_COLUMN, "question", "answer", "qtype", "split")
VAL_FRACTION = 0.1


class DataError(ValueError):
    """The dataset is missing, malformed or empty; the message says where and what."""


def _required() -> str:
    return "image, and messages or question + answer (optional: qtype, split)"


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith((".", "_")) for part in path.relative_to(root).parts)


@functools.lru_cache(maxsize=16)
def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a URI; cached: an S3 filesystem resolves the bucket's
    region once, not once per file."""
    return pafs.FileSystem.from_uri(uri)


def _reason(err: BaseException) -> str:
    """The underlying error's first line (pyarrow's can run to dozens of lines)."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return lines[0][:500] + (" ..." if len(lines) > 1 or len(lines[0]) > 500 else "")


@contextlib.contextmanager
def _remote(uri: str) -> Iterator[None]:
    """A URI's filesystem errors (no such bucket, no credentials, no network) as DataError."""
    try:
        yield
    except DataError:
        raise
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(f"cannot read dataset {uri}: {type(err).__name__}: {_reason(err)}") from None


def _join(uri: str, rel: str) -> str:
    """The URI of a file `rel` below the dataset URI (any ?query stays at the end)."""
    base, sep, query = uri.partition("?")
    return f"{base.rstrip('/')}/{rel}{sep}{query}"


@dataclass
class _Files:
    """A dataset's Parquet files as read: local `Path`s (`fs` None) or paths inside `fs`;
    `shown`: how messages name each one (a URI's: its own URI); `where`: the dataset."""

    paths: list
    shown: list
    where: str | Path
    fs: pafs.FileSystem | None = None


def _uri_files(uri: str) -> _Files:
    with _remote(uri):
        fs, root = _filesystem(uri)
        root = root.rstrip("/") or root
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"dataset path does not exist: {uri}")
        if info.type == pafs.FileType.File:
            found = [(root, uri)]
        else:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
            rels = sorted(posixpath.relpath(i.path, root) for i in infos
                          if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
            found = [(posixpath.join(root, r), _join(uri, r)) for r in rels
                     if not any(part.startswith((".", "_")) for part in r.split("/"))]
    if not found:
        raise DataError(f"no .parquet files under {uri} (a dataset needs columns: {_required()})")
    return _Files([f for f, _ in found], [u for _, u in found], uri, fs)


def _files(path: str | os.PathLike) -> _Files:
    """The dataset's files, the filesystem they are on and how messages name them."""
    if uri_scheme(path) is not None:
        return _uri_files(path)
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"dataset path does not exist: {p}")
    if p.is_file():
        return _Files([p], [p], p)
    files = sorted(f for f in p.rglob("*.parquet") if f.is_file() and not _hidden(f, p))
    if not files:
        raise DataError(f"no .parquet files under {p} (a dataset needs columns: {_required()})")
    return _Files(files, files, p)


def _reading(files: _Files):
    """Where a URI's read errors become DataError (a local path's propagate as they did)."""
    return _remote(str(files.where)) if files.fs is not None else contextlib.nullcontext()


def parquet_files(path: str | os.PathLike) -> list[Path] | list[str]:
    """The Parquet files of a dataset path (a file, or every `*.parquet` under a directory):
    `Path`s for a local path, each file's URI for a URI."""
    return list(_files(path).shown)


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):  # e.g. pandas categoricals
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_bytes(t: pa.DataType) -> bool:
    return (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
            or pa.types.is_fixed_size_binary(t))


def _check_schema(file: Path | str, filesystem: pafs.FileSystem | None = None,
                  shown: Path | str | None = None) -> pa.Schema:
    """The file's schema, checked; `filesystem`: where `file` is (None: local), `shown`: its
    name in messages (default: `file`)."""
    try:
        schema = pq.read_schema(file, filesystem=filesystem)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{shown or file} is not a readable Parquet file: {err}") from None
    file = shown or file
    names = set(schema.names)
    missing = ["image"] if "image" not in names else []
    if not any(set(form) <= names for form in TEXT_FORMS):
        half = [c for c in ("question", "answer") if c not in names]
        missing.append(f"{half[0]} (beside {'answer' if half[0] == 'question' else 'question'}; "
                       "or one messages column)" if len(half) == 1 else "messages (or question + answer)")
    if missing:
        raise DataError(f"{file} is missing column(s) {', '.join(missing)}; "
                        f"a dataset needs columns: {_required()}")
    wrong = [f"image is {schema.field('image').type}, expected binary (encoded image bytes)"
             ] if not _is_bytes(schema.field("image").type) else []
    wrong += [f"{c} is {schema.field(c).type}, expected string"
              for c in KNOWN_COLUMNS[1:] if c in names and not _is_text(schema.field(c).type)]
    if wrong:
        raise DataError(f"{file}: wrong column type(s): {'; '.join(wrong)}")
    return schema


def dataset_columns(path: str | os.PathLike) -> tuple[str, ...]:
    """The known columns every file of the dataset has (checked: the same in every file)."""
    return _columns(_files(path))


def _columns(files: _Files) -> tuple[str, ...]:
    found = None
    for file, shown in zip(files.paths, files.shown):
        cols = tuple(c for c in KNOWN_COLUMNS if c in _check_schema(file, files.fs, shown).names)
        if found is not None and cols != found:
            raise DataError(f"{shown} has columns {', '.join(cols)} but {files.shown[0]} has "
                            f"{', '.join(found)}: every file of a dataset needs the same columns")
        found = cols
    return found


def split_column(images: Sequence[bytes], val_fraction: float = VAL_FRACTION) -> list[str]:
    """The split of rows whose data has no `split` column: by a stable hash of the image."""
    return [stable_split(bytes(b), val_fraction) for b in images]


def validate_dataset(path: str | os.PathLike,
                     splits: Sequence[str] = ("train", "val")) -> dict[str, int]:
    """Rows per split, after checking every file's schema.

    Reads Parquet metadata and the `split` column only, never images (but for a dataset
    without `split`, whose split is hashed from them). Raises DataError when the path is
    missing, a file lacks a column, the dataset has no rows or one of `splits` has none.
    """
    if isinstance(splits, str):  # a bare "train" would iterate as letters
        splits = (splits,)
    files = _files(path)
    has_split = "split" in _columns(files)
    counts: dict[str, int] = {}
    total = 0
    fs = files.fs
    with _reading(files):
        for file in files.paths:
            rows = pq.read_metadata(file, filesystem=fs).num_rows
            total += rows
            if rows == 0:
                continue
            if has_split:
                column = pq.read_table(file, columns=["split"], filesystem=fs).column("split")
            else:
                images = pq.read_table(file, columns=["image"], filesystem=fs).column("image").to_pylist()
                column = pa.array(split_column(images))
            for item in pc.value_counts(column).to_pylist():
                name = "<null>" if item["values"] is None else str(item["values"])
                counts[name] = counts.get(name, 0) + item["counts"]
    where = files.where
    if total == 0:
        raise DataError(f"dataset at {where} is empty: 0 rows in {len(files.paths)} file(s)")
    for split in splits:
        if counts.get(split, 0) == 0:
            found = ", ".join(f"{k!r}: {v}" for k, v in sorted(counts.items()))
            raise DataError(f"dataset at {where} has 0 rows with split == {split!r} "
                            f"(rows per split: {found})")
    return counts


def last_turn(messages_json: str) -> tuple[str, str]:
    """(the last user text, the last assistant text) of a `messages` cell."""
    msgs = loads(messages_json)
    return msgs[-2]["content"], msgs[-1]["content"]


def normalize_columns(columns: dict[str, list], want: Sequence[str]) -> dict[str, list]:
    """Rows in whichever form the data has -> the columns `want`: `messages` from
    `question` / `answer` (one turn), `question` / `answer` from `messages` (its last
    turn), `qtype` "" where the data has none. Shared by `read_split` and Ray Data's
    per-batch reader, so both see the same rows."""
    n = len(columns["image"]) if "image" in columns else len(next(iter(columns.values())))
    out = {}
    for c in want:
        if c in columns:
            out[c] = list(columns[c])
        elif c == MESSAGES_COLUMN:
            out[c] = [dumps(one_turn(q, a)) for q, a in zip(columns["question"], columns["answer"])]
        elif c in ("question", "answer"):
            out[c] = [last_turn(m)[c == "answer"] for m in columns[MESSAGES_COLUMN]]
        elif c == "qtype":
            out[c] = [""] * n
        else:
            raise KeyError(c)
    return out


def source_columns(present: Sequence[str], want: Sequence[str]) -> list[str]:
    """The stored columns that `normalize_columns` needs for `want` (plus image, for a
    hashed split)."""
    need = set()
    for c in want:
        if c in present:
            need.add(c)
        elif c == MESSAGES_COLUMN:
            need |= {"question", "answer"}
        elif c in ("question", "answer"):
            need.add(MESSAGES_COLUMN)
    if "split" not in present:
        need.add("image")
    return [c for c in KNOWN_COLUMNS if c in need]


def read_split(path: str | os.PathLike, split: str,
               columns: Sequence[str] | None = None) -> pa.Table:
    """The rows with `split == split`, in file order; `columns` selects columns (default:
    the stored ones), in either text form whichever form is stored (`normalize_columns`).

    Raises DataError when the split has no rows: training on nothing is never intended.
    """
    files = _files(path)
    present = _columns(files)
    if columns is None:
        columns = list(present)
    unknown = [c for c in columns if c not in KNOWN_COLUMNS]
    if unknown:
        raise DataError(f"dataset at {path} has no column(s) {', '.join(unknown)}; "
                        f"columns: {', '.join(present)}")
    read = source_columns(present, columns)
    with _reading(files):
        dataset = ds.dataset([str(f) for f in files.paths], format="parquet", filesystem=files.fs)
        if "split" in present:
            table = dataset.to_table(columns=read, filter=pc.field("split") == split)
        else:
            table = dataset.to_table(columns=read)
    if "split" not in present:
        table = table.filter(pa.array([s == split for s in split_column(table.column("image").to_pylist())]))
        if "split" in columns:
            table = table.append_column("split", pa.array([split] * table.num_rows, pa.string()))
    if table.num_rows == 0:
        raise DataError(f"dataset at {files.where} has 0 rows with split == {split!r}")
    if all(c in table.column_names for c in columns):
        return table.select(list(columns))
    rows = normalize_columns(table.select([c for c in table.column_names]).to_pydict(), columns)
    types = {"image": table.schema.field("image").type} if "image" in table.column_names else {}
    return pa.table({c: pa.array(v, types.get(c, pa.string())) for c, v in rows.items()})


# ----------------------------------------------------------------------------- images


def decode_rgb_uint8(png_bytes: bytes, image_size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3] RGB at image_size x image_size."""
    if not isinstance(png_bytes, (bytes, bytearray, memoryview)):
        raise DataError(f"image is not a decodable image: expected bytes, got {type(png_bytes).__name__}")
    try:
        with Image.open(io.BytesIO(png_bytes)) as img:
            img = img.convert("RGB")  # also drops alpha / palettes / greyscale
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except Exception as err:  # Pillow's plugins raise many types on hostile or truncated bytes
        raise DataError(f"image is not a decodable image ({len(png_bytes)} bytes): {err}") from None


def normalize_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [-1, 1].

    SigLIP-style: (x / 255 - 0.5) / 0.5. Shared by the local loader and Ray Data workers,
    which keep images as uint8 until the batch is on the worker.
    """
    return pixels.to(torch.float32).div_(127.5).sub_(1.0).movedim(-1, -3).contiguous()


def decode_image(png_bytes: bytes, image_size: int) -> torch.Tensor:
    """Encoded image -> float32 [3, H, W] in [-1, 1], bilinear-resized to image_size."""
    return decode_images([png_bytes], image_size)[0]


def decode_images(images: Iterable[bytes], image_size: int) -> torch.Tensor:
    """A batch of encoded images -> float32 [B, 3, H, W] in [-1, 1]."""
    images = list(images)
    out = np.empty((len(images), image_size, image_size, 3), dtype=np.uint8)
    for i, data in enumerate(images):
        out[i] = decode_rgb_uint8(data, image_size)
    return normalize_pixels(torch.from_numpy(out))
