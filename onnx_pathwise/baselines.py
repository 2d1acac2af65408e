"""Baseline attribution methods on the same engine (docs/design.md §5), no autodiff framework.

Every method takes ``(explainer, x, target)`` — a batch (N, *input shape), and one class per
sample (an int, an int array, or None for the argmax of the scores) — and returns
attributions of the input's shape (N, *input shape):

* :func:`gradient` — saliency ∂y_c/∂x (signed), the frozen network's gradient at x.
* :func:`input_x_gradient` — x ⊙ ∂y_c/∂x.
* :func:`unwrap` — the target row of the full local affine model W_x (docs/design.md §3) ⊙ x; equal
  to Input×Gradient, computed through :meth:`Explainer.unwrap`.
* :func:`pathwise` — the pathwise attribution W_p ⊙ x (docs/design.md §4, :meth:`Explainer.explain`).
* :func:`integrated_gradients` — (x − x₀) ⊙ ∫₀¹ ∂y_c/∂x(x₀ + α(x − x₀)) dα (Sundararajan,
  Taly, Yan 2017), by the Riemann midpoint rule with gates re-recorded at every point, or
  exactly: along the segment the network is piecewise linear, so the integral is a finite sum
  over the segment's activation pieces.
* :func:`guided_backprop` — Springenberg et al. 2015: the backward sweep keeps only positive
  cotangents at every gate's input.

``y_c`` is the explained score (the logit; terminal Softmax/Sigmoid are peeled, docs/design.md §1).
:meth:`Explainer.attribute` dispatches here by name (:func:`attribute`, which builds the
:class:`Attribution`).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import limits
from .engine import Hook, Record
from .errors import PathwiseError
from .ir import Node
from .pathwise import resolve_targets
from .sweep import record_rows, refuse_overflow

if TYPE_CHECKING:
    from .explainer import Explainer

Array = np.ndarray

#: Input rows (samples × interpolation points) recorded and swept at once, at most.
MAX_ROWS = 4096


# ---------------------------------------------------------------------- plumbing


def _row_chunk(explainer: Explainer) -> int:
    """Rows per record/sweep so that one sweep stays within the engine's memory bound."""
    return max(1, min(MAX_ROWS, explainer.sweep.class_chunk(1)))


