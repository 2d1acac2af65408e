"""The only protobuf boundary: an ONNX file or ModelProto in, a :class:`~onnx_pathwise.ir.ModelIR` out.

Reading a model goes through these steps, each refusing with a :class:`ModelError`
that names the file and the cause:

1. :func:`read_model` — a regular file only; parse it; every name valid UTF-8
   (:func:`check_names`); every stored tensor, wherever it lives, of a known type with the data
   its type and dims say (:func:`check_resources`); external data checked everywhere and read
   by us from inside the model's folder only, so onnxruntime never resolves a path;
   :func:`upgrade_old_opset` — opsets older than onnxruntime runs (< 7) are upgraded.
2. choose the data input and the explained output; peel terminal Softmax / LogSoftmax /
   Sigmoid and ``ai.onnx.ml`` post-processing so explanations target pre-activation scores.
3. classify every tensor as *constant*, *shape* (depends on the input only through
   ``Shape``/``Size``) or *data*; the input→output cone is the data nodes between input and
   explained output. Every node of the cone is validated; all problems are reported at once,
   before any numerics.
4. one probe run in onnxruntime at batch 1 folds constant and shape subgraphs to values and
   records every data tensor's per-sample shape. A file that fixes the batch at B > 1 is run
   twice at B, with the rows moved by one place, to check that no tensor mixes samples. The
   declared input size and the sizes shape inference finds are checked first, and the
   constants the cone reads must be finite.
5. attributes get their schema defaults for the model's opset and canonical values from
   constant inputs (Pad-11 ``pads``, Squeeze-13 ``axes``, ...), so rules see one form.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import limits
from .errors import ModelError, UnsupportedModelError
from .io import MAX_INPUT_BYTES, file_kind, open_regular
from .ir import ModelIR, Node
from .limits import check_fits, format_bytes
from .rules import NOT_PIECEWISE_LINEAR, RULES, supported_ops, terminal_ops
from .rules.attrs import FLOAT_TYPES

#: op_type → role, for ops of the default domain that may sit on the input→output path
#: (derived from the rule registry, :data:`onnx_pathwise.rules.RULES`).
SUPPORTED_OPS: dict[str, str] = supported_ops()
TERMINAL_OPS = terminal_ops()
ML_DOMAIN = "ai.onnx.ml"
CONST, SHAPE_KIND, DATA = 0, 1, 2
MAX_CONSTANT_BYTES = 2**31
#: protobuf cannot parse a message of 2 GiB or more.
MAX_PROTOBUF_BYTES = 2**31


def read_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse an ONNX file and load its external data, refusing what a hostile file could do.

    The file must be a regular file (:func:`~onnx_pathwise.io.open_regular`: never a FIFO,
    device or anything under ``/proc``); every name must be valid UTF-8 (:func:`check_names`);
    sizes and stored data must agree (:func:`check_resources`); external data is checked
    everywhere it can live and read by us from inside the model's folder only
    (:func:`_load_external_data`), so the ModelProto returned holds no external reference.
    """
    path = Path(path)
    f, size = open_regular(path, ModelError, "an ONNX file")
    with f:
        if size >= MAX_PROTOBUF_BYTES:
            raise ModelError(f"{path}: {size} bytes, more than a protobuf file can hold "
                             "(2 GiB); large weights belong in external data")
        data = f.read(size)
    if not data:
        raise ModelError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(f"{path}: not a valid ONNX protobuf ({type(exc).__name__})") from None
    del data
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{path}: not an ONNX model (no graph)")
    try:
        check_names(model)
        check_resources(model)
        _load_external_data(model, path)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    return model


def check_names(model: onnx.ModelProto) -> None:
    """Refuse a model with a text field (a node, value, initializer, attribute or function
    name, a domain, a doc string, an external-data entry, ...) that is not valid UTF-8.

    protobuf parses such a field without complaint and hands it out as ``bytes`` instead of
    ``str``, which compares unequal to every name and breaks any code that formats it; the
    message names the field by its path in the model and shows the bytes escaped.
    """
    stack: list[tuple[Any, str]] = [(model, "model")]
    while stack:
        message, where = stack.pop()
        if isinstance(message, TensorProto):
            # only its text fields: listing all fields would copy raw_data, however large
            fields = [(message.DESCRIPTOR.fields_by_name[n], getattr(message, n)) for n in ("name", "doc_string")]
            fields += [(message.DESCRIPTOR.fields_by_name[n], getattr(message, n))
                       for n in ("external_data", "metadata_props") if n in message.DESCRIPTOR.fields_by_name]
        else:
            fields = message.ListFields()
        for field, value in fields:
            if field.type == field.TYPE_MESSAGE:
                if field.is_repeated:
                    stack += [(v, f"{where}.{field.name}[{i}]") for i, v in enumerate(value)]
                else:
                    stack.append((value, f"{where}.{field.name}"))
            elif field.type == field.TYPE_STRING:
                for i, text in enumerate(value if field.is_repeated else [value]):
                    if not isinstance(text, str):
                        index = f"[{i}]" if field.is_repeated else ""
                        raise ModelError(f"{where}.{field.name}{index} is not valid UTF-8 "
                                         f"({bytes(text)!r}); the file is corrupt")
            elif field.name in ("s", "strings") and isinstance(message, onnx.AttributeProto):
                # bytes in protobuf, "UTF-8 string" in onnx.proto: an attribute's string value
                for i, raw in enumerate(value if field.is_repeated else [value]):
                    try:
                        raw.decode()
                    except UnicodeDecodeError:
                        index = f"[{i}]" if field.is_repeated else ""
                        raise ModelError(f"{where}.{field.name}{index} is not valid UTF-8 "
                                         f"({bytes(raw)!r}); the file is corrupt") from None


