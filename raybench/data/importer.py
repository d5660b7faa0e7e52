"""`raybench data import`: a conversation dataset in a format other trainers take (see
`raybench.data.import_formats`) to raybench Parquet, every image read and checked once.

Output: `data-NNNNN.parquet` files under `out` (at most `ROWS_PER_FILE` rows each) with the
columns of `SCHEMA` -- `image` (the encoded bytes as found: PNG, JPEG, ...; other formats
Pillow reads are re-encoded to PNG), `messages` (`conversation.dumps`, no `<image>` tags),
`qtype` (the record's own, else ""), `split` (the record's own, else `split`, else a stable
hash of the image bytes so every conversation about one image lands in one split) and
`source_index` (the record's number in the source, from 0) -- plus `_import-report.json`
(every bad record's number and reason; the leading "_" makes pyarrow, pandas and Ray Data
skip it when they read the directory).

A source is a `.json` file (a list of records), `.jsonl` (one record a line), `.parquet` (or
a directory of them, HF style: the same fields as columns). An image reference is bytes, a
`{bytes, path}` struct (bytes win), a `data:image/...;base64,` URI or a path (relative ones
under `image_root`, default: the source's directory). http(s) URLs are never fetched.

Bad records are counted, reported by number and skipped; `strict=True` raises on the first.
Nothing is left half-written: the files go to a hidden directory beside `out`, renamed
into place when the import succeeds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raybench.data import conversation
from raybench.data.import_formats import FORMATS, BadRecord, checked_conversation
from raybench.data.loader import DataError

ROWS_PER_FILE = 5000
REPORT_NAME = "_import-report.json"  # "_": Parquet readers of the directory skip it
KEPT_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF"}  # bytes in these are kept as found
SCHEMA = pa.schema([("image", pa.binary()), (conversation.MESSAGES_COLUMN, pa.string()),
                    ("qtype", pa.string()), ("split", pa.string()), ("source_index", pa.int64())])


class StrictImportError(DataError):
    """`strict=True` met a bad record."""

    def __init__(self, index: int, reason: str):
        self.index, self.reason = index, reason
        super().__init__(f"record {index}: {reason} (--strict stops at the first bad record; "
                         "nothing was written)")


@dataclass
class ImportReport:
    source: str
    format: str
    out: str
    records: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    bad: list[tuple[int, str]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["bad_count"] = len(self.bad)
        d["bad"] = [{"record": i, "reason": r} for i, r in self.bad]
        return d

    def summary(self, max_bad: int = 20) -> str:
        rows = ", ".join(f"{k}: {v}" for k, v in sorted(self.rows.items())) or "none"
        lines = [(f"read {self.records} records from {self.source} ({self.format}); "
                  f"wrote {sum(self.rows.values())} rows to {self.out} ({rows}); {len(self.bad)} bad")]
        lines += [f"  record {i}: {r}" for i, r in self.bad[:max_bad]]
        if len(self.bad) > max_bad:
            lines.append(f"  ... and {len(self.bad) - max_bad} more in {Path(self.out) / REPORT_NAME}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- sources


def read_records(src: Path) -> Iterator[tuple[int, Any]]:
    """(record number, record) for every record of `src`; a malformed JSON line is yielded
    as a BadRecord in place of its record."""
    if src.is_dir() or src.suffix == ".parquet":
        files = sorted(src.rglob("*.parquet")) if src.is_dir() else [src]
        if not files:
            raise DataError(f"no .parquet files under {src}")
        n = 0
        for f in files:
            try:
                batches = pq.ParquetFile(f).iter_batches(batch_size=256)
                for batch in batches:
                    for record in batch.to_pylist():
                        yield n, record
                        n += 1
            except (pa.ArrowException, OSError) as err:
                raise DataError(f"{f} is not a readable Parquet file: {err}") from None
    elif src.suffix == ".jsonl":
        with open(src, encoding="utf-8") as fh:
            n = 0
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as err:
                    yield n, BadRecord(f"line {line_no} is not JSON: {err}")
                n += 1
    elif src.suffix == ".json":
        try:
            with open(src, encoding="utf-8") as fh:
                records = json.load(fh)
        except json.JSONDecodeError as err:
            raise DataError(f"{src} is not JSON: {err} (one record a line? name it .jsonl)") from None
        if not isinstance(records, list):
            raise DataError(f"{src}: a .json source is a list of records, got {type(records).__name__}")
        yield from enumerate(records)
    else:
        raise DataError(f"{src}: the source is a .json, .jsonl or .parquet file (or a directory "
                        "of .parquet files)")


# ----------------------------------------------------------------------------- images


class ImageReader:
    """Image references to checked, encoded bytes; each distinct image decoded once."""

    def __init__(self, image_root: Path):
        self.image_root = image_root
        # sha256 of the source bytes -> the PNG re-encoding, or None when stored as found
        self._checked: dict[bytes, bytes | None] = {}

    def raw(self, ref: Any) -> bytes:
        if isinstance(ref, dict):
            ref = ref.get("bytes") if ref.get("bytes") is not None else ref.get("path")
            if ref is None:
                raise BadRecord("image struct has neither bytes nor path")
        if isinstance(ref, (bytes, bytearray, memoryview)):
            return bytes(ref)
        if not isinstance(ref, str) or not ref:
            raise BadRecord(f"image reference must be bytes, a {{bytes, path}} struct, a data: URI "
                            f"or a path, got {type(ref).__name__}")
        if ref.startswith(("http://", "https://")):
            raise BadRecord(f"image {ref}: remote images are not fetched; download them first")
        if ref.startswith("data:"):
            header, _, payload = ref.partition(",")
            if not header.endswith(";base64"):
                raise BadRecord(f"image data: URI {header[:40]}... is not base64")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as err:
                raise BadRecord(f"image data: URI is not valid base64: {err}") from None
        if ref.startswith("file://"):
            ref = ref[len("file://"):]
        elif "://" in ref:
            raise BadRecord(f"image {ref}: only local paths are read; copy it here first")
        path = Path(ref).expanduser()
        path = path if path.is_absolute() else self.image_root / path
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise BadRecord(f"image file not found: {path}") from None
        except OSError as err:
            raise BadRecord(f"cannot read image file {path}: {err}") from None

    def encoded(self, ref: Any) -> bytes:
        """The bytes to store: the source's own when Pillow decodes them in a common format,
        PNG when it decodes them in another; BadRecord when it cannot."""
        data = self.raw(ref)
        key = hashlib.sha256(data).digest()
        if key in self._checked:
            return self._checked[key] or data
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                rgb = img.convert("RGB")  # what the loader does with it
                if img.format not in KEPT_FORMATS:
                    buf = io.BytesIO()
                    rgb.save(buf, format="PNG")
                    data = buf.getvalue()
        except Exception as err:  # noqa: BLE001 -- any decoder failure is the record's problem
            raise BadRecord(f"image cannot be decoded: {type(err).__name__}: {err}") from None
        self._checked[key] = None if img.format in KEPT_FORMATS else data
        return data


# ----------------------------------------------------------------------------- import


def _prepare_out(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    entries = list(out.iterdir())
    if not entries:
        return
    if not overwrite:
        raise DataError(f"--out {out} is not empty; pass --overwrite to replace a previous import")
    foreign = [e.name for e in entries
               if not (e.is_file() and (e.name == REPORT_NAME or e.name.endswith(".parquet")))]
    if foreign:
        raise DataError(f"--out {out} holds more than a previous import ({', '.join(sorted(foreign)[:5])}); "
                        "--overwrite only replaces a directory of .parquet files and "
                        f"{REPORT_NAME}: remove it yourself or pick another --out")


class _ParquetWriter:
    """Rows (in SCHEMA's column order) -> `data-NNNNN.parquet` files of at most
    `rows_per_file` rows each, named in `report.files`."""

    def __init__(self, folder: Path, rows_per_file: int, report: ImportReport):
        self.folder, self.rows_per_file, self.report = folder, rows_per_file, report
        self.rows: dict[str, list] = {name: [] for name in SCHEMA.names}

    def add(self, values: tuple) -> None:
        for name, value in zip(SCHEMA.names, values):
            self.rows[name].append(value)
        if len(self.rows["image"]) >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        if self.rows["image"]:
            name = f"data-{len(self.report.files):05d}.parquet"
            pq.write_table(pa.table(self.rows, schema=SCHEMA), self.folder / name)
            self.report.files.append(name)
            for column in self.rows.values():
                column.clear()


def import_dataset(src: str | os.PathLike, fmt: str, out: str | os.PathLike, *,
                   image_root: str | os.PathLike | None = None, strict: bool = False,
                   split: str | None = None, val_fraction: float = 0.1, overwrite: bool = False,
                   rows_per_file: int = ROWS_PER_FILE,
                   progress: Callable[[int], None] | None = None) -> ImportReport:
    """Import `src` (format `fmt`) into `out` as raybench Parquet; the report says what was
    written and which records were bad. Raises DataError for a bad source or `out`, when no
    record is good, and (StrictImportError) on the first bad record when `strict`."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if not 0.0 <= val_fraction <= 1.0:
        raise DataError(f"--val-fraction must be within [0, 1], got {val_fraction}")
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.exists():
        raise DataError(f"source does not exist: {src}")
    _prepare_out(out, overwrite)
    parse = FORMATS[fmt]
    images = ImageReader(Path(image_root).expanduser() if image_root is not None
                         else (src if src.is_dir() else src.parent))
    report = ImportReport(source=str(src), format=fmt, out=str(out))
    base = out.resolve()  # a name even for "."
    tmp = base.parent / f".{base.name}.importing-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    writer = _ParquetWriter(tmp, rows_per_file, report)
    try:
        for index, record in read_records(src):
            report.records += 1
            if progress is not None and report.records % 10000 == 0:
                progress(report.records)
            try:
                if isinstance(record, BadRecord):
                    raise record
                parsed = parse(record)
                messages = checked_conversation(parsed)
                image = images.encoded(parsed.images[0])
            except BadRecord as err:
                if strict:
                    raise StrictImportError(index, str(err)) from None
                report.bad.append((index, str(err)))
                continue
            row_split = parsed.split or split or conversation.stable_split(image, val_fraction)
            writer.add((image, conversation.dumps(messages), parsed.qtype, row_split, index))
            report.rows[row_split] = report.rows.get(row_split, 0) + 1
        writer.flush()
        if report.records == 0:
            raise DataError(f"{src} holds no records")
        if not report.files:
            first = "; ".join(f"record {i}: {r}" for i, r in report.bad[:3])
            raise DataError(f"no good records in {src}: {report.records} read, all bad ({first}"
                            f"{'; ...' if len(report.bad) > 3 else ''})")
        (tmp / REPORT_NAME).write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")
        if out.exists():
            shutil.rmtree(out)  # empty, or a previous import (checked by _prepare_out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
