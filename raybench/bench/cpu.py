"""Where the machine's cores went, from /proc (Linux): per process and idle.

On 2 cores a benchmark's throughput is bounded by the CPU its own processes get, so a gap
between two ways of running the same code is first read here: which processes took the
cores the workers did not get. `CpuSampler` snapshots every process in a thread, so the
cores can be read afterwards for any stretch of a run (the timed steps, not start-up).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """Every process's command line and CPU seconds so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            # "pid (comm) state ... utime stime ...": comm may hold spaces, so split after ')'.
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            # Ray's process titles ("ray::RayTrainWorker") pad argv with NULs: strip them.
            cmd = " ".join((d / "cmdline").read_bytes().decode(errors="replace").split("\0")).strip()
        except OSError:
            continue  # exited while we looked
        out[int(d.name)] = (cmd, (int(fields[11]) + int(fields[12])) / tick)
    return out


def idle_seconds() -> float:
    """The machine's idle CPU seconds so far (all cores; idle + iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return (int(fields[3]) + int(fields[4])) / os.sysconf("SC_CLK_TCK")


def cores_between(before: dict, after: dict, wall_s: float, part: Callable[[int, str], str]) -> dict[str, float]:
    """Cores each part used between two snapshots (CPU seconds over wall seconds); `part`
    names the part a process belongs to, from its pid and command line."""
    cores: dict[str, float] = Counter()
    for pid, (cmd, t) in after.items():
        cores[part(pid, cmd)] += (t - before.get(pid, (cmd, 0.0))[1]) / wall_s
    return {k: round(v, 2) for k, v in sorted(cores.items(), key=lambda kv: -kv[1]) if v >= 0.005}


class CpuSampler:
    """Snapshots (wall time, per-process CPU, machine idle) every `interval_s` while in a
    `with` block; `cores(t0, t1, part)` reads the stretch between two wall times."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s, self.snaps = interval_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.snaps.append((time.time(), cpu_snapshot(), idle_seconds()))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def cores(self, t0: float, t1: float, part: Callable[[int, str], str]) -> dict[str, float]:
        """Cores per part from the first snapshot at or after `t0` to the last at or before
        `t1`, plus `idle`; {} when fewer than two snapshots fall in the stretch."""
        inside = [s for s in self.snaps if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return {}
        (a_t, a, a_idle), (b_t, b, b_idle) = inside[0], inside[-1]
        wall = b_t - a_t
        return {**cores_between(a, b, wall, part), "idle": round((b_idle - a_idle) / wall, 2)}
