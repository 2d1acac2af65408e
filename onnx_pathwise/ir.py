"""The typed intermediate representation every module past :mod:`~onnx_pathwise.analysis` works on.

No protobuf here: nodes are frozen dataclasses, tensors are numpy arrays, and the whole
model is a :class:`ModelIR` holding the input→output cone in a deterministic topological
order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Roles of nodes in the layer graph (docs/design.md §1).
AFFINE, SHAPE, MERGE, GATE, ROUTING, TERMINAL = (
    "affine",
    "shape",
    "merge",
    "gate",
    "routing",
    "terminal",
)


@dataclass(frozen=True)
class Node:
    """One ONNX node of the input→output cone, after folding and canonicalisation.

    ``attrs`` holds every attribute with the schema default filled in for the model's
    opset, plus canonical attributes read from constant inputs (``pads`` of Pad-11,
    ``axes`` of Squeeze-13, ...), so rules never look at opset differences.
    ``data`` marks which inputs carry data (depend on the model input); the others
    are constants found in :attr:`ModelIR.constants`.
    """

    name: str
    op_type: str
    domain: str
    opset: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any]
    data: tuple[bool, ...]
    role: str = AFFINE

    @property
    def data_inputs(self) -> tuple[str, ...]:
        return tuple(t for t, d in zip(self.inputs, self.data) if d)


@dataclass
class ModelIR:
    """The analysable part of a model.

    ``shapes`` maps every data tensor to its per-sample shape (the batch axis removed);
    ``constants`` maps every constant tensor a cone node reads to its value.
    ``batch_fixed``: the file fixes the batch dimension, at ``fixed_batch`` (B ≥ 1; 0 when the
    batch dimension is symbolic); onnxruntime then runs groups of B samples.
    """

    nodes: list[Node]
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]
    input_dtype: np.dtype
    constants: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]
    batch_fixed: bool = False
    fixed_batch: int = 0
    peeled: tuple[str, ...] = ()
    opset: int = 0
    source_output: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def num_classes(self) -> int:
        return int(np.prod(self.shapes[self.output_name], dtype=np.int64))

    def producers(self) -> dict[str, Node]:
        return {t: n for n in self.nodes for t in n.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for t in n.data_inputs:
                out.setdefault(t, []).append(n)
        return out
