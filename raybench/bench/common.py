"""What every benchmark shares: the timing record, the files it writes, Markdown tables."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]


def checkout_commit() -> str | None:
    """The checkout's short commit, stored with each recorded unit (None outside a git checkout)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def write_unit_json(path: Path, data: dict) -> None:
    """A recorded unit's file, whole or absent: written aside, then renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.rename(path)


def timed_ms(fn, repeats: int, warmup: int = 2) -> list[float]:
    """Wall-clock milliseconds of `repeats` calls of `fn`, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def summarize(samples: list[float]) -> dict:
    """The shape every benchmark stores a timing in: median, min, max and the raw samples."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": samples}


def machine_info() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": pkg("transformers"), "ray": pkg("ray"),
            "cpus": os.cpu_count(), "memory_gib": round(memory / 2**30, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads()}


def write_result(out: Path, name: str, result: dict, row: str, plot) -> None:
    """The outputs every benchmark writes: <name>.json (with machine info), <name>.png via
    `plot(result, path)`, and one Markdown row appended to results.md (also printed)."""
    result["machine"] = machine_info()
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"{name}.png")
    with (out / "results.md").open("a") as f:
        f.write(row + "\n")
    print(row)


def markdown_table(rows: list[dict], columns: dict[str, str] | None = None) -> str:
    """A GitHub Markdown table of `rows` (pandas + tabulate). `columns` maps each row key to
    its header, in order (default: every key of the first row, as it is). Cells are written
    as given: format numbers before, so the page shows the precision each figure deserves."""
    import pandas as pd

    keys = list(columns) if columns is not None else list(rows[0]) if rows else []
    frame = pd.DataFrame([{k: row.get(k, "") for k in keys} for row in rows], columns=keys)
    return frame.rename(columns=columns or {}).to_markdown(index=False, disable_numparse=True)


def spread(stats: dict, fmt: str = ".2f") -> str:
    """A timing record (`summarize`) as one cell: "median (min-max)"."""
    return f"{stats['median']:{fmt}} ({stats['min']:{fmt}}-{stats['max']:{fmt}})"


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_rss_growth_mib(fn) -> float:
    """Peak resident memory above the starting point while `fn` runs (Linux only)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed pages back so the baseline is honest
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        return float("nan")
    base = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - base) / 1024
