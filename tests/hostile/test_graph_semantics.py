"""Graph semantics that must never give a wrong answer with exit 0.

- Constant means constant: a node is folded only if nothing it reads depends on the input,
  counting the outer-scope names its subgraphs (If/Loop/Scan bodies, nested) read. Control flow
  that depends on the input is refused by name (exit 4), never frozen at its probe value.
- Duplicate value names are refused by name (exit 3): onnxruntime resolves some of them
  differently from a first-wins reading (two initializers: the last wins; a Constant node over
  an initializer: the Constant wins) and refuses the rest. An initializer that is also a graph
  input is legal and not fed: onnxruntime and the analysis both use the initializer.
- A terminal Softmax/LogSoftmax is peeled only when it normalises over exactly one sample's
  scores; over the batch axis, or over part of the scores, it is refused by name (exit 4).

Where a model is accepted, W_x x + b_x equals onnxruntime's output to round-off.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_model, runner, write_model_files
from helpers import vi as _vi
from onnx import TensorProto, helper, numpy_helper

from onnx_pathwise import Explainer, runtime
from onnx_pathwise.cli import app
from onnx_pathwise.errors import ModelError, UnsupportedModelError

X = np.array([[1.0, -0.5], [0.3, 2.0], [-1.2, 0.7]], np.float32)
W = numpy_helper.from_array(np.array([[1.0, 2.0], [3.0, -1.0]], np.float32), "w")
TRUE = numpy_helper.from_array(np.array(True), "c")


def _model(nodes: list[onnx.NodeProto], inits: list[TensorProto], *, opset: int = 17,
           inputs: list[onnx.ValueInfoProto] | None = None, out: str = "y",
           in_shape: list[int | str] | None = None) -> onnx.ModelProto:
    return make_model(nodes, inits, name="g", inputs=inputs or [_vi("x", in_shape or ["N", 2])], outputs=[_vi(out)],
                      opset=opset, ir_version=8)


def _branch(name: str, nodes: list[onnx.NodeProto], out: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [_vi(out)])


def _net(side: onnx.NodeProto, *, extra: list[onnx.NodeProto] = (), inits: list[TensorProto] = ()) -> onnx.ModelProto:
    """x → MatMul(w) → Relu → r;  y = r + side  (``side`` writes tensor 'side')."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             side, *extra,
             helper.make_node("Add", ["r", "side"], ["y"], name="add")]
    return _model(nodes, [W, TRUE, *inits])


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    out = model.graph.output[0].name
    return np.asarray(runtime.probe(model, [out], {"x": x})[out], np.float64).reshape(len(x), -1)


def _assert_exact(model: onnx.ModelProto, x: np.ndarray = X) -> Explainer:
    """Accepted: W_x x + b_x equals onnxruntime's output (after any peeled head: its input)."""
    ex = Explainer(model, device="cpu")
    res = ex.unwrap(x)
    n, k = res.bias.shape
    affine = np.einsum("nki,ni->nk", res.weight.reshape(n, k, -1).astype(np.float64),
                       x.reshape(n, -1).astype(np.float64)) + res.bias
    scores = np.asarray(runtime.probe(model, [ex.ir.output_name], {"x": x})[ex.ir.output_name], np.float64)
    np.testing.assert_allclose(affine, scores.reshape(n, -1), rtol=1e-5, atol=1e-5)
    assert float(res.delta.max()) < 1e-5
    return ex


def _cli(model: onnx.ModelProto, tmp: Path) -> tuple[int, str]:
    path, inputs = write_model_files(tmp, model, X)
    result = runner.invoke(app, ["unwrap", str(path), str(inputs), "--out", str(tmp / "new" / "u.npz"),
                                 "--device", "cpu"])
    assert not (tmp / "new").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-pathwise: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return result.exit_code, lines[0]


# --------------------------------------------------------------------------- constant means constant


def if_reads_input() -> onnx.ModelProto:
    """The issue's case: an If whose branches read the model input x from the outer scope,
    added to the logits (frozen at its probe value, W_x missed a term)."""
    then = _branch("then", [helper.make_node("Identity", ["x"], ["t"])], "t")
    other = _branch("else", [helper.make_node("Neg", ["x"], ["e"])], "e")
    return _net(helper.make_node("If", ["c"], ["side"], then_branch=then, else_branch=other, name="side_if"))


def nested_if_reads_input() -> onnx.ModelProto:
    """x read two subgraphs deep: If → then → If → then reads x."""
    inner = helper.make_node("If", ["c"], ["t"], name="inner_if",
                             then_branch=_branch("in_then", [helper.make_node("Relu", ["x"], ["it"])], "it"),
                             else_branch=_branch("in_else", [helper.make_node("Neg", ["x"], ["ie"])], "ie"))
    then = _branch("then", [inner], "t")
    other = _branch("else", [helper.make_node("Identity", ["w"], ["e"])], "e")
    return _net(helper.make_node("If", ["c"], ["side"], then_branch=then, else_branch=other, name="outer_if"))