def _probe_chunk(explainer: Explainer) -> int:
    """Rows per probe: a tangent pass keeps every tensor of the cone at once."""
    from .sweep import MAX_SWEEP_ELEMENTS

    total = sum(int(np.prod(shape, dtype=np.int64)) for shape in explainer.ir.shapes.values())
    return max(1, min(MAX_ROWS, MAX_SWEEP_ELEMENTS // max(1, 2 * total)))


def _targets(explainer: Explainer, x: Array, target: Any, record: Record | None) -> tuple[Array, Record | None]:
    if target is None:
        record = record if record is not None else explainer.record(x)
        return resolve_targets(None, record.scores), record
    n = x.shape[0]
    return resolve_targets(target, np.zeros((n, explainer.num_classes))), record


def target_seeds(explainer: Explainer, target: Array) -> dict[str, Array]:
    """One seed per row: e_{target[i]} at the scores, shape (1, n, *score shape); for a single
    score y, ±1 on y for class 1 / class 0 (the side's log-odds, docs/design.md §4)."""
    n = len(target)
    K = explainer.num_classes
    seed = np.zeros((1, n, K), explainer.engine.dtype)
    if K == 1:
        seed[0, :, 0] = np.where(np.asarray(target) == 1, 1.0, -1.0)
    else:
        seed[0, np.arange(n), target] = 1.0
    name = explainer.ir.output_name
    return {name: seed.reshape((1, n) + explainer.ir.shapes[name])}


def _sweep(
    explainer: Explainer,
    x: Array,
    target: Array,
    record: Record | None = None,
    hooks: Callable[[Record], Mapping[str, Hook]] | None = None,
) -> Array:
    """∂y_target/∂x per row (n, *in) of the frozen network, with optional gate hooks built
    per chunk from its record; chunked over rows, each row recorded once (``record`` when
    given, sliced per chunk)."""
    from .sweep import slice_record

    n = x.shape[0]
    if record is not None and n <= _row_chunk(explainer):
        w, _ = explainer.engine.backward(
            target_seeds(explainer, target), record, hooks=hooks(record) if hooks else None
        )
        return w[0]
    out = np.empty(x.shape, explainer.engine.dtype)
    step = _row_chunk(explainer)
    for s in range(0, n, step):
        rec = slice_record(record, s, s + step) if record is not None else record_rows(explainer.sweep, x[s : s + step])[0]
        w, _ = explainer.engine.backward(
            target_seeds(explainer, target[s : s + step]), rec, hooks=hooks(rec) if hooks else None
        )
        out[s : s + step] = w[0]
    return out


# ---------------------------------------------------------------------- methods


def gradient(explainer: Explainer, x: Any, target: Any = None, *, record: Record | None = None) -> Array:
    """Saliency: ∂y_c/∂x at x (signed), one backward sweep per batch chunk.

    Gates and max-pool argmax are those recorded at x, so this is the gradient of the network
    wherever it is differentiable (ReLU'(0) = 0, max-pool ties to the first maximum).
    """
    x = explainer.check_input(x)
    tgt, record = _targets(explainer, x, target, record)
    return _sweep(explainer, x, tgt, record)


def input_x_gradient(explainer: Explainer, x: Any, target: Any = None, *, record: Record | None = None) -> Array:
    """Input×Gradient: x ⊙ ∂y_c/∂x."""
    x = explainer.check_input(x)
    return (gradient(explainer, x, target, record=record) * x).astype(explainer.engine.dtype)


def unwrap(explainer: Explainer, x: Any, target: Any = None, *, record: Record | None = None) -> Array:
    """Full unwrapping: W_x[c] ⊙ x from the local affine model of :meth:`Explainer.unwrap`
    (all K rows, checked against onnxruntime); equals Input×Gradient."""
    x = explainer.check_input(x)
    rec = record if record is not None else explainer.record(x)
    tgt, _ = _targets(explainer, x, target, rec)
    res = explainer.unwrap(x, record=rec)
    if explainer.num_classes == 1:  # the side's log-odds ±y
        sign = np.where(tgt == 1, 1.0, -1.0).reshape((-1,) + (1,) * (x.ndim - 1))
        return (res.weight[:, 0] * sign * x).astype(res.weight.dtype)
    return (res.weight[np.arange(x.shape[0]), tgt] * x).astype(res.weight.dtype)


def pathwise(
    explainer: Explainer,
    x: Any,
    target: Any = None,
    *,
    width: int | str | None = None,
    depth: int | None = None,
    input_width: int | str | None = None,
    classes: int | str | None = None,
    record: Record | None = None,
) -> Array:
    """Pathwise attribution W_p ⊙ x (docs/design.md §4); see :meth:`Explainer.explain`."""
    x = explainer.check_input(x)
    tgt, record = _targets(explainer, x, target, record)
    return explainer.explain(x, tgt, width=width, depth=depth, input_width=input_width, record=record,
                             classes=classes).attribution


def guided_backprop(explainer: Explainer, x: Any, target: Any = None, *, record: Record | None = None) -> Array:
    """Guided Backpropagation (Springenberg, Dosovitskiy, Brox, Riedmiller 2015).

    The backward sweep of the frozen network, except that at every gate (Relu, LeakyRelu,
    PRelu, Clip, Max(x, 0)) the cotangent reaching the gate's *input* is clamped to ≥ 0:
    z̄ = max(slope·ȳ, 0). Policy: the clamp is applied after the gate's own frozen slope, as in
    the paper (R = [z > 0]·[R̄ > 0]·R̄ for ReLU) and as in a torch hook clamping the ReLU's input
    gradient. It is implemented as a hook on the gate's output cotangent that keeps
    max(ȳ, 0) where the slope is ≥ 0 and min(ȳ, 0) where it is negative (a PRelu with a
    negative coefficient), so that the slope multiplication that follows yields exactly
    max(slope·ȳ, 0). Max-pool routing and every affine node pass cotangents unchanged.
    """
    x = explainer.check_input(x)
    tgt, record = _targets(explainer, x, target, record)

    def hooks(rec: Record) -> dict[str, Hook]:
        def clamp(node: Node, g: Array) -> Array:
            slope = rec.states[node.name].slope  # (n, *s); g is (m, n, *s)
            return np.where(slope >= 0, np.maximum(g, 0), np.minimum(g, 0)).astype(g.dtype)

        return {node.name: clamp for node in explainer.engine.gate_nodes}

    return _sweep(explainer, x, tgt, record, hooks=hooks)


def _baseline(explainer: Explainer, x: Array, baseline: Any) -> Array:
    if isinstance(baseline, str):
        if baseline != "zeros":
            raise PathwiseError(f"baseline {baseline!r}: use 'zeros', a number or an array")
        return np.zeros_like(x)
    b = np.asarray(baseline)
    if b.dtype.kind not in "fiu":
        raise PathwiseError(f"baseline: dtype {b.dtype} is not numeric")
    if b.ndim == 0:
        return np.full_like(x, float(b))
    if b.shape == x.shape[1:]:
        b = np.broadcast_to(b, x.shape)
    if b.shape != x.shape:
        raise PathwiseError(f"baseline: shape {b.shape} fits neither the input {x.shape[1:]} nor the batch {x.shape}")
    return explainer.check_input(np.array(b), "baseline")


#: Bytes Integrated Gradients holds per (sample, step): the step's alpha, weight and owner row
#: and their temporaries (the probe points themselves go in budget-sized chunks).
IG_BYTES_PER_STEP = 40


def integrated_gradients(
    explainer: Explainer,
    x: Any,
    target: Any = None,
    *,
    baseline: Any = "zeros",
    steps: int = 32,
    exact: bool = False,
    record: Record | None = None,
) -> Array:
    """Integrated Gradients (Sundararajan, Taly, Yan 2017) from ``baseline`` x₀ to x.

    ``baseline``: ``"zeros"``, a number (constant input), or an array of the input's shape
    or the batch's shape. Step version (``exact=False``): (x − x₀) ⊙ (1/S) Σ_k ∂y_c/∂x at
    x₀ + α_k (x − x₀), α_k = (k + ½)/S (Riemann midpoint), with gates and argmax re-recorded at
    every point; all points of all samples go through batched record/backward calls.

    ``exact=True``: the network is affine on each activation piece of the segment, so
    IG = (x − x₀) ⊙ Σ_j (α_{j+1} − α_j) g_j with g_j the gradient on piece j. The pieces are
    found analytically (see :func:`segment_pieces`); completeness Σ IG = y_c(x) − y_c(x₀)
    then holds to float32 round-off. ``steps`` sets the initial probe grid.
    """
    x = explainer.check_input(x)
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise PathwiseError(f"steps {steps!r}: must be a positive integer")
    steps = int(steps)
    limits.check_fits(IG_BYTES_PER_STEP * float(x.shape[0]) * steps,
                      f"Integrated Gradients with {steps} steps on {x.shape[0]} sample(s)")
    tgt, _ = _targets(explainer, x, target, record)
    x0 = _baseline(explainer, x, baseline)
    d = x.astype(np.float64) - x0.astype(np.float64)
    n = x.shape[0]
    if exact:
        pieces = segment_pieces(explainer, x, x0, steps=steps)
        alphas = np.concatenate([p.representative for p in pieces])
        weights = np.concatenate([np.diff(p.breaks) for p in pieces])
        owner = np.concatenate([np.full(len(p.representative), i) for i, p in enumerate(pieces)])
    else:
        a = (np.arange(steps) + 0.5) / steps
        alphas = np.tile(a, n)
        weights = np.full(n * steps, 1.0 / steps)
        owner = np.repeat(np.arange(n), steps)
    chunk = _row_chunk(explainer)
    points = ((s, s + chunk) for s in range(0, len(alphas), chunk))
    grads = (_point_gradients if explainer.engine.linear_base is None else _summed_gradients)
    total = grads(explainer, points, x0, d, alphas, weights, owner, tgt)
    return (total * d).astype(explainer.engine.dtype)


def _points(x0: Array, d: Array, alphas: Array, owner: Array, a: int, b: int) -> Array:
    """Points a … b − 1 of the segments: x0 + α d of each point's sample, in float64, cast back."""
    own = owner[a:b]
    pts = x0[own].astype(np.float64) + alphas[a:b].reshape((-1,) + (1,) * (x0.ndim - 1)) * d[own]
    return pts.astype(x0.dtype)


def _point_gradients(explainer: Explainer, chunks: Iterable[tuple[int, int]], x0: Array, d: Array,
                     alphas: Array, weights: Array, owner: Array, tgt: Array) -> Array:
    """Σ_j weights[j] ∂y/∂x at x0 + alphas[j] d of sample owner[j], per sample (float64)."""
    total = np.zeros(x0.shape, np.float64)
    for a, b in chunks:
        own = owner[a:b]
        g = _sweep(explainer, _points(x0, d, alphas, owner, a, b), tgt[own])
        for j, o in enumerate(own):  # row by row in order, as np.add.at adds (4× faster here)
            total[o] += g[j].astype(np.float64) * weights[a + j]
    return total


def _summed_gradients(explainer: Explainer, chunks: Iterable[tuple[int, int]], x0: Array, d: Array,
                      alphas: Array, weights: Array, owner: Array, tgt: Array) -> Array:
    """:func:`_point_gradients` with the sum taken where the sweep reaches the network's linear
    base (``Engine.linear_base``, e.g. the stem convolution below the first ReLU): the sweep
    from there to the input is the same linear map at every point, so it runs once per sample on
    the weighted sum of the points' cotangents instead of once per point. ``owner`` never
    decreases: a sample's sums are finished, swept down and dropped as soon as its last point
    is done, so they are held for a few samples at a time."""
    eng = explainer.engine
    total = np.zeros(x0.shape, np.float64)
    sums: dict[int, dict[str, Array]] = {}
    for a, b in chunks:
        own = owner[a:b]
        cut = _base_cotangents(explainer, _points(x0, d, alphas, owner, a, b), tgt[own])
        for j, o in enumerate(own):
            acc = sums.setdefault(int(o), {})
            for t, c in cut.items():
                term = c[0, j].astype(np.float64) * weights[a + j]
                if t in acc:
                    acc[t] += term
                else:
                    acc[t] = term
        done = sorted(o for o in sums if b >= len(owner) or o < owner[b])
        if done:
            seeds = {t: np.stack([sums[o][t] for o in done])[None].astype(eng.dtype) for t in cut}
            base = Record(x=x0[done], scores=np.zeros((len(done), 0)), states={}, preactivations={})
            w, _ = eng.backward(seeds, base)
            total[done] = w[0]
            for o in done:
                del sums[o]
        del cut  # before the next chunk's record (ResNet-18's IG-32 peaked 65 MiB higher with it)
    return total


def _base_cotangents(explainer: Explainer, x: Array, target: Array) -> dict[str, Array]:
    """The cotangents (1, rows, *s) of the target scores at the network's linear base for rows
    x, from their own record (dropped on return, before the next chunk records)."""
    eng = explainer.engine
    assert eng.linear_base is not None
    rec = record_rows(explainer.sweep, x)[0]
    return eng.backward_to(target_seeds(explainer, target), rec, eng.linear_base)


# ---------------------------------------------------------------------- exact segment pieces


@dataclass(frozen=True)
class SegmentPieces:
    """The activation pieces of one segment x₀ + α(x − x₀), α ∈ [0, 1].

    ``breaks`` (J + 1,) from 0 to 1; piece j is [breaks[j], breaks[j+1]] and
    ``representative[j]`` an α inside it whose recorded pattern is the piece's.
    """

    breaks: Array
    representative: Array

    @property
    def count(self) -> int:
        return int(len(self.representative))


def _gate_kinks(node: Node) -> list[tuple[float, bool]]:
    """(kink, whether z == kink counts as the upper side) of a gate's pre-activation."""
    if node.op_type == "Clip":
        lo, hi = float(node.attrs["min"]), float(node.attrs["max"])
        return [(k, up) for k, up in ((lo, False), (hi, True)) if np.isfinite(k)]
    return [(0.0, False)]


def _probe(explainer: Explainer, x0: Array, d: Array, owner: Array, alpha: Array) -> tuple[Array, Array, list[bytes]]:
    """Record at x₀ + α d for each row and return the row's piece [lo, hi] (clipped to
    [0, 1]) and its activation-pattern key."""
    from . import kernels  # numba: imported on first use
    from .rules.pooling import _geometry, _window_index

    eng, ir = explainer.engine, explainer.ir
    P = len(alpha)
    shp = (-1,) + (1,) * (d.ndim - 1)
    pts = (x0[owner].astype(np.float64) + alpha.reshape(shp) * d[owner]).astype(x0.dtype)
    rec, values = record_rows(explainer.sweep, pts, preactivations=True)
    env = eng.tangent_env(d[owner][None].astype(eng.dtype), rec)
    lo = np.zeros(P)
    hi = np.ones(P)
    for node in eng.gate_nodes:
        z = rec.preactivations[node.name].reshape(P, -1)
        dz = env[node.data_inputs[0]].reshape(P, -1)
        for kink, up_at_kink in _gate_kinks(node):
            kernels.gate_piece(z, dz, float(kink), up_at_kink, alpha, lo, hi)
    for node in eng.routing_nodes:
        src = node.data_inputs[0]
        shape = ir.shapes[src]
        S = int(np.prod(shape[1:], dtype=np.int64))
        if node.op_type == "MaxPool":
            table = _window_index(*_geometry(node, eng._ctx(node, P)))
        else:
            table = np.arange(S, dtype=np.int64)[None, :]
        kernels.window_piece(np.asarray(values[src]).reshape(P, -1), env[src].reshape(P, -1), table, S,
                             rec.states[node.name].argmax, alpha, lo, hi)
    lo = np.clip(np.minimum(lo, alpha), 0.0, 1.0)
    hi = np.clip(np.maximum(hi, alpha), 0.0, 1.0)
    # one key per row: its activation pattern (gate slopes and offsets, max-pool choices)
    parts = []
    for node in eng.gate_nodes:
        st = rec.states[node.name]
        if node.op_type == "Relu":  # slopes are 0 or 1: one bit each
            parts.append(np.packbits(st.slope.reshape(P, -1) != 0, axis=1))
        else:
            parts.append(np.ascontiguousarray(st.slope).reshape(P, -1).view(np.uint8))
        if st.offset is not None:
            parts.append(np.ascontiguousarray(st.offset).reshape(P, -1).view(np.uint8))
    for node in eng.routing_nodes:
        parts.append(rec.states[node.name].argmax.reshape(P, -1).astype(np.int32).view(np.uint8))
    pattern = np.concatenate(parts, axis=1) if parts else np.zeros((P, 0), np.uint8)
    keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in pattern]
    return lo, hi, keys


def segment_pieces(
    explainer: Explainer, x: Any, baseline: Any = "zeros", steps: int = 32, tol: float = 1e-7, max_rounds: int = 64
) -> list[SegmentPieces]:
    """The activation pieces of the segments x₀ → x of a batch (one :class:`SegmentPieces`
    per sample).

    With the pattern frozen at a probe α_p, every gate pre-activation is affine along the
    segment: z(α) = z(α_p) + (α − α_p)·ż, with ż the forward tangent along d = x − x₀
    (:meth:`Engine.tangent_env`, one tangent); likewise every max-pool window's margin between
    its recorded maximum and each other element. The probe's piece ends at the nearest α where
    any of them reaches its kink, computed in float64. Activation regions are convex, so a
    pattern occupies one interval of the segment: probes with the same pattern merge. Start
    from ``steps`` grid midpoints, then probe the middle of every uncovered gap (all samples
    in one batched record per round) until no gap exceeds ``tol``; adjacent pieces meet in the
    middle of their (round-off sized) gap or overlap. Gaps still open after ``max_rounds``
    rounds (float32 noise at a tie, far below ``tol`` in practice) are bridged the same way.
    """
    x = explainer.check_input(x)
    x0 = _baseline(explainer, x, baseline)
    d = x.astype(np.float64) - x0.astype(np.float64)
    n = x.shape[0]
    found: list[dict[bytes, list[float]]] = [{} for _ in range(n)]  # key → [lo, hi, probe, depth]
    owner = np.repeat(np.arange(n), steps)
    alpha = np.tile((np.arange(steps) + 0.5) / steps, n)
    chunk = _probe_chunk(explainer)
    for _ in range(max_rounds):
        for s in range(0, len(alpha), chunk):
            own, al = owner[s : s + chunk], alpha[s : s + chunk]
            lo, hi, keys = _probe(explainer, x0, d, own, al)
            for i, a, b, ap, k in zip(own, lo, hi, al, keys):
                got = found[i].get(k)
                if got is None:
                    found[i][k] = [a, b, ap, min(ap - a, b - ap)]
                else:
                    got[0], got[1] = min(got[0], a), max(got[1], b)
                    if min(ap - a, b - ap) > got[3]:  # the probe deepest inside represents the piece
                        got[2], got[3] = ap, min(ap - a, b - ap)
        owner_l: list[Array] = []
        alpha_l: list[Array] = []
        for i in range(n):
            pieces = np.array(list(found[i].values()))
            pieces = pieces[np.argsort((pieces[:, 0] + pieces[:, 1]) / 2, kind="stable")]
            # the gaps before, between and after the pieces, in order
            a = np.concatenate([[0.0], pieces[:, 1]])
            b = np.concatenate([pieces[:, 0], [1.0]])
            open_ = b - a > tol
            owner_l.append(np.full(int(open_.sum()), i, np.int64))
            alpha_l.append((a[open_] + b[open_]) / 2)
        owner, alpha = np.concatenate(owner_l), np.concatenate(alpha_l)
        if not owner.size:
            break
    out = []
    for i in range(n):
        final = sorted(found[i].values(), key=lambda p: (p[0] + p[1]) / 2)
        inner = [(p[1] + q[0]) / 2 for p, q in zip(final, final[1:])]
        breaks = np.maximum.accumulate(np.clip(np.array([0.0] + inner + [1.0]), 0.0, 1.0))
        breaks[-1] = 1.0
        out.append(SegmentPieces(breaks, np.array([p[2] for p in final])))
    return out


# ---------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Method:
    """One attribution method of the registry: everything the API, the CLI (``--method``,
    ``--methods``), ``evaluate``, the streaming ``explain`` and the README's methods table
    know about it."""

    name: str
    fn: Callable[..., Array]  # fn(explainer, x, target=None, *, record=None, **options) -> (N, *in)
    description: str  # one line, for --help and the README
    path: bool = False  # selects a path (width, depth, input_width, classes; writes the path)
    weight: bool = False  # yields the local weights W (explain writes weight)
    bias: bool = False  # yields the local bias b (explain writes bias)
    evaluate: bool = True  # in evaluate's default --methods

    @property
    def options(self) -> dict[str, Any]:
        """The keyword options the method accepts (besides ``record``) with their defaults."""
        return {p.name: p.default for p in inspect.signature(self.fn).parameters.values()
                if p.kind == p.KEYWORD_ONLY and p.name != "record"}

    def check(self, options: Mapping[str, Any]) -> None:
        """Refuse options the method does not take (:class:`PathwiseError`, one line)."""
        allowed = list(self.options)
        bad = sorted(set(options) - set(allowed))
        if bad:
            raise PathwiseError(
                f"method {self.name!r} does not take option(s) {', '.join(bad)}; "
                f"it takes: {', '.join(allowed) if allowed else 'none'}"
            )


#: The attribution methods, in the order the CLI and the docs list them. A new method is one
#: :func:`register` call (docs/design.md §9).
METHODS: dict[str, Method] = {}


def register(name: str, fn: Callable[..., Array], description: str, **flags: bool) -> Method:
    """Add a method to :data:`METHODS` (``flags``: ``path``, ``weight``, ``bias``, ``evaluate``)."""
    if name in METHODS:
        raise ValueError(f"attribution method {name!r} is registered twice")
    METHODS[name] = Method(name, fn, description, **flags)
    return METHODS[name]


register("pathwise", pathwise, "Pathwise attribution W_p ⊙ x: the paths through the units that favour the target.",
         path=True, weight=True, bias=True)
register("gradient", gradient, "Saliency ∂y_c/∂x of the frozen network at x (signed).")
register("input_x_gradient", input_x_gradient, "Input × Gradient: x ⊙ ∂y_c/∂x.")
register("integrated_gradients", integrated_gradients, "Integrated Gradients from a baseline: Riemann midpoint "
         "steps, or exact over the segment's linear pieces.")
register("guided_backprop", guided_backprop, "Guided Backpropagation: only positive cotangents pass every gate.")
register("unwrap", unwrap, "The target row of the local affine model W_x ⊙ x (equals Input × Gradient).",
         evaluate=False)


def method_options(method: str) -> list[str]:
    """The keyword options a method accepts (besides ``record``)."""
    return list(get_method(method).options)


def get_method(method: str) -> Method:
    if method not in METHODS:
        raise PathwiseError(f"unknown attribution method {method!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[method]


def check_options(method: str, options: Mapping[str, Any]) -> None:
    get_method(method).check(options)


@dataclass(frozen=True)
class Attribution:
    """Attributions of a batch by one method (:meth:`Explainer.attribute`)."""

    attribution: np.ndarray  # (N, *input shape)
    output: np.ndarray  # (N, K) onnxruntime's scores at x
    target: np.ndarray  # (N,)
    method: str
    options: dict[str, Any]


def attribute(explainer: Explainer, x: Any, method: str, target: Any = None, /, **options: Any) -> Attribution:
    """Attributions of each sample by the registered ``method`` with its keyword ``options``
    (anything else is refused), on one forward record (:meth:`Explainer.attribute`)."""
    spec = get_method(method)
    spec.check(options)
    rec = explainer.record(x)
    tgt = resolve_targets(target, rec.scores)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, not warned
        attribution = spec.fn(explainer, rec.x, tgt, record=rec, **options)
    refuse_overflow(f"the {method} attribution", attribution)
    return Attribution(attribution, rec.scores, tgt, method, dict(options))


def methods_table() -> str:
    """The README's table of attribution methods (between its methods-table markers)."""
    rows = ["| Method | Options (default) | Path | Weight, bias | What it computes |",
            "|---|---|---|---|---|"]
    for m in METHODS.values():
        opts = ", ".join(f"`{k}` ({v!r})" for k, v in m.options.items()) or "—"
        wb = "yes" if m.weight and m.bias else "—"
        rows.append(f"| `{m.name}` | {opts} | {'yes' if m.path else '—'} | {wb} | {m.description} |")
    return "\n".join(rows) + "\n"