# --------------------------------------------------------------------------- resource limits

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


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH] + [
        g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]


def _all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node: the graph's, its subgraphs' and the local functions' bodies."""
    out: list[onnx.NodeProto] = []
    stack = [list(model.graph.node)] + [list(f.node) for f in model.functions]
    while stack:
        for node in stack.pop():
            out.append(node)
            stack += [list(g.node) for g in _subgraphs(node)]
    return out


def _all_tensors(
    model: onnx.ModelProto,
) -> tuple[list[tuple[str, TensorProto]], list[tuple[str, onnx.SparseTensorProto]]]:
    """Every stored tensor of the model, with where it lives (for messages): initializers and
    sparse initializers (values and indices) of every graph, and tensor, tensors, sparse-tensor
    attributes of every node at any depth of If/Loop/Scan bodies, of local function bodies
    and of training graphs. Attribute fields are read whatever the attribute's declared type."""
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


_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
#: Tensor types with several values per stored byte (raw_data and int32_data are packed).
_PACKED_TYPES = {getattr(TensorProto, n): k for n, k in
                 (("UINT4", 2), ("INT4", 2), ("FLOAT4E2M1", 2), ("UINT2", 4), ("INT2", 4))
                 if hasattr(TensorProto, n)}
_COMPLEX_TYPES = frozenset({TensorProto.COMPLEX64, TensorProto.COMPLEX128})
_KNOWN_TYPES = frozenset(v for v in TensorProto.DataType.values() if v != TensorProto.UNDEFINED)


