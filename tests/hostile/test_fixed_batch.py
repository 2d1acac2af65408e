"""Models whose file fixes the batch dimension at B > 1 (older PyTorch exports fix it at the
tracing batch): inputs run in groups of B, each row one sample, and every result equals the
per-sample result; a model that moves or mixes the batch axis is refused, naming the node."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from helpers import export_torch
from onnx import TensorProto, helper, numpy_helper

from onnx_pathwise import Explainer, UnsupportedModelError, runtime
from onnx_pathwise.analysis import build
from onnx_pathwise.render import _describe_text, describe

torch = pytest.importorskip("torch")
nn = torch.nn

BATCHES = (1, 2, 8)
SHAPES = {"mlp": (2, 3), "cnn": (2, 8, 8)}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: Any) -> Any:
        y = x.view(x.size(0), -1)  # a traced Reshape that bakes in the batch size
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(y)))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.fc = nn.Conv2d(4, 4, 3), nn.Linear(16, 5)

    def forward(self, x: Any) -> Any:
        y = nn.functional.max_pool2d(torch.relu(self.bn(self.conv1(x))), 2)
        return self.fc(torch.flatten(torch.relu(self.conv2(y)), 1))


def _export(module: Any, shape: tuple[int, ...], batch: int, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_torch(module, (torch.randn(batch, *shape),), path, dynamic_axes=None, do_constant_folding=False)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    torch.manual_seed(0)
    cnn = CNN().eval()
    with torch.no_grad():
        cnn.bn.running_mean.copy_(0.3 * torch.randn(4))
        cnn.bn.running_var.copy_(0.5 + torch.rand(4))
    modules = {"mlp": MLP().eval(), "cnn": cnn}
    tmp = tmp_path_factory.mktemp("fixed_batch")
    return {(name, b): _export(m, SHAPES[name], b, tmp / f"{name}_{b}.onnx")
            for name, m in modules.items() for b in BATCHES}


def _x(name: str, n: int) -> np.ndarray:
    return np.random.default_rng(n).normal(size=(n,) + SHAPES[name]).astype(np.float32)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_the_exports_fix_the_batch(exported: dict[tuple[str, int], Path], name: str) -> None:
    ops = {n.op_type for n in onnx.load(str(exported[name, 8])).graph.node}
    assert ("BatchNormalization" in ops and "MaxPool" in ops) if name == "cnn" else "Reshape" in ops
    for b in BATCHES:
        ex = Explainer(exported[name, b], device="cpu")
        assert ex.ir.batch_fixed and ex.ir.fixed_batch == b
        assert ex.input_shape == SHAPES[name]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("n", [1, 3, 9])
def test_every_fixed_batch_gives_the_per_sample_results(exported: dict[tuple[str, int], Path], name: str, n: int) -> None:
    x = _x(name, n)
    results = []
    for b in BATCHES:
        ex = Explainer(exported[name, b], device="cpu")
        u = ex.unwrap(x)
        assert u.delta.max() < 1e-5 * (1 + np.abs(u.output).max())  # W x + b = onnxruntime's scores
        e = ex.explain(x, width=3)
        r = ex.certified_radius(x)
        results.append((u, e, r))
    (u1, e1, r1) = results[0]
    for u, e, r in results[1:]:
        np.testing.assert_array_equal(u.weight, u1.weight)
        np.testing.assert_array_equal(u.bias, u1.bias)
        np.testing.assert_allclose(u.output, u1.output, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(e.target, e1.target)
        for p, q in zip(e.path, e1.path):
            assert [k.kept.tolist() for k in p] == [k.kept.tolist() for k in q]
        np.testing.assert_array_equal(e.attribution, e1.attribution)
        np.testing.assert_array_equal(r.l2, r1.l2)
        np.testing.assert_array_equal(r.linf, r1.linf)


def test_a_batch_equals_the_sample_loop_at_fixed_batch_8(exported: dict[tuple[str, int], Path]) -> None:
    ex = Explainer(exported["cnn", 8], device="cpu")
    x = _x("cnn", 11)
    whole = ex.explain(x, width="20%")
    for i in range(x.shape[0]):
        one = ex.explain(x[i : i + 1], width="20%")
        np.testing.assert_array_equal(one.attribution[0], whole.attribution[i])
        np.testing.assert_allclose(one.bias[0], whole.bias[i], rtol=1e-6, atol=1e-7)


def test_onnxruntime_only_ever_sees_groups_of_b(exported: dict[tuple[str, int], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    ex = Explainer(exported["mlp", 8], device="cpu")
    rec = ex.sweep.recorder_for()
    seen: list[tuple[int, ...]] = []
    real = rec._session

    class Spy:
        def run(self, names: Any, feed: dict[str, np.ndarray], options: Any = None) -> Any:
            x = feed["x"]
            seen.append(x.shape)
            return real.run(names, feed, options)

    monkeypatch.setattr(rec, "_session", Spy())
    x = _x("mlp", 11)
    record = ex.record(x)
    assert seen == [(8, 2, 3), (8, 2, 3)]
    assert record.scores.shape == (11, 4)
    alone = Explainer(exported["mlp", 1], device="cpu").record(x)
    np.testing.assert_allclose(record.scores, alone.scores, rtol=1e-5, atol=1e-6)


def test_inspect_shows_the_fixed_batch(exported: dict[tuple[str, int], Path]) -> None:
    info = describe(Explainer(exported["cnn", 8], device="cpu"), exported["cnn", 8])
    assert info["input"]["batch_fixed_in_file"] is True and info["input"]["batch_in_file"] == 8
    assert "fixed at 8 in the file; any N works, run in groups of 8" in _describe_text(info)


# --------------------------------------------------------------------------- refusals

B = 4


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], in_shape: tuple[int, ...] = (B, 3)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


W = np.arange(6, dtype=np.float32).reshape(3, 2) / 5 - 0.4


def _head(src: str) -> list[onnx.NodeProto]:
    return [helper.make_node("MatMul", [src, "w"], ["h"], name="fc"), helper.make_node("Relu", ["h"], ["y"], name="relu")]


MIXING = {
    # W (B×B) on the left contracts the batch axis: every output row mixes every sample
    "matmul_left": ([helper.make_node("MatMul", ["m", "x"], ["t"], name="mix_left"), *_head("t")],
                    {"m": np.eye(B, dtype=np.float32)[::-1] + 0.1, "w": W}, "mix_left"),
    "reduce_batch": ([helper.make_node("ReduceSum", ["x", "axes"], ["s"], name="sum_batch", keepdims=1),
                      helper.make_node("Add", ["x", "s"], ["t"], name="join"), *_head("t")],
                     {"axes": np.array([0], np.int64), "w": W}, "sum_batch"),
    "reshape_rows": ([helper.make_node("Reshape", ["x", "shape"], ["r"], name="fold_rows"),
                      helper.make_node("Reshape", ["r", "back"], ["t"], name="unfold"), *_head("t")],
                     {"shape": np.array([2, 2 * 3], np.int64), "back": np.array([B, 3], np.int64), "w": W}, "fold_rows"),
    "transpose": ([helper.make_node("Reshape", ["x", "shape"], ["r"], name="square"),
                   helper.make_node("Transpose", ["r"], ["q"], name="swap", perm=[1, 0, 2]),
                   helper.make_node("Reshape", ["q", "back"], ["t"], name="unsquare"), *_head("t")],
                  {"shape": np.array([B, 1, 3], np.int64), "back": np.array([B, 3], np.int64), "w": W}, "swap"),
    "transpose_square": ([helper.make_node("MatMul", ["x", "up"], ["s"], name="widen"),
                          helper.make_node("Transpose", ["s"], ["q"], name="flip", perm=[1, 0]),
                          helper.make_node("MatMul", ["q", "down"], ["t"], name="narrow"), *_head("t")],
                         {"up": np.ones((3, B), np.float32) / 3, "down": np.ones((B, 3), np.float32) / B, "w": W},
                         "flip"),
    "per_row_bias": ([helper.make_node("Add", ["x", "c"], ["t"], name="row_bias"), *_head("t")],
                     {"c": np.arange(B * 3, dtype=np.float32).reshape(B, 3), "w": W}, "row_bias"),
    "concat_batch": ([helper.make_node("Concat", ["x", "x"], ["c"], name="stack", axis=0),
                      helper.make_node("Slice", ["c", "st", "en"], ["t"], name="cut"), *_head("t")],
                     {"st": np.array([0], np.int64), "en": np.array([B], np.int64), "w": W}, "stack"),
}


@pytest.mark.parametrize("case", sorted(MIXING))
def test_a_model_that_mixes_the_batch_axis_is_refused_by_name(case: str) -> None:
    nodes, inits, culprit = MIXING[case]
    with pytest.raises(UnsupportedModelError) as info:
        Explainer(_model(nodes, inits), device="cpu")
    assert any(p.startswith(f"{culprit} (") for p in info.value.problems), info.value.problems


def test_the_numeric_check_catches_what_the_graph_checks_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "fixed_batch_problems", lambda *args: [])
    nodes, inits, _ = MIXING["matmul_left"]
    with pytest.raises(UnsupportedModelError) as info:
        Explainer(_model(nodes, inits), device="cpu")
    (problem,) = info.value.problems
    assert problem.startswith("mix_left (MatMul, opset 17): its output 't' mixes the samples"), problem


def test_constants_with_equal_rows_broadcast_over_any_batch() -> None:
    c = np.tile(np.array([[0.5, -1.0, 2.0]], np.float32), (B, 1))
    nodes = [helper.make_node("Add", ["x", "c"], ["t"], name="bias"), *_head("t")]
    ex = Explainer(_model(nodes, {"c": c, "w": W}), device="cpu")
    assert ex.ir.constants["c"].shape == (1, 3)
    x = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    u = ex.unwrap(x)
    expected = np.maximum((x + c[0]) @ W, 0)
    np.testing.assert_allclose(u.output, expected, rtol=1e-6, atol=1e-6)
    assert u.delta.max() < 1e-6


def test_per_sample_ops_on_a_fixed_batch_are_accepted() -> None:
    """Reshape to (B, 1, 3), a Transpose that keeps axis 0, a MatMul with W on the left of a
    rank-3 tensor (per sample), Flatten back: no mixing."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="r"),
             helper.make_node("Transpose", ["r"], ["q"], name="t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["m", "q"], ["p"], name="left"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"), *_head("f")]
    m = np.array([[2.0, -1.0, 0.5], [0.0, 1.0, 1.0], [1.0, 0.0, -1.0]], np.float32)
    ex = Explainer(_model(nodes, {"shape": np.array([B, 1, 3], np.int64), "m": m, "w": W}), device="cpu")
    x = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    u = ex.unwrap(x)
    np.testing.assert_allclose(u.output, np.maximum((x @ m.T) @ W, 0), rtol=1e-5, atol=1e-6)
    assert u.delta.max() < 1e-5


def test_a_recorder_pads_the_last_group_and_drops_the_padding() -> None:
    nodes = [helper.make_node("Add", ["x", "c"], ["t"], name="bias"), *_head("t")]
    model = _model(nodes, {"c": np.ones((1, 3), np.float32), "w": W})
    rec = runtime.Recorder(model, "x", ["y", "t"], "cpu", B)
    x = np.random.default_rng(2).normal(size=(6, 3)).astype(np.float32)
    values = rec.run(x)
    assert values["t"].shape == (6, 3) and values["y"].shape == (6, 2)
    np.testing.assert_allclose(values["t"], x + 1, rtol=1e-6)
