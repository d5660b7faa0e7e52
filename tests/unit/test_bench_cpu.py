"""`raybench.bench.cpu`: the cores each process used, read back for a stretch of a run."""

import os
import subprocess
import sys
import time

from raybench.bench.cpu import CpuSampler, cores_between


def _part(pid, cmd):
    return "spinner" if "raybench-spin" in cmd else "sleeper" if "raybench-sleep" in cmd else "rest"


def test_a_spinning_process_is_counted_busy_and_a_sleeping_one_idle():
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass",
                             "raybench-spin"])
    sleep = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)", "raybench-sleep"])
    try:
        with CpuSampler(interval_s=0.2) as cpu:
            time.sleep(1.0)  # both have started
            t0 = time.time()
            time.sleep(1.5)
            t1 = time.time()
    finally:
        spin.kill(), sleep.kill()
    cores = cpu.cores(t0, t1, _part)
    # On a loaded 2-core machine a busy loop still gets a good share of one core.
    assert cores["spinner"] > 0.3
    assert cores.get("sleeper", 0.0) < 0.05
    # Idle is in cores too (all of the machine's together), not seconds or clock ticks.
    assert 0 <= cores["idle"] <= os.cpu_count() + 0.1


def test_a_stretch_without_two_snapshots_reads_as_unknown():
    with CpuSampler(interval_s=10) as cpu:  # one snapshot at the start, one at exit
        pass
    t = cpu.snaps[0][0]
    assert cpu.cores(t + 0.001, t + 0.002, _part) == {}


def test_cores_between_counts_processes_that_started_in_between():
    before = {1: ("a", 10.0)}
    after = {1: ("a", 11.0), 2: ("b", 0.5)}
    assert cores_between(before, after, 2.0, lambda pid, cmd: cmd) == {"a": 0.5, "b": 0.25}