def _stored_bytes(data_type: int, count: int) -> int:
    """Bytes that ``count`` values of ``data_type`` take in ``raw_data`` (or external data)."""
    if data_type in _PACKED_TYPES:
        return -(-count // _PACKED_TYPES[data_type])
    try:
        return count * np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except Exception:
        return count * 4


def _tensor_problem(t: TensorProto) -> str:
    """Why a stored tensor cannot be taken as it is: an unknown data type, a claim beyond the
    limit, or data that does not match its type and dims (refused before numpy or onnxruntime
    tries to read or allocate it). External data is checked when it is loaded."""
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
    nbytes = _stored_bytes(t.data_type, count)
    if nbytes > MAX_CONSTANT_BYTES:
        return (f"claims shape {dims}: {nbytes / 2**30:.1f} GiB, more than the limit of "
                f"{MAX_CONSTANT_BYTES / 2**30:g} GiB")
    if t.data_location not in (TensorProto.DEFAULT, TensorProto.EXTERNAL):
        return f"has unknown data_location {t.data_location}"
    if t.data_location == TensorProto.EXTERNAL:
        return ""
    field = helper.tensor_dtype_to_field(t.data_type)
    wrong = [f for f in _TYPED_FIELDS if f != field and len(getattr(t, f))]
    if wrong:
        return f"is {type_name} but stores its values in {wrong[0]} (expected {field} or raw_data)"
    if t.HasField("raw_data"):
        if t.data_type == TensorProto.STRING:
            return "is STRING but stores raw_data (strings go in string_data)"
        if len(getattr(t, field)):
            return f"stores its values twice, in raw_data and in {field}"
        held = len(t.raw_data)  # a copy of the bytes: read once
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
                total += 1 + sum(graph_size(g.node, depth + 1) for g in _subgraphs(node))
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


def _check_inferred_sizes(model: onnx.ModelProto) -> None:
    """Refuse, before the probe run, a tensor that onnx's shape inference (with data propagation)
    finds over :data:`MAX_CONSTANT_BYTES`: Expand, Tile or ConstantOfShape of a computed shape
    would make onnxruntime allocate it. A symbolic dimension counts as 1 (the probe runs one
    sample). Models shape inference cannot handle are let through."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        shape = [int(d.dim_value) if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        count = 1
        for d in shape:
            count *= max(d, 0)
        nbytes = _stored_bytes(vi.type.tensor_type.elem_type, count)
        if nbytes > MAX_CONSTANT_BYTES:
            raise ModelError(f"tensor {vi.name!r} would have shape {shape}: {nbytes / 2**30:.1f} GiB, "
                             f"more than the limit of {MAX_CONSTANT_BYTES / 2**30:g} GiB")


def check_resources(model: onnx.ModelProto) -> None:
    """Refuse, before onnxruntime or numpy sees the model, what would hang or exhaust memory:
    local functions that inline to more than :data:`MAX_INLINED_NODES` nodes, nest deeper than
    :data:`MAX_NESTING` or call themselves; stored tensors anywhere in the model (see
    :func:`_all_tensors`) of an unknown type, whose dims claim more than
    :data:`MAX_CONSTANT_BYTES` or that store other data than their type and dims say; sparse
    tensors whose dense shape claims more; ConstantOfShape nodes with a constant shape that
    would fill more than :data:`MAX_CONSTANT_BYTES`."""
    _inlined_size(model)
    tensors, sparse = _all_tensors(model)
    for where, t in tensors:
        problem = _tensor_problem(t)
        if problem:
            raise ModelError(f"{where} {problem}")
    for where, s in sparse:
        dims = [int(d) for d in s.dims]
        count = 1
        for d in dims:
            count *= max(d, 0)
        if any(d < 0 for d in dims) or _stored_bytes(s.values.data_type, count) > MAX_CONSTANT_BYTES:
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
        nbytes = _stored_bytes(TensorProto.FLOAT if value is None else value.data_type, count)
        if nbytes > MAX_CONSTANT_BYTES:
            raise ModelError(f"node {node.name or '<unnamed>'!r} (ConstantOfShape) would allocate shape "
                             f"{shape}: {nbytes / 2**30:.1f} GiB, more than the limit of "
                             f"{MAX_CONSTANT_BYTES / 2**30:g} GiB")


def external_references(model: onnx.ModelProto) -> list[str]:
    """Where the model still refers to external data (one line each; empty when none)."""
    tensors, _ = _all_tensors(model)
    out = []
    for where, t in tensors:
        if t.data_location == TensorProto.EXTERNAL:
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            out.append(f"{where} stores its data in external file {location!r}")
    return out


#: The keys an external-data entry may have (ONNX spec, ``TensorProto.external_data``).
EXTERNAL_DATA_KEYS = ("location", "offset", "length", "checksum")


@dataclass(frozen=True)
class _ExternalPart:
    """One checked external-data reference: which tensor, which file (and its identity), where."""

    where: str
    tensor: TensorProto
    target: Path
    identity: tuple[int, int]
    offset: int
    length: int
    checksum: str | None


def _external_int(fields: Mapping[str, str], key: str, where: str) -> int | None:
    text = fields.get(key)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise ModelError(f"{where}: external-data {key} {text!r} is not a non-negative integer")
    return int(text)


def _check_external(t: TensorProto, where: str, base: Path) -> _ExternalPart:
    """Validate one external-data reference without reading anything: known keys, each once;
    a relative location inside ``base`` with no ``..``, no symbolic link on the way and a
    regular, singly-linked file at the end; offset and length integers inside the file and
    matching the tensor's type and dims; a checksum that looks like a SHA-1 digest."""
    fields: dict[str, str] = {}
    for entry in t.external_data:
        if entry.key not in EXTERNAL_DATA_KEYS:
            raise ModelError(f"{where}: unknown external-data key {entry.key!r} "
                             f"(allowed: {', '.join(EXTERNAL_DATA_KEYS)})")
        if entry.key in fields:
            raise ModelError(f"{where}: external-data key {entry.key!r} is given twice")
        fields[entry.key] = entry.value
    location = fields.get("location", "")
    if not location:
        raise ModelError(f"{where}: is marked as external data but names no location")
    where = f"{where} stores its data in {location!r}"
    parts = location.split("/")
    if (
        "\x00" in location or "\\" in location or os.path.isabs(location) or location.startswith("/")
        or ".." in parts or not parts[-1] or parts[-1] == "."
    ):
        raise ModelError(f"{where}: external data must be a relative path inside the model's folder "
                         "(no '..', no absolute path, '/' as separator)")
    offset = _external_int(fields, "offset", where) or 0
    length = _external_int(fields, "length", where)
    checksum = fields.get("checksum")
    if checksum is not None and not re.fullmatch(r"[0-9a-fA-F]{40}", checksum):
        raise ModelError(f"{where}: external-data checksum {checksum!r} is not a SHA-1 digest")
    if t.data_type == TensorProto.STRING:
        raise ModelError(f"{where}: STRING tensors cannot be stored as external data")
    names = [p for p in parts if p not in ("", ".")]
    target = base
    for i, part in enumerate(names):
        target = target / part
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            raise ModelError(f"{where}: no such file in the model's folder") from None
        except OSError as exc:
            raise ModelError(f"{where}: cannot be read ({exc.strerror or type(exc).__name__})") from None
        if stat.S_ISLNK(st.st_mode):
            raise ModelError(f"{where}: external data may not be a symbolic link or lie in a linked folder")
        if i < len(names) - 1 and not stat.S_ISDIR(st.st_mode):
            raise ModelError(f"{where}: {'/'.join(names[: i + 1])!r} is not a folder")
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(f"{where}: is {file_kind(st.st_mode)}, not a regular file")
    if st.st_nlink > 1:
        raise ModelError(f"{where}: external data may not be a hard link")
    size = st.st_size
    if offset > size or (length is not None and offset + length > size):
        raise ModelError(f"{where}: offset {offset} and length {length} lie outside the file ({size} bytes)")
    if length is None:
        length = size - offset
    count = 1
    for d in t.dims:
        count *= max(int(d), 0)
    expected = _stored_bytes(t.data_type, count)
    if length != expected:
        raise ModelError(f"{where}: {length} bytes, but shape {[int(d) for d in t.dims]} of "
                         f"{TensorProto.DataType.Name(t.data_type)} needs {expected}")
    return _ExternalPart(where, t, target, (st.st_dev, st.st_ino), offset, length, checksum)


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Check every external-data reference of the model (:func:`_check_external`), then read
    the bytes ourselves into the tensors, so the model holds no external reference when
    onnxruntime sees it and onnxruntime never resolves a path. Nothing is read before every
    reference has passed; the total must fit a protobuf and the memory budget."""
    base = Path(os.path.realpath(path)).parent
    tensors, _ = _all_tensors(model)
    parts: list[_ExternalPart] = []
    for where, t in tensors:
        if t.data_location == TensorProto.EXTERNAL:
            parts.append(_check_external(t, where, base))
        elif len(t.external_data):
            del t.external_data[:]  # inert without data_location EXTERNAL; dropped all the same
    if not parts:
        return
    total = sum(p.length for p in parts)
    if total + model.ByteSize() >= MAX_PROTOBUF_BYTES:
        raise ModelError(f"its external data totals {format_bytes(total)}; with the graph that is more "
                         "than one protobuf message can hold (2 GiB), which onnxruntime needs here")
    check_fits(total, f"loading the external data of {path} ({len(parts)} tensors)")
    opened: dict[Path, tuple[IO[bytes], int]] = {}
    try:
        for part in parts:
            if part.target not in opened:
                f, size = open_regular(part.target, ModelError, "external data", follow_symlinks=False)
                opened[part.target] = (f, size)
                st = os.fstat(f.fileno())
                if (st.st_dev, st.st_ino) != part.identity:
                    raise ModelError(f"{part.where}: the file changed while it was being checked")
            f, size = opened[part.target]
            if part.offset + part.length > size:
                raise ModelError(f"{part.where}: the file shrank while it was being read")
            chunks, got = [], 0
            while got < part.length:
                chunk = os.pread(f.fileno(), part.length - got, part.offset + got)
                if not chunk:
                    raise ModelError(f"{part.where}: the file shrank while it was being read")
                chunks.append(chunk)
                got += len(chunk)
            data = b"".join(chunks)
            if part.checksum is not None and not _checksum_matches(part, data, f):
                raise ModelError(f"{part.where}: SHA-1 checksum {part.checksum!r} matches neither "
                                 "the tensor's bytes nor the file")
            part.tensor.raw_data = data
            part.tensor.data_location = TensorProto.DEFAULT
            del part.tensor.external_data[:]
            problem = _tensor_problem(part.tensor)
            if problem:
                raise ModelError(f"{part.where}: the tensor {problem}")
    finally:
        for f, _ in opened.values():
            f.close()


#: Largest external-data file whose whole-file checksum is computed.
_MAX_HASHED_FILE = 8 * 2**30


def _checksum_matches(part: _ExternalPart, data: bytes, f: IO[bytes]) -> bool:
    """The spec leaves open whether ``checksum`` covers the tensor's bytes or the whole file:
    either is accepted."""
    want = part.checksum.lower() if part.checksum else ""
    if hashlib.sha1(data).hexdigest() == want:
        return True
    if os.fstat(f.fileno()).st_size > _MAX_HASHED_FILE:
        return False
    digest = hashlib.sha1()
    offset = 0
    while chunk := os.pread(f.fileno(), 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest() == want


# --------------------------------------------------------------------------- helpers


def _opset(model: onnx.ModelProto, domain: str = "") -> int:
    for imp in model.opset_import:
        if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(imp.version)
    return 0


def _attr_defaults(op_type: str, domain: str, opset: int) -> dict[str, Any]:
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except Exception:
        return {}
    out: dict[str, Any] = {}
    for name, attr in schema.attributes.items():
        default = attr.default_value
        if default is not None and default.type != onnx.AttributeProto.UNDEFINED:
            # decoded like node attributes: string defaults (auto_pad, mode) are bytes
            out[name] = _decode(helper.get_attribute_value(default))
    return out


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
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


def _elem_type(vi: onnx.ValueInfoProto) -> int:
    return vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else 0


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
        for g in _subgraphs(node):
            reads |= _outer_reads(g)
    reads.discard("")
    return reads - defined


def _node_reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads: its inputs, then the outer-scope names its subgraphs read."""
    subgraphs = _subgraphs(node)
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
    return any(_is_random(n) for g in _subgraphs(node) for n in g.node)


def _duplicate_name(graph: onnx.GraphProto) -> str:
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
    pending = [(n, _node_reads(n)) for n in nodes]
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
        for g in _subgraphs(node):
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
    opset = _opset(model)
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


# --------------------------------------------------------------------------- loading


def load(
    source: str | os.PathLike[str] | onnx.ModelProto,
    *,
    input_name: str | None = None,
    output_name: str | None = None,
    probe: Any = None,
) -> tuple[onnx.ModelProto, ModelIR]:
    """Read and analyse a model; return the (external-data-loaded) ModelProto and its IR.

    ``probe(model, outputs, feed)`` runs the model in onnxruntime and returns the named
    outputs; by default :func:`onnx_pathwise.runtime.probe`.
    """
    if isinstance(source, onnx.ModelProto):
        model, label = source, "model"
        try:
            check_names(model)
            check_resources(model)
            external = external_references(model)
            if external:
                raise ModelError(f"{external[0]}; a ModelProto in memory has no folder to resolve "
                                 "external data against: pass the model's file path instead, so "
                                 "that its external data is checked and loaded from its folder")
        except ModelError as exc:
            raise ModelError(f"{label}: {exc}") from None
    else:
        model, label = read_model(source), str(source)
    if probe is None:
        from .runtime import probe as probe_fn

        probe = probe_fn
    try:
        model = upgrade_old_opset(model)
        return model, _analyse(model, label, input_name, output_name, probe)
    except ModelError as exc:
        if str(exc).startswith(label):
            raise
        exc.args = (f"{label}: {exc.args[0]}",) + exc.args[1:]
        raise


def _analyse(
    model: onnx.ModelProto,
    label: str,
    input_name: str | None,
    output_name: str | None,
    probe: Any,
) -> ModelIR:
    graph = model.graph
    opset = _opset(model)
    if opset == 0:
        raise ModelError("model imports no default-domain opset")
    max_known = onnx.defs.onnx_opset_version()
    if opset > max_known:
        raise ModelError(f"opset {opset} is newer than this onnx package knows ({max_known})")
    if graph.sparse_initializer:
        raise ModelError("sparse initializers are not supported")
    if any(len(f.node) for f in model.functions) and any(
        n.domain not in ("", "ai.onnx", ML_DOMAIN) for n in graph.node
    ):
        raise ModelError("models with local functions are not supported")

    inits = {t.name: t for t in graph.initializer}
    for t in graph.initializer:
        n_bytes = int(np.prod(t.dims, dtype=np.float64)) * 4
        if n_bytes > MAX_CONSTANT_BYTES:
            raise ModelError(f"initializer {t.name!r} claims {n_bytes / 2**30:.1f} GiB")

    duplicate = _duplicate_name(graph)
    if duplicate:
        raise ModelError(duplicate)

    # 1. the data input
    candidates = [vi for vi in graph.input if vi.name not in inits]
    if input_name is not None:
        chosen = [vi for vi in candidates if vi.name == input_name]
        if not chosen:
            raise ModelError(
                f"no graph input named {input_name!r}; inputs: {[vi.name for vi in candidates]}"
            )
        in_vi = chosen[0]
    else:
        floats = [vi for vi in candidates if _elem_type(vi) in FLOAT_TYPES]
        if len(floats) != 1:
            names = [vi.name for vi in candidates]
            if not floats:
                raise ModelError(f"no float input to explain; inputs: {names}")
            raise ModelError(
                f"{len(floats)} float inputs {[vi.name for vi in floats]}: choose one with --input-name"
            )
        in_vi = floats[0]
    if _elem_type(in_vi) not in FLOAT_TYPES:
        raise ModelError(f"input {in_vi.name!r} is not a float tensor")
    dims = in_vi.type.tensor_type.shape.dim
    if not dims:
        raise ModelError(f"input {in_vi.name!r} has no static rank")
    in_shape: list[int] = []
    for i, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0:
            in_shape.append(int(d.dim_value))
        elif i == 0:
            in_shape.append(-1)
        else:
            raise ModelError(
                f"input {in_vi.name!r} dimension {i} is symbolic ({d.dim_param or '?'}); "
                "only the batch dimension may be"
            )
    # a fixed leading dimension B (older PyTorch exports fix it at the tracing batch): inputs
    # run in groups of B, each row one sample, once step 5 has checked that no op mixes rows
    fixed_batch = max(in_shape[0], 0)
    batch_fixed = fixed_batch >= 1
    other_inputs = {vi.name for vi in candidates if vi.name != in_vi.name}

    # 2. tensor kinds
    consts: dict[str, np.ndarray] = {}
    kind: dict[str, int] = {in_vi.name: DATA}
    for name in inits:
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
        ins = [kind[i] for i in _node_reads(node)]
        if node.op_type in ("Shape", "Size"):
            k = SHAPE_KIND if ins and ins[0] != CONST else CONST
        else:
            k = max(ins, default=CONST)
            if _is_random(node):
                k = DATA
        for o in node.output:
            if o:
                kind[o] = k

    # 3. the explained output, terminal ops peeled
    peeled: list[str] = []
    chains: dict[str, list[onnx.NodeProto]] = {}  # output name → the terminal nodes peeled below it

    def peel(t: str) -> str:
        chain = chains[t] = []
        while t in producer:
            # pass-throughs above a terminal op (skl2onnx: probabilities = Identity(Softmax))
            # are post-processing too; elsewhere they stay in the cone
            below = t
            while below in producer and producer[below].op_type in ("Identity", "Dropout") and (
                producer[below].input and kind.get(producer[below].input[0]) == DATA
            ):
                below = producer[below].input[0]
            p = producer.get(below)
            if p is None:
                break
            data_ins = [i for i in p.input if i and kind.get(i) == DATA]
            terminal = p.op_type in TERMINAL_OPS or p.domain == ML_DOMAIN
            if not terminal or len(data_ins) != 1:
                break
            peeled.append(p.op_type)
            chain.append(p)
            t = data_ins[0]
        return t

    if output_name is not None:
        if output_name not in kind:
            raise ModelError(
                f"no tensor named {output_name!r}; outputs: {[o.name for o in graph.output]}"
            )
        explained = peel(output_name)
        source_output = output_name
    else:
        found: dict[str, str] = {}
        for o in graph.output:
            if kind.get(o.name) != DATA:
                continue
            et = _elem_type(o)
            if et and et not in FLOAT_TYPES and not (o.name in producer and producer[o.name].domain == ML_DOMAIN):
                continue
            peeled_before = len(peeled)
            t = peel(o.name)
            if t == o.name and et == 0 and o.name in producer and producer[o.name].domain == ML_DOMAIN:
                del peeled[peeled_before:]
                continue
            if t in producer and producer[t].op_type in ("ArgMax", "ArgMin", "Cast") and et not in FLOAT_TYPES:
                del peeled[peeled_before:]
                continue
            found.setdefault(t, o.name)
        if len(found) != 1:
            outs = [o.name for o in graph.output]
            if not found:
                raise ModelError(f"no float output depends on input {in_vi.name!r}; outputs: {outs}")
            raise ModelError(
                f"{len(found)} float outputs {list(found.values())}: choose one with --output"
            )
        explained, source_output = next(iter(found.items()))
    if kind.get(explained) != DATA:
        raise ModelError(f"output {explained!r} does not depend on input {in_vi.name!r}")
    # peeled normalisers, checked against the recorded shapes after the probe run
    heads = [p for p in chains[source_output]
             if p.op_type in ("Softmax", "LogSoftmax") and p.domain in ("", "ai.onnx")]

    # 4. the cone: data nodes that the explained output reads, back to the input
    needed: set[str] = {explained}
    cone_nodes: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if not any(o in needed for o in node.output):
            continue
        cone_nodes.append(node)
        for read in _node_reads(node):
            if kind.get(read) == DATA:
                needed.add(read)
    cone_nodes.reverse()
    if in_vi.name not in needed and explained != in_vi.name:
        raise ModelError(f"output {explained!r} does not depend on input {in_vi.name!r}")

    # validation by op type, before any numerics
    problems: list[str] = []
    for node in cone_nodes:
        domain = node.domain or ""
        v = _opset(model, domain) if domain not in ("", "ai.onnx") else opset
        where = f"{node.name or '<unnamed>'} ({node.op_type}, {'opset ' if not domain or domain == 'ai.onnx' else domain + ' opset '}{v})"
        unfed = [i for i in _node_reads(node) if i in other_inputs]
        if unfed:
            problems.append(f"{where}: reads graph input(s) {unfed} that are not explained")
        if _subgraphs(node):
            computed = [i for i in _node_reads(node) if kind.get(i) == DATA]
            why = f"it reads {computed}" if computed else "a subgraph draws random numbers"
            problems.append(f"{where}: control flow whose result depends on the input is not supported "
                            f"({why}; only control flow on constants is folded)")
            continue
        if domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
            reason = "not piecewise linear" if node.op_type in NOT_PIECEWISE_LINEAR else "not supported"
            if node.op_type in TERMINAL_OPS:
                reason = "only allowed after the last layer"
            problems.append(f"{where}: {reason}")
            continue
        check = RULES[node.op_type].check
        msg = check(_checked_node(node, kind, opset)) if check else ""
        if msg:
            problems.append(f"{where}: {msg}")
    if problems:
        raise UnsupportedModelError(problems, list(SUPPORTED_OPS))

    # 5. one probe run: constant and shape values, per-sample shapes
    const_needed = sorted(
        {i for n in cone_nodes for i in n.input if i and kind.get(i) in (CONST, SHAPE_KIND)}
    )
    for name in const_needed:
        if name in inits:
            consts[name] = numpy_helper.to_array(inits[name])
        elif name in producer and producer[name].op_type == "Constant":
            consts[name] = _constant_node_value(producer[name])
    data_tensors = sorted(needed)
    to_fetch = [t for t in const_needed if t not in consts] + [
        t for t in data_tensors if t != in_vi.name
    ]
    to_fetch += [p.input[0] for p in heads if p.input[0] != in_vi.name]
    elem = _elem_type(in_vi)
    np_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    feed_shape = tuple(1 if d < 0 else d for d in in_shape)
    _check_declared_input(in_vi.name, feed_shape, np_dtype)
    _check_inferred_sizes(model)
    if fixed_batch > 1:
        # B distinct rows, and the same rows moved down by one with a fresh first row: the
        # numeric check below that no recorded tensor mixes rows compares the two runs
        limits.check_fits(2 * int(np.prod(feed_shape, dtype=np.int64)) * np_dtype.itemsize,
                          f"the analysis run at the file's fixed batch of {fixed_batch}")
        rows = np.random.default_rng(0).normal(size=(fixed_batch + 1,) + feed_shape[1:]).astype(np_dtype)
        runs = probe(model, to_fetch, [{in_vi.name: rows[1:]}, {in_vi.name: rows[:-1]}])
        values = runs[0]
    else:
        values = probe(model, to_fetch, {in_vi.name: np.zeros(feed_shape, np_dtype)})
    for t in const_needed:
        if t not in consts:
            consts[t] = np.asarray(values[t])
    _check_finite_constants(cone_nodes, consts)
    shapes: dict[str, tuple[int, ...]] = {in_vi.name: tuple(feed_shape[1:])}
    produced_by = {o: node for node in cone_nodes for o in node.output}
    problems = []
    for t in data_tensors:
        if t == in_vi.name:
            continue
        arr = np.asarray(values[t])
        if arr.ndim == 0 or arr.shape[0] != feed_shape[0]:
            if fixed_batch <= 1:
                raise ModelError(f"tensor {t!r} does not keep the batch axis first (shape {arr.shape})")
            problems.append(f"{_where(produced_by[t], opset)}: its output {t!r} has shape {arr.shape}: "
                            f"the batch axis (fixed at {fixed_batch} in the file) does not stay first")
            continue
        shapes[t] = tuple(int(d) for d in arr.shape[1:])
    for p in heads:
        head_shape = feed_shape if p.input[0] == in_vi.name else np.shape(values[p.input[0]])
        problem = _normaliser_problem(p, opset, tuple(int(d) for d in head_shape))
        if problem:
            problems.append(f"{p.name or '<unnamed>'} ({p.op_type}, opset {opset}): {problem}")
    if fixed_batch > 1:
        problems = problems or _fixed_batch_problems(cone_nodes, kind, consts, shapes, fixed_batch, opset)
        problems = problems or _rows_mixed(cone_nodes, needed, runs, fixed_batch, opset)
    if problems:
        raise UnsupportedModelError(problems, list(SUPPORTED_OPS))

    # 6. IR nodes with canonical attributes and roles
    ir_nodes: list[Node] = []
    used_names: set[str] = set()
    problems = []
    for idx, node in enumerate(cone_nodes):
        name = node.name or f"{node.op_type}_{idx}"
        while name in used_names:
            name = f"{name}_{idx}"
        used_names.add(name)
        attrs = _attr_defaults(node.op_type, "", opset)
        attrs.update({a.name: _decode(helper.get_attribute_value(a)) for a in node.attribute})
        data = tuple(bool(i) and kind.get(i) == DATA for i in node.input)
        outputs = tuple(node.output)
        proto_node = Node(name, node.op_type, "", opset, tuple(node.input), outputs, attrs, data)
        try:
            attrs = canonical_attrs(proto_node, consts, shapes)
        except ModelError as exc:
            problems.append(f"{name} ({node.op_type}, opset {opset}): {exc}")
            continue
        role = RULES[node.op_type].node_role(data)
        ir_nodes.append(
            Node(name, node.op_type, "", opset, tuple(node.input), outputs, attrs, data, role)
        )
    if problems:
        raise UnsupportedModelError(problems, list(SUPPORTED_OPS))

    return ModelIR(
        nodes=ir_nodes,
        input_name=in_vi.name,
        output_name=explained,
        input_shape=tuple(feed_shape[1:]),
        input_dtype=np_dtype,
        constants={k: consts[k] for k in const_needed},
        shapes=shapes,
        batch_fixed=batch_fixed,
        fixed_batch=fixed_batch,
        peeled=tuple(peeled),
        opset=opset,
        source_output=source_output,
        info={"label": label, "producer": model.producer_name, "ir_version": model.ir_version},
    )


# --------------------------------------------------------------------------- fixed batch B > 1


def _where(node: onnx.NodeProto, opset: int) -> str:
    return f"{node.name or '<unnamed>'} ({node.op_type}, opset {opset})"


#: Ops whose constant operands broadcast against the computed tensor, axes aligned from the
#: right: a constant of the output's full rank has an axis on the batch axis.
_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Sum", "Max", "PRelu", "Concat"})


def _fixed_batch_problems(
    nodes: Sequence[onnx.NodeProto],
    kind: Mapping[str, int],
    consts: dict[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    batch: int,
    opset: int,
) -> list[str]:
    """Graph checks for a file that fixes the batch at ``batch`` > 1, beyond those that
    refuse an op on axis 0 at any batch size (:func:`canonical_attrs`): a MatMul whose constant
    left operand contracts the batch axis, and constants that hold one value per batch row
    (a sample's result would depend on its place in the group). A constant whose rows are all
    equal is kept as one row, which broadcasts over any batch."""
    problems: list[str] = []
    per_row: dict[str, list[onnx.NodeProto]] = {}
    other_uses: set[str] = set()
    for node in nodes:
        op = node.op_type
        data = [t for t in node.input if t and kind.get(t) == DATA]
        if not data:
            continue
        rank = len(shapes[data[0]]) + 1
        out_rank = len(shapes[node.output[0]]) + 1 if node.output[0] in shapes else rank
        if op == "MatMul" and len(node.input) > 1 and kind.get(node.input[1]) == DATA and rank <= 2:
            problems.append(f"{_where(node, opset)}: MatMul(W, x) with a constant W on the left and x of "
                            f"rank 2 contracts the batch axis (fixed at {batch} in the file): it mixes samples")
        for i, t in enumerate(node.input):
            if not t or kind.get(t) == DATA or t not in consts:
                continue
            c = np.asarray(consts[t])
            if op in _BROADCASTING:
                aligned = c.ndim == out_rank
            elif op == "Gemm":
                aligned = i == 2 and c.ndim == 2
            elif op == "MatMul":
                aligned = c.ndim >= 3 and c.ndim == rank
            else:
                aligned = False
            if aligned and c.shape[0] == batch:
                per_row.setdefault(t, []).append(node)
            else:
                other_uses.add(t)
    for t, users in per_row.items():
        c = np.asarray(consts[t])
        if t not in other_uses and np.array_equal(c, np.broadcast_to(c[:1], c.shape), equal_nan=c.dtype.kind in "fc"):
            consts[t] = c[:1]
            continue
        problems.append(f"{_where(users[0], opset)}: constant {t!r} of shape {c.shape} holds one value per "
                        f"batch row (the batch is fixed at {batch} in the file): a sample's result would "
                        "depend on its place in the group")
    return problems


def _rows_mixed(
    nodes: Sequence[onnx.NodeProto], needed: set[str], runs: Sequence[Mapping[str, Any]], batch: int, opset: int
) -> list[str]:
    """The numeric check behind the graph checks for a fixed batch B > 1: the second run's
    input holds the first run's rows moved down by one and a fresh row 0, so where every row
    is computed on its own, row i+1 of every recorded tensor in the second run equals row i of
    the first (to the round-off of a kernel that sees the row at another place). The first
    tensor where it does not, in topological order, names the node that mixes samples."""
    first, second = runs
    for node in nodes:
        for t in node.output:
            if t not in needed or t not in first:
                continue
            a = np.asarray(first[t], np.float64)[:-1]
            b = np.asarray(second[t], np.float64)[1:]
            scale = max(float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)), 1e-30)
            tol = (1e-4 if np.asarray(first[t]).dtype.itemsize >= 4 else 2e-2) * scale
            diff = np.abs(a - b)
            if not np.all((diff <= tol) | (a == b) | (np.isnan(a) & np.isnan(b))):
                worst = float(np.nanmax(diff)) if np.any(np.isfinite(diff)) else float("nan")
                return [f"{_where(node, opset)}: its output {t!r} mixes the samples of a batch (fixed at "
                        f"{batch} in the file): moving the samples by one place changed their values by "
                        f"up to {worst:.3g}, not just their place"]
    return []
