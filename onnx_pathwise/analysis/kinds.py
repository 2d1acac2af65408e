"""What each tensor is: *constant*, *shape* (depends on the input only through ``Shape``/``Size``)
or *data*; what a node reads (subgraphs' outer-scope reads included); the graph's nodes in an
order where each comes after all it reads."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx

from ..errors import ModelError
from ..load import node_subgraphs

CONST, SHAPE_KIND, DATA = 0, 1, 2

#: Ops whose value is random: never folded, whatever they read.
_RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the scopes around it: used by one of its nodes (or nested
    subgraphs, at any depth) or returned as one of its outputs, but defined neither as its input,
    its initializer nor a node output inside it. onnxruntime resolves such a name in the nearest
    enclosing graph that defines it; a local definition shadows an outer one."""
    defined = {vi.name for vi in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    defined |= {o for n in graph.node for o in n.output}
    reads = {o.name for o in graph.output}
    for node in graph.node:
        reads.update(node.input)
        for g in node_subgraphs(node):
            reads |= _outer_reads(g)
    reads.discard("")
    return reads - defined


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads: its inputs, then the outer-scope names its subgraphs read."""
    subgraphs = node_subgraphs(node)
    if not subgraphs:
        return [i for i in node.input if i]
    outer: set[str] = set()
    for g in subgraphs:
        outer |= _outer_reads(g)
    inputs = [i for i in node.input if i]
    return inputs + sorted(outer - set(inputs))


def _is_random(node: onnx.NodeProto) -> bool:
    """A random op, or control flow with one anywhere in its subgraphs."""
    if node.op_type in _RANDOM_OPS:
        return True
    return any(_is_random(n) for g in node_subgraphs(node) for n in g.node)


def duplicate_name(graph: onnx.GraphProto) -> str:
    """Why the graph defines a value name twice (empty when it does not).

    onnxruntime refuses a graph input listed twice and a node output that repeats another node
    output, an initializer or a graph input; it silently takes the *last* of two initializers
    with one name, and a Constant node over an initializer of the same name. Each is refused
    here, so that the model is never analysed with one value and run with another. An
    initializer that is also a graph input (an overridable default, IR ≥ 4; every initializer
    in IR 3) is legal: it is not fed, so onnxruntime uses the initializer, as the analysis does.
    """
    seen: dict[str, str] = {}
    for vi in graph.input:
        if vi.name in seen:
            return f"graph input {vi.name!r} is listed twice"
        seen[vi.name] = "a graph input"
    inits: set[str] = set()
    for t in list(graph.initializer) + [s.values for s in graph.sparse_initializer]:
        if t.name in inits:
            return f"two initializers are named {t.name!r}"
        inits.add(t.name)
        seen.setdefault(t.name, "an initializer")
    for node in graph.node:
        for o in node.output:
            if not o:
                continue
            if o in seen:
                return (f"node {node.name or '<unnamed>'!r} ({node.op_type}) writes {o!r}, a name "
                        f"already defined by {seen[o]}")
            seen[o] = f"node {node.name or '<unnamed>'!r} ({node.op_type})"
    return ""


def _topological(nodes: Sequence[onnx.NodeProto], known: set[str]) -> list[onnx.NodeProto]:
    """Kahn's order that keeps the file order where it is already valid. A node waits for
    everything it reads, including the outer-scope names its subgraphs read."""
    ready = set(known)
    pending = [(n, node_reads(n)) for n in nodes]
    order: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for n, reads in pending:
            if all(i in ready for i in reads):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append((n, reads))
        if len(rest) == len(pending):
            missing = sorted({i for _, reads in rest for i in reads if i not in ready})
            raise ModelError(f"graph is not a DAG or reads undefined tensors: {missing[:5]}")
        pending = rest
    return order


def tensor_kinds(
    graph: onnx.GraphProto, input_name: str, initializers: Iterable[str], other_inputs: Iterable[str]
) -> tuple[dict[str, int], list[onnx.NodeProto], dict[str, onnx.NodeProto]]:
    """Every tensor's kind (:data:`CONST`, :data:`SHAPE_KIND` or :data:`DATA`), the graph's nodes
    in topological order and the node producing each tensor. ``input_name`` is the explained
    input; ``other_inputs`` are graph inputs that are not fed, so nothing reading them folds."""
    kind: dict[str, int] = {input_name: DATA}
    for name in initializers:
        kind[name] = CONST
    for name in other_inputs:
        kind[name] = DATA  # an unfed input: anything reading it cannot be folded
    nodes = _topological(graph.node, set(kind))
    producer: dict[str, onnx.NodeProto] = {}
    for node in nodes:
        for o in node.output:
            producer[o] = node
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            kind[node.output[0]] = CONST
            continue
        # a node is constant only if all it reads is: its subgraphs' outer-scope reads count
        ins = [kind[i] for i in node_reads(node)]
        if node.op_type in ("Shape", "Size"):
            k = SHAPE_KIND if ins and ins[0] != CONST else CONST
        else:
            k = max(ins, default=CONST)
            if _is_random(node):
                k = DATA
        for o in node.output:
            if o:
                kind[o] = k
    return kind, nodes, producer
