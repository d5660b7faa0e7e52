"""Read VQA rows from Parquet: our synthetic set or a user's files with the same columns.

A dataset is one `.parquet` file or a directory of them (searched recursively; names
starting with `.` or `_` are skipped, as `pyarrow.dataset` does). Every file needs the
columns in `REQUIRED_COLUMNS`; `split` says which rows are "train" and which "val".
Images are encoded bytes (PNG, JPEG, ...) decoded with Pillow, never unpickled.

Problems a user can fix (a wrong path, a missing column, an empty split, an undecodable
image) raise `DataError` with a message that names the file, column or split.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from PIL import Image

REQUIRED_COLUMNS = ("image", "question", "answer", "qtype", "split")


class DataError(ValueError):
    """The dataset is missing, malformed or empty; the message says where and what."""


def _required() -> str:
    return ", ".join(REQUIRED_COLUMNS)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith((".", "_")) for part in path.relative_to(root).parts)


def parquet_files(path: str | os.PathLike) -> list[Path]:
    """The Parquet files of a dataset path (a file, or every `*.parquet` under a directory)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"dataset path does not exist: {p}")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*.parquet") if f.is_file() and not _hidden(f, p))
    if not files:
        raise DataError(f"no .parquet files under {p} (a dataset needs columns: {_required()})")
    return files


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):  # e.g. pandas categoricals
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_bytes(t: pa.DataType) -> bool:
    return (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
            or pa.types.is_fixed_size_binary(t))


def _check_schema(file: Path) -> pa.Schema:
    try:
        schema = pq.read_schema(file)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{file} is not a readable Parquet file: {err}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise DataError(f"{file} is missing column(s) {', '.join(missing)}; "
                        f"a dataset needs columns: {_required()}")
    wrong = [f"{c} is {schema.field(c).type}, expected binary (encoded image bytes)"
             for c in ("image",) if not _is_bytes(schema.field(c).type)]
    wrong += [f"{c} is {schema.field(c).type}, expected string"
              for c in REQUIRED_COLUMNS[1:] if not _is_text(schema.field(c).type)]
    if wrong:
        raise DataError(f"{file}: wrong column type(s): {'; '.join(wrong)}")
    return schema


def validate_dataset(path: str | os.PathLike,
                     splits: Sequence[str] = ("train", "val")) -> dict[str, int]:
    """Rows per split, after checking every file's schema.

    Reads Parquet metadata and the `split` column only, never images. Raises DataError
    when the path is missing, a file lacks a column, the dataset has no rows or one of
    `splits` has none.
    """
    if isinstance(splits, str):  # a bare "train" would iterate as letters
        splits = (splits,)
    files = parquet_files(path)
    counts: dict[str, int] = {}
    total = 0
    for file in files:
        _check_schema(file)
        rows = pq.read_metadata(file).num_rows
        total += rows
        if rows == 0:
            continue
        column = pq.read_table(file, columns=["split"]).column("split")
        for item in pc.value_counts(column).to_pylist():
            name = "<null>" if item["values"] is None else str(item["values"])
            counts[name] = counts.get(name, 0) + item["counts"]
    where = Path(path).expanduser()
    if total == 0:
        raise DataError(f"dataset at {where} is empty: 0 rows in {len(files)} file(s)")
    for split in splits:
        if counts.get(split, 0) == 0:
            found = ", ".join(f"{k!r}: {v}" for k, v in sorted(counts.items()))
            raise DataError(f"dataset at {where} has 0 rows with split == {split!r} "
                            f"(rows per split: {found})")
    return counts


def read_split(path: str | os.PathLike, split: str,
               columns: Sequence[str] | None = None) -> pa.Table:
    """The rows with `split == split`, in file order; `columns` selects columns (default: all).

    Raises DataError when the split has no rows: training on nothing is never intended.
    """
    files = parquet_files(path)
    for file in files:
        _check_schema(file)
    dataset = ds.dataset([str(f) for f in files], format="parquet")
    if columns is not None:
        unknown = [c for c in columns if c not in dataset.schema.names]
        if unknown:
            raise DataError(f"dataset at {path} has no column(s) {', '.join(unknown)}; "
                            f"columns: {', '.join(dataset.schema.names)}")
        columns = list(columns)
    table = dataset.to_table(columns=columns, filter=pc.field("split") == split)
    if table.num_rows == 0:
        raise DataError(f"dataset at {Path(path).expanduser()} has 0 rows with split == {split!r}")
    return table


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
