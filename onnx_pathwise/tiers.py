"""When the compiled kernels are worth loading: numpy first, numba once a process has done enough.

Four inner loops of a plain explanation exist twice, as numpy and as a numba kernel that
gives the same bits (``tests/test_rules.py`` and ``tests/test_pathwise.py`` check each pair):
keeping the selected units' cotangents (:func:`onnx_pathwise.selection.keep_units`), the unit
scores' necessary test and centred rows (:func:`onnx_pathwise.scores.unit_excess`), max-pool
routing (:func:`onnx_pathwise.rules.pooling.window_argmax`) and its adjoint. The compiled
loops are 1.5–5× faster, but loading numba costs about a second per process (its import and
first dispatch) and compiling them after an install a few more: more than a command-line run
on one batch gains from them. So, as a JIT tiers an interpreter, the numpy forms run until
the process has spent :data:`COMPILE_AFTER` seconds in them (by then they have cost about half
of what loading numba does: a ResNet-18 run switches after a few batches of 8, or a few dozen
single images), or until numba is loaded anyway (class chunks, exact Integrated Gradients);
then the kernels. Results never depend on the tier, only the speed does.

``ONNX_PATHWISE_KERNELS``: ``auto`` (the default), ``compiled`` (always the kernels) or
``numpy`` (never).

:func:`in_parallel` runs independent pieces of such work (the kernels release the GIL, as do
numpy's large passes) on the calling thread and a pool of one thread per further core: the
unit scores of a large layer, the per-unit sums of a class chunk, the max-pool routing of many
channels.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

from .errors import PathwiseError

#: Seconds spent in the numpy forms before the kernels load.
COMPILE_AFTER = 1.0
_MODES = ("auto", "compiled", "numpy")
_spent = 0.0
_lock = threading.Lock()


def _mode() -> str:
    mode = os.environ.get("ONNX_PATHWISE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise PathwiseError(f"ONNX_PATHWISE_KERNELS={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def compiled() -> ModuleType | None:
    """:mod:`onnx_pathwise.kernels` when the compiled form should run, else None: run the
    numpy form inside :func:`timed`."""
    mode = _mode()
    if mode == "numpy" or (mode == "auto" and "onnx_pathwise.kernels" not in sys.modules and _spent < COMPILE_AFTER):
        return None
    from . import kernels

    return kernels


@contextlib.contextmanager
def timed() -> Iterator[None]:
    """Count the time of a numpy form towards :data:`COMPILE_AFTER`."""
    global _spent
    start = time.perf_counter()
    try:
        yield
    finally:
        with _lock:
            _spent += time.perf_counter() - start


# ---------------------------------------------------------------------- threads for the kernels

_pool: ThreadPoolExecutor | None = None
_POOL_NAME = "onnx-pathwise"


def workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ranges(n: int, work: int, per_thread: int) -> list[tuple[int, int]]:
    """[0, n) cut into one range per thread for :func:`in_parallel`: as many ranges as there are
    cores, at most one per ``per_thread`` of ``work`` (and per item), one at least."""
    parts = max(1, min(workers(), n, work // per_thread))
    cuts = [n * p // parts for p in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def in_parallel(tasks: list[Callable[[], Any]]) -> list[Any]:
    """Run independent tasks on the calling thread and ``workers() - 1`` pool threads, results
    in order: for the kernels that release the GIL (numba's ``nogil``, numpy's large passes).
    A task that calls this again runs its own tasks in turn (the pool never waits on itself)."""
    global _pool
    if len(tasks) <= 1 or workers() <= 1 or threading.current_thread().name.startswith(_POOL_NAME):
        return [task() for task in tasks]
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=workers() - 1, thread_name_prefix=_POOL_NAME)
    rest = [_pool.submit(task) for task in tasks[1:]]
    return [tasks[0]()] + [f.result() for f in rest]
