"""Pathwise explanations (Lim, Jo, Lee, Choi, AISTATS 2024) on one backward sweep.

The sweep carries the cotangents of all K scores (docs/design.md §4). As it passes each path layer
(the last ``depth`` gate layers), a hook scores every unit with P_i = softmax_k(h_i·J_ik)[c]
in float64, keeps the first ``width`` units by P (ties to the lower index) whose P exceeds 1/K
(or the first one if none does), and cuts the rest by masking the cotangents. Gates and argmax
stay those of the recorded forward pass, so every path model is an exact term of the
network's unfolded sum, and W_p, b_p come out of the same sweep.

The rows that compete (:class:`Competing`) are every class by default; the two logits [0, y]
of a single score (K = 1); or, with ``classes=N``, each sample's top N classes plus its
target. Where one sample's rows do not fit the memory budget they are swept in chunks, layer
by layer, and the selection reads per-unit sums accumulated chunk by chunk
(:class:`onnx_pathwise.selection.UnitStats`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import limits
from .engine import Engine, Record, Through, blas_for
from .errors import ModelError, PathwiseError
from .graph import GateLayer
from .ir import Node
from .selection import UnitStats, keep_units, select_units

if TYPE_CHECKING:
    from .graphsweep import SelectionGraph

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
    #: the competing classes of the selection: None for all of them (exact), or N for each
    #: sample's top N predicted classes plus its target (docs/design.md §4 variant, ``classes=N``)
    classes: int | None = None
    #: where the units were selected: ``"host"`` (the sweep in numpy) or ``"graph"`` (one
    #: onnxruntime graph on the explainer's device, docs/design.md §4); the same units either way
    selection: str = "host"

    @property
    def score(self) -> np.ndarray:
        """y_c(x) of the full network (onnxruntime); for a single score y, the explained
        side's log-odds: y for class 1, −y for class 0."""
        return target_scores(self.output, self.target)

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
    """One class per sample: ``target`` (an int, or one int per sample) checked against the
    scores, or each sample's predicted class when None.

    A single score y (K = 1, a binary classifier whose Sigmoid was peeled) has two classes,
    the implicit class 0 with logit 0 and class 1 with logit y (docs/design.md §4): targets are 0 or
    1, by default the predicted side, 1 where y ≥ 0.
    """
    n, K = scores.shape
    if target is None:
        if K == 1:
            return (np.asarray(scores)[:, 0] >= 0).astype(np.int64)
        return scores.argmax(axis=1)
    t = np.asarray(target)
    if t.dtype.kind not in "iu":
        raise PathwiseError(f"target {target!r}: expected an int or one int per sample")
    t = np.broadcast_to(t, (n,)) if t.ndim == 0 else t
    if t.shape != (n,):
        raise PathwiseError(f"target: {t.shape[0]} values for {n} samples")
    classes = 2 if K == 1 else K
    if np.any(t < 0) or np.any(t >= classes):
        what = "a single score: 0 or 1, the side explained" if K == 1 else f"{K} scores"
        raise PathwiseError(f"target {target!r}: out of range for {what}")
    return t.astype(np.int64)


def target_scores(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The explained score of each sample: y_c, or for a single score y the side's log-odds
    (y for class 1, −y for class 0)."""
    n, K = scores.shape
    if K == 1:
        return np.where(np.asarray(target) == 1, scores[:, 0], -scores[:, 0])
    return scores[np.arange(n), target]


def parse_classes(classes: Any) -> int | None:
    """The competing-classes option: None or ``"all"`` (every class, exact) or an int N ≥ 2
    (each sample's top-N predicted classes plus its target)."""
    if classes is None:
        return None
    if isinstance(classes, str):
        text = classes.strip().lower()
        if text == "all":
            return None
        try:
            classes = int(text)
        except ValueError:
            raise PathwiseError(f"classes {classes!r}: expected 'all' or a number of classes such as 10") from None
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)):
        raise PathwiseError(f"classes {classes!r}: expected 'all' or a number of classes such as 10")
    if classes < 2:
        raise PathwiseError(f"classes {classes}: at least 2 must compete (a softmax over one class is always 1)")
    return int(classes)