def _check_declared_input(name: str, shape: Sequence[int], dtype: np.dtype) -> None:
    """Refuse an input whose declared per-sample size could never be fed (more than an input
    file may hold, :data:`~onnx_pathwise.io.MAX_INPUT_BYTES`), then check the probe's feed
    against the memory budget, before anything is allocated."""
    count = 1
    for d in shape:
        count *= int(d)
    nbytes = count * dtype.itemsize
    if nbytes > MAX_INPUT_BYTES:
        raise ModelError(f"input {name!r} declares shape {list(shape)}: {format_bytes(nbytes)} per sample, "
                         f"more than the limit of {format_bytes(MAX_INPUT_BYTES)} for one input")
    check_fits(nbytes, f"the probe run's input {name!r} of shape {list(shape)}")


#: Elements checked at a time for NaN and infinities (bounds the temporary mask).
_FINITE_CHUNK = 1 << 22


def _check_finite_constants(cone_nodes: Sequence[onnx.NodeProto], consts: Mapping[str, np.ndarray]) -> None:
    """Refuse a constant read by the input→output cone (weights, biases, BatchNormalization
    statistics, folded values) that holds NaN or an infinity: every explanation would be NaN.
    Clip bounds may be ±inf (no bound)."""
    seen: set[tuple[str, bool]] = set()
    for node in cone_nodes:
        for i, name in enumerate(node.input):
            bound = node.op_type == "Clip" and i in (1, 2)
            if not name or name not in consts or (name, bound) in seen:
                continue
            seen.add((name, bound))
            flat = np.asarray(consts[name]).reshape(-1)
            if flat.dtype.kind in "biuOSU":
                continue
            nan = inf = 0
            for start in range(0, flat.size, _FINITE_CHUNK):
                chunk = flat[start:start + _FINITE_CHUNK]
                if chunk.dtype.kind not in "fc":  # bfloat16, float8: ml_dtypes
                    try:
                        chunk = chunk.astype(np.float32)
                    except (TypeError, ValueError):
                        break
                nan += int(np.count_nonzero(np.isnan(chunk)))
                inf += 0 if bound else int(np.count_nonzero(np.isinf(chunk)))
            if nan or inf:
                what = " and ".join(f"{n} {label}" for n, label in ((nan, "NaN"), (inf, "infinite")) if n)
                raise ModelError(f"constant {name!r} read by node {node.name or '<unnamed>'!r} ({node.op_type}) "
                                 f"holds {what} value(s) of {flat.size}; every explanation would be NaN")


