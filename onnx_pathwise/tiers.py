"""When the compiled kernels are worth loading: numpy first, numba once a process has done enough.

Three inner loops of a plain explanation exist twice, as numpy and as a numba kernel that
gives the same bits (``tests/test_rules.py`` and ``tests/test_pathwise.py`` check each pair):
keeping the selected units' cotangents (:func:`onnx_pathwise.selection.keep_units`), max-pool
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
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from types import ModuleType

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
