"""The layer graph (networkx), the ordered gate layers and the ReLU-linear segments."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from .ir import AFFINE, GATE, MERGE, ROUTING, SHAPE, ModelIR, Node

if TYPE_CHECKING:  # networkx is imported where a graph is built: a plain explanation needs none
    import networkx as nx

INPUT_NODE = "<input>"


@dataclass(frozen=True)
class GateLayer:
    """A gate node of the cone: the paper's hidden layer. ``units`` = elements per sample."""

    index: int
    name: str
    op_type: str
    shape: tuple[int, ...]
    input: str
    output: str

    @cached_property
    def units(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class Segment:
    """A maximal connected set of affine/shape/merge nodes between gates (or routing nodes),
    the model input and the explained output. ``inputs`` may be several (residual joins)."""

    index: int
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weights: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        return int(sum(a.size for w in self.weights.values() for a in w.values()))


def layer_graph(ir: ModelIR) -> nx.DiGraph:
    """One graph node per IR node (plus ``<input>``); edges follow data tensors.

    Node attributes: op_type, role, inputs, outputs, shapes (per-sample, of the outputs),
    weights (constant inputs by name). Edge attribute: tensor.
    """
    import networkx as nx

    g = nx.DiGraph()
    g.add_node(INPUT_NODE, op_type="Input", role="input", inputs=(), outputs=(ir.input_name,),
               shapes=(ir.input_shape,), weights={})
    producer = {ir.input_name: INPUT_NODE}
    for node in ir.nodes:
        g.add_node(
            node.name,
            op_type=node.op_type,
            role=node.role,
            inputs=node.inputs,
            outputs=node.outputs,
            shapes=tuple(ir.shapes.get(t) for t in node.outputs),
            weights={t: ir.constants[t] for t, d in zip(node.inputs, node.data) if t and not d},
            attrs=dict(node.attrs),
        )
        for t in node.data_inputs:
            g.add_edge(producer[t], node.name, tensor=t)
        for t in node.outputs:
            producer[t] = node.name
    return g


def gate_layers(ir: ModelIR) -> list[GateLayer]:
    """Gate nodes in the cone's deterministic topological order."""
    out: list[GateLayer] = []
    for node in ir.nodes:
        if node.role == GATE:
            out.append(
                GateLayer(len(out), node.name, node.op_type, ir.shapes[node.outputs[0]],
                          node.data_inputs[0], node.outputs[0])
            )
    return out


def _weights(node: Node, ir: ModelIR) -> dict[str, np.ndarray]:
    return {t: ir.constants[t] for t, d in zip(node.inputs, node.data) if t and not d
            and ir.constants[t].dtype.kind == "f" and node.role == AFFINE}


def segments(ir: ModelIR) -> list[Segment]:
    """ReLU-linear segments: weakly connected components of the affine/shape/merge nodes."""
    import networkx as nx

    linear = [n for n in ir.nodes if n.role in (AFFINE, SHAPE, MERGE)]
    names = {n.name for n in linear}
    g = nx.Graph()
    g.add_nodes_from(names)
    producer = {t: n for n in ir.nodes for t in n.outputs}
    consumers = ir.consumers()
    for n in linear:
        for t in n.data_inputs:
            p = producer.get(t)
            if p is not None and p.name in names:
                g.add_edge(p.name, n.name)
    order = {n.name: i for i, n in enumerate(ir.nodes)}
    comps = sorted((sorted(c, key=order.__getitem__) for c in nx.connected_components(g)),
                   key=lambda c: order[c[0]])
    out: list[Segment] = []
    by_name = {n.name: n for n in ir.nodes}
    for comp in comps:
        members = set(comp)
        ins: list[str] = []
        outs: list[str] = []
        for name in comp:
            node = by_name[name]
            for t in node.data_inputs:
                p = producer.get(t)
                if (p is None or p.name not in members) and t not in ins:
                    ins.append(t)
            for t in node.outputs:
                readers = consumers.get(t, [])
                if (t == ir.output_name or any(r.name not in members for r in readers)) and t not in outs:
                    outs.append(t)
        weights = {name: w for name in comp if (w := _weights(by_name[name], ir))}
        out.append(Segment(len(out), tuple(comp), tuple(ins), tuple(outs), weights))
    return out


def routing_nodes(ir: ModelIR) -> list[str]:
    return [n.name for n in ir.nodes if n.role == ROUTING]