def if_returns_input() -> onnx.ModelProto:
    """A branch with no nodes whose output *is* the outer x."""
    then = helper.make_graph([], "then", [], [_vi("x")])
    other = _branch("else", [helper.make_node("Neg", ["x"], ["e"])], "e")
    return _net(helper.make_node("If", ["c"], ["side"], then_branch=then, else_branch=other, name="passthrough_if"))


def loop_reads_input() -> onnx.ModelProto:
    """A Loop of one iteration whose body adds the outer x to its carried value."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "x"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), _vi("v_in")],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _vi("v_out")])
    trips = numpy_helper.from_array(np.array(1, np.int64), "trips")
    zero = numpy_helper.from_array(np.zeros((1, 2), np.float32), "zero")
    return _net(helper.make_node("Loop", ["trips", "c", "zero"], ["side"], body=body, name="side_loop"),
                inits=[trips, zero])


def scan_reads_input() -> onnx.ModelProto:
    """A Scan over a constant sequence whose body adds the outer x to its state."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x"], ["s_out"]), helper.make_node("Identity", ["e_in"], ["e_out"])],
        "body", [_vi("s_in"), _vi("e_in")], [_vi("s_out"), _vi("e_out")])
    seq = numpy_helper.from_array(np.zeros((1, 2), np.float32), "seq")
    zero = numpy_helper.from_array(np.zeros((1, 2), np.float32), "zero")
    return _net(helper.make_node("Scan", ["zero", "seq"], ["side", "scanned"], body=body, num_scan_inputs=1,
                                 name="side_scan"), inits=[seq, zero])


def only_path_is_control_flow() -> onnx.ModelProto:
    """The input reaches the output *only* through an If's subgraph: the If must be in the cone."""
    then = _branch("then", [helper.make_node("Relu", ["x"], ["t"])], "t")
    other = _branch("else", [helper.make_node("Neg", ["x"], ["e"])], "e")
    return _model([helper.make_node("If", ["c"], ["h"], then_branch=then, else_branch=other, name="only_if"),
                   helper.make_node("MatMul", ["h", "w"], ["y"], name="fc")], [W, TRUE])


def if_draws_random() -> onnx.ModelProto:
    """Constant inputs, but a random op in a branch: not a constant either."""
    then = _branch("then", [helper.make_node("RandomNormal", [], ["t"], shape=[1, 2])], "t")
    other = _branch("else", [helper.make_node("Identity", ["bias"], ["e"])], "e")
    bias = numpy_helper.from_array(np.array([[0.5, -0.5]], np.float32), "bias")
    return _net(helper.make_node("If", ["c"], ["side"], then_branch=then, else_branch=other, name="random_if"),
                inits=[bias])


REFUSED_CONTROL_FLOW = {
    "if-reads-input": (if_reads_input, "side_if (If, opset 17)"),
    "nested-if-reads-input": (nested_if_reads_input, "outer_if (If, opset 17)"),
    "if-returns-input": (if_returns_input, "passthrough_if (If, opset 17)"),
    "loop-reads-input": (loop_reads_input, "side_loop (Loop, opset 17)"),
    "scan-reads-input": (scan_reads_input, "side_scan (Scan, opset 17)"),
    "only-path-is-control-flow": (only_path_is_control_flow, "only_if (If, opset 17)"),
    "if-draws-random": (if_draws_random, "random_if (If, opset 17)"),
}


@pytest.mark.parametrize("name", list(REFUSED_CONTROL_FLOW))
def test_control_flow_on_the_input_is_refused(name: str, tmp_path: Path) -> None:
    make, where = REFUSED_CONTROL_FLOW[name]
    model = make()
    with pytest.raises(UnsupportedModelError) as info:
        Explainer(model, device="cpu")
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(where), info.value.problems
    assert "control flow" in info.value.problems[0]
    code, line = _cli(model, tmp_path)
    assert code == UnsupportedModelError.exit_code and where in line


def test_the_if_of_the_issue_would_change_the_answer() -> None:
    """The refused If is not harmless: onnxruntime's output moves with x through it."""
    model = if_reads_input()
    a, b = _ort(model, X), _ort(model, 2 * X)
    relu = lambda v: np.maximum(v.astype(np.float64) @ numpy_helper.to_array(W), 0)  # noqa: E731
    np.testing.assert_allclose(a, relu(X) + X, rtol=1e-6)
    np.testing.assert_allclose(b, relu(2 * X) + 2 * X, rtol=1e-6)


