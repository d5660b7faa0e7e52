"""Where a replica's model work runs: one thread per process when torch uses several.

The stages run their models off the event loop, so the replica keeps taking requests while
a batch or a decode step runs. With more than one intra-op thread, every Python thread that
runs torch ops gets its own OpenMP team, and on a CPU node two teams (the thread that loaded
and warmed the model, and each worker thread that later steps it) compete for the same
cores: a decode step taken in a worker thread then runs far slower than on the thread that
warmed the model (docs/serving.md has the measurement). So with several threads, loading, warm-up and every batch run on one thread,
shared by the stages of a process (the `single` topology shares its cores anyway); with
one thread, work goes to asyncio's pool as before, and stages in one process overlap.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")

_lock = threading.Lock()
_executor: concurrent.futures.ThreadPoolExecutor | None = None


def _model_thread() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="raybench-torch")
        return _executor


def one_thread() -> bool:
    """Whether model work goes to the process's one model thread (several torch threads)."""
    return torch.get_num_threads() > 1


def call(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn` where the process's model work runs, and wait for it (loading, warm-up)."""
    if not one_thread() or threading.current_thread().name.startswith("raybench-torch"):
        return fn(*args)
    return _model_thread().submit(fn, *args).result()


async def run(fn: Callable[..., T], *args: Any) -> T:
    """`call` from an event loop: the loop keeps running while `fn` does."""
    if not one_thread():
        return await asyncio.to_thread(fn, *args)
    return await asyncio.get_running_loop().run_in_executor(_model_thread(), functools.partial(fn, *args))
