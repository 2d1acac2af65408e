"""Property/fuzz test of issue 11: mutated valid models through the real commands.

A seeded generator (reproducible: mutant ``i`` is drawn from ``random.Random(SEED + i)``)
mutates valid models -- the bundled samples and a few hand-built ones -- in the fields a hostile
file controls: tensor fields, external-data entries, names, attribute values, op types, opsets,
graph structure, input dims and the serialized bytes. Every mutant goes through ``inspect``,
``unwrap`` (with the matching input) and, for some, ``explain --no-png`` and ``audit``, run as a
user would, in a working directory holding a planted secret, with a second one in the parent of
the model's folder. For every run: the exit code is documented (1 only as a verdict of
``inspect``/``audit``), a failure is one ``onnx-pathwise: error:`` line, no traceback, no hang,
nothing outside the out folder created or changed, no secret's bytes in any output; where
``unwrap`` exits 0, W x + b equals onnxruntime's output on the mutant to round-off.

The bulk runs in-process (``typer.testing.CliRunner``, in a thread joined with a timeout); FIFO
and a sample of the rest run as ``python -m onnx_pathwise`` subprocesses with ``timeout=``.
Default budget: ``BUDGET`` in-process mutants and ``SUBPROCESS`` subprocess ones; more with
``ONNX_PATHWISE_FUZZ=2000`` (subprocess count: ``ONNX_PATHWISE_FUZZ_SUBPROCESS``). Run with
``-s`` to see the tally of outcomes.
"""

from __future__ import annotations

import collections
import copy
import os
import random
import stat
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnx_pathwise.cli import app

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples"
PREFIX = "onnx-pathwise: error: "
SEED = 11_000
BUDGET = int(os.environ.get("ONNX_PATHWISE_FUZZ", "100"))
SUBPROCESS = int(os.environ.get("ONNX_PATHWISE_FUZZ_SUBPROCESS", "6"))
IN_PROCESS_TIMEOUT = 60.0
SUBPROCESS_TIMEOUT = 120.0
VERDICT_COMMANDS = {"inspect", "audit"}
SECRET_CWD = b"SECRET-cwd-7f3a9c0e11d24b6a"
SECRET_PARENT = b"SECRET-parent-2b8e41d07c9f"
PEELED = {"Softmax", "LogSoftmax", "Sigmoid"}


# --------------------------------------------------------------------------- valid models


@dataclass
class Base:
    name: str
    model: onnx.ModelProto
    x: np.ndarray