def constant_if_reads_outer_constants() -> onnx.ModelProto:
    """An If on constants whose branches read an initializer and a node output from the outer
    scope, the latter defined *after* the If in the file (onnxruntime sorts by outer reads too)."""
    then = _branch("then", [helper.make_node("Add", ["bias", "late"], ["t"])], "t")
    other = _branch("else", [helper.make_node("Neg", ["bias"], ["e"])], "e")
    bias = numpy_helper.from_array(np.array([[0.5, -1.5]], np.float32), "bias")
    late = helper.make_node("Mul", ["bias", "bias"], ["late"], name="late")
    return _net(helper.make_node("If", ["c"], ["side"], then_branch=then, else_branch=other, name="const_if"),
                extra=[late], inits=[bias])


def constant_loop_in_if() -> onnx.ModelProto:
    """Control flow nested in control flow, reading only constants: folded."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "bias"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), _vi("v_in")],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _vi("v_out")])
    loop = helper.make_node("Loop", ["trips", "c", "zero"], ["t"], body=body)
    then = _branch("then", [loop], "t")
    other = _branch("else", [helper.make_node("Identity", ["bias"], ["e"])], "e")
    inits = [numpy_helper.from_array(np.array(3, np.int64), "trips"),
             numpy_helper.from_array(np.zeros((1, 2), np.float32), "zero"),
             numpy_helper.from_array(np.array([[0.25, -0.75]], np.float32), "bias")]
    return _net(helper.make_node("If", ["c"], ["side"], then_branch=then, else_branch=other, name="const_if"),
                inits=inits)


def local_name_shadows_input() -> onnx.ModelProto:
    """A branch initializer named like the outer x: the branch reads its own 'x' (onnxruntime
    resolves the innermost definition), so the If is constant."""
    shadow = numpy_helper.from_array(np.array([[2.0, 3.0]], np.float32), "x")
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [], [_vi("t")],
                             initializer=[shadow])
    other = _branch("else", [helper.make_node("Identity", ["w"], ["e"])], "e")
    return _net(helper.make_node("If", ["c"], ["side"], then_branch=then, else_branch=other, name="shadow_if"))


@pytest.mark.parametrize("make", [constant_if_reads_outer_constants, constant_loop_in_if, local_name_shadows_input])
def test_control_flow_on_constants_is_folded_exactly(make) -> None:  # type: ignore[no-untyped-def]
    ex = _assert_exact(make())
    assert [n.op_type for n in ex.ir.nodes] == ["MatMul", "Relu", "Add"]


# --------------------------------------------------------------------------- duplicate names


def two_initializers() -> onnx.ModelProto:
    w2 = numpy_helper.from_array(2 * numpy_helper.to_array(W), "w")
    return _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                   helper.make_node("Relu", ["h"], ["y"], name="relu")], [W, w2])


def two_node_outputs() -> onnx.ModelProto:
    return _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                   helper.make_node("Neg", ["x"], ["h"], name="neg"),
                   helper.make_node("Relu", ["h"], ["y"], name="relu")], [W])


def constant_shadows_initializer() -> onnx.ModelProto:
    bias = numpy_helper.from_array(np.array([10.0, 20.0], np.float32), "b")
    const = helper.make_node("Constant", [], ["b"], name="b_const",
                             value=numpy_helper.from_array(np.array([5.0, 5.0], np.float32)))
    return _model([const, helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                   helper.make_node("Relu", ["h"], ["r"], name="relu"),
                   helper.make_node("Add", ["r", "b"], ["y"], name="add")], [W, bias])


def node_output_shadows_input() -> onnx.ModelProto:
    return _model([helper.make_node("MatMul", ["x", "w"], ["x"], name="fc"),
                   helper.make_node("Relu", ["x"], ["y"], name="relu")], [W])


def input_listed_twice() -> onnx.ModelProto:
    return _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                   helper.make_node("Relu", ["h"], ["y"], name="relu")], [W],
                  inputs=[_vi("x", ["N", 2]), _vi("x", ["N", 2])])


DUPLICATES = {
    "two-initializers": (two_initializers, "two initializers are named 'w'"),
    "two-node-outputs": (two_node_outputs, "node 'neg' (Neg) writes 'h', a name already defined by node 'fc'"),
    "constant-shadows-initializer": (constant_shadows_initializer,
                                     "node 'b_const' (Constant) writes 'b', a name already defined by an initializer"),
    "node-output-shadows-input": (node_output_shadows_input,
                                  "node 'fc' (MatMul) writes 'x', a name already defined by a graph input"),
    "input-listed-twice": (input_listed_twice, "graph input 'x' is listed twice"),
}


@pytest.mark.parametrize("name", list(DUPLICATES))
def test_duplicate_names_are_refused(name: str, tmp_path: Path) -> None:
    make, fragment = DUPLICATES[name]
    model = make()
    with pytest.raises(ModelError, match=re.escape(fragment)) as info:
        Explainer(model, device="cpu")
    assert not isinstance(info.value, UnsupportedModelError)
    code, line = _cli(model, tmp_path)
    assert code == ModelError.exit_code and fragment in line


def test_initializer_that_is_also_an_input_is_its_default() -> None:
    """IR ≥ 4 overridable default: not fed, so onnxruntime uses the initializer; so do we."""
    bias = numpy_helper.from_array(np.array([10.0, -20.0], np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "b"], ["y"], name="add")]
    model = _model(nodes, [W, bias], inputs=[_vi("x", ["N", 2]), _vi("b", [2])])
    ex = _assert_exact(model)
    assert ex.input_name == "x"
    expected = np.maximum(X.astype(np.float64) @ numpy_helper.to_array(W), 0) + [10.0, -20.0]
    np.testing.assert_allclose(ex.unwrap(X).output, expected, rtol=1e-6)


# --------------------------------------------------------------------------- terminal normalisers


def _head(op: str, axis: int | None, opset: int, scores: tuple[int, ...] = (3,),
          in_shape: list[int | str] | None = None) -> onnx.ModelProto:
    """x (N, 2) → MatMul → Relu → Reshape to (N, *scores) → ``op`` named 'head'."""
    k = int(np.prod(scores))
    w = numpy_helper.from_array(np.arange(2 * k, dtype=np.float32).reshape(2, k) / 7 - 0.5, "w")
    shape = numpy_helper.from_array(np.array((-1, *scores), np.int64), "shape")
    kw = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Relu", ["h"], ["z"], name="relu"),
             helper.make_node("Reshape", ["z", "shape"], ["scores"], name="reshape"),
             helper.make_node(op, ["scores"], ["y"], name="head", **kw)]
    return _model(nodes, [w, shape], opset=opset, in_shape=in_shape)


ACCEPTED_HEADS = {
    "softmax13-axis1": ("Softmax", 1, 13, (3,)),
    "softmax13-axis-1": ("Softmax", -1, 13, (3,)),
    "softmax13-default": ("Softmax", None, 13, (3,)),
    "logsoftmax13-axis-1": ("LogSoftmax", -1, 13, (3,)),
    "softmax11-axis1": ("Softmax", 1, 11, (3,)),
    "softmax11-default": ("Softmax", None, 11, (3,)),
    "softmax11-axis1-coerced": ("Softmax", 1, 11, (2, 3)),
    "softmax13-unit-axis-before": ("Softmax", -1, 13, (1, 3)),
    "softmax11-unit-axis-after": ("Softmax", 1, 11, (3, 1)),
    "sigmoid": ("Sigmoid", None, 13, (3,)),
}


@pytest.mark.parametrize("name", list(ACCEPTED_HEADS))
def test_per_sample_heads_are_peeled(name: str) -> None:
    op, axis, opset, scores = ACCEPTED_HEADS[name]
    ex = _assert_exact(_head(op, axis, opset, scores))
    assert ex.ir.peeled == (op,) and ex.ir.output_name == "scores"


REFUSED_HEADS = {
    "softmax13-batch-axis": ("Softmax", 0, 13, (3,), None, "over the batch axis (axis 0"),
    "softmax13-batch-axis-negative": ("LogSoftmax", -2, 13, (3,), None, "over the batch axis (axis -2"),
    "softmax11-batch-axis": ("Softmax", 0, 11, (3,), None, "over the batch axis (axis 0"),
    "logsoftmax11-batch-axis": ("LogSoftmax", 0, 11, (3,), None, "over the batch axis (axis 0"),
    "softmax11-batch-axis-fixed-batch": ("Softmax", 0, 11, (3,), [1, 2], "over the batch axis (axis 0"),
    "softmax13-rows-only": ("Softmax", -1, 13, (2, 3), None, "over axis -1 of its input (shape (N, 2, 3))"),
    "softmax11-tail-only": ("Softmax", 2, 11, (2, 3), None, "over axis 2 of its input (shape (N, 2, 3))"),
    "softmax13-unit-axis": ("Softmax", 1, 13, (1, 3), None, "over axis 1 of its input (shape (N, 1, 3))"),
}


@pytest.mark.parametrize("name", list(REFUSED_HEADS))
def test_heads_that_are_not_per_sample_are_refused(name: str, tmp_path: Path) -> None:
    op, axis, opset, scores, in_shape, fragment = REFUSED_HEADS[name]
    model = _head(op, axis, opset, scores, in_shape)
    with pytest.raises(UnsupportedModelError) as info:
        Explainer(model, device="cpu")
    (problem,) = info.value.problems
    assert problem.startswith(f"head ({op}, opset {opset}): normalises ") and fragment in problem, problem
    assert "not a per-sample classifier head" in problem
    code, line = _cli(model, tmp_path)
    assert code == UnsupportedModelError.exit_code and "head (" in line and fragment in line
