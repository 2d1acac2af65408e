"""Walks over a ModelProto shared by the loader and the analysis: subgraphs, every stored tensor,
the opset a model imports."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import onnx
from onnx import TensorProto, helper


def node_subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs a node holds in its attributes (If branches, Loop and Scan bodies)."""
    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH] + [
        g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]


def all_tensors(
    model: onnx.ModelProto,
) -> tuple[list[tuple[str, TensorProto]], list[tuple[str, onnx.SparseTensorProto]]]:
    """Every stored tensor of the model, with where it lives (for messages): initializers and
    sparse initializers (values and indices) of every graph, and tensor, tensors, sparse-tensor
    attributes of every node at any depth of If/Loop/Scan bodies, of local function bodies
    and of training graphs. Attribute fields are read whatever the attribute's declared type.
    The main graph's initializers come first, in their order."""
    tensors: list[tuple[str, TensorProto]] = []
    sparse: list[tuple[str, onnx.SparseTensorProto]] = []

    def add_sparse(s: onnx.SparseTensorProto, label: str) -> None:
        sparse.append((label, s))
        tensors.append((f"{label} (values)", s.values))
        tensors.append((f"{label} (indices)", s.indices))

    def named(label: str, t: TensorProto) -> str:
        return f"{label} (tensor {t.name!r})" if t.name else label

    def add_attr(a: onnx.AttributeProto, owner: str) -> None:
        label = f"{owner}: attribute {a.name!r}"
        if a.HasField("t"):
            tensors.append((named(label, a.t), a.t))
        tensors.extend((named(f"{label}[{i}]", t), t) for i, t in enumerate(a.tensors))
        if a.HasField("sparse_tensor"):
            add_sparse(a.sparse_tensor, label)
        for i, s in enumerate(a.sparse_tensors):
            add_sparse(s, f"{label}[{i}]")
        inside = f" in subgraph {a.name!r} of {owner}"
        if a.HasField("g"):
            add_graph(a.g, inside)
        for g in a.graphs:
            add_graph(g, inside)

    def add_nodes(nodes: Sequence[onnx.NodeProto], where: str) -> None:
        for n in nodes:
            owner = f"node {n.name or '<unnamed>'!r} ({n.op_type}){where}"
            for a in n.attribute:
                add_attr(a, owner)

    def add_graph(g: onnx.GraphProto, where: str) -> None:
        tensors.extend((f"initializer {t.name!r}{where}", t) for t in g.initializer)
        for s in g.sparse_initializer:
            add_sparse(s, f"sparse initializer {s.values.name!r}{where}")
        add_nodes(g.node, where)

    add_graph(model.graph, "")
    for f in model.functions:
        where = f" in local function '{f.domain}.{f.name}'"
        add_nodes(f.node, where)
        for a in f.attribute_proto:
            add_attr(a, f"local function '{f.domain}.{f.name}'")
    for i, info in enumerate(model.training_info):
        add_graph(info.initialization, f" in training_info[{i}].initialization")
        add_graph(info.algorithm, f" in training_info[{i}].algorithm")
    return tensors, sparse


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    """The opset the model imports for ``domain`` (the default domain: ``""`` or ``ai.onnx``); 0 if none."""
    for imp in model.opset_import:
        if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(imp.version)
    return 0


def _copy_fields(src: Any, dst: Any, skip: str) -> None:
    """Copy every set field of protobuf message ``src`` but ``skip`` into ``dst``."""
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def with_initializers(model: onnx.ModelProto, each: Callable[[TensorProto], TensorProto]) -> onnx.ModelProto:
    """A copy of ``model`` whose main-graph initializers are ``each(t)`` of its own: the data of
    the ones ``each`` replaces is never copied (a whole-model ``CopyFrom`` would copy it all)."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    out.graph.initializer.extend(each(t) for t in model.graph.initializer)
    return out


def without_large_data(model: onnx.ModelProto, limit: int = 1 << 16) -> onnx.ModelProto:
    """A copy of ``model`` whose main-graph initializers of ``limit`` bytes or more keep their
    name, type and dims but not their data: enough for shape inference, whose data propagation
    only reads small tensors (shapes), without copying the weights (onnx's inference serialises
    and parses the whole model: a 537 MB VGG-16 cost 1 GB more at load)."""
    return with_initializers(model, lambda t: TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
                             if _claimed_bytes(t) >= limit else t)


def _claimed_bytes(t: TensorProto) -> int:
    """The bytes a tensor's type and dims claim (the loader has checked that its data agrees):
    cheap, where ``ByteSize`` serialises the tensor (0.8 s for VGG-16's weights)."""
    count = 1
    for d in t.dims:
        count *= int(d)
    try:
        return count * int(helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
    except (KeyError, TypeError, ValueError):
        return count
