"""Whole models from real exporters (PyTorch legacy and dynamo, skl2onnx, onnx.helper, old
opsets): the unwrapped affine model must reproduce onnxruntime's scores and an independent
Jacobian, batches must equal per-sample results, and unsupported models must be refused
with every offending node listed."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import onnx
import pytest
import torch
import zoo
from onnx import numpy_helper

import onnx_pathwise
from onnx_pathwise import Explainer, ModelError, UnsupportedModelError, frontend, load

N = 3  # samples per batch
TOL = 1e-4  # relative to the scale of the compared quantity

TORCH_MODELS = ["mlp", "cnn", "residual", "residual_dynamo", "branches", "activations", "fixed_batch",
                "pixel_shuffle"]
HAND_MODELS = ["constant_weights", "ir3", "opset6_mlp", "opset6_conv", "space_to_depth"]
SKLEARN_MODELS = ["sklearn_zipmap", "sklearn_nozipmap"]
ALL_MODELS = TORCH_MODELS + HAND_MODELS + SKLEARN_MODELS

#: (gate op_types in order, routing nodes, peeled terminal ops) per model.
STRUCTURE: dict[str, tuple[list[str], int, tuple[str, ...]]] = {
    "mlp": (["Relu", "Relu"], 0, ("Softmax",)),
    "cnn": (["Relu", "Relu"], 2, ()),
    "residual": (["Relu"] * 5, 0, ()),
    "residual_dynamo": (["Relu"] * 5, 0, ()),
    "branches": (["Relu"] * 3, 0, ()),
    "activations": (["LeakyRelu", "PRelu", "Clip"], 0, ()),
    "fixed_batch": (["Relu", "Relu"], 0, ()),
    "constant_weights": (["Relu", "Relu"], 0, ()),
    "ir3": (["Relu"], 0, ()),
    "opset6_mlp": (["Relu"], 0, ("Softmax",)),
    "opset6_conv": (["Relu"], 0, ()),
    "pixel_shuffle": (["Relu", "Relu"], 0, ()),
    "space_to_depth": (["Relu", "Relu"], 0, ()),
    "sklearn_zipmap": (["Relu", "Relu"], 0, ("ZipMap", "Softmax")),
    "sklearn_nozipmap": (["Relu", "Relu"], 0, ("Softmax",)),
}

#: Units per gate layer (C×H×W for conv features).
GATE_UNITS = {
    "mlp": [16, 12],
    "cnn": [4 * 12 * 12, 6 * 4 * 4],
    "residual": [4 * 100, 4 * 100, 4 * 100, 6 * 25, 6 * 25],
    "branches": [3 * 64, 2 * 64, 5 * 64],
    "activations": [4 * 81, 3 * 25, 10],
    "fixed_batch": [3 * 25, 8],
    "sklearn_zipmap": [16, 8],
    "pixel_shuffle": [8 * 36, 4 * 144],
    "space_to_depth": [4 * 36, 8 * 9],
}


class Zoo:
    """Builds each model once per test module, on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._built: dict[str, tuple[Path, Any]] = {}
        self._explainers: dict[str, Explainer] = {}

    def build(self, name: str) -> tuple[Path, Any]:
        if name not in self._built:
            path = self.folder / f"{name}.onnx"
            if name.startswith("sklearn_"):
                self._built[name] = zoo.sklearn_mlp(path, zipmap=name == "sklearn_zipmap")
            else:
                self._built[name] = zoo.BUILDERS[name](path)
        return self._built[name]

    def explainer(self, name: str) -> Explainer:
        if name not in self._explainers:
            self._explainers[name] = Explainer(self.build(name)[0], device="cpu")
        return self._explainers[name]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


def input_shape(name: str) -> tuple[int, ...]:
    return zoo.INPUT_SHAPES["sklearn_mlp" if name.startswith("sklearn_") else name]


