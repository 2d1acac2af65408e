"""Resource limits checked before onnxruntime or numpy sees a model: sizes stored tensors claim,
the data they hold, local functions inlined and nested, tensors shape inference finds."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError
from .protos import all_tensors, node_subgraphs, without_large_data

#: The most bytes one stored tensor, or one tensor shape inference finds, may claim.
MAX_CONSTANT_BYTES = 2**31
#: protobuf cannot parse a message of 2 GiB or more.
MAX_PROTOBUF_BYTES = 2**31

#: Nodes a model may have once its local functions are inlined, as onnxruntime does when it loads
#: the model (a chain of functions that each call the previous one twice doubles at every level).
MAX_INLINED_NODES = 1_000_000
#: How deeply local functions and subgraphs may nest.
MAX_NESTING = 64
#: Tensor types whose stored data holds one entry per element (raw_data: itemsize bytes each).
_PLAIN_TYPES = frozenset({
    TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.BOOL,
    TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32,
    TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64,
})



_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
#: Tensor types with several values per stored byte (raw_data and int32_data are packed).
_PACKED_TYPES = {getattr(TensorProto, n): k for n, k in
                 (("UINT4", 2), ("INT4", 2), ("FLOAT4E2M1", 2), ("UINT2", 4), ("INT2", 4))
                 if hasattr(TensorProto, n)}
_COMPLEX_TYPES = frozenset({TensorProto.COMPLEX64, TensorProto.COMPLEX128})
_KNOWN_TYPES = frozenset(v for v in TensorProto.DataType.values() if v != TensorProto.UNDEFINED)


def stored_bytes(data_type: int, count: int) -> int:
    """Bytes that ``count`` values of ``data_type`` take in ``raw_data`` (or external data)."""
    if data_type in _PACKED_TYPES:
        return -(-count // _PACKED_TYPES[data_type])
    try:
        return count * np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except Exception:
        return count * 4


def tensor_problem(t: TensorProto, raw_bytes: int | None = None) -> str:
    """Why a stored tensor cannot be taken as it is: an unknown data type, a claim beyond the
    limit, or data that does not match its type and dims (refused before numpy or onnxruntime
    tries to read or allocate it). External data is checked when it is loaded. ``raw_bytes``:
    the length of its raw_data where the caller read it from the file's bytes
    (:func:`raw_data_sizes`); otherwise it is read from the message, which copies the data."""
    if t.data_type == TensorProto.UNDEFINED:
        return "has data type 0 (UNDEFINED); its values cannot be read"
    if t.data_type not in _KNOWN_TYPES:
        return f"has unknown data type {t.data_type}"
    type_name = TensorProto.DataType.Name(t.data_type)
    dims = [int(d) for d in t.dims]
    if any(d < 0 for d in dims):
        return f"has a negative dimension {dims}"
    count = 1
    for d in dims:
        count *= d
    nbytes = stored_bytes(t.data_type, count)
    if nbytes > MAX_CONSTANT_BYTES:
        return (f"claims shape {dims}: {nbytes / 2**30:.1f} GiB, more than the limit of "
                f"{MAX_CONSTANT_BYTES / 2**30:g} GiB")
    if t.data_location not in (TensorProto.DEFAULT, TensorProto.EXTERNAL):
        return f"has unknown data_location {t.data_location}"
    if t.data_location == TensorProto.EXTERNAL:
        # values inline as well would leave two answers to "what are the weights": refused
        inline = "raw_data" if t.HasField("raw_data") else next((f for f in _TYPED_FIELDS if len(getattr(t, f))), None)
        return f"stores its values twice, in {inline} and in external data" if inline else ""
    field = helper.tensor_dtype_to_field(t.data_type)
    wrong = [f for f in _TYPED_FIELDS if f != field and len(getattr(t, f))]
    if wrong:
        return f"is {type_name} but stores its values in {wrong[0]} (expected {field} or raw_data)"
    if t.HasField("raw_data"):
        if t.data_type == TensorProto.STRING:
            return "is STRING but stores raw_data (strings go in string_data)"
        if len(getattr(t, field)):
            return f"stores its values twice, in raw_data and in {field}"
        held = len(t.raw_data) if raw_bytes is None else raw_bytes  # len(t.raw_data) copies the bytes
        if held != nbytes and (t.data_type in _PLAIN_TYPES or t.data_type in _PACKED_TYPES
                               or t.data_type in _COMPLEX_TYPES):
            return f"has shape {dims} ({nbytes} bytes of {type_name}) but stores {held} bytes"
        return ""
    if t.data_type in _COMPLEX_TYPES:
        expected = 2 * count
    elif t.data_type in _PACKED_TYPES:
        expected = nbytes
    elif t.data_type in _PLAIN_TYPES or t.data_type == TensorProto.STRING:
        expected = count
    else:
        return ""
    held = len(getattr(t, field))
    if held != expected:
        return f"has shape {dims} ({expected} values of {type_name}) but stores {held}"
    return ""


def _inlined_size(model: onnx.ModelProto) -> None:
    """Refuse local functions that call themselves, nest too deeply or inline to too many nodes."""
    functions = {(f.domain, f.name): f for f in model.functions}
    sizes: dict[tuple[str, str], int] = {}
    active: list[tuple[str, str]] = []
    caller = [""]

    def where() -> str:
        outer = f", called through '{active[0][0]}.{active[0][1]}'" if len(active) > 1 else ""
        return f"(node {caller[0]!r}{outer})"

    def graph_size(nodes: Sequence[onnx.NodeProto], depth: int) -> int:
        if depth > MAX_NESTING:
            raise ModelError(f"local functions or subgraphs nest more than {MAX_NESTING} deep {where()}")
        total = 0
        for node in nodes:
            if depth == 0:
                caller[0] = node.name or node.op_type
            key = (node.domain, node.op_type)
            if key in functions:
                total += function_size(key, depth + 1)
            else:
                total += 1 + sum(graph_size(g.node, depth + 1) for g in node_subgraphs(node))
        return total

    def function_size(key: tuple[str, str], depth: int) -> int:
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ModelError(f"local function '{key[0]}.{key[1]}' calls itself {where()}")
        active.append(key)
        size = graph_size(functions[key].node, depth)
        if size > MAX_INLINED_NODES:
            raise ModelError(f"local function '{key[0]}.{key[1]}' {where()} expands to {size:,} nodes "
                             f"when inlined, more than the limit of {MAX_INLINED_NODES:,}")
        active.pop()
        sizes[key] = size
        return size

    total = graph_size(model.graph.node, 0)
    if total > MAX_INLINED_NODES:
        raise ModelError(f"the graph has {total:,} nodes once local functions are inlined, more than "
                         f"the limit of {MAX_INLINED_NODES:,}")


def check_inferred_sizes(model: onnx.ModelProto) -> None:
    """Refuse, before the probe run, a tensor that onnx's shape inference (with data propagation)
    finds over :data:`MAX_CONSTANT_BYTES`: Expand, Tile or ConstantOfShape of a computed shape
    would make onnxruntime allocate it. A symbolic dimension counts as 1 (the probe runs one
    sample). Models shape inference cannot handle are let through."""
    try:
        inferred = onnx.shape_inference.infer_shapes(without_large_data(model), data_prop=True)
    except Exception:
        return
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        shape = [int(d.dim_value) if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        count = 1
        for d in shape:
            count *= max(d, 0)
        nbytes = stored_bytes(vi.type.tensor_type.elem_type, count)
        if nbytes > MAX_CONSTANT_BYTES:
            raise ModelError(f"tensor {vi.name!r} would have shape {shape}: {nbytes / 2**30:.1f} GiB, "
                             f"more than the limit of {MAX_CONSTANT_BYTES / 2**30:g} GiB")


_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9  # field numbers in onnx.proto
#: Fields :func:`raw_data_sizes` walks before it gives up (a Python loop: a file of millions of
#: empty fields would otherwise take minutes; the message's lengths are read then).
MAX_WALKED_FIELDS = 1 << 18


def _fields(data: bytes, start: int, stop: int, budget: list[int]) -> Iterator[tuple[int, int, int, int]]:
    """The fields of the protobuf message in data[start:stop]: (number, wire type, where its
    payload starts, where it ends; a length-delimited field's payload is its bytes). Each
    field spends one of ``budget[0]``."""
    i = start
    while i < stop:
        budget[0] -= 1
        if budget[0] < 0:
            raise ValueError("too many fields to walk")
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, end = _varint(data, i)
        elif wire == 1:
            end = i + 8
        elif wire == 2:
            size, i = _varint(data, i)
            end = i + size
        elif wire == 5:
            end = i + 4
        else:  # groups: not in ONNX
            raise ValueError(f"wire type {wire}")
        if end > stop:
            raise ValueError("field past its message")
        yield number, wire, i, end
        i = end


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def raw_data_sizes(data: bytes) -> list[int | None] | None:
    """The length of raw_data of each initializer of the main graph, in order (None where it has
    none), from the model's serialized bytes: reading ``raw_data`` from the parsed message
    copies it (VGG-16's 537 MB: 0.3 s). As protobuf parses, the graph's occurrences are merged
    and a later raw_data replaces an earlier one. None when the bytes hold what ONNX does not
    (groups), end inside a field or hold more than :data:`MAX_WALKED_FIELDS` fields on the
    way: the lengths are then read from the message."""
    budget = [MAX_WALKED_FIELDS]
    try:
        sizes: list[int | None] = []
        for number, wire, a, b in _fields(data, 0, len(data), budget):
            if number != _MODEL_GRAPH or wire != 2:
                continue
            for g_number, g_wire, ga, gb in _fields(data, a, b, budget):
                if g_number != _GRAPH_INITIALIZER or g_wire != 2:
                    continue
                size = None
                for t_number, t_wire, ta, tb in _fields(data, ga, gb, budget):
                    if t_number == _TENSOR_RAW_DATA and t_wire == 2:
                        size = tb - ta
                sizes.append(size)
        return sizes
    except (ValueError, IndexError):
        return None


def check_resources(model: onnx.ModelProto, raw_sizes: Sequence[int | None] | None = None) -> None:
    """Refuse, before onnxruntime or numpy sees the model, what would hang or exhaust memory:
    local functions that inline to more than :data:`MAX_INLINED_NODES` nodes, nest deeper than
    :data:`MAX_NESTING` or call themselves; stored tensors anywhere in the model (see
    :func:`all_tensors`) of an unknown type, whose dims claim more than
    :data:`MAX_CONSTANT_BYTES` or that store other data than their type and dims say; sparse
    tensors whose dense shape claims more; ConstantOfShape nodes with a constant shape that
    would fill more than :data:`MAX_CONSTANT_BYTES`. ``raw_sizes``: :func:`raw_data_sizes` of the
    file the model was parsed from, when it has one entry per initializer of the main graph."""
    _inlined_size(model)
    tensors, sparse = all_tensors(model)
    main = len(model.graph.initializer)  # all_tensors lists them first, in order
    lengths = raw_sizes if raw_sizes is not None and len(raw_sizes) == main else ()
    for k, (where, t) in enumerate(tensors):
        problem = tensor_problem(t, lengths[k] if k < len(lengths) else None)
        if problem:
            raise ModelError(f"{where} {problem}")
    for where, s in sparse:
        dims = [int(d) for d in s.dims]
        count = 1
        for d in dims:
            count *= max(d, 0)
        if any(d < 0 for d in dims) or stored_bytes(s.values.data_type, count) > MAX_CONSTANT_BYTES:
            raise ModelError(f"{where} claims dense shape {dims}, negative or more than the limit of "
                             f"{MAX_CONSTANT_BYTES / 2**30:g} GiB")
    known: dict[str, TensorProto] = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                known[node.output[0]] = value
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape" or not node.input or node.input[0] not in known:
            continue
        shape_t = known[node.input[0]]
        if shape_t.data_location == TensorProto.EXTERNAL or len(shape_t.dims) != 1 or shape_t.dims[0] > 64:
            continue
        shape = [int(d) for d in numpy_helper.to_array(shape_t).reshape(-1)]
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        count = 1
        for d in shape:
            count *= max(d, 0)
        nbytes = stored_bytes(TensorProto.FLOAT if value is None else value.data_type, count)
        if nbytes > MAX_CONSTANT_BYTES:
            raise ModelError(f"node {node.name or '<unnamed>'!r} (ConstantOfShape) would allocate shape "
                             f"{shape}: {nbytes / 2**30:.1f} GiB, more than the limit of "
                             f"{MAX_CONSTANT_BYTES / 2**30:g} GiB")

