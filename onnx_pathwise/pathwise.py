"""Pathwise explanations (Lim, Jo, Lee, Choi, AISTATS 2024) on one backward sweep.

The sweep carries the cotangents of all K scores (DESIGN §4). As it passes each path layer
(the last ``depth`` gate layers), a hook scores every unit with P_i = softmax_k(h_i·J_ik)[c]
in float64, keeps the first ``width`` units by P (ties to the lower index) whose P exceeds 1/K
(or the first one if none does), and cuts the rest by masking the cotangents. Gates and argmax
stay those of the recorded forward pass, so every path model is an exact term of the
network's unfolded sum, and W_p, b_p come out of the same sweep.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .engine import Engine, Record, Through
from .errors import PathwiseError
from .graph import GateLayer
from .ir import Node

Width = int | str | None


def parse_width(spec: Width, units: int) -> int:
    """Units kept per layer: an int count, a percentage string ``"5%"`` (max(1, round(n·p/100))
    with Python's round), or None for all units. Always between 1 and ``units``."""
    if spec is None:
        return units
    if isinstance(spec, str):
        s = spec.strip()
        if s.endswith("%"):
            try:
                p = float(s[:-1])
            except ValueError:
                raise PathwiseError(f"width {spec!r}: expected a count like 10 or a percentage like '5%'") from None
            if not 0 < p <= 100:
                raise PathwiseError(f"width {spec!r}: the percentage must be in (0, 100]")
            return min(units, max(1, round(units * p / 100)))
        try:
            spec = int(s)
        except ValueError:
            raise PathwiseError(f"width {spec!r}: expected a count like 10 or a percentage like '5%'") from None
    if isinstance(spec, bool) or not isinstance(spec, (int, np.integer)):
        raise PathwiseError(f"width {spec!r}: expected an int, a percentage string or None")
    if spec < 1:
        raise PathwiseError(f"width {spec}: must be at least 1")
    return min(units, int(spec))


def path_layers(layers: Sequence[GateLayer], depth: int | None) -> list[GateLayer]:
    """The last ``depth`` gate layers (all when None or more than there are)."""
    if depth is None:
        return list(layers)
    whole = isinstance(depth, (int, np.integer)) or (isinstance(depth, float) and depth.is_integer())
    if isinstance(depth, bool) or not whole or depth < 0:
        raise PathwiseError(f"depth {depth!r}: must be a non-negative integer")
    # clamp the start: a negative one would count from the end (depth = layers + 1 kept one)
    return list(layers[max(0, len(layers) - int(depth)):])


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
_pool: ThreadPoolExecutor | None = None


def _workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _in_parallel(tasks: list[Callable[[], Any]]) -> list[Any]:
    """Run independent tasks on the calling thread and the worker threads, results in order.
    The tasks must not call this themselves (the pool is not re-entrant)."""
    global _pool
    if len(tasks) <= 1 or _workers() <= 1:
        return [task() for task in tasks]
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_workers() - 1, thread_name_prefix="onnx-pathwise")
    rest = [_pool.submit(task) for task in tasks[1:]]
    return [tasks[0]()] + [f.result() for f in rest]