@dataclass(frozen=True)
class Competing:
    """The rows a pathwise sweep carries per sample: seed row r of sample i is the score of
    class ``classes[r, i]`` (−1: a zero seed, padding).

    The selection scores the swept rows, with ``zero_row`` (a single score) after a row of
    zeros: the implicit class 0 whose logit is 0 and whose cotangents are zero everywhere (so it
    is never swept, and :func:`select_units` never builds it over every unit). Only the first
    ``count[i]`` scored rows compete in sample i's softmax; ``target_row`` is the target's scored row, ``carry_row``
    the swept row whose cotangent gives W_p, times ``sign`` (−1 for the implicit class 0 of a
    single score, whose log-odds is −y)."""

    classes: np.ndarray  # (M, n)
    count: np.ndarray  # (n,)
    target_row: np.ndarray  # (n,)
    carry_row: np.ndarray  # (n,)
    sign: np.ndarray  # (n,) float64
    every: bool  # every class competes, one row each in class order (the exact default)
    zero_row: bool = False  # a single score: the implicit class 0, scored as a zero row, never swept

    @property
    def rows(self) -> int:
        return int(self.classes.shape[0])

    def seeds(self, start: int, stop: int, K: int, dtype: Any) -> np.ndarray:
        """The score seeds (stop − start, n, K) of rows start … stop − 1."""
        cls = self.classes[start:stop]
        m, n = cls.shape
        seed = np.zeros((m, n, K), dtype)
        r, i = np.nonzero(cls >= 0)
        seed[r, i, cls[r, i]] = 1.0
        return seed


def competing_rows(classes: int | None, K: int) -> int:
    """Rows per sample a sweep carries (an upper bound before the scores are known)."""
    if K == 1:
        return 1  # the one logit: its implicit partner is never swept
    return K if classes is None or classes >= K else classes + 1


def competing_set(scores: np.ndarray, target: np.ndarray, classes: int | None) -> Competing:
    """The competing rows of each sample (docs/design.md §4): every class (``classes`` None), the
    two sides [0, y] of a single score, or the top ``classes`` predicted classes (ties to the
    lower index) plus the target, in class order."""
    n, K = scores.shape
    ones = np.ones(n)
    if K == 1:
        return Competing(np.zeros((1, n), np.int64), np.full(n, 2), target.astype(np.int64), np.zeros(n, np.int64),
                         np.where(target == 1, 1.0, -1.0), every=False, zero_row=True)
    if classes is None or classes >= K:
        cls = np.broadcast_to(np.arange(K)[:, None], (K, n))
        return Competing(cls, np.full(n, K), target, target, ones, every=True)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :classes]
    sets = [np.union1d(top[i], [target[i]]) for i in range(n)]
    M = max(len(c) for c in sets)
    cls = np.full((M, n), -1, np.int64)
    rows = np.zeros(n, np.int64)
    for i, c in enumerate(sets):
        cls[: len(c), i] = c
        rows[i] = int(np.searchsorted(c, target[i]))
    return Competing(cls, np.array([len(c) for c in sets]), rows, rows, ones, every=False)


def _owned(cut: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A chunk's cut as the checkpoint store keeps it: each array as it is when it owns its
    memory (no copy), or copied when it is a view of a larger one (a slice of a Concat's
    cotangent), which would otherwise stay alive whole. The store is planned by the arrays'
    own sizes; DenseNet-121's views held 10–20% more (1,000 classes under an 8 GiB budget: a
    9.1 GiB peak)."""
    def root(v: np.ndarray) -> np.ndarray:
        while isinstance(v.base, np.ndarray):
            v = v.base
        return v

    return {t: v.copy() if root(v).nbytes > v.nbytes else v for t, v in cut.items()}


@contextlib.contextmanager
def progress_bar(show: bool, total: int, what: str) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr while ``total`` steps run, only when asked for (``show``):
    the chunks of a sweep, the method runs of ``metrics.evaluate``."""
    if not show:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda: bar.advance(task)