def _normaliser_problem(node: onnx.NodeProto, opset: int, shape: tuple[int, ...]) -> str:
    """Why a terminal Softmax/LogSoftmax over a tensor of ``shape`` (batch axis first) is not a
    per-sample classifier head (empty when it is one): it must normalise over exactly the
    sample's scores — every non-batch axis longer than 1 — and never over the batch axis.
    Softmax-13 normalises over its one ``axis`` (default -1); older versions coerce the input to
    2-D at ``axis`` (default 1) and normalise over every axis from ``axis`` on."""
    rank = len(shape)
    axis = next((int(a.i) for a in node.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
    shown = "(" + ", ".join(["N", *map(str, shape[1:])]) + ")"
    if not -rank <= axis < rank:
        return f"axis {axis} is out of range for its input of shape {shown}"
    normalised = {axis % rank} if opset >= 13 else set(range(axis % rank, rank))
    if 0 in normalised:
        return (f"normalises over the batch axis (axis {axis} of its input, shape {shown}): not a "
                "per-sample classifier head")
    classes = {i for i in range(1, rank) if shape[i] != 1}
    if {i for i in normalised if shape[i] != 1} != classes:
        return (f"normalises over axis {axis} of its input (shape {shown}), not over all of a "
                "sample's scores: not a per-sample classifier head")
    return ""


_SIMPLE_ATTRIBUTES = frozenset({
    onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT, onnx.AttributeProto.STRING,
    onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS, onnx.AttributeProto.STRINGS,
})


def _checked_node(node: onnx.NodeProto, kind: Mapping[str, int], opset: int) -> Node:
    """What a registry entry's ``check`` sees, before any numerics: the inputs, which of them
    are computed, and the node's own int, float and string attributes (no schema defaults)."""
    attrs = {a.name: _decode(helper.get_attribute_value(a)) for a in node.attribute if a.type in _SIMPLE_ATTRIBUTES}
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


# --------------------------------------------------------------------------- edits for audits


def last_weight(ir: ModelIR, model: onnx.ModelProto) -> str | None:
    """The initializer holding the weights of the affine layer closest to the output."""
    inits = {t.name for t in model.graph.initializer}
    for node in reversed(ir.nodes):
        if node.op_type in ("Gemm", "MatMul", "Conv", "ConvTranspose"):
            for t, d in zip(node.inputs, node.data):
                if t and not d and t in inits and ir.constants[t].ndim >= 2:
                    return t
    return None


def randomize_initializer(model: onnx.ModelProto, name: str, seed: int = 0) -> onnx.ModelProto:
    """A copy of ``model`` whose initializer ``name`` is redrawn from a normal distribution with
    the same mean and standard deviation (the randomisation sanity check)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, t in enumerate(out.graph.initializer):
        if t.name == name:
            w = numpy_helper.to_array(t)
            rng = np.random.default_rng(seed)
            w64 = w.astype(np.float64)  # float32 statistics of a 1e38 weight overflow
            std = float(w64.std()) or 1.0
            new = rng.normal(float(w64.mean()), std, size=w.shape)
            if w.dtype.kind == "f":  # a draw beyond float32's range would cast to inf
                new = np.clip(new, np.finfo(w.dtype).min, np.finfo(w.dtype).max)
            new = new.astype(w.dtype)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(new, name))
            return out
    raise KeyError(name)
