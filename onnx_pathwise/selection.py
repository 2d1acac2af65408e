"""The pathwise selection (docs/design.md §4): which units of one path layer a sample keeps.

:func:`select_units` scores every unit of a layer from its gate outputs h and the K score
cotangents J arriving there (:func:`onnx_pathwise.scores.unit_excess`, large layers split across
threads), keeps the first ``width`` by P (ties to the lower index) whose P exceeds 1/K, or the
first unit by P when none does; :class:`UnitStats` makes the same choice from per-unit sums
accumulated class chunk by class chunk, when one sample's K cotangents do not fit the memory
budget; :func:`keep_units` cuts the other units out of the cotangents. The sweep that calls them
is :class:`onnx_pathwise.pathwise.PathSweep`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from . import scores, tiers

if TYPE_CHECKING:
    from .pathwise import Competing


def _log_p(h: np.ndarray, J: np.ndarray, c: int) -> np.ndarray:
    """log softmax_k(h·J_k)[c] in float64: h (a,), J (K, a)."""
    C = J.astype(np.float64)
    C *= h
    top = C.max(axis=0)
    C -= top
    lead = C[c].copy()
    np.exp(C, out=C)
    return lead - np.log(C.sum(axis=0))


#: units per chunk above which the unit scores of one sample are split across threads
PARALLEL_UNITS = 1 << 15


def _unit_ranges(u: int) -> list[tuple[int, int]]:
    """A layer's u units cut into one range per thread when it is large (PARALLEL_UNITS units
    per thread at least), else one range."""
    return tiers.ranges(u, u, PARALLEL_UNITS)


def _candidates(h: np.ndarray, J: np.ndarray, c: int, split: bool = True,
                zero_row: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices (ascending) and scores e = log(K·P) of one sample's units with P > 1/K.

    Each unit's score depends on that unit alone, so with ``split`` large layers are cut into
    chunks scored on several threads (numpy's passes release the GIL); the result does
    not depend on the cut."""
    u = h.shape[0]

    def score(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        idx, e = scores.unit_excess(h[a:b], J[:, a:b], c, zero_row)
        return idx + a, e

    ranges = _unit_ranges(u) if split else [(0, u)]
    if len(ranges) == 1:
        return score(0, u)
    chunks = tiers.in_parallel([functools.partial(score, a, b) for a, b in ranges])
    return np.concatenate([i for i, _ in chunks]), np.concatenate([e for _, e in chunks])


def keep_units(g: np.ndarray, mask: np.ndarray, slope: np.ndarray | None = None) -> np.ndarray:
    """g (K, n, u) times ``slope`` (n, u) on the units of ``mask`` (n, u), +0 elsewhere (never
    -0 or NaN, as a multiply by the mask would give), as a new array. numpy writes the kept
    entries into zeros (its select, ``np.where``, is slower); the compiled loop is one select
    pass over the whole array, 3-6x faster (same bits, :mod:`onnx_pathwise.tiers`)."""
    kernels = tiers.compiled()
    if kernels is not None:
        return kernels.keep_units(g, mask, np.ones(mask.shape, g.dtype) if slope is None else slope)
    with tiers.timed():
        out = np.zeros(g.shape, g.dtype)  # calloc: pages never written are never touched (zeros_like writes them)
        for i in range(g.shape[1]):
            j = np.flatnonzero(mask[i])
            out[:, i, j] = g[:, i, j] if slope is None else g[:, i, j] * slope[i, j]
        return out


def _keep(candidates: np.ndarray, e: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` candidates with the largest scores, ties at the cut to the lower index
    (candidates ascend): everything above the cut, then the first ties at it."""
    m = candidates.size
    if m <= width:
        return candidates
    kth = np.partition(e, m - width)[m - width]
    above = e > kth
    ties = np.flatnonzero(e == kth)[: width - int(np.count_nonzero(above))]
    above[ties] = True
    return candidates[above]


def select_units(h: np.ndarray, J: np.ndarray, target: np.ndarray, width: int,
                 counts: np.ndarray | None = None, zero_row: bool = False) -> np.ndarray:
    """The kept-unit mask (n, u) of one path layer.

    h (n, u) gate outputs, J (K, n, u) score cotangents, target (n,) rows of J (the classes,
    when every class competes); with ``counts`` only the first counts[i] rows of sample i
    compete (the rest is padding). Scores
    P_i = softmax_k(h_i J_ik)[c] in float64 (as e = log(K·P) > 0, see
    :func:`onnx_pathwise.scores.unit_excess`), candidates by P descending with ties to the
    lower index, the first ``width`` kept when P > 1/K, else the first candidate. Samples are
    independent: a batch is spread over the cores sample by sample, a single sample's large
    layer chunk by chunk. With ``zero_row`` (a single score) the scored rows are a row of zeros
    then J's one row (``target`` and ``counts`` count the zero row), never built in full.
    """
    K, n, u = J.shape
    mask = np.zeros((n, u), bool)
    first = 1 if zero_row else 0  # scored rows that J does not hold

    def one(i: int) -> None:
        c = int(target[i])
        Ji = J[:, i] if counts is None else J[: int(counts[i]) - first, i]
        candidates, e = _candidates(h[i], Ji, c, split=n == 1, zero_row=zero_row)
        if candidates.size == 0:
            # nobody favours the target: keep the first candidate of the full order
            if zero_row:
                Ji = np.concatenate([np.zeros((1, u), J.dtype), Ji])
            full = _log_p(h[i], Ji, c)
            mask[i, int(np.argmax(full))] = True  # argmax returns the lowest index among ties
            return
        mask[i, _keep(candidates, e, width)] = True

    if n == 1:
        one(0)
    else:
        tiers.in_parallel([functools.partial(one, i) for i in range(n)])
    return mask


class UnitStats:
    """Per-unit sums of one path layer over chunks of competing rows (docs/design.md §4, "Bounded
    memory at any K"): what the selection needs of every class, never the n × K matrix."""

    def __init__(self, h: np.ndarray, competing: Competing) -> None:
        n, u = h.shape
        self.h, self.competing = h, competing
        self.s = np.zeros((n, u))
        self.top = np.zeros((n, u))  # log-sum-exp = top + log(acc), any top (kernels.lse_accumulate)
        self.acc = np.zeros((n, u))
        self.jc = np.zeros((n, u))
        self._scratch = np.empty(u)

    def add(self, start: int, g: np.ndarray) -> None:
        """Cotangents g (m, n, u) of rows start … start + m − 1."""
        from . import kernels

        m, n = g.shape[:2]
        g = np.ascontiguousarray(g)
        comp = self.competing
        ranges = _unit_ranges(g.shape[2])
        for i in range(n):
            rows = int(min(max(int(comp.count[i]) - start, 0), m))
            c = int(comp.target_row[i]) - start
            args = (self.h[i], g, i, rows, c if 0 <= c < m else -1, self.s[i], self.top[i], self.acc[i],
                    self.jc[i], self._scratch)
            # each unit's sums are its own: a large layer's units are split across threads
            tiers.in_parallel([functools.partial(kernels.lse_accumulate, *args, a, b) for a, b in ranges])

    def select(self, width: int) -> np.ndarray:
        """The kept-unit mask (n, u), by the rule of :func:`select_units`."""
        from . import kernels

        n, u = self.h.shape
        mask = np.zeros((n, u), bool)
        idx, e = np.empty(u, np.int64), np.empty(u)
        for i in range(n):
            K = int(self.competing.count[i])
            m = kernels.lse_excess(self.h[i], self.s[i], self.top[i], self.acc[i], self.jc[i], K, idx, e)
            if m == 0:
                # nobody favours the target: keep the first candidate of the full order
                with np.errstate(divide="ignore"):
                    full = self.h[i].astype(np.float64) * self.jc[i] - self.top[i] - np.log(self.acc[i])
                mask[i, int(np.argmax(full))] = True
                continue
            mask[i, _keep(idx[:m].copy(), e[:m].copy(), width)] = True
        return mask