class PathSweep:
    """Runs the pathwise sweep and remembers what the decomposition needs.

    With ``chunk`` None, one sweep carries every competing row down to the lowest path layer
    and the target's row below it. With ``chunk`` rows, the rows go in chunks, layer by layer
    from the output (docs/design.md §4, "Bounded memory at any K"): each chunk is swept down to the
    layer with the masks chosen so far, from the nearest cut kept in memory (a checkpoint,
    stored when all its rows fit ``store_bytes``) or else from the scores, and feeds the
    layer's per-unit sums; then one sweep of the target's row gives W_p and b_p. With a
    ``graph`` (:class:`onnx_pathwise.graphsweep.SelectionGraph`) the masks come from it, run in
    onnxruntime on the device, and that last sweep follows.
    """

    def __init__(self, engine: Engine, layers: Sequence[GateLayer], record: Record, target: np.ndarray,
                 competing: Competing, widths: dict[str, int], input_width: int | None, keep_at: str | None = None,
                 chunk: int | None = None, store_bytes: float = 0.0, progress: bool = False,
                 graph: SelectionGraph | None = None) -> None:
        self.engine, self.record, self.competing = engine, record, competing
        self.graph = graph
        self.selection = "host"  # "graph" once the selection graph has given the masks
        self.progress = progress
        self.target = target  # the explained class (side) of each sample
        self.widths = widths
        self.input_width = input_width
        self.keep_at = keep_at
        self.chunk = chunk
        self.store_bytes = store_bytes
        self.masks: dict[str, np.ndarray] = {}
        self.at_layer: np.ndarray | None = None  # (n, u) ∂y_c/∂h at keep_at, masks applied
        self.input_mask: np.ndarray | None = None
        self.layers = {layer.name: layer for layer in layers}
        self.sweeps = 0  # backward sweeps run (for tests of the chunked schedule)
        self._capture = chunk is None  # at_layer is taken by the sweep that carries the target's row
        self._narrow_at: str | None = None  # the node where the single sweep narrows to the carried row

    def _counts(self) -> np.ndarray | None:
        return None if self.competing.every else self.competing.count

    def _gate_hook(self, node: Node, g: np.ndarray) -> np.ndarray | Through:
        K, n = g.shape[:2]
        flat = g.reshape(K, n, -1)
        if node.name in self.widths:
            state = self.record.states[node.name]
            self.masks[node.name] = select_units(state.value.reshape(n, -1), flat, self.competing.target_row,
                                                 self.widths[node.name], self._counts(), self.competing.zero_row)
        return self._apply(node, g)

    def _apply(self, node: Node, g: np.ndarray) -> np.ndarray | Through:
        """Cut the units outside the mask chosen at ``node`` (the gate's transpose done here
        where it has no offset); at ``keep_at`` remember the target's row."""
        K, n = g.shape[:2]
        flat = g.reshape(K, n, -1)
        if node.name == self._narrow_at and K > 1:
            # the lowest path layer: below it the sweep carries one row per sample, so only
            # that row is masked (the engine narrows the rest here)
            flat = flat[self.competing.carry_row, np.arange(n)][None]
            K = 1
        shape = (K, n) + g.shape[2:]
        if node.name in self.masks:
            mask = self.masks[node.name]
            state = self.record.states[node.name]
            if state.offset is None and node.name != self.keep_at:
                return Through(keep_units(flat, mask, state.slope.reshape(n, -1)).reshape(shape))
            flat = keep_units(flat, mask)
        if node.name == self.keep_at and self._capture:
            rows = self.competing.carry_row if K > 1 else np.zeros(n, np.int64)  # one row once narrowed
            at = flat[rows, np.arange(n)]
            self.at_layer = at * self.competing.sign[:, None].astype(at.dtype)
        return flat.reshape(shape)

    def _input_hook(self, node: Any, w: np.ndarray) -> np.ndarray:
        K, n = w.shape[:2]
        flat = w.reshape(K, n, -1)
        assert self.input_width is not None
        mask = select_units(self.record.x.reshape(n, -1), flat, self.competing.target_row,
                            self.input_width, self._counts(), self.competing.zero_row)
        self.input_mask = mask
        return (flat * mask[None].astype(flat.dtype)).reshape(w.shape)

    def _score_seeds(self, start: int, stop: int) -> dict[str, np.ndarray]:
        ir = self.engine.ir
        seed = self.competing.seeds(start, stop, ir.num_classes, self.engine.dtype)
        return {ir.output_name: seed.reshape(seed.shape[:2] + ir.shapes[ir.output_name])}

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        """W_p (n, *in) and b_p (n,) of each sample's target (its side's log-odds for a
        single score)."""
        if self.graph is not None and self._select_on_device():
            self.selection = "graph"
            W, b = self._final_sweep()
        elif self.chunk is None or self.chunk >= self.competing.rows:
            W, b = self._run_whole()
        else:
            W, b = self._run_chunked()
        sign = self.competing.sign
        if np.all(sign == 1):
            return W, b
        return (W * sign.reshape((-1,) + (1,) * (W.ndim - 1)).astype(W.dtype)), b * sign

    def _select_on_device(self) -> bool:
        """The masks from the selection graph, sample by sample (a progress bar when asked for);
        False, after one line on stderr, when onnxruntime fails to run it (the device's memory
        exhausted, say): the host sweep then selects, in this sweep and the model's later ones."""
        assert self.graph is not None
        comp, n = self.competing, self.record.n
        try:
            with progress_bar(self.progress, n, f"pathwise selection on the device, {comp.rows} classes") as advance:
                self.masks = self.graph.masks(self.record, comp.classes, comp.count, comp.target_row, advance)
        except ModelError as exc:
            print(f"onnx-pathwise: {exc}; selecting on the host instead", file=sys.stderr)
            self.graph.failed = str(exc)  # the model's later sweeps go to the host at once
            self.masks = {}
            return False
        return True

    def _run_whole(self) -> tuple[np.ndarray, np.ndarray]:
        """The single sweep: all competing rows down to the lowest path layer (selection
        needs them), then only the carried row: below it nothing is selected any more (unless
        the input is, with ``input_width``). With no path layer it carries that row alone."""
        self._capture = True
        names = set(self.widths) | ({self.keep_at} if self.keep_at is not None else set())
        hooks = {name: self._gate_hook for name in names}
        narrow_after: str | None = None
        if not self.input_width:
            order = [node.name for node in self.engine.nodes if node.name in self.widths]
            narrow_after = order[0] if order else ""
        carry = self.competing.carry_row
        self.sweeps += 1
        self._narrow_at = narrow_after
        try:
            W, b = self.engine.backward(
                self._score_seeds(0, self.competing.rows), self.record, hooks=hooks,
                input_hook=self._input_hook if self.input_width else None,
                bias_rows=carry, narrow_after=narrow_after,
            )
        finally:
            self._narrow_at = None
        n = self.record.n
        weight = W[0] if W.shape[0] == 1 and narrow_after is not None else W[carry, np.arange(n)]
        return weight, b[0]

    def _run_chunked(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.chunk is not None
        M, R = self.competing.rows, self.chunk
        order = [node.name for node in reversed(self.engine.nodes) if node.name in self.widths]  # from the output
        steps = (len(order) + (1 if self.input_width else 0)) * -(-M // R)
        # every chunk's sweep has at most R rows per sample: their BLAS limit is set once
        with progress_bar(self.progress, steps, f"pathwise, {M} classes in chunks of {R}") as advance, \
                blas_for(R * self.record.n):
            self._select_chunked(order, advance)
        result = self._final_sweep()
        # hand back what the chunks freed once it is more than half the budget: kept whole, it
        # was where the next sample's sweep started from, and batches grew past the budget
        # sample after sample; kept below that, the next sweep reuses it instead of
        # page-faulting it in again (limits.release_freed_if_large)
        limits.release_freed_if_large()
        return result

    def _select_chunked(self, order: list[str], advance: Callable[[], None]) -> None:
        """Each path layer's mask (and the input's), from the output down, class chunk by chunk."""
        eng, rec, comp = self.engine, self.record, self.competing
        assert self.chunk is not None and not comp.zero_row  # a single score sweeps one row: never chunked
        M, R, n = comp.rows, self.chunk, rec.n
        by_name = {node.name: node for node in eng.nodes}
        store: list[dict[str, np.ndarray]] | None = None  # the nearest cut kept in memory, chunk by chunk
        resident = limits.Resident()
        for pos, name in enumerate(order + ([None] if self.input_width else [])):  # type: ignore[list-item]
            if name is None:
                h = rec.x.reshape(n, -1)
            else:
                h = rec.states[name].value.reshape(n, -1)
            stats = UnitStats(h, comp)
            last = pos == len(order) - (0 if self.input_width else 1)
            hooks = {k: self._apply for k in self.masks}
            new_store: list[dict[str, np.ndarray]] | None = None
            for a in range(0, M, R):
                b = min(M, a + R)
                seeds = store[a // R] if store is not None else self._score_seeds(a, b)
                self.sweeps += 1
                if name is None:
                    w, _ = eng.backward(seeds, rec, hooks=hooks)
                    g = w.reshape(b - a, n, -1)
                else:
                    cut = eng.backward_to(seeds, rec, name, hooks=hooks)
                    node = by_name[name]
                    g = cut[node.outputs[0]].reshape(b - a, n, -1)
                    if a == 0 and not last:
                        need = sum(v.size // (b - a) for v in cut.values()) * M * eng.dtype.itemsize
                        held = sum(v.nbytes for part in store for v in part.values()) if store is not None else 0
                        if need + held <= self.store_bytes:
                            new_store = []
                    if new_store is not None:
                        new_store.append(_owned(cut))
                stats.add(a, g)
                resident.check()
                advance()
            if name is None:
                self.input_mask = stats.select(int(self.input_width))  # type: ignore[arg-type]
            else:
                self.masks[name] = stats.select(self.widths[name])
            if new_store is not None:
                store = new_store

    def _final_sweep(self) -> tuple[np.ndarray, np.ndarray]:
        """The carried row alone, every mask applied, from the scores: W_p and b_p."""
        eng, rec, comp = self.engine, self.record, self.competing
        n = rec.n
        names = set(self.masks) | ({self.keep_at} if self.keep_at is not None else set())
        carry = comp.carry_row
        seed = np.zeros((1, n, eng.ir.num_classes), eng.dtype)
        seed[0, np.arange(n), comp.classes[carry, np.arange(n)]] = 1.0
        ir = eng.ir
        mask = self.input_mask

        def apply_input(node: Any, w: np.ndarray) -> np.ndarray:
            assert mask is not None
            return (w.reshape(1, n, -1) * mask[None].astype(w.dtype)).reshape(w.shape)

        self.sweeps += 1
        self._capture = True
        W, bias = eng.backward(
            {ir.output_name: seed.reshape((1, n) + ir.shapes[ir.output_name])}, rec,
            hooks={k: self._apply for k in names}, input_hook=apply_input if mask is not None else None,
            bias_rows=np.zeros(n, np.int64),
        )
        return W[0], bias[0]

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