def _candidates(h: np.ndarray, J: np.ndarray, c: int, split: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices (ascending) and scores e = log(K·P) of one sample's units with P > 1/K.

    Each unit's score depends on that unit alone, so with ``split`` large layers are cut into
    chunks scored on several threads (the compiled kernel releases the GIL); the result does
    not depend on the cut."""
    from . import kernels  # numba: imported on first use

    u = h.shape[0]

    def score(a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        idx, e = np.empty(b - a, np.int64), np.empty(b - a, np.float64)
        m = kernels.unit_excess(h[a:b], J[:, a:b], c, idx, e)
        return idx[:m] + a, e[:m]

    parts = min(_workers(), u // PARALLEL_UNITS) if split else 1
    if parts <= 1:
        return score(0, u)
    cuts = [u * p // parts for p in range(parts + 1)]
    chunks = _in_parallel([functools.partial(score, a, b) for a, b in zip(cuts[:-1], cuts[1:])])
    return np.concatenate([i for i, _ in chunks]), np.concatenate([e for _, e in chunks])


def select_units(h: np.ndarray, J: np.ndarray, target: np.ndarray, width: int) -> np.ndarray:
    """The kept-unit mask (n, u) of one path layer.

    h (n, u) gate outputs, J (K, n, u) score cotangents, target (n,) classes. Scores
    P_i = softmax_k(h_i J_ik)[c] in float64 (as e = log(K·P) > 0, see
    :func:`onnx_pathwise.kernels.unit_excess`), candidates by P descending with ties to the
    lower index, the first ``width`` kept when P > 1/K, else the first candidate. Samples are
    independent: a batch is spread over the cores sample by sample, a single sample's large
    layer chunk by chunk.
    """
    K, n, u = J.shape
    mask = np.zeros((n, u), bool)

    def one(i: int) -> None:
        c = int(target[i])
        candidates, e = _candidates(h[i], J[:, i], c, split=n == 1)
        m = candidates.size
        if m == 0:
            # nobody favours the target: keep the first candidate of the full order
            full = _log_p(h[i], J[:, i], c)
            mask[i, int(np.argmax(full))] = True  # argmax returns the lowest index among ties
            return
        if m > width:
            # the kept set is the `width` largest scores, ties at the cut to the lower index
            # (candidates ascend): everything above the cut, then the first ties at it
            kth = np.partition(e, m - width)[m - width]
            above = e > kth
            ties = np.flatnonzero(e == kth)[: width - int(np.count_nonzero(above))]
            above[ties] = True
            candidates = candidates[above]
        mask[i, candidates] = True

    if n == 1:
        one(0)
    else:
        _in_parallel([functools.partial(one, i) for i in range(n)])
    return mask


@dataclass(frozen=True)
class PathLayer:
    """One layer of a sample's decision path."""

    node: str
    kept: np.ndarray  # flat unit indices, ascending
    units: int

    @property
    def count(self) -> int:
        return int(self.kept.size)


@dataclass(frozen=True)
class Explanation:
    """Pathwise explanations of a batch; every array has the batch axis first."""

    attribution: np.ndarray  # (N, *input shape) = weight ⊙ x
    weight: np.ndarray  # (N, *input shape) W_p
    bias: np.ndarray  # (N,) b_p
    output: np.ndarray  # (N, K) onnxruntime's scores
    target: np.ndarray  # (N,)
    masked_score: np.ndarray  # (N,) y_c of the masked network at x = W_p·x + b_p
    path: list[list[PathLayer]] = field(repr=False)
    input_kept: np.ndarray | None = field(default=None, repr=False)  # (N, D) when input_width

    @property
    def score(self) -> np.ndarray:
        """y_c(x) of the full network (onnxruntime)."""
        return self.output[np.arange(len(self.target)), self.target]

    @property
    def faithfulness(self) -> np.ndarray:
        """masked score / full score (1 = the path alone explains the whole score)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.masked_score / self.score

    @property
    def sparsity(self) -> np.ndarray:
        """Fraction of the path layers' units kept, per sample."""
        out = []
        for layers in self.path:
            total = sum(p.units for p in layers)
            out.append(sum(p.count for p in layers) / total if total else 1.0)
        return np.array(out)


def resolve_targets(target: Any, scores: np.ndarray) -> np.ndarray:
    n, K = scores.shape
    if target is None:
        return scores.argmax(axis=1)
    t = np.asarray(target)
    if t.dtype.kind not in "iu":
        raise PathwiseError(f"target {target!r}: expected an int or one int per sample")
    t = np.broadcast_to(t, (n,)) if t.ndim == 0 else t
    if t.shape != (n,):
        raise PathwiseError(f"target: {t.shape[0]} values for {n} samples")
    if np.any(t < 0) or np.any(t >= K):
        raise PathwiseError(f"target {target!r}: out of range for {K} scores")
    return t.astype(np.int64)


class PathSweep:
    """Runs the single pathwise sweep and remembers what the decomposition needs."""

    def __init__(self, engine: Engine, layers: Sequence[GateLayer], record: Record, target: np.ndarray,
                 widths: dict[str, int], input_width: int | None, keep_at: str | None = None) -> None:
        self.engine, self.record, self.target = engine, record, target
        self.widths = widths
        self.input_width = input_width
        self.keep_at = keep_at
        self.masks: dict[str, np.ndarray] = {}
        self.at_layer: np.ndarray | None = None  # (n, u) ∂y_c/∂h at keep_at, masks applied
        self.input_mask: np.ndarray | None = None
        self.layers = {layer.name: layer for layer in layers}

    def _gate_hook(self, node: Node, g: np.ndarray) -> np.ndarray | Through:
        from . import kernels

        K, n = g.shape[:2]
        flat = g.reshape(K, n, -1)
        if node.name in self.widths:
            state = self.record.states[node.name]
            mask = select_units(state.value.reshape(n, -1), flat, self.target, self.widths[node.name])
            self.masks[node.name] = mask
            if state.offset is None and node.name != self.keep_at:
                # the kept units times their frozen slopes: the gate's transpose done here
                return Through(kernels.keep_units(flat, mask, state.slope.reshape(n, -1)).reshape(g.shape))
            flat = kernels.keep_units(flat, mask, np.ones(mask.shape, flat.dtype))
        if node.name == self.keep_at:
            rows = self.target if K > 1 else np.zeros(n, np.int64)  # one row once narrowed
            self.at_layer = flat[rows, np.arange(n)].copy()
        return flat.reshape(g.shape)

    def _input_hook(self, node: Any, w: np.ndarray) -> np.ndarray:
        K, n = w.shape[:2]
        flat = w.reshape(K, n, -1)
        assert self.input_width is not None
        mask = select_units(self.record.x.reshape(n, -1), flat, self.target, self.input_width)
        self.input_mask = mask
        return (flat * mask[None].astype(flat.dtype)).reshape(w.shape)

    def run(self, seeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """W_p (n, *in) and b_p (n,) of each sample's target.

        The sweep carries all K score cotangents down to the lowest path layer (selection needs
        them), then only the target's: below it nothing is selected any more (unless the input
        is, with ``input_width``). With no path layer it carries the target's alone throughout.
        """
        names = set(self.widths) | ({self.keep_at} if self.keep_at is not None else set())
        hooks = {name: self._gate_hook for name in names}
        narrow_after: str | None = None
        if not self.input_width:
            order = [node.name for node in self.engine.nodes if node.name in self.widths]
            narrow_after = order[0] if order else ""
        W, b = self.engine.backward(
            seeds, self.record, hooks=hooks, input_hook=self._input_hook if self.input_width else None,
            bias_rows=self.target, narrow_after=narrow_after,
        )
        n = self.record.n
        weight = W[0] if W.shape[0] == 1 and narrow_after is not None else W[self.target, np.arange(n)]
        return weight, b[0]

    def replay(self, seeds: dict[str, np.ndarray]) -> np.ndarray:
        """A sweep from ``seeds`` that applies the masks already chosen (no new selection)."""
        def apply(node: Node, g: np.ndarray) -> np.ndarray:
            m, n = g.shape[:2]
            mask = self.masks[node.name]
            return (g.reshape(m, n, -1) * mask[None].astype(g.dtype)).reshape(g.shape)

        def apply_input(node: Any, w: np.ndarray) -> np.ndarray:
            m, n = w.shape[:2]
            assert self.input_mask is not None
            return (w.reshape(m, n, -1) * self.input_mask[None].astype(w.dtype)).reshape(w.shape)

        w, _ = self.engine.backward(
            seeds, self.record, hooks={k: apply for k in self.masks},
            input_hook=apply_input if self.input_mask is not None else None,
        )
        return w
