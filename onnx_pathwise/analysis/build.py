"""The analysis: a checked ModelProto (from :mod:`onnx_pathwise.load`) in, a
:class:`~onnx_pathwise.ir.ModelIR` out. Pure: it reads no file; the one probe run in onnxruntime
goes through the ``probe`` function it is given.

1. choose the data input and the explained output; peel terminal Softmax / LogSoftmax /
   Sigmoid and ``ai.onnx.ml`` post-processing so explanations target pre-activation scores
   (:mod:`.ports`).
2. classify every tensor as *constant*, *shape* (depends on the input only through
   ``Shape``/``Size``) or *data* (:mod:`.kinds`); the input→output cone is the data nodes
   between input and explained output. Every node of the cone is validated; all problems are
   reported at once, before any numerics (:mod:`.cone`).
3. one probe run in onnxruntime at batch 1 folds constant and shape subgraphs to values and
   records every data tensor's per-sample shape. A file that fixes the batch at B > 1 is run
   twice at B, with the rows moved by one place, to check that no tensor mixes samples
   (:mod:`.fixed_batch`). The declared input size and the sizes shape inference finds are
   checked first, and the constants the cone reads must be finite.
4. attributes get their schema defaults for the model's opset and canonical values from
   constant inputs (Pad-11 ``pads``, Squeeze-13 ``axes``, ...), so rules see one form
   (:mod:`.attributes`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelError, UnsupportedModelError
from ..io import MAX_INPUT_BYTES
from ..ir import ModelIR, Node
from ..limits import check_fits, format_bytes
from ..load import MAX_CONSTANT_BYTES, check_inferred_sizes, opset_version
from ..rules import RULES
from .attributes import attr_defaults, canonical_attrs, constant_node_value, decode_value, elem_type
from .cone import SUPPORTED_OPS, input_cone, validate_cone
from .fixed_batch import fixed_batch_problems, node_where, rows_mixed
from .kinds import CONST, DATA, SHAPE_KIND, duplicate_name, tensor_kinds
from .ports import ML_DOMAIN, data_input, explained_output, normaliser_problem


def analyse(
    model: onnx.ModelProto,
    label: str,
    input_name: str | None,
    output_name: str | None,
    probe: Any,
) -> ModelIR:
    """The model's IR: its explained input and output, the cone between them with canonical
    attributes and roles, the constants it reads and every data tensor's per-sample shape.
    ``label`` names the model in the IR's info; ``probe(model, outputs, feed, arrays)`` runs the model
    in onnxruntime (:func:`onnx_pathwise.runtime.probe`)."""
    graph = model.graph
    opset = opset_version(model)
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

    duplicate = duplicate_name(graph)
    if duplicate:
        raise ModelError(duplicate)

    # 1. the data input
    in_vi, in_shape, other_inputs = data_input(graph, inits, input_name)
    # a fixed leading dimension B (older PyTorch exports fix it at the tracing batch): inputs
    # run in groups of B, each row one sample, once step 5 has checked that no op mixes rows
    fixed_batch = max(in_shape[0], 0)
    batch_fixed = fixed_batch >= 1

    # 2. tensor kinds
    consts: dict[str, np.ndarray] = {}
    kind, nodes, producer = tensor_kinds(graph, in_vi.name, inits, other_inputs)

    # 3. the explained output, terminal ops peeled
    explained, source_output, peeled, heads = explained_output(graph, kind, producer, in_vi.name, output_name)

    # 4. the cone: data nodes that the explained output reads, back to the input
    cone_nodes, needed = input_cone(nodes, kind, explained, in_vi.name)

    # validation by op type, before any numerics
    validate_cone(model, cone_nodes, kind, other_inputs, opset)

    # 5. one probe run: constant and shape values, per-sample shapes
    const_needed = sorted(
        {i for n in cone_nodes for i in n.input if i and kind.get(i) in (CONST, SHAPE_KIND)}
    )
    for name in const_needed:
        if name in inits:
            consts[name] = numpy_helper.to_array(inits[name])
        elif name in producer and producer[name].op_type == "Constant":
            consts[name] = constant_node_value(producer[name])
    data_tensors = sorted(needed)
    to_fetch = [t for t in const_needed if t not in consts] + [
        t for t in data_tensors if t != in_vi.name
    ]
    to_fetch += [p.input[0] for p in heads if p.input[0] != in_vi.name]
    elem = elem_type(in_vi)
    np_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    feed_shape = tuple(1 if d < 0 else d for d in in_shape)
    _check_declared_input(in_vi.name, feed_shape, np_dtype)
    check_inferred_sizes(model)
    if fixed_batch > 1:
        # B distinct rows, and the same rows moved down by one with a fresh first row: the
        # numeric check below that no recorded tensor mixes rows compares the two runs
        check_fits(2 * int(np.prod(feed_shape, dtype=np.int64)) * np_dtype.itemsize,
                   f"the analysis run at the file's fixed batch of {fixed_batch}")
        rows = np.random.default_rng(0).normal(size=(fixed_batch + 1,) + feed_shape[1:]).astype(np_dtype)
        runs = probe(model, to_fetch, [{in_vi.name: rows[1:]}, {in_vi.name: rows[:-1]}], consts)
        values = runs[0]
    else:
        values = probe(model, to_fetch, {in_vi.name: np.zeros(feed_shape, np_dtype)}, consts)
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
            problems.append(f"{node_where(produced_by[t], opset)}: its output {t!r} has shape {arr.shape}: "
                            f"the batch axis (fixed at {fixed_batch} in the file) does not stay first")
            continue
        shapes[t] = tuple(int(d) for d in arr.shape[1:])
    for p in heads:
        head_shape = feed_shape if p.input[0] == in_vi.name else np.shape(values[p.input[0]])
        problem = normaliser_problem(p, opset, tuple(int(d) for d in head_shape))
        if problem:
            problems.append(f"{p.name or '<unnamed>'} ({p.op_type}, opset {opset}): {problem}")
    if fixed_batch > 1:
        problems = problems or fixed_batch_problems(cone_nodes, kind, consts, shapes, fixed_batch, opset)
        problems = problems or rows_mixed(cone_nodes, needed, runs, fixed_batch, opset)
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
        attrs = attr_defaults(node.op_type, "", opset)
        attrs.update({a.name: decode_value(helper.get_attribute_value(a)) for a in node.attribute})
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
