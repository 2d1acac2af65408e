"""Opsets older than onnxruntime runs (< 7) upgraded: the legacy ``broadcast``/``axis``
attributes rewritten by the operator spec, the rest by onnx's version converter."""

from __future__ import annotations

from collections.abc import Mapping

import onnx
from onnx import helper

from ..errors import ModelError
from .protos import node_subgraphs, opset_version

#: The oldest default-domain opset onnxruntime has kernels for (Gemm, BatchNormalization,
#: Add, ... start at 7); older models are upgraded with onnx's version converter.
MIN_RUNTIME_OPSET = 7


#: The last opset whose Add/Sub/Mul/Div and Gemm take ``broadcast`` (and ``axis``) attributes.
LEGACY_BROADCAST_OPSET = 6
_LEGACY_BINARY = frozenset({"Add", "Sub", "Mul", "Div"})


def _converter_error(opset: int, exc: Exception) -> ModelError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelError(
        f"opset {opset} is older than onnxruntime supports ({MIN_RUNTIME_OPSET}) and onnx's "
        f"version converter cannot upgrade it: {first}"
    )


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and every subgraph inside it, at any depth."""
    out = [graph]
    for node in graph.node:
        for g in node_subgraphs(node):
            out += _graphs(g)
    return out


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Every tensor's shape as far as onnx's shape inference knows it (None for an unknown
    dimension; tensors of unknown rank are missing)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    shapes: dict[str, list[int | None]] = {}
    for g in _graphs(inferred.graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            tt = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and tt.HasField("shape"):
                shapes[vi.name] = [int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim]
        for t in g.initializer:
            shapes[t.name] = [int(d) for d in t.dims]
        for node in g.node:
            if node.op_type == "Constant" and node.output:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    shapes[node.output[0]] = [int(d) for d in value.dims]
    return shapes


def rewrite_legacy_broadcast(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of an opset-≤6 model whose Add/Sub/Mul/Div and Gemm carry no ``broadcast``
    or ``axis`` attributes, computing the same values under numpy broadcasting (opset 7 on).

    `Add-1/Add-6 <https://github.com/onnx/onnx/blob/main/docs/Changelog.md#Add-6>`_ (Sub, Mul,
    Div alike): with ``broadcast=1`` the right-hand side B is broadcast to the shape of A; B is
    a single element, or its shape is a contiguous run of A's shape starting at ``axis``
    (suffix matching when ``axis`` is not set). So A (N, C, H, W) + B (C,) with ``axis=1`` adds
    B[c] to every element of channel c. Numpy broadcasting matches trailing dimensions instead,
    so B gets rank(A) − axis − rank(B) trailing unit axes (an ``Unsqueeze`` before the node);
    suffix matching and ``broadcast=0`` (equal shapes) already agree with numpy. Gemm-1/Gemm-6
    ``broadcast`` lets C broadcast to (M, N), which Gemm-7's unidirectional broadcasting does
    for every shape the old rule allowed: the attribute is dropped. onnx's version converter
    is not trusted with these: it turns ``axis=1`` with B (C,) on A (N, C, H) into
    B (C, 1, 1), which broadcasts against the batch axis.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    shapes = _static_shapes(out)
    names = {n for g in _graphs(out.graph) for n in shapes} | {
        o for g in _graphs(out.graph) for node in g.node for o in node.output
    }

    def fresh(base: str) -> str:
        name, k = f"{base}_legacy_broadcast", 1
        while name in names:
            k += 1
            name = f"{base}_legacy_broadcast_{k}"
        names.add(name)
        return name

    for g in _graphs(out.graph):
        rewritten: list[onnx.NodeProto] = []
        for node in g.node:
            if node.domain in ("", "ai.onnx") and node.op_type == "Gemm":
                _drop_attributes(node, ("broadcast",))
            elif node.domain in ("", "ai.onnx") and node.op_type in _LEGACY_BINARY:
                attrs = {a.name: a.i for a in node.attribute if a.name in ("broadcast", "axis")}
                if attrs.get("broadcast", 0) and "axis" in attrs and len(node.input) == 2:
                    trailing = _legacy_trailing_axes(node, attrs["axis"], shapes)
                    if trailing:
                        b = node.input[1]
                        rank_b = len(shapes[b])
                        unsqueezed = fresh(b)
                        rewritten.append(helper.make_node(
                            "Unsqueeze", [b], [unsqueezed], axes=list(range(rank_b, rank_b + trailing)),
                            name=f"{node.name or node.op_type}/legacy_broadcast"))
                        node.input[1] = unsqueezed
                _drop_attributes(node, ("broadcast", "axis"))
            rewritten.append(node)
        del g.node[:]
        g.node.extend(rewritten)
    return out


def _drop_attributes(node: onnx.NodeProto, names: tuple[str, ...]) -> None:
    kept = [a for a in node.attribute if a.name not in names]
    del node.attribute[:]
    node.attribute.extend(kept)


def _legacy_trailing_axes(node: onnx.NodeProto, axis: int, shapes: Mapping[str, list[int | None]]) -> int:
    """How many unit axes B needs after its own so that numpy aligns it with A at ``axis``
    (legacy broadcasting, :func:`rewrite_legacy_broadcast`); refuses what the old rule forbids."""
    where = f"node {node.name or '<unnamed>'!r} ({node.op_type}, broadcast=1, axis={axis})"
    a, b = node.input[0], node.input[1]
    if a not in shapes or b not in shapes:
        missing = [t for t in (a, b) if t not in shapes]
        raise ModelError(f"{where}: the rank of {missing} cannot be inferred, and legacy broadcasting "
                         "along an axis needs it")
    shape_a, shape_b = shapes[a], shapes[b]
    rank_a, rank_b = len(shape_a), len(shape_b)
    if all(d == 1 for d in shape_b):
        return 0  # one element: numpy broadcasts it anywhere (rank ≤ rank(A), as the old rule asks)
    start = axis + rank_a if axis < 0 else axis
    trailing = rank_a - start - rank_b
    if not 0 <= start < rank_a or trailing < 0:
        raise ModelError(f"{where}: B of shape {shape_b} does not fit A of rank {rank_a} from axis {axis}")
    for j, d in enumerate(shape_b):
        # the batch axis is pinned to 1 for the converter: only other axes are checked
        da = shape_a[start + j]
        if start + j > 0 and d is not None and da is not None and d != da:
            raise ModelError(f"{where}: B of shape {shape_b} does not match A's shape {shape_a} from "
                             f"axis {start}")
    return trailing


def upgrade_old_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return ``model`` upgraded to :data:`MIN_RUNTIME_OPSET` when its opset is older (else as is).

    Legacy ``broadcast``/``axis`` attributes are rewritten by :func:`rewrite_legacy_broadcast`
    first, following the operator spec; the rest is onnx's version converter. The converter
    refuses symbolic dimensions, so they are pinned to 1 for the conversion and restored
    afterwards; inferred ``value_info`` (which saw the pinned sizes) is dropped.
    """
    opset = opset_version(model)
    if not 0 < opset < MIN_RUNTIME_OPSET:
        return model
    from onnx import version_converter

    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    params: dict[tuple[str, int], str] = {}
    for vi in list(pinned.graph.input) + list(pinned.graph.output):
        if not vi.type.HasField("tensor_type"):
            continue
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if not d.HasField("dim_value"):
                params[(vi.name, i)] = d.dim_param
                d.dim_value = 1
    try:
        # opsets < 6 first become 6 (their Add-1 ... differ from Add-6 only in consumed_inputs),
        # where shape inference gives the ranks that the legacy broadcast rewrite needs
        if opset < LEGACY_BROADCAST_OPSET:
            pinned = version_converter.convert_version(pinned, LEGACY_BROADCAST_OPSET)
    except Exception as exc:
        raise _converter_error(opset, exc) from None
    pinned = rewrite_legacy_broadcast(pinned)
    try:
        upgraded = version_converter.convert_version(pinned, MIN_RUNTIME_OPSET)
    except Exception as exc:
        raise _converter_error(opset, exc) from None
    for vi in list(upgraded.graph.input) + list(upgraded.graph.output):
        if not vi.type.HasField("tensor_type"):
            continue
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if (vi.name, i) in params:
                d.dim_param = params[(vi.name, i)] or "N"
    del upgraded.graph.value_info[:]
    return upgraded

