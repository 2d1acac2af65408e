"""The Python API: ``Explainer(model).unwrap(x)`` and friends.

>>> import numpy as np
>>> from onnx_pathwise import Explainer
>>> from onnx_pathwise.samples import tiny_mlp
>>> ex = Explainer(tiny_mlp(), device="cpu")
>>> [layer.units for layer in ex.gate_layers]
[3]
>>> res = ex.unwrap(np.array([[1.0, 2.0]], np.float32))
>>> res.weight.shape, res.bias.shape
((1, 2, 2), (1, 2))
>>> bool(res.delta.max() < 1e-5)
True
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np

from . import frontend, runtime
from . import graph as graph_mod
from .engine import Engine, Record
from .errors import ModelError, PathwiseError
from .ir import ModelIR
from .passes import run_passes
from .pathwise import Explanation
from .radius import RadiusResult
from .sweep import Sweep, concat_batches, slice_record

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class UnwrapResult:
    """The local affine model f(x') = W x' + b on the activation region of each sample."""

    weight: np.ndarray  # (N, K, *input shape)
    bias: np.ndarray  # (N, K)
    output: np.ndarray  # (N, K) onnxruntime's explained scores
    delta: np.ndarray  # (N,) max |W x + b − output|

    def __repr__(self) -> str:
        return (f"UnwrapResult(weight={self.weight.shape}, bias={self.bias.shape}, "
                f"max delta={float(self.delta.max(initial=0)):.3g})")


class Explainer:
    """Exact local explanations of a piecewise-linear ONNX model.

    Model in the constructor, data in the call. ``device`` is ``"auto"`` (CUDA when
    onnxruntime can use it, else the CPU), ``"cpu"`` or ``"cuda"``.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | onnx.ModelProto,
        device: str = "auto",
        *,
        input_name: str | None = None,
        output_name: str | None = None,
    ) -> None:
        self.device = runtime.resolve_device(device)
        self.proto, raw_ir = frontend.load(model, input_name=input_name, output_name=output_name)
        self.source_ir: ModelIR = raw_ir
        self.ir: ModelIR = run_passes(raw_ir)
        #: the shared sweep layer (onnx_pathwise.sweep): engine, recorders, kernels, chunk plans
        self.sweep = Sweep(self.proto, self.ir, self.device)
        self.kernels = self.sweep.kernels
        self.engine: Engine = self.sweep.engine
        #: show a progress bar on stderr while a pathwise sweep goes in class chunks (opt-in)
        self.progress = False

    # ------------------------------------------------------------------ structure

    @cached_property
    def layer_graph(self) -> nx.DiGraph:
        """networkx.DiGraph of the analysed cone (after folding)."""
        return graph_mod.layer_graph(self.ir)

    @cached_property
    def gate_layers(self) -> list[graph_mod.GateLayer]:
        return self.sweep.gate_layers

    @cached_property
    def segments(self) -> list[graph_mod.Segment]:
        return graph_mod.segments(self.ir)

    @property
    def input_name(self) -> str:
        return self.ir.input_name

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample input shape (without the batch axis)."""
        return self.ir.input_shape

    @property
    def num_classes(self) -> int:
        return self.ir.num_classes

    # ------------------------------------------------------------------ data (delegated to the sweep)

    def check_input(self, x: Any, name: str = "input") -> np.ndarray:
        """Validate and batch an input (:meth:`onnx_pathwise.sweep.Sweep.check_input`)."""
        return self.sweep.check_input(x, name)

    def record(self, x: Any, preactivations: bool = False) -> Record:
        """One onnxruntime forward pass (:meth:`onnx_pathwise.sweep.Sweep.record`)."""
        return self.sweep.record(x, preactivations)

    def _recorder_for(self, preactivations: bool = False) -> runtime.Recorder:
        return self.sweep._recorder_for(preactivations)

    @property
    def _biggest(self) -> int:
        return self.sweep._biggest

    def _sweep_bytes(self, rows: int, n: int) -> tuple[float, float]:
        return self.sweep._sweep_bytes(rows, n)

    def _sweep_plan(self, rows: int, n: int) -> tuple[int, int | None, float]:
        return self.sweep._sweep_plan(rows, n)

    def _sample_chunk(self, rows_per_sample: int) -> int:
        return self.sweep._sample_chunk(rows_per_sample)

    def _class_chunk(self, n: int) -> int:
        return self.sweep._class_chunk(n)

    def _score_seeds(self, classes: np.ndarray, n: int) -> dict[str, np.ndarray]:
        return self.sweep._score_seeds(classes, n)

    def unwrap(self, x: Any, record: Record | None = None) -> UnwrapResult:
        """The local affine model W_x, b_x of every sample, checked against onnxruntime."""
        step = self._sample_chunk(1)
        if record is None:
            xb = self.check_input(x)
            if xb.shape[0] > step:  # bounded memory: one sample chunk at a time
                return concat_batches(  # type: ignore[no-any-return]
                    [self.unwrap(xb[s : s + step]) for s in range(0, xb.shape[0], step)])
        elif record.n > step:  # the same, reusing the recorded forward pass
            return concat_batches(  # type: ignore[no-any-return]
                [self.unwrap(None, record=slice_record(record, s, s + step)) for s in range(0, record.n, step)])
        rec = record if record is not None else self.record(x)
        n, K = rec.scores.shape
        ws, bs = [], []
        step = self._class_chunk(n)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, not warned
            for start in range(0, K, step):
                classes = np.arange(start, min(K, start + step))
                w, b = self.engine.backward(self._score_seeds(classes, n), rec)
                ws.append(w)
                bs.append(b)
            W = np.concatenate(ws).swapaxes(0, 1)  # (n, K, *in)
            b = np.concatenate(bs).T.astype(np.float64)
            fx = np.einsum("nkd,nd->nk", W.reshape(n, K, -1).astype(np.float64),
                           rec.x.reshape(n, -1).astype(np.float64)) + b
        if not (np.all(np.isfinite(W)) and np.all(np.isfinite(fx))):
            bad = int(np.argwhere(~np.isfinite(W.reshape(n, -1)).all(axis=1) | ~np.isfinite(fx).all(axis=1))[0][0])
            raise ModelError(f"the local affine model of sample {bad} overflows {W.dtype} (a weight or "
                             "product of weights is too large)")
        delta = np.abs(fx - rec.scores).max(axis=1)
        return UnwrapResult(W, b.astype(W.dtype), rec.scores, delta)

    def certified_radius(self, x: Any, record: Record | None = None, max_input_size: int = 4096) -> RadiusResult:
        """The largest L2 and L∞ balls around each x inside its activation region (docs/design.md §3);
        see :func:`onnx_pathwise.radius.certified_radius`."""
        from .radius import certified_radius

        return certified_radius(self.sweep, x, record, max_input_size)

    # ------------------------------------------------------------------ pathwise (docs/design.md §4)

    def _path_setup(self, width: Any, depth: int | None) -> tuple[list[Any], dict[str, int]]:
        from .pathwise import parse_width, path_layers

        layers = path_layers(self.gate_layers, depth)
        return layers, {layer.name: parse_width(width, layer.units) for layer in layers}

    def _path_sweep(self, rec: Record, target: Any, width: Any, depth: int | None, input_width: Any,
                    keep_at: str | None = None, classes: int | None = None,
                    ) -> tuple[list[Any], Any, np.ndarray, np.ndarray]:
        """The pathwise sweep (every competing row down to the lowest path layer, in class
        chunks where they do not fit the memory budget): (path layers, the sweep with its
        masks and targets, W_p (n, *in), b_p (n,) of each target)."""
        from .pathwise import PathSweep, competing_set, parse_width, resolve_targets

        layers, widths = self._path_setup(width, depth)
        D = int(np.prod(self.input_shape, dtype=np.int64))
        in_width = parse_width(input_width, D) if input_width is not None else None
        tgt = resolve_targets(target, rec.scores)
        competing = competing_set(rec.scores, tgt, classes)
        _, chunk, store = self._sweep_plan(competing.rows, rec.n)
        sweep = PathSweep(self.engine, layers, rec, tgt, competing, widths, in_width, keep_at=keep_at,
                          chunk=chunk, store_bytes=store, progress=self.progress)
        W, b = sweep.run()
        return layers, sweep, W, b

    def explain(
        self,
        x: Any,
        target: Any = None,
        width: int | str | None = None,
        depth: int | None = None,
        input_width: int | str | None = None,
        record: Record | None = None,
        classes: int | str | None = None,
    ) -> Explanation:
        """Pathwise explanation of each sample (docs/design.md §4), one backward sweep per batch chunk.

        ``width``: units kept per path layer (int or ``"5%"``; default all that favour the
        target); ``depth``: how many of the last gate layers are path-constrained (default all;
        0 gives Input×Gradient); ``input_width``: apply the same selection to the input
        elements; ``target``: int, one int per sample, or None for the argmax (for a single
        score y: 0 or 1, the side explained, default 1 where y ≥ 0); ``classes``: the classes
        that compete in each unit's softmax, None or ``"all"`` (every class, exact) or N (the
        top N predicted classes plus the target). Memory stays within the budget at any number
        of classes (docs/design.md §4): samples, then classes, go in chunks.

        >>> import numpy as np
        >>> from onnx_pathwise.samples import tiny_mlp
        >>> e = Explainer(tiny_mlp(), device="cpu").explain(np.array([1.0, 2.0], np.float32))
        >>> e.target.tolist(), [p.kept.tolist() for p in e.path[0]]
        ([0], [[0]])
        >>> e.attribution.tolist(), e.masked_score.tolist()
        ([[1.0, 0.0]], [1.5])
        """
        from .pathwise import Explanation, PathLayer, competing_rows, parse_classes

        ncls = parse_classes(classes)
        xb = self.check_input(x) if record is None else record.x
        step, _, _ = self._sweep_plan(competing_rows(ncls, self.num_classes), xb.shape[0])
        if xb.shape[0] > step:  # bounded memory: one sweep per chunk of samples, recorded once
            t = None if target is None else np.asarray(target)
            return concat_batches([  # type: ignore[no-any-return]
                self.explain(xb[s : s + step], t if t is None or t.ndim == 0 else t[s : s + step],
                             width, depth, input_width,
                             record=None if record is None else slice_record(record, s, s + step), classes=ncls)
                for s in range(0, xb.shape[0], step)
            ])
        rec = record if record is not None else self.record(xb)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, not warned
            layers, sweep, weight, bias = self._path_sweep(rec, target, width, depth, input_width, classes=ncls)
            tgt = sweep.target
            n = rec.n
            xf = rec.x.astype(np.float64)
            masked = (weight.reshape(n, -1).astype(np.float64) * xf.reshape(n, -1)).sum(axis=1) + bias
            attribution = (weight * rec.x).astype(weight.dtype)
        if not (np.all(np.isfinite(attribution)) and np.all(np.isfinite(masked))):
            bad = int(np.argwhere(~np.isfinite(attribution.reshape(n, -1)).all(axis=1) | ~np.isfinite(masked))[0][0])
            raise ModelError(f"the pathwise explanation of sample {bad} overflows {weight.dtype} (a weight or "
                             "product of weights is too large)")
        paths = [
            [PathLayer(layer.name, np.flatnonzero(sweep.masks[layer.name][i]), layer.units) for layer in layers]
            for i in range(n)
        ]
        return Explanation(
            attribution=attribution,
            weight=weight,
            bias=bias,
            output=rec.scores,
            target=tgt,
            masked_score=masked,
            path=paths,
            input_kept=sweep.input_mask,
            classes=ncls,
        )

    def decompose(
        self,
        x: Any,
        layer: str | None = None,
        top: int = 8,
        group: str = "unit",
        target: Any = None,
        width: int | str | None = None,
        depth: int | None = None,
        input_width: int | str | None = None,
        classes: int | str | None = None,
    ) -> Decomposition:
        """Split each sample's pathwise attribution into the parts through single units (or
        channels) of one gate layer (default: the last), ranked by their score contribution
        h_u·∂y_c/∂h_u. ``parts`` (top ones) + ``rest`` (the other kept units) + ``bypass``
        (paths that skip the layer, e.g. residual joins) = ``attribution``. ``classes`` as in
        :meth:`explain`."""
        from .pathwise import parse_classes

        ncls = parse_classes(classes)
        if group not in ("unit", "channel"):
            raise PathwiseError(f"group {group!r}: choose 'unit' or 'channel'")
        if int(top) < 1:
            raise PathwiseError(f"top {top}: must be at least 1")
        names = [g.name for g in self.gate_layers]
        if not names:
            raise PathwiseError("the model has no gate layer to decompose at")
        name = layer if layer is not None else names[-1]
        if name not in names:
            raise PathwiseError(f"layer {name!r} is not a gate layer; gate layers: {', '.join(names)}")
        from .pathwise import competing_rows

        xb = self.check_input(x)
        step, _, _ = self._sweep_plan(competing_rows(ncls, self.num_classes), xb.shape[0])
        if xb.shape[0] > step:  # bounded memory: one sweep per chunk of samples
            t = None if target is None else np.asarray(target)
            return concat_batches([  # type: ignore[no-any-return]
                self.decompose(xb[s : s + step], name, top, group, t if t is None or t.ndim == 0 else t[s : s + step],
                               width, depth, input_width, ncls)
                for s in range(0, xb.shape[0], step)
            ])
        gl = self.gate_layers[names.index(name)]
        rec = self.record(xb)
        _, sweep, W, _ = self._path_sweep(rec, target, width, depth, input_width, keep_at=name, classes=ncls)
        tgt = sweep.target
        n = rec.n
        attribution = (W * rec.x).astype(W.dtype)
        assert sweep.at_layer is not None
        g = sweep.at_layer.astype(np.float64)  # (n, u), masks applied
        h = rec.states[name].value.reshape(n, -1).astype(np.float64)
        contrib = h * g  # per unit
        if group == "channel" and len(gl.shape) > 1:
            groups = np.repeat(np.arange(gl.shape[0]), gl.units // gl.shape[0])
        else:
            groups = np.arange(gl.units)
        G = int(groups.max()) + 1
        gcontrib = np.zeros((n, G))
        np.add.at(gcontrib.T, groups, contrib.T)
        active = np.zeros((n, G), bool)
        np.logical_or.at(active.T, groups, (g != 0).T)
        m = min(int(top), G)
        order = np.argsort(-np.where(active, gcontrib, -np.inf), axis=1, kind="stable")[:, :m]
        seeds = np.zeros((m + 1, n, gl.units), self.engine.dtype)
        chosen = np.zeros((n, gl.units), bool)
        for i in range(n):
            for j in range(m):
                sel = (groups == order[i, j]) & active[i, groups]
                seeds[j, i, sel] = g[i, sel]
                chosen[i] |= sel
        seeds[m] = np.where(chosen, 0.0, g)
        Wp = sweep.replay({gl.output: seeds.reshape((m + 1, n) + gl.shape)})
        parts = (Wp[:m] * rec.x[None]).swapaxes(0, 1)  # (n, m, *in)
        rest = Wp[m] * rec.x
        bypass = attribution - parts.sum(axis=1) - rest
        g_cut = self.layer_graph.copy()
        g_cut.remove_node(name)
        out_node = next(v for v, d in self.layer_graph.nodes(data=True) if self.ir.output_name in d["outputs"])
        crosses_all = out_node != name and not nx.has_path(g_cut, graph_mod.INPUT_NODE, out_node)
        return Decomposition(
            crosses_all=crosses_all,
            layer=name,
            group=group,
            attribution=attribution,
            parts=parts,
            part_index=order,
            part_score=np.take_along_axis(gcontrib, order, axis=1),
            part_active=np.take_along_axis(active, order, axis=1),
            rest=rest,
            bypass=bypass,
            target=tgt,
            output=rec.scores,
            classes=ncls,
        )

    # ------------------------------------------------------------------ baselines (docs/design.md §5)

    def attribute(self, x: Any, method: str = "pathwise", target: Any = None, **options: Any) -> Attribution:
        """Attributions of each sample by one method, on the same engine (no autodiff framework).

        ``method``: a name in :data:`onnx_pathwise.baselines.METHODS` ('pathwise', 'gradient',
        'input_x_gradient', 'integrated_gradients', 'guided_backprop', 'unwrap'); ``options``:
        that method's keyword options (``Method.options``), anything else is refused.

        >>> import numpy as np
        >>> from onnx_pathwise.samples import tiny_mlp
        >>> a = Explainer(tiny_mlp(), device="cpu").attribute(np.array([1.0, 2.0], np.float32), "gradient")
        >>> a.attribution.tolist(), a.target.tolist()
        ([[1.0, 0.0]], [0])
        """
        from . import baselines
        from .pathwise import resolve_targets

        spec = baselines.get_method(method)
        spec.check(options)
        rec = self.record(x)
        tgt = resolve_targets(target, rec.scores)
        attribution = spec.fn(self, rec.x, tgt, record=rec, **options)
        return Attribution(attribution, rec.scores, tgt, method, dict(options))


@dataclass(frozen=True)
class Attribution:
    """Attributions of a batch by one method (:meth:`Explainer.attribute`)."""

    attribution: np.ndarray  # (N, *input shape)
    output: np.ndarray  # (N, K) onnxruntime's scores at x
    target: np.ndarray  # (N,)
    method: str
    options: dict[str, Any]


@dataclass(frozen=True)
class Decomposition:
    """Parts of the pathwise attribution through units (or channels) of one gate layer."""

    layer: str
    group: str
    attribution: np.ndarray  # (N, *in)
    parts: np.ndarray  # (N, m, *in), ranked by part_score
    part_index: np.ndarray  # (N, m) unit (or channel) index of each part
    part_score: np.ndarray  # (N, m) h_u·∂y_c/∂h_u summed over the part
    part_active: np.ndarray  # (N, m) False where the part holds no kept, active unit
    rest: np.ndarray  # (N, *in) the other kept units' share
    bypass: np.ndarray  # (N, *in) paths that do not cross the layer
    target: np.ndarray
    output: np.ndarray
    crosses_all: bool  # every input→output path crosses the layer, so bypass must vanish
    classes: int | None = None  # the competing classes (None: all), as in Explanation

    @property
    def delta(self) -> np.ndarray:
        """Where every path crosses the layer: max |Σ parts + rest − attribution| per sample,
        computed from independent sweeps (float round-off only). Elsewhere the bypass closes
        the sum by construction and delta is 0."""
        n = self.attribution.shape[0]
        total = self.parts.sum(axis=1) + self.rest + (0 if self.crosses_all else self.bypass)
        return np.abs(total - self.attribution).reshape(n, -1).max(axis=1)
