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
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from . import baselines, frontend, limits, runtime
from . import decompose as decompose_mod
from . import explain as explain_mod
from . import graph as graph_mod
from . import radius as radius_mod
from . import unwrap as unwrap_mod
from .baselines import Attribution
from .decompose import Decomposition
from .engine import Engine, Record
from .errors import PathwiseError
from .ir import ModelIR
from .passes import run_passes
from .pathwise import Explanation, parse_classes
from .radius import RadiusResult
from .sweep import Sweep
from .unwrap import UnwrapResult

if TYPE_CHECKING:
    import networkx as nx
    import onnx

__all__ = ["Attribution", "Decomposition", "Explainer", "Explanation", "RadiusResult", "UnwrapResult"]


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
        proto, raw_ir = frontend.load(model, input_name=input_name, output_name=output_name)
        #: the checked model without the data of the weights the sweep holds (runtime.lean;
        #: runtime.filled(proto, sweep.initializers) is the whole model)
        self.proto = runtime.lean(proto, raw_ir.constants)
        del proto
        self.source_ir: ModelIR = raw_ir
        self.ir: ModelIR = run_passes(raw_ir)
        #: the shared sweep layer (onnx_pathwise.sweep): engine, recorders, kernels, chunk plans
        self.sweep = Sweep(self.proto, self.ir, self.device, raw_ir.constants)
        self.kernels = self.sweep.kernels
        self.engine: Engine = self.sweep.engine
        #: show a progress bar on stderr while a pathwise sweep goes in class chunks (opt-in)
        self.progress = False

    # ------------------------------------------------------------------ structure

    @cached_property
    def layer_graph(self) -> nx.DiGraph:
        """networkx.DiGraph of the analysed cone (after folding)."""
        return self.sweep.layer_graph

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

    @limits.reused_heap()
    def record(self, x: Any, preactivations: bool = False) -> Record:
        """One onnxruntime forward pass (:meth:`onnx_pathwise.sweep.Sweep.record`)."""
        return self.sweep.record(x, preactivations)

    @limits.reused_heap()
    def scores(self, x: Any) -> np.ndarray:
        """The explained output of each sample, (N, K): the record's forward pass without the
        gate states (:meth:`onnx_pathwise.sweep.Sweep.scores`); the same bits as ``record(x).scores``."""
        return self.sweep.scores(x)

    @limits.reused_heap()
    def unwrap(self, x: Any, record: Record | None = None) -> UnwrapResult:
        """The local affine model W_x, b_x of every sample, checked against onnxruntime
        (:func:`onnx_pathwise.unwrap.unwrap`)."""
        return unwrap_mod.unwrap(self.sweep, x, record)

    @limits.reused_heap()
    def certified_radius(self, x: Any, record: Record | None = None, max_input_size: int = 4096) -> RadiusResult:
        """The largest L2 and L∞ balls around each x inside its activation region (docs/design.md §3);
        see :func:`onnx_pathwise.radius.certified_radius`."""
        return radius_mod.certified_radius(self.sweep, x, record, max_input_size)

    # ------------------------------------------------------------------ pathwise (docs/design.md §4)

    @limits.reused_heap()
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
        """Pathwise explanation of each sample (docs/design.md §4), one backward sweep per batch chunk
        (:func:`onnx_pathwise.explain.explain`).

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
        return explain_mod.explain(self.sweep, x, target, width, depth, input_width, record, classes,
                                   progress=self.progress)

    @limits.reused_heap()
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
        :meth:`explain` (:func:`onnx_pathwise.decompose.decompose`)."""
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
        return decompose_mod.decompose(self.sweep, x, name, top, group, target, width, depth, input_width, ncls,
                                       progress=self.progress)

    # ------------------------------------------------------------------ baselines (docs/design.md §5)

    @limits.reused_heap()
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
        return baselines.attribute(self, x, method, target, **options)