def sample(name: str, n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n,) + input_shape(name)).astype(np.float32)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| relative to the scale of b."""
    b = np.asarray(b, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-12))


# --------------------------------------------------------------------------- oracles


def torch_logits_fn(name: str, module: Any) -> Any:
    """The float64 function x → explained scores of a torch model (terminal Softmax dropped)."""
    m = copy.deepcopy(module).double().eval()
    if name == "mlp":
        m = m[:-1]
    return m


def torch_jacobian(fn: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scores (n, K), Jacobian (n, K, *in)) in float64. Samples are independent (eval mode),
    so the Jacobian of the batch-summed scores holds every sample's Jacobian."""
    xt = torch.from_numpy(x.astype(np.float64))
    with torch.no_grad():
        scores = fn(xt).reshape(x.shape[0], -1).numpy()
    jac = torch.autograd.functional.jacobian(lambda v: fn(v).reshape(v.shape[0], -1).sum(0), xt,
                                             vectorize=True)
    return scores, jac.numpy().swapaxes(0, 1)


def gate_pattern(ex: Explainer, x: np.ndarray) -> dict[str, np.ndarray]:
    rec = ex.record(x)
    out = {g.name: rec.states[g.name].slope.copy() for g in ex.gate_layers}
    for node in ex.engine.routing_nodes:
        out[node.name] = rec.states[node.name].argmax.copy()
    return out


def away_from_kinks(ex: Explainer, name: str, n: int = N, seed: int = 0) -> np.ndarray:
    """The n of 16·n random inputs with the largest certified L∞ radius."""
    cand = sample(name, 16 * n, seed)
    order = np.argsort(-ex.certified_radius(cand).linf, kind="stable")
    return cand[np.sort(order[:n])]


def float64_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every float32 tensor (initializers, Constant and ConstantOfShape values,
    Cast targets, graph inputs and outputs) turned into float64."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == onnx.TensorProto.FLOAT:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == onnx.TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
            if node.op_type == "Cast" and a.name == "to" and a.i == onnx.TensorProto.FLOAT:
                a.i = onnx.TensorProto.DOUBLE
    for vi in list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    del g.value_info[:]
    return m