def _tiny(name: str, nodes: list[onnx.NodeProto], inits: list[TensorProto], in_dims: list[Any],
          out_dims: list[Any], opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def bases() -> list[Base]:
    out = []
    for name, x in (("mlp", "mlp_inputs.npy"), ("cnn", "cnn_inputs.npy"), ("tiny_mlp", "tiny_mlp_inputs.npy")):
        out.append(Base(name, onnx.load(SAMPLES / f"{name}.onnx"), np.load(SAMPLES / x)[:2]))
    g = np.random.default_rng(0)
    init = numpy_helper.from_array
    residual = _tiny("residual", [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], transB=1),
        helper.make_node("Add", ["h2", "x"], ["s"]),
        helper.make_node("Relu", ["s"], ["r2"]),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], transB=1),
    ], [init(_f32(g, 4, 4), "w1"), init(_f32(g, 4), "b1"), init(_f32(g, 4, 4), "w2"), init(_f32(g, 4), "b2"),
        init(_f32(g, 3, 4), "w3"), init(_f32(g, 3), "b3")], ["N", 4], ["N", 3])
    out.append(Base("residual", residual, _f32(g, 2, 4)))
    # an If over constants: which weight the network uses is chosen by a constant condition
    then_g = helper.make_graph([helper.make_node("Identity", ["wt"], ["ht"])], "then", [],
                               [helper.make_tensor_value_info("ht", TensorProto.FLOAT, [3, 5])],
                               [init(_f32(g, 3, 5), "wt")])
    else_g = helper.make_graph([helper.make_node("Identity", ["we"], ["he"])], "else", [],
                               [helper.make_tensor_value_info("he", TensorProto.FLOAT, [3, 5])],
                               [init(_f32(g, 3, 5), "we")])
    if_model = _tiny("if_const", [
        helper.make_node("Constant", [], ["cond"], value=init(np.array(True), "c")),
        helper.make_node("If", ["cond"], ["wif"], then_branch=then_g, else_branch=else_g),
        helper.make_node("MatMul", ["x", "wif"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w", "b"], ["y"], transB=1),
    ], [init(_f32(g, 2, 5), "w"), init(_f32(g, 2), "b")], ["N", 3], ["N", 2])
    out.append(Base("if_const", if_model, _f32(g, 2, 3)))
    fixed = _tiny("fixed_batch2", [
        helper.make_node("MatMul", ["x", "w1"], ["m"]),
        helper.make_node("Add", ["m", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ], [init(_f32(g, 3, 6), "w1"), init(_f32(g, 6), "b1"), init(_f32(g, 6, 2), "w2")], [2, 3], [2, 2])
    out.append(Base("fixed_batch2", fixed, _f32(g, 2, 3)))
    # "external": the residual model with its weights in weights.bin beside it (see Mutant.files)
    out.append(Base("external", copy.deepcopy(residual), out[3].x))
    return out


# --------------------------------------------------------------------------- mutants


@dataclass
class Mutant:
    index: int
    base: Base
    family: str
    desc: str
    model: onnx.ModelProto
    files: dict[str, bytes] = field(default_factory=dict)  # beside the model
    fifos: list[str] = field(default_factory=list)  # FIFOs beside the model
    edit_bytes: Callable[[bytes], bytes] | None = None

    def label(self) -> str:
        return f"mutant {self.index} (base {self.base.name}, {self.family}: {self.desc})"


def all_tensors(m: onnx.ModelProto) -> list[TensorProto]:
    """Initializers and tensor attributes, in the graph and in subgraphs."""
    out: list[TensorProto] = []

    def walk(g: onnx.GraphProto) -> None:
        out.extend(g.initializer)
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    out.append(a.t)
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(m.graph)
    return out


def all_nodes(m: onnx.ModelProto) -> list[onnx.NodeProto]:
    out: list[onnx.NodeProto] = []

    def walk(g: onnx.GraphProto) -> None:
        for n in g.node:
            out.append(n)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(m.graph)
    return out


def externalize(m: onnx.ModelProto, location: str = "weights.bin") -> bytes:
    """Move every graph initializer to ``location`` beside the model; returns the file's bytes."""
    blob = bytearray()
    for t in m.graph.initializer:
        data = numpy_helper.to_array(t).tobytes()
        name, dims, dtype = t.name, list(t.dims), t.data_type
        t.Clear()
        t.name, t.data_type = name, dtype
        t.dims.extend(dims)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(len(blob))), ("length", str(len(data)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        blob += data
    return bytes(blob)


def _to_raw(t: TensorProto) -> None:
    if t.data_location == TensorProto.EXTERNAL or t.raw_data:
        return
    try:
        arr = numpy_helper.to_array(t)
    except Exception:
        return
    new = numpy_helper.from_array(arr, t.name)
    t.CopyFrom(new)


def mut_tensor(m: onnx.ModelProto, r: random.Random, mu: Mutant) -> str:
    tensors = [t for t in all_tensors(m) if t.data_location != TensorProto.EXTERNAL] or all_tensors(m)
    t = r.choice(tensors)
    kind = r.choice(["dtype", "dims", "raw", "swap", "nonfinite", "nonfinite", "twice"])
    if kind == "dtype":
        v = r.choice([0, 999, -1, TensorProto.INT64, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BOOL,
                      TensorProto.STRING, TensorProto.INT8, TensorProto.BFLOAT16, TensorProto.COMPLEX64])
        t.data_type = v
        return f"{t.name}.data_type={v}"
    if kind == "dims":
        dims = list(t.dims)
        op = r.choice(["set", "append", "drop", "clear"])
        v = r.choice([-1, -7, 0, 2**31, 2**31 - 1, 2**40, 2**62, 3, (dims[0] + 1) if dims else 2])
        if op == "set" and dims:
            dims[r.randrange(len(dims))] = v
        elif op == "append":
            dims.insert(r.randrange(len(dims) + 1), v)
        elif op == "drop" and dims:
            dims.pop(r.randrange(len(dims)))
        else:
            dims = []
        del t.dims[:]
        t.dims.extend(dims)
        return f"{t.name}.dims={dims}"
    _to_raw(t)
    if kind == "raw":
        raw = t.raw_data
        how = r.choice(["truncate", "extend", "empty", "odd"])
        if how == "truncate":
            t.raw_data = raw[: r.randrange(len(raw) + 1)] if raw else b""
        elif how == "extend":
            t.raw_data = raw + bytes(r.randrange(1, 64))
        elif how == "empty":
            t.raw_data = b""
        else:
            t.raw_data = raw + b"\x01"
        return f"{t.name}.raw_data {how}"
    if kind == "swap":
        if not t.raw_data:
            return "no raw_data"
        arr = np.frombuffer(t.raw_data, dtype=np.uint8).copy()
        t.raw_data = b""
        target = r.choice(["float_data", "int64_data", "int32_data", "double_data", "uint64_data", "string_data"])
        if target == "string_data":
            t.string_data.append(bytes(arr[:16]))
        elif target in ("float_data", "double_data"):
            getattr(t, target).extend(float(v) for v in arr[: max(1, len(arr) // 4)])
        else:
            getattr(t, target).extend(int(v) for v in arr[: max(1, len(arr) // 4)])
        return f"{t.name}: values moved to {target}"
    if kind == "twice":
        if t.raw_data and t.data_type == TensorProto.FLOAT:
            t.float_data.extend(np.frombuffer(t.raw_data, np.float32).tolist())
        return f"{t.name}: stored twice"
    # nonfinite
    if t.data_type not in (TensorProto.FLOAT, TensorProto.DOUBLE) or not t.raw_data:
        return "not float"
    dtype = np.float32 if t.data_type == TensorProto.FLOAT else np.float64
    arr = np.frombuffer(t.raw_data, dtype).copy()
    v = r.choice([np.nan, np.inf, -np.inf, 1e38, -3.4e38])
    arr[r.randrange(arr.size)] = v
    t.raw_data = arr.tobytes()
    return f"{t.name}: a value set to {v}"


def mut_external(m: onnx.ModelProto, r: random.Random, mu: Mutant) -> str:
    """Weights in weights.bin beside the model, then one entry made hostile."""
    blob = externalize(m)
    mu.files["weights.bin"] = blob
    t = r.choice(list(m.graph.initializer))
    entries = {e.key: e for e in t.external_data}
    kind = r.choice(["location", "location", "location", "offset", "length", "checksum", "keys", "fifo", "none"])
    if kind == "none":
        return "valid external data"
    if kind == "fifo":
        mu.fifos.append("pipe.bin")
        entries["location"].value = "pipe.bin"
        return f"{t.name} location=FIFO"
    if kind == "location":
        v = r.choice(["../secret_parent.txt", "@PARENT@/secret_parent.txt", "secret_parent.txt", "secret_cwd.txt",
                      "../../cwd/secret_cwd.txt", "./weights.bin", "sub/../weights.bin", "weights.bin\\",
                      "..\\secret_parent.txt", "", "/dev/zero", "/proc/self/environ", "weights.bin\x00x",
                      "link.bin", "hard.bin", "dir"])
        if v == "link.bin":
            mu.files["@symlink@link.bin"] = b"../secret_parent.txt"
        if v == "hard.bin":
            mu.files["@hardlink@hard.bin"] = b"weights.bin"
        if v == "dir":
            mu.files["@dir@dir"] = b""
        entries["location"].value = v
        return f"{t.name} location={v!r}"
    if kind in ("offset", "length"):
        v = r.choice(["-1", "abc", "99999999999", "1e3", " 0", "0x10", "+4", str(len(blob)), str(len(blob) + 4),
                      "18446744073709551616", "", "4", "٣"])
        if kind in entries:
            entries[kind].value = v
        else:
            e = t.external_data.add()
            e.key, e.value = kind, v
        return f"{t.name} {kind}={v!r}"
    if kind == "checksum":
        v = r.choice(["zz", "0" * 40, "A" * 40, "", "0" * 41])
        e = t.external_data.add()
        e.key, e.value = "checksum", v
        return f"{t.name} checksum={v!r}"
    how = r.choice(["dup location", "unknown key", "no location", "basepath"])
    if how == "dup location":
        e = t.external_data.add()
        e.key, e.value = "location", "../secret_parent.txt"
    elif how == "unknown key":
        e = t.external_data.add()
        e.key, e.value = "basepath", "/"
    elif how == "no location":
        keep = [(e.key, e.value) for e in t.external_data if e.key != "location"]
        del t.external_data[:]
        for k, v in keep:
            e = t.external_data.add()
            e.key, e.value = k, v
    else:
        t.data_location = TensorProto.DEFAULT
    return f"{t.name} external_data: {how}"


def _all_names(m: onnx.ModelProto) -> list[str]:
    names: set[str] = set()
    for n in all_nodes(m):
        names.update(v for v in (*n.input, *n.output) if v)
    return sorted(names)


def rename_everywhere(m: onnx.ModelProto, old: str, new: str) -> None:
    def walk(g: onnx.GraphProto) -> None:
        for n in g.node:
            for seq in (n.input, n.output):
                for i, v in enumerate(seq):
                    if v == old:
                        seq[i] = new
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
        for coll in (g.input, g.output, g.value_info, g.initializer):
            for v in coll:
                if v.name == old:
                    v.name = new

    walk(m.graph)


def mut_names(m: onnx.ModelProto, r: random.Random, mu: Mutant) -> str:
    name = r.choice(_all_names(m))
    kind = r.choice(["utf8", "utf8", "control", "long", "duplicate", "empty", "node name"])
    if kind == "utf8":
        marker = "Z" + "".join(r.choice("QXJK") for _ in range(11))
        bad = r.choice([b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7\xf6\xf5\xf4", b"\xc3\x28abcdefghij",
                        b"ab\xed\xa0\x80cdefghi"])[: len(marker)]
        where = r.choice(["tensor", "node", "doc", "domain", "producer"])
        if where == "tensor":
            rename_everywhere(m, name, marker)
        elif where == "node":
            r.choice(all_nodes(m)).name = marker
        elif where == "doc":
            m.graph.doc_string = marker
        elif where == "domain":
            m.domain = marker
        else:
            m.producer_name = marker
        enc = marker.encode()
        mu.edit_bytes = lambda data: data.replace(enc, bad)
        return f"invalid UTF-8 in {where} ({name!r})"
    if kind == "control":
        new = r.choice(["a\x1b[31mred", "line\nbreak", "nul\x00byte", "\r\x07bell", "\u202etxt.exe", "tab\tname"])
        rename_everywhere(m, name, new)
        return f"{name!r} renamed {new!r}"
    if kind == "long":
        new = "n" * r.choice([300, 5000])
        rename_everywhere(m, name, new)
        return f"{name!r} renamed to {len(new)} chars"
    if kind == "duplicate":
        other = r.choice(_all_names(m))
        nodes = [n for n in all_nodes(m) if name in n.output]
        if nodes:
            outs = nodes[0].output
            outs[list(outs).index(name)] = other
        return f"output {name!r} renamed to existing {other!r}"
    if kind == "empty":
        rename_everywhere(m, name, "")
        return f"{name!r} renamed ''"
    r.choice(all_nodes(m)).name = "\x1b]0;owned\x07"
    return "escape sequence in a node name"


ATTRS: dict[str, list[str]] = {
    "Conv": ["kernel_shape", "strides", "pads", "dilations", "group", "auto_pad"],
    "MaxPool": ["kernel_shape", "strides", "pads", "ceil_mode", "storage_order", "dilations", "auto_pad"],
    "Gemm": ["transA", "transB", "alpha", "beta"],
    "Flatten": ["axis"], "Softmax": ["axis"], "If": ["then_branch", "else_branch"], "Constant": ["value"],
}


def mut_attribute(m: onnx.ModelProto, r: random.Random, mu: Mutant) -> str:
    node = r.choice(all_nodes(m))
    names = ATTRS.get(node.op_type, []) + [a.name for a in node.attribute] + ["axis", "perm", "bogus"]
    name = r.choice(names)
    kind = r.choice(["remove", "value", "value", "type", "mismatch"])
    kept = [a for a in node.attribute if a.name != name]
    if kind == "remove":
        del node.attribute[:]
        node.attribute.extend(kept)
        return f"{node.op_type}.{name} removed"
    if kind == "value":
        v: Any = r.choice([0, -1, 99, -99, 2**31, 2**63 - 1, [0, 0], [-1, -1, -1, -1], [0], [2**31, 1],
                           [1, 2, 3, 4, 5, 6, 7, 8], [0, 1], [1, 0], [3, 3], float("nan"), float("inf"), -0.0,
                           "VALID", "SAME_UPPER", "NOTSET", "BOGUS", 5])
    else:
        v = r.choice([1.5, "x", b"\xff", [1.0, 2.0], ["a"], numpy_helper.from_array(np.zeros(2, np.float32))])
    attr = helper.make_attribute(name, v)
    if kind == "mismatch":
        attr.type = r.choice([onnx.AttributeProto.INT, onnx.AttributeProto.INTS, onnx.AttributeProto.GRAPH,
                              onnx.AttributeProto.FLOAT, onnx.AttributeProto.UNDEFINED])
    del node.attribute[:]
    node.attribute.extend([*kept, attr])
    return f"{node.op_type}.{name}={v!r} ({kind})"


def mut_op(m: onnx.ModelProto, r: random.Random, mu: Mutant) -> str:
    node = r.choice(all_nodes(m))
    if r.random() < 0.3:
        node.domain = r.choice(["com.evil", "ai.onnx.ml", "com.microsoft", "ai.onnx", "\x1b[2J"])
        return f"{node.op_type} domain={node.domain!r}"
    new = r.choice(["Tanh", "Sigmoid", "Softmax", "Exp", "Abs", "LeakyRelu", "Gelu", "NoSuchOp", "Identity", "Relu",
                    "Neg", "Sin", "Max", "Mul", "Loop", "Gemm", "Conv", "", "relu"])
    old, node.op_type = node.op_type, new
    return f"{old} -> {new!r}"


def mut_opset(m: onnx.ModelProto, r: random.Random, mu: Mutant) -> str:
    kind = r.choice(["version", "version", "drop", "dup", "unknown domain", "ir"])
    default = [o for o in m.opset_import if o.domain in ("", "ai.onnx")]
    if kind == "version" and default:
        v = r.choice([0, 1, 6, 7, 11, 99, -1, 2**40])
        default[0].version = v
        return f"opset {v}"
    if kind == "drop":
        keep = [o for o in m.opset_import if o.domain not in ("", "ai.onnx")]
        del m.opset_import[:]
        m.opset_import.extend(keep)
        return "no default domain"
    if kind == "dup":
        m.opset_import.append(helper.make_opsetid("", r.choice([1, 13, 17])))
        return "default domain imported twice"
    if kind == "ir":
        m.ir_version = r.choice([0, 1, 3, 99, -1])
        return f"ir_version {m.ir_version}"
    m.opset_import.append(helper.make_opsetid(r.choice(["com.evil", "ai.onnx.ml"]), r.choice([0, 1, 99])))
    return "extra domain"


def mut_graph(m: onnx.ModelProto, r: random.Random, mu: Mutant) -> str:
    g = m.graph
    kind = r.choice(["dangling", "cycle", "no outputs", "int output", "reverse", "drop node", "dup node",
                     "extra output", "extra input", "output is input", "init shadows input"])
    if kind == "dangling":
        n = r.choice([n for n in g.node if n.input] or list(g.node))
        if n.input:
            n.input[r.randrange(len(n.input))] = "nowhere"
    elif kind == "cycle":
        first = next(n for n in g.node if n.input)
        first.input[0] = g.node[-1].output[0]
    elif kind == "no outputs":
        del g.output[:]
    elif kind == "int output":
        g.output[0].type.tensor_type.elem_type = r.choice([TensorProto.INT64, TensorProto.BOOL, 0])
    elif kind == "reverse":
        nodes = list(g.node)[::-1]
        del g.node[:]
        g.node.extend(nodes)
    elif kind == "drop node":
        del g.node[r.randrange(len(g.node))]
    elif kind == "dup node":
        g.node.append(copy.deepcopy(r.choice(list(g.node))))
    elif kind == "extra output":
        name = r.choice(_all_names(m))
        g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    elif kind == "extra input":
        g.input.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["N", 3]))
    elif kind == "output is input":
        g.output.append(helper.make_tensor_value_info(g.input[0].name, TensorProto.FLOAT, None))
    else:
        arr = np.zeros([d.dim_value or 1 for d in g.input[0].type.tensor_type.shape.dim], np.float32)
        g.initializer.append(numpy_helper.from_array(arr, g.input[0].name))
    return kind


def mut_input_dims(m: onnx.ModelProto, r: random.Random, mu: Mutant) -> str:
    t = m.graph.input[0].type.tensor_type
    dims = t.shape.dim
    kind = r.choice(["value", "value", "symbolic", "drop", "add", "no shape", "dtype"])
    if kind == "value" and dims:
        i = r.randrange(len(dims))
        dims[i].dim_value = r.choice([0, -1, -5, 2**31, 2**40, 1, 7])
        return f"input dim {i} = {dims[i].dim_value}"
    if kind == "symbolic" and len(dims) > 1:
        i = r.randrange(1, len(dims))
        dims[i].dim_param = r.choice(["K", "N", "", "\x1b[31m"])
        return f"input dim {i} symbolic {dims[i].dim_param!r}"
    if kind == "drop" and dims:
        del dims[r.randrange(len(dims))]
        return "input dim dropped"
    if kind == "add":
        dims.add().dim_value = r.choice([1, 3])
        return "input dim added"
    if kind == "no shape":
        t.ClearField("shape")
        return "input shape cleared"
    t.elem_type = r.choice([0, TensorProto.INT64, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.STRING, 99])
    return f"input elem_type {t.elem_type}"


def mut_bytes(m: onnx.ModelProto, r: random.Random, mu: Mutant) -> str:
    kind = r.choice(["flip", "flip", "truncate", "insert", "zero"])
    k = r.choice([1, 1, 2, 5, 20])
    seed = r.randrange(2**32)

    def edit(data: bytes) -> bytes:
        rr = random.Random(seed)
        b = bytearray(data)
        if kind == "flip":
            for _ in range(k):
                i = rr.randrange(len(b))
                b[i] ^= 1 << rr.randrange(8)
        elif kind == "truncate":
            del b[rr.randrange(len(b)):]
        elif kind == "insert":
            i = rr.randrange(len(b) + 1)
            b[i:i] = bytes(rr.randrange(256) for _ in range(k))
        else:
            i = rr.randrange(len(b))
            b[i:i + k] = bytes(len(b[i:i + k]))
        return bytes(b)

    mu.edit_bytes = edit
    return f"{kind} x{k} (seed {seed})"


FAMILIES: dict[str, Callable[[onnx.ModelProto, random.Random, Mutant], str]] = {
    "tensor": mut_tensor, "external": mut_external, "names": mut_names, "attribute": mut_attribute,
    "op": mut_op, "opset": mut_opset, "graph": mut_graph, "input dims": mut_input_dims, "bytes": mut_bytes,
}
BASES = bases()


def make_mutant(index: int, family: str | None = None) -> Mutant:
    r = random.Random(SEED + index)
    base = r.choice(BASES)
    family = family or r.choice(list(FAMILIES))
    if base.name == "external" and family != "external" and r.random() < 0.7:
        family = "external"
    model = copy.deepcopy(base.model)
    mu = Mutant(index, base, family, "", model)
    if base.name == "external" and family != "external":
        mu.files["weights.bin"] = externalize(model)
    mu.desc = FAMILIES[family](model, r, mu)
    return mu


# --------------------------------------------------------------------------- running


@dataclass
class Layout:
    root: Path
    cwd: Path
    folder: Path
    model: Path
    x: Path
    out: Path


def plant(mu: Mutant, root: Path) -> Layout:
    """root/cwd (secret, out folder), root/parent (secret)/model (model, input, extra files)."""
    cwd, parent = root / "cwd", root / "parent"
    folder = parent / "model"
    folder.mkdir(parents=True)
    cwd.mkdir()
    (cwd / "secret_cwd.txt").write_bytes(SECRET_CWD)
    (parent / "secret_parent.txt").write_bytes(SECRET_PARENT)
    model = copy.deepcopy(mu.model)
    for t in all_tensors(model):
        for e in t.external_data:
            e.value = e.value.replace("@PARENT@", str(parent))
    data = model.SerializeToString()
    if mu.edit_bytes is not None:
        data = mu.edit_bytes(data)
    (folder / "model.onnx").write_bytes(data)
    for name, content in mu.files.items():
        if name.startswith("@symlink@"):
            os.symlink(content.decode(), folder / name.removeprefix("@symlink@"))
        elif name.startswith("@hardlink@"):
            os.link(folder / content.decode(), folder / name.removeprefix("@hardlink@"))
        elif name.startswith("@dir@"):
            (folder / name.removeprefix("@dir@")).mkdir()
        else:
            (folder / name).write_bytes(content)
    for name in mu.fifos:
        os.mkfifo(folder / name)
    np.save(folder / "x.npy", mu.base.x)
    return Layout(root, cwd, folder, folder / "model.onnx", folder / "x.npy", cwd / "out")


def snapshot(folder: Path, skip: Path) -> dict[str, tuple[str, bytes | str | None, int, int]]:
    out: dict[str, tuple[str, bytes | str | None, int, int]] = {}
    for p in sorted(folder.rglob("*")):
        if p == skip or skip in p.parents:
            continue
        st = os.lstat(p)
        rel = p.relative_to(folder).as_posix()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(p), 0, st.st_mtime_ns)
        elif stat.S_ISREG(st.st_mode):
            out[rel] = ("file", p.read_bytes(), st.st_mode, st.st_mtime_ns)
        else:
            out[rel] = (stat.filemode(st.st_mode)[0], None, st.st_mode, 0 if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns)
    return out


def commands(mu: Mutant, lay: Layout, every: bool) -> list[list[str]]:
    m, x = str(lay.model), str(lay.x)
    cmds = [["inspect", m], ["unwrap", m, x, "--out", str(lay.out / "w.npz"), "--device", "cpu"]]
    if every or mu.index % 4 == 0:
        cmds.append(["explain", m, x, "--out", str(lay.out / "explain"), "--no-png", "--device", "cpu"])
    if every or mu.index % 4 == 2:
        cmds.append(["audit", m, "--inputs", x, "--device", "cpu", "--report", "json", "--out", str(lay.out / "audit.json")])
    return cmds


@dataclass
class Ran:
    code: int | None
    stdout: str
    stderr: str
    exception: BaseException | None = None


runner = CliRunner()


def run_in_process(args: list[str], cwd: Path) -> Ran:
    box: list[Any] = []

    def target() -> None:
        box.append(runner.invoke(app, args))

    old = os.getcwd()
    os.chdir(cwd)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # what a user's python shows
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            thread.join(IN_PROCESS_TIMEOUT)
    finally:
        os.chdir(old)
    shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning,
                                                               ImportWarning, ResourceWarning))]
    if thread.is_alive():
        return Ran(None, "", "", TimeoutError(f"no answer in {IN_PROCESS_TIMEOUT} s"))
    res = box[0]
    exc = res.exception if not isinstance(res.exception, SystemExit) else None
    # a warning python would print: one more stderr line in a real run
    stderr = res.stderr + "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in shown)
    return Ran(res.exit_code, res.stdout, stderr, exc)


def run_subprocess(args: list[str], cwd: Path) -> Ran:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run([sys.executable, "-m", "onnx_pathwise", *args], capture_output=True, text=True,
                              cwd=cwd, env=env, timeout=SUBPROCESS_TIMEOUT, errors="replace")
    except subprocess.TimeoutExpired:
        return Ran(None, "", "", TimeoutError(f"no answer in {SUBPROCESS_TIMEOUT} s"))
    return Ran(done.returncode, done.stdout, done.stderr)


def reference(model_path: Path, x: np.ndarray) -> np.ndarray | None:
    """onnxruntime's scores on the mutant (the logits under a final Softmax/LogSoftmax/Sigmoid),
    or None where onnxruntime cannot run the mutant as written (a legacy opset the tool upgrades)."""
    try:
        model = onnx.load(model_path)
        out = model.graph.output[0].name
        producer = {o: n for n in model.graph.node for o in n.output}.get(out)
        if producer is not None and producer.op_type in PEELED:
            out = producer.input[0]
            model.graph.output.append(onnx.ValueInfoProto(name=out))
        so = ort.SessionOptions()
        so.log_severity_level = 4
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        batch = x if len(x.shape) == len(sess.get_inputs()[0].shape) else x[None]
        return np.asarray(sess.run([out], {sess.get_inputs()[0].name: batch.astype(np.float32)})[0])
    except Exception:
        return None


def check_run(mu: Mutant, lay: Layout, args: list[str], ran: Ran, before: dict[str, Any],
              tally: collections.Counter[str]) -> list[str]:
    """Every property of one run; returns the violations (empty when clean)."""
    cmd = args[0]
    bad: list[str] = []
    if ran.exception is not None:
        bad.append(f"{cmd}: {ran.exception!r}")
        return bad
    allowed = {0, 1, 2, 3, 4, 5} if cmd in VERDICT_COMMANDS else {0, 2, 3, 4, 5}
    if ran.code not in allowed:
        bad.append(f"{cmd}: exit {ran.code}")
    lines = ran.stderr.splitlines()
    if "Warning: " in ran.stderr:
        bad.append(f"{cmd}: a warning on stderr: {ran.stderr[-600:]!r}")
    if "Traceback" in ran.stderr or "Traceback" in ran.stdout:
        bad.append(f"{cmd}: traceback")
    if ran.code != 0:
        if len(lines) > 1 or (lines and not lines[0].startswith(PREFIX)) or (ran.code != 1 and len(lines) != 1):
            bad.append(f"{cmd}: exit {ran.code} with stderr {ran.stderr[-600:]!r}")
    outputs = [ran.stdout.encode(errors="replace"), ran.stderr.encode(errors="replace")]
    if lay.out.exists():
        outputs += [p.read_bytes() for p in lay.out.rglob("*") if p.is_file() and not p.is_symlink()]
    for secret in (SECRET_CWD, SECRET_PARENT):
        if any(secret in o for o in outputs):
            bad.append(f"{cmd}: a secret's bytes in the output")
    if snapshot(lay.root, lay.out) != before:
        bad.append(f"{cmd}: a file outside the out folder created or changed")
    tally[f"{cmd} exit {ran.code}"] += 1
    if cmd == "unwrap" and ran.code == 0:
        with np.load(lay.out / "w.npz") as z:
            w, b, output, delta = z["weight"], z["bias"], z["output"], z["delta"]
        n, k = w.shape[:2]
        x = mu.base.x.astype(np.float64).reshape(n, -1)
        fx = np.einsum("nkd,nd->nk", w.astype(np.float64).reshape(n, k, -1), x) + b
        ref = reference(lay.model, mu.base.x)
        scale = 1.0 + float(np.max(np.abs(output))) if output.size else 1.0
        tol = 1e-4 * scale
        if not np.all(np.isfinite(fx)) or float(np.max(np.abs(fx - output), initial=0)) > tol:
            bad.append(f"unwrap: W x + b differs from its own output by {np.max(np.abs(fx - output))}")
        if float(np.max(delta, initial=0)) > tol:
            bad.append(f"unwrap: delta {np.max(delta)}")
        if ref is None:
            tally["unwrap exact (onnxruntime cannot run the mutant as written)"] += 1
        elif ref.reshape(fx.shape).shape != fx.shape or float(np.max(np.abs(ref.reshape(fx.shape) - fx))) > tol:
            bad.append(f"unwrap: exit 0 but W x + b differs from onnxruntime by "
                       f"{np.max(np.abs(ref.reshape(fx.shape) - fx))}")
        else:
            tally["unwrap exact (checked against onnxruntime)"] += 1
    return bad


def fuzz_one(mu: Mutant, root: Path, run: Callable[[list[str], Path], Ran], every: bool,
             tally: collections.Counter[str], only: list[str] | None = None) -> list[str]:
    lay = plant(mu, root)
    problems = []
    for args in commands(mu, lay, every):
        if only is not None and args[0] not in only:
            continue
        if lay.out.exists():
            for p in sorted(lay.out.rglob("*"), reverse=True):
                p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
        before = snapshot(lay.root, lay.out)
        ran = run(args, lay.cwd)
        problems += [f"{mu.label()}: {p}" for p in check_run(mu, lay, args, ran, before, tally)]
    return problems


def report(tally: collections.Counter[str], title: str) -> None:
    print(f"\n{title}")
    for key in sorted(tally):
        print(f"  {key}: {tally[key]}")


# --------------------------------------------------------------------------- tests


def test_every_base_model_is_valid_and_explained_exactly(tmp_path: Path) -> None:
    """The generator's starting points pass every command (else a mutant's refusal means nothing)."""
    tally: collections.Counter[str] = collections.Counter()
    for i, base in enumerate(BASES):
        mu = Mutant(-1 - i, base, "none", "unmutated", copy.deepcopy(base.model))
        if base.name == "external":
            mu.files["weights.bin"] = externalize(mu.model)
        assert fuzz_one(mu, tmp_path / base.name, run_in_process, True, tally) == []
    assert tally["unwrap exact (checked against onnxruntime)"] == len(BASES), tally
    # audit's randomisation check may fail on these tiny networks: a verdict, exit 1
    assert all(k.endswith("exit 0") or k == "audit exit 1" for k in tally if " exit " in k), tally


def test_mutants_in_process(tmp_path: Path) -> None:
    tally: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    families: collections.Counter[str] = collections.Counter()
    for i in range(BUDGET):
        mu = make_mutant(i)
        families[mu.family] += 1
        if mu.fifos:  # a FIFO would block this process: those run in test_mutants_as_subprocesses
            tally["skipped here: FIFO"] += 1
            continue
        problems += fuzz_one(mu, tmp_path / str(i), run_in_process, False, tally)
    report(tally + collections.Counter({f"family {k}": v for k, v in families.items()}),
           f"{BUDGET} mutants in-process")
    print("\n".join(problems))
    assert not problems, "\n".join(problems[:20])


def test_raw_data_lengths_from_the_bytes_match_the_parsed_mutants() -> None:
    """The loader reads the main graph's raw_data lengths from a file's bytes
    (``load.resources.raw_data_sizes``) instead of copying each weight out of the parsed
    message: on every mutant that protobuf parses, byte-level ones included, they are the
    message's, or the walk gives up (None) and the loader reads the message."""
    from onnx_pathwise.load.resources import raw_data_sizes

    checked = walked = 0
    for i in range(4 * BUDGET):
        mu = make_mutant(i)
        data = mu.model.SerializeToString()
        if mu.edit_bytes is not None:
            data = mu.edit_bytes(data)
        try:
            parsed = onnx.load_model_from_string(data)
        except Exception:
            continue
        checked += 1
        sizes = raw_data_sizes(data)
        if sizes is not None:
            walked += 1
            assert sizes == [len(t.raw_data) if t.HasField("raw_data") else None for t in parsed.graph.initializer], i
    assert walked > BUDGET, (checked, walked)


def test_mutants_as_subprocesses(tmp_path: Path) -> None:
    """FIFO cases first, then a sample of the rest; each runs one command in a real process."""
    tally: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    picked: list[Mutant] = []
    i = 0
    while len(picked) < max(2, SUBPROCESS // 4) and i < 5000:  # FIFO external-data locations
        mu = make_mutant(100_000 + i, "external")
        if mu.fifos:
            picked.append(mu)
        i += 1
    picked += [make_mutant(200_000 + j) for j in range(SUBPROCESS - len(picked))]
    names = ["inspect", "unwrap", "explain", "audit"]
    for j, mu in enumerate(picked):
        problems += fuzz_one(mu, tmp_path / str(j), run_subprocess, True, tally, only=[names[j % 4]])
    report(tally, f"{len(picked)} mutants as subprocesses")
    assert not problems, "\n".join(problems[:20])
