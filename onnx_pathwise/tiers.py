"""When the compiled kernels are worth loading: numpy first, numba once a process has done enough.

Three inner loops of a plain explanation exist twice, as numpy and as a numba kernel that
gives the same bits (``tests/test_rules.py`` and ``tests/test_pathwise.py`` check each pair):
keeping the selected units' cotangents (:func:`onnx_pathwise.pathwise.keep_units`), max-pool
routing (:func:`onnx_pathwise.rules.pooling.window_argmax`) and its adjoint. The compiled
loops are 1.5–3× faster, but loading numba costs about a second per process (its import and
first dispatch) and compiling them after an install a few more: more than a command-line run
on one batch gains from them. So, as a JIT tiers an interpreter, the numpy forms run until
the process has pushed :data:`COMPILE_AFTER` elements through them (by then the numpy forms
have cost about half of what loading numba does; one ResNet-18 batch of 8, or eight single
images), or until numba is loaded anyway (class chunks, exact Integrated Gradients); then the
kernels. Results never depend on the tier.

``ONNX_PATHWISE_KERNELS``: ``auto`` (the default), ``compiled`` (always the kernels) or
``numpy`` (never).
"""

from __future__ import annotations

import os
import sys
import threading
from types import ModuleType

from .errors import PathwiseError

#: Elements (cotangent entries and pooled inputs) handled in numpy before the kernels load.
COMPILE_AFTER = 200_000_000
_MODES = ("auto", "compiled", "numpy")
_done = 0
_lock = threading.Lock()


def _mode() -> str:
    mode = os.environ.get("ONNX_PATHWISE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise PathwiseError(f"ONNX_PATHWISE_KERNELS={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def compiled(elements: int) -> ModuleType | None:
    """:mod:`onnx_pathwise.kernels` when the compiled form should run a job of ``elements``
    elements, else None (run the numpy form); counts the job towards :data:`COMPILE_AFTER`."""
    global _done
    mode = _mode()
    if mode == "numpy":
        return None
    if mode == "auto" and "onnx_pathwise.kernels" not in sys.modules:
        with _lock:
            _done += elements
            if _done < COMPILE_AFTER:
                return None
    from . import kernels

    return kernels