def fd_jacobian(ex: Explainer, path: Path, x: np.ndarray, eps: float = 1e-5,
                f: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, central finite differences (n, K, *in)) of the explained tensor, evaluated by
    ``f`` (default: onnx's reference evaluator on a float64 copy of the original file);
    asserts (with onnxruntime) that no perturbed point leaves the activation region of its
    sample."""
    n = x.shape[0]
    D = int(np.prod(x.shape[1:]))
    steps = eps * np.eye(D)
    xs = x.reshape(n, 1, D).astype(np.float64)
    plus = (xs + steps).reshape((n * D,) + x.shape[1:])
    minus = (xs - steps).reshape((n * D,) + x.shape[1:])
    base = gate_pattern(ex, x)
    for pts in (plus, minus):
        pat = gate_pattern(ex, pts.astype(np.float32))
        for k, v in base.items():
            assert np.array_equal(np.repeat(v, D, axis=0), pat[k]), f"FD step crosses a kink at {k}"
    if f is None:
        from onnx.reference import ReferenceEvaluator

        ref = ReferenceEvaluator(float64_copy(onnx.load(str(path))))

        def f(v: np.ndarray) -> np.ndarray:
            (out,) = ref.run([ex.ir.output_name], {ex.input_name: v})
            return np.asarray(out, np.float64).reshape(v.shape[0], -1)

    fp, fm = f(plus).reshape(n, D, -1), f(minus).reshape(n, D, -1)
    jac = ((fp - fm) / (2 * eps)).swapaxes(1, 2)  # (n, K, D)
    return f(x.astype(np.float64)), jac.reshape((n, jac.shape[1]) + x.shape[1:])


def sklearn_logits(clf: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits (n, K), Jacobian (n, K, D)) of an MLPClassifier, in float64 from its weights."""
    h = x.astype(np.float64)
    n, d = h.shape
    jac = np.broadcast_to(np.eye(d), (n, d, d)).copy()  # ∂h_j/∂x_d
    layers = list(zip(clf.coefs_, clf.intercepts_))
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        jac = np.einsum("njd,jk->nkd", jac, w)
        if i < len(layers) - 1:
            on = (h > 0).astype(np.float64)
            h = h * on
            jac = jac * on[:, :, None]
    return h, jac


def oracle(models: Zoo, name: str, x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(independent scores or None, independent Jacobian) for model ``name`` at x."""
    path, module = models.build(name)
    if name == "fixed_batch":  # its forward reshapes to a batch of 1: one sample at a time
        parts = [torch_jacobian(torch_logits_fn(name, module), x[i : i + 1]) for i in range(len(x))]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if name in TORCH_MODELS:
        return torch_jacobian(torch_logits_fn(name, module), x)
    if name in SKLEARN_MODELS:
        return sklearn_logits(module, x)
    return fd_jacobian(models.explainer(name), path, x)


def batch_for(models: Zoo, name: str, seed: int = 0) -> np.ndarray:
    """A batch for model ``name``: random, or (finite-difference oracles) away from kinks."""
    if name in HAND_MODELS:
        return away_from_kinks(models.explainer(name), name, N, seed)
    return sample(name, N, seed)


# --------------------------------------------------------------------------- every model


def check_affine_model(ex: Explainer, x: np.ndarray, in_shape: tuple[int, ...]) -> Any:
    """Unwrap x and check W·x + b against onnxruntime's scores, computed here from scratch."""
    res = ex.unwrap(x)
    n, K = x.shape[0], ex.num_classes
    assert res.weight.shape == (n, K) + in_shape
    assert res.bias.shape == (n, K)
    scores = ex.record(x).scores.astype(np.float64)
    fx = np.einsum("nkd,nd->nk", res.weight.reshape(n, K, -1).astype(np.float64),
                   x.reshape(n, -1).astype(np.float64)) + res.bias.astype(np.float64)
    assert rel_err(fx, scores) < TOL
    assert float(res.delta.max()) < TOL * np.abs(scores).max()
    np.testing.assert_allclose(res.output, scores, rtol=0, atol=1e-6 * np.abs(scores).max())
    # The scores alone (the metrics' curves): the record's pass, so the same bits.
    np.testing.assert_array_equal(ex.scores(x), ex.record(x).scores)
    return res


@pytest.mark.parametrize("name", ALL_MODELS)
def test_unwrap_reproduces_onnxruntime_and_jacobian(models: Zoo, name: str) -> None:
    ex = models.explainer(name)
    x = batch_for(models, name)
    res = check_affine_model(ex, x, input_shape(name))

    ref_scores, ref_jac = oracle(models, name, x)
    if ref_scores is not None:  # the explained tensor is the pre-activation logits
        assert rel_err(res.output, ref_scores) < TOL
    assert rel_err(res.weight, ref_jac) < TOL, f"W differs from the Jacobian by {rel_err(res.weight, ref_jac):.2e}"


@pytest.mark.parametrize("name", ["cnn", "residual", "fixed_batch", "sklearn_mlp"])
def test_completeness_delta_without_w_sweeps_the_rows_asked_for(models: Zoo, name: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`unwrap.delta` (the audit's completeness check) is exact to round-off like unwrap's own,
    and sweeps every class, or each sample's top N: a bias made wrong on one class shows in
    the delta of exactly the samples whose rows include that class."""
    from onnx_pathwise import unwrap as unwrap_mod

    ex = models.explainer(name)
    x = sample(name, seed=2)
    d, scores = unwrap_mod.delta(ex.sweep, x)
    np.testing.assert_array_equal(scores, ex.record(x).scores)
    assert d.shape == (N,) and np.all(d < TOL * max(1.0, np.abs(scores).max()))
    K = scores.shape[1]
    top = np.argsort(-scores, axis=1, kind="stable")[:, :2]
    # a class in some samples' top 2 and not in others', else in none (or, at K = 2, in all)
    counts = [sum(c in t for t in top.tolist()) for c in range(K)]
    bad = next((c for c in range(K) if 0 < counts[c] < N), counts.index(min(counts)))
    real = ex.engine.backward

    def wrong_bias(seeds, record, *args, **kwargs):
        w, b = real(seeds, record, *args, **kwargs)
        rows = next(iter(seeds.values())).reshape(len(b), -1, K)[:, 0].argmax(axis=1)
        return w, b + (rows == bad)[:, None]

    monkeypatch.setattr(ex.engine, "backward", wrong_bias)
    every, _ = unwrap_mod.delta(ex.sweep, x)
    np.testing.assert_allclose(every, 1.0, atol=1e-3)
    some, _ = unwrap_mod.delta(ex.sweep, x, classes=2)
    np.testing.assert_allclose(some, [1.0 if bad in t else 0.0 for t in top.tolist()], atol=1e-3)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_batch_equals_per_sample(models: Zoo, name: str) -> None:
    ex = models.explainer(name)
    x = sample(name, seed=1)
    batch = ex.unwrap(x)
    for i in range(N):
        one = ex.unwrap(x[i])
        assert one.weight.shape == (1,) + batch.weight.shape[1:]
        assert rel_err(one.weight[0], batch.weight[i]) < 1e-5
        assert rel_err(one.bias[0], batch.bias[i]) < 1e-5
        np.testing.assert_allclose(one.output[0], batch.output[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_structure(models: Zoo, name: str) -> None:
    ex = models.explainer(name)
    gates, routing, peeled = STRUCTURE[name]
    assert [g.op_type for g in ex.gate_layers] == gates
    assert [g.index for g in ex.gate_layers] == list(range(len(gates)))
    if name in GATE_UNITS:
        assert [g.units for g in ex.gate_layers] == GATE_UNITS[name]
    assert len(ex.engine.routing_nodes) == routing
    assert ex.ir.peeled == peeled
    g = ex.layer_graph
    assert isinstance(g, nx.DiGraph)
    assert nx.is_directed_acyclic_graph(g)
    assert set(g.nodes) == {"<input>"} | {n.name for n in ex.ir.nodes}
    for gate in ex.gate_layers:
        assert g.nodes[gate.name]["role"] == "gate"
        assert g.nodes[gate.name]["shapes"][0] == gate.shape
    # every non-input node is reachable from the input and reaches the explained output
    out_node = next(n.name for n in ex.ir.nodes if ex.ir.output_name in n.outputs)
    assert nx.descendants(g, "<input>") | {"<input>"} == set(g.nodes)
    assert nx.ancestors(g, out_node) | {out_node} == set(g.nodes)
    # segments: every affine/shape/merge node in exactly one; inputs are gate/routing outputs or x
    segs = ex.segments
    members = [m for s in segs for m in s.nodes]
    assert sorted(members) == sorted(n.name for n in ex.ir.nodes if n.role in ("affine", "shape", "merge"))
    boundary = {ex.ir.input_name} | {t for n in ex.ir.nodes if n.role in ("gate", "routing") for t in n.outputs}
    for s in segs:
        assert s.inputs and set(s.inputs) <= boundary
    assert any(ex.ir.output_name in s.outputs for s in segs)
    assert all(n.op_type != "BatchNormalization" for n in ex.ir.nodes) or name == "opset6_conv"


def test_pixel_shuffle_and_space_to_depth_models_hold_the_ops(models: Zoo) -> None:
    """The whole-model cases exercise DepthToSpace in both modes and SpaceToDepth: PyTorch's
    legacy exporter writes PixelShuffle as DepthToSpace in CRD mode."""
    ops = {(n.op_type, n.attrs.get("mode")) for name in ("pixel_shuffle", "space_to_depth")
           for n in models.explainer(name).ir.nodes if n.op_type in ("DepthToSpace", "SpaceToDepth")}
    assert ops == {("DepthToSpace", "CRD"), ("DepthToSpace", "DCR"), ("SpaceToDepth", None)}


def test_residual_segments_join_two_inputs(models: Zoo) -> None:
    for name in ("residual", "residual_dynamo"):
        ex = models.explainer(name)
        joins = [s for s in ex.segments if len(s.inputs) == 2]
        assert len(joins) == 2, [s.inputs for s in ex.segments]
        for s in joins:
            assert any(ex.ir.node(m).role == "merge" for m in s.nodes)
        # the strided block's join holds its 3×3 conv and the 1×1 shortcut conv (BN folded)
        convs = [[m for m in s.nodes if ex.ir.node(m).op_type == "Conv"] for s in joins]
        assert sorted(len(c) for c in convs) == [1, 2]
        assert len(ex.segments) == 6


def test_mlp_softmax_is_peeled(models: Zoo) -> None:
    ex = models.explainer("mlp")
    path, module = models.build("mlp")
    assert ex.ir.peeled == ("Softmax",)
    assert ex.ir.source_output == "logits"
    assert ex.num_classes == 4
    x = sample("mlp")
    res = ex.unwrap(x)
    probs = module(torch.from_numpy(x)).detach().numpy()
    z = res.output - res.output.max(axis=1, keepdims=True)
    np.testing.assert_allclose(np.exp(z) / np.exp(z).sum(axis=1, keepdims=True), probs, atol=1e-6)


def test_fixed_batch_of_one_runs_batches(models: Zoo) -> None:
    ex = models.explainer("fixed_batch")
    assert ex.ir.batch_fixed
    path, _ = models.build("fixed_batch")
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1
    assert ex.unwrap(sample("fixed_batch", n=5)).weight.shape[0] == 5


def test_branches_constant_and_shape_subgraphs_are_folded(models: Zoo) -> None:
    ex = models.explainer("branches")
    path, _ = models.build("branches")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"ConstantOfShape", "Slice", "Concat", "Pad", "Shape", "Gather"} <= ops
    pad = next(n for n in ex.ir.nodes if n.op_type == "Pad")
    assert list(pad.attrs["pads"]) == [0, 0, 0, 1, 0, 0, 1, 2]  # ZeroPad2d((1, 2, 0, 1))
    # the pad arithmetic and the Shape(x)-driven reshape target are folded out of the cone
    assert sorted(n.op_type for n in ex.ir.nodes) == sorted(
        ["Conv", "Relu", "Pad", "Conv", "Relu", "Concat", "Sub", "Relu", "Reshape", "Gemm"])
    assert ex.unwrap(sample("branches", n=5)).weight.shape[0] == 5


def test_activation_gates_have_their_slopes(models: Zoo) -> None:
    ex = models.explainer("activations")
    rec = ex.record(sample("activations"), preactivations=True)
    leaky, prelu, clip = (rec.states[g.name].slope for g in ex.gate_layers)
    assert set(np.unique(leaky)) == {np.float32(0.1), np.float32(1.0)}
    assert {np.float32(v) for v in (0.2, -0.3, 0.5)} & set(np.unique(prelu))
    clip_node = ex.ir.node(ex.gate_layers[2].name)
    assert (clip_node.attrs["min"], clip_node.attrs["max"]) == (0.0, 6.0)
    z = rec.preactivations[ex.gate_layers[2].name]
    assert (z > 6).any() and (z < 0).any() and ((z > 0) & (z < 6)).any()  # all three pieces used
    assert set(np.unique(clip)) == {0.0, 1.0}


def test_old_opsets_are_upgraded_for_onnxruntime(models: Zoo) -> None:
    for name in ("opset6_mlp", "opset6_conv"):
        path, _ = models.build(name)
        assert onnx.load(str(path)).opset_import[0].version == 6
        ex = models.explainer(name)
        assert ex.ir.opset >= load.MIN_RUNTIME_OPSET
        dims = ex.proto.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param  # the batch axis stays symbolic
    pad = next(n for n in models.explainer("opset6_conv").ir.nodes if n.op_type == "Pad")
    assert list(pad.attrs["pads"]) == [0, 0, 1, 1, 0, 0, 1, 0]


def test_ir3_initializers_as_inputs(models: Zoo) -> None:
    path, _ = models.build("ir3")
    model = onnx.load(str(path))
    assert model.ir_version == 3
    assert len(model.graph.input) == 5
    ex = models.explainer("ir3")
    assert ex.input_name == "x" and ex.input_shape == (4,)


def test_sklearn_explains_logits(models: Zoo) -> None:
    x = sample("sklearn_zipmap", n=6)
    results = []
    for name in SKLEARN_MODELS:
        ex = models.explainer(name)
        _, clf = models.build(name)
        assert ex.num_classes == 3
        res = ex.unwrap(x)
        logits, _ = sklearn_logits(clf, x)
        assert rel_err(res.output, logits) < TOL
        z = res.output - res.output.max(axis=1, keepdims=True)
        np.testing.assert_allclose(np.exp(z) / np.exp(z).sum(1, keepdims=True), clf.predict_proba(x), atol=1e-5)
        results.append(res)
    np.testing.assert_array_equal(results[0].weight, results[1].weight)


# --------------------------------------------------------------------------- radius


def _unit_gradient(module: Any, layer: int, unit: int, x: np.ndarray) -> tuple[float, np.ndarray]:
    """Pre-activation z and ∂z/∂x of ``unit`` of the MLP's ``layer``-th ReLU (float64)."""
    m = torch_logits_fn("mlp", module)
    pre = m[: 2 * layer + 1]
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    z = pre(xt[None])[0, unit]
    (g,) = torch.autograd.grad(z, xt)
    return float(z), g.numpy()


def test_certified_radius_mlp(models: Zoo) -> None:
    ex = models.explainer("mlp")
    _, module = models.build("mlp")
    x = sample("mlp", n=4, seed=3)
    rad = ex.certified_radius(x)
    assert rad.l2.shape == rad.linf.shape == (4,)
    assert np.all(rad.l2 > 0) and np.all(np.isfinite(rad.l2))
    assert np.all(rad.linf <= rad.l2 * (1 + 1e-9))  # ‖g‖₁ ≥ ‖g‖₂ for every unit
    rng = np.random.default_rng(4)
    names = [g.name for g in ex.gate_layers]
    for i in range(4):
        base = gate_pattern(ex, x[i : i + 1])
        # inside: random L2 directions at 0.99 r, and random corners of the L∞ ball at 0.99 r∞
        u = rng.normal(size=(64, 6))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        corners = rng.choice([-1.0, 1.0], size=(64, 6))
        pts = np.concatenate([x[i] + 0.99 * rad.l2[i] * u, x[i] + 0.99 * rad.linf[i] * corners]).astype(np.float32)
        pat = gate_pattern(ex, pts)
        for k in names:
            assert np.array_equal(pat[k], np.repeat(base[k], len(pts), axis=0)), f"sample {i}: {k} flipped inside"
        # outside: 1.5 r along the binding unit's gradient flips that unit
        layer_name, idx = rad.l2_unit[i].rstrip("]").split("[")
        layer, unit = names.index(layer_name), int(idx)
        z, g = _unit_gradient(module, layer, unit, x[i])
        assert abs(abs(z) / np.linalg.norm(g) - rad.l2[i]) < 1e-4 * rad.l2[i]
        step = -np.sign(z) * 1.5 * rad.l2[i] * g / np.linalg.norm(g)
        moved = gate_pattern(ex, (x[i] + step).astype(np.float32)[None])[layer_name]
        assert moved.reshape(-1)[unit] != base[layer_name].reshape(-1)[unit], f"sample {i}: unit did not flip"


@pytest.mark.parametrize("name", ["cnn", "activations"])
def test_certified_radius_conv_models_keep_region(models: Zoo, name: str) -> None:
    """MaxPool windows (cnn) and LeakyRelu/PRelu/Clip(0, 6) kinks (activations): random points
    at 0.99 × the radius keep every gate slope and every recorded argmax."""
    ex = models.explainer(name)
    x = sample(name, n=2, seed=5)
    rad = ex.certified_radius(x)
    assert np.all(rad.l2 > 0) and np.all(rad.linf > 0)
    rng = np.random.default_rng(6)
    D = int(np.prod(x.shape[1:]))
    for i in range(2):
        base = gate_pattern(ex, x[i : i + 1])
        u = rng.normal(size=(32, D))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        corners = rng.choice([-1.0, 1.0], size=(32, D))
        flat = x[i].reshape(1, D)
        pts = np.concatenate([flat + 0.99 * rad.l2[i] * u, flat + 0.99 * rad.linf[i] * corners])
        pat = gate_pattern(ex, pts.reshape((-1,) + x.shape[1:]).astype(np.float32))
        for k, v in base.items():
            assert np.array_equal(pat[k], np.repeat(v, len(pts), axis=0)), f"sample {i}: {k} changed inside"


# --------------------------------------------------------------------------- refusals and outputs


def test_unsupported_nodes_are_all_listed(models: Zoo) -> None:
    path, _ = models.build("unsupported")

    def no_numerics(*args: Any) -> Any:
        raise AssertionError("the model was run before validation finished")

    with pytest.raises(UnsupportedModelError) as info:
        frontend.load(path, probe=no_numerics)
    err = info.value
    assert len(err.problems) == 3, err.problems
    for node, op in (("/Tanh", "Tanh"), ("/Sigmoid", "Sigmoid"), ("/MatMul", "MatMul")):
        assert any(p.startswith(f"{node} ({op}, opset 17)") for p in err.problems), err.problems
    assert "Relu" in err.supported and "Tanh" not in err.supported
    with pytest.raises(UnsupportedModelError):
        Explainer(path, device="cpu")
    assert isinstance(err, onnx_pathwise.ModelError)


def test_several_float_outputs_need_a_choice(models: Zoo) -> None:
    path, module = models.build("multi_output")
    with pytest.raises(ModelError, match="--output") as info:
        Explainer(path, device="cpu")
    assert "logits" in str(info.value) and "features" in str(info.value)
    x = sample("multi_output")
    for out, k, pick in (("logits", 3, 0), ("features", 7, 1)):
        ex = Explainer(path, device="cpu", output_name=out)
        assert ex.num_classes == k
        res = ex.unwrap(x)
        m64 = copy.deepcopy(module).double()
        scores, jac = torch_jacobian(lambda v, m64=m64, pick=pick: m64(v)[pick], x)
        assert rel_err(res.output, scores) < TOL
        assert rel_err(res.weight, jac) < TOL
        assert float(res.delta.max()) < TOL * np.abs(scores).max()
    with pytest.raises(ModelError, match="no tensor named"):
        Explainer(path, device="cpu", output_name="nope")


@pytest.mark.parametrize("name", ["cnn", "residual", "branches", "activations", "fixed_batch"])
def test_record_from_gate_outputs_equals_record_from_inputs(models: Zoo, name: str) -> None:
    """The fast record (gate outputs) freezes the same slopes, offsets, values and argmax as
    the record of pre-activations."""
    ex = models.explainer(name)
    x = sample(name)
    fast, full = ex.record(x), ex.record(x, preactivations=True)
    assert not fast.preactivations or name == "activations"  # PRelu with a negative slope needs z
    assert len(full.preactivations) == len(ex.gate_layers)
    for key, a in full.states.items():
        b = fast.states[key]
        for field in ("slope", "offset", "value", "argmax"):
            va, vb = getattr(a, field, None), getattr(b, field, None)
            if va is None or vb is None:
                assert va is None and vb is None, (key, field)
            else:
                np.testing.assert_array_equal(va, vb, err_msg=f"{key}.{field}")
