"""Node attributes as the rules read them: schema defaults for the model's opset, values decoded
from protobuf, canonical forms from the op registry (:data:`onnx_pathwise.rules.RULES`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError
from ..ir import Node
from ..rules import RULES
from .kinds import DATA


def attr_defaults(op_type: str, domain: str, opset: int) -> dict[str, Any]:
    """The schema defaults of ``op_type``'s attributes at ``opset`` (empty when onnx has no schema)."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except Exception:
        return {}
    out: dict[str, Any] = {}
    for name, attr in schema.attributes.items():
        default = attr.default_value
        if default is not None and default.type != onnx.AttributeProto.UNDEFINED:
            # decoded like node attributes: string defaults (auto_pad, mode) are bytes
            out[name] = decode_value(helper.get_attribute_value(default))
    return out


def decode_value(value: Any) -> Any:
    """An attribute value as the rules read it: text as ``str``, tensors as numpy arrays."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list):
        return [decode_value(v) for v in value]
    return value


def constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    """The value a ``Constant`` node holds."""
    for attr in node.attribute:
        v = helper.get_attribute_value(attr)
        if attr.name == "value":
            return numpy_helper.to_array(v)
        if attr.name == "value_float":
            return np.array(v, np.float32)
        if attr.name == "value_floats":
            return np.array(v, np.float32)
        if attr.name == "value_int":
            return np.array(v, np.int64)
        if attr.name == "value_ints":
            return np.array(v, np.int64)
    raise ModelError(f"Constant node {node.name!r} has no supported value attribute")


def elem_type(vi: onnx.ValueInfoProto) -> int:
    """The element type a value declares (0 when it is not a tensor)."""
    return vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0


_SIMPLE_ATTRIBUTES = frozenset({
    onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT, onnx.AttributeProto.STRING,
    onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS, onnx.AttributeProto.STRINGS,
})


def checked_node(node: onnx.NodeProto, kind: Mapping[str, int], opset: int) -> Node:
    """What a registry entry's ``check`` sees, before any numerics: the inputs, which of them
    are computed, and the node's own int, float and string attributes (no schema defaults)."""
    attrs = {a.name: decode_value(helper.get_attribute_value(a)) for a in node.attribute if a.type in _SIMPLE_ATTRIBUTES}
    data = tuple(bool(i) and kind.get(i) == DATA for i in node.input)
    return Node(node.name, node.op_type, "", opset, tuple(node.input), tuple(node.output), attrs, data)


# --------------------------------------------------------------------------- canonical attributes


def canonical_attrs(
    node: Node, consts: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, Any]:
    """Return ``node.attrs`` in the one form the rules read, whatever the opset (the op's
    registry entry, ``RULES[op].canonical``, does the work)."""
    a: dict[str, Any] = dict(node.attrs)
    rule = RULES.get(node.op_type)
    if rule is not None and rule.canonical is not None:
        rule.canonical(node, a, consts, shapes)
    return a

