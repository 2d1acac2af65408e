"""Which input is explained and which output: the one float input (or ``--input-name``); the
one float output that depends on it (or ``--output``), with terminal Softmax / LogSoftmax /
Sigmoid and ``ai.onnx.ml`` post-processing peeled so that explanations target pre-activation
scores; peeled normalisers checked to be per-sample classifier heads."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ModelError
from ..rules import terminal_ops
from ..rules.attrs import FLOAT_TYPES
from .attributes import elem_type
from .kinds import DATA

TERMINAL_OPS = terminal_ops()
ML_DOMAIN = "ai.onnx.ml"


def data_input(
    graph: onnx.GraphProto, inits: Mapping[str, onnx.TensorProto], input_name: str | None
) -> tuple[onnx.ValueInfoProto, list[int], set[str]]:
    """The explained input, its shape (-1 for a symbolic batch dimension) and the names of the
    other graph inputs (not fed: whatever reads them is not explained)."""
    candidates = [vi for vi in graph.input if vi.name not in inits]
    if input_name is not None:
        chosen = [vi for vi in candidates if vi.name == input_name]
        if not chosen:
            raise ModelError(
                f"no graph input named {input_name!r}; inputs: {[vi.name for vi in candidates]}"
            )
        in_vi = chosen[0]
    else:
        floats = [vi for vi in candidates if elem_type(vi) in FLOAT_TYPES]
        if len(floats) != 1:
            names = [vi.name for vi in candidates]
            if not floats:
                raise ModelError(f"no float input to explain; inputs: {names}")
            raise ModelError(
                f"{len(floats)} float inputs {[vi.name for vi in floats]}: choose one with --input-name"
            )
        in_vi = floats[0]
    if elem_type(in_vi) not in FLOAT_TYPES:
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
    other_inputs = {vi.name for vi in candidates if vi.name != in_vi.name}
    return in_vi, in_shape, other_inputs


def explained_output(
    graph: onnx.GraphProto,
    kind: Mapping[str, int],
    producer: Mapping[str, onnx.NodeProto],
    input_name: str,
    output_name: str | None,
) -> tuple[str, str, list[str], list[onnx.NodeProto]]:
    """The explained tensor (below the peeled terminal ops), the graph output it was found from,
    the op types peeled and the peeled Softmax/LogSoftmax nodes (checked against the recorded
    shapes after the probe run, :func:`normaliser_problem`)."""
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
            sigmoid_output = _binary_probabilities(p, graph, kind, producer)
            if sigmoid_output is not None:  # skl2onnx: probabilities = Concat(1 − σ(z), σ(z))
                peeled.append("Concat(1 - p, p)")
                chain.append(p)
                t = sigmoid_output
                continue
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
            et = elem_type(o)
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
                raise ModelError(f"no float output depends on input {input_name!r}; outputs: {outs}")
            raise ModelError(
                f"{len(found)} float outputs {list(found.values())}: choose one with --output"
            )
        explained, source_output = next(iter(found.items()))
    if kind.get(explained) != DATA:
        raise ModelError(f"output {explained!r} does not depend on input {input_name!r}")
    # peeled normalisers, checked against the recorded shapes after the probe run
    heads = [p for p in chains[source_output]
             if p.op_type in ("Softmax", "LogSoftmax") and p.domain in ("", "ai.onnx")]
    return explained, source_output, peeled, heads


def _binary_probabilities(node: onnx.NodeProto, graph: onnx.GraphProto, kind: Mapping[str, int],
                          producer: Mapping[str, onnx.NodeProto]) -> str | None:
    """The σ(z) a binary classifier's head ``Concat([1 − σ(z), σ(z)], axis=1)`` is built from
    (scikit-learn's through skl2onnx), else None. Peeling it leaves one score, σ's input: the
    single-score rule of docs/design.md §4 then explains the two classes exactly."""
    if node.op_type != "Concat" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    axis = next((int(a.i) for a in node.attribute if a.name == "axis"), None)
    if axis not in (1, -1) or any(kind.get(i) != DATA for i in node.input):
        return None
    sub = producer.get(node.input[0])
    p = node.input[1]
    if sub is None or sub.op_type != "Sub" or len(sub.input) != 2 or sub.input[1] != p:
        return None
    if not _is_one(sub.input[0], graph, kind, producer):
        return None
    sig = producer.get(p)
    return p if sig is not None and sig.op_type == "Sigmoid" and sig.domain in ("", "ai.onnx") else None


def _is_one(name: str, graph: onnx.GraphProto, kind: Mapping[str, int], producer: Mapping[str, onnx.NodeProto]) -> bool:
    """Whether ``name`` is a stored constant whose every element is 1 (an initializer or a
    Constant node's ``value``)."""
    if kind.get(name) == DATA:
        return False
    tensor = next((t for t in graph.initializer if t.name == name), None)
    if tensor is None and name in producer and producer[name].op_type == "Constant":
        tensor = next((a.t for a in producer[name].attribute if a.name == "value"), None)
    if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return False
    try:
        value = numpy_helper.to_array(tensor)
    except Exception:  # a malformed tensor is reported by the resource checks, not here
        return False
    return value.size >= 1 and value.size <= 1 << 20 and bool(np.all(value == 1))


def normaliser_problem(node: onnx.NodeProto, opset: int, shape: tuple[int, ...]) -> str:
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
