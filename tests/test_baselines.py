"""Baseline attributions on the engine versus PyTorch autograd, exact Integrated Gradients,
batch = per sample, and the Explainer.attribute dispatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch_nets import cnn, export, mlp

from onnx_pathwise import Explainer, PathwiseError
from onnx_pathwise import baselines as B
from onnx_pathwise.samples import tiny_mlp

GATES = (nn.ReLU, nn.LeakyReLU, nn.ReLU6)


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def case(request: pytest.FixtureRequest) -> tuple[nn.Module, Explainer, np.ndarray]:
    rng = np.random.default_rng(1)
    if request.param == "mlp":
        module, x = mlp(), rng.normal(size=(4, 6)).astype(np.float32) * 2
    else:
        module, x = cnn(), rng.normal(size=(3, 2, 8, 8)).astype(np.float32)
    ex = Explainer(export(module, torch.from_numpy(x)), device="cpu")
    return module.double(), ex, x


def torch_grad(module: nn.Module, x: np.ndarray, target: np.ndarray, guided: bool = False) -> np.ndarray:
    """∂y_c/∂x by autograd in float64; ``guided`` clamps every gate's input gradient to ≥ 0."""
    handles = []
    if guided:
        for m in module.modules():
            if isinstance(m, GATES):
                handles.append(m.register_full_backward_hook(lambda mod, gin, gout: (gin[0].clamp(min=0),)))
    try:
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        y = module(xt)
        y[torch.arange(len(target)), torch.as_tensor(target)].sum().backward()
        assert xt.grad is not None
        return xt.grad.numpy()
    finally:
        for h in handles:
            h.remove()


def torch_ig_mean(module: nn.Module, base: np.ndarray, x: np.ndarray, target: np.ndarray, steps: int) -> np.ndarray:
    """Mean autograd gradient at base + α(x − base), α = (k + ½)/steps, all points in one batch."""
    alphas = ((np.arange(steps) + 0.5) / steps).reshape((-1, 1) + (1,) * x.ndim)
    pts = base[None].astype(np.float64) + alphas * (x.astype(np.float64) - base)[None]
    g = torch_grad(module, pts.reshape((-1,) + x.shape[1:]), np.tile(target, steps))
    return g.reshape((steps,) + x.shape).mean(axis=0)


def close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-4) -> None:
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(np.abs(b).max())))


def targets(ex: Explainer, x: np.ndarray) -> np.ndarray:
    # Not the argmax, so that the target is an explicit choice.
    return (ex.record(x).scores.argmax(axis=1) + 1) % ex.num_classes


def test_gradient_and_input_x_gradient_match_torch(case):
    module, ex, x = case
    t = targets(ex, x)
    g = torch_grad(module, x, t)
    close(B.gradient(ex, x, t), g)
    close(B.input_x_gradient(ex, x, t), g * x)
    close(B.unwrap(ex, x, t), g * x)
    close(B.pathwise(ex, x, t, depth=0), g * x)


def test_guided_backprop_matches_torch_hooks(case):
    module, ex, x = case
    t = targets(ex, x)
    ours = B.guided_backprop(ex, x, t)
    ref = torch_grad(module, x, t, guided=True)
    close(ours, ref)
    assert not np.allclose(ref, torch_grad(module, x, t))  # the clamp does something here


@pytest.mark.parametrize("baseline", ["zeros", 0.3, "array"])
def test_integrated_gradients_steps_match_torch(case, baseline):
    module, ex, x = case
    t = targets(ex, x)
    x0 = np.random.default_rng(5).normal(size=x.shape[1:]).astype(np.float32) if baseline == "array" else baseline
    steps = 16
    base = np.zeros_like(x) if baseline == "zeros" else np.broadcast_to(np.asarray(x0, np.float32), x.shape)
    ref = (x - base) * torch_ig_mean(module, base, x, t, steps)
    close(B.integrated_gradients(ex, x, t, baseline=x0, steps=steps), ref)


class _InputSkip(nn.Module):
    """conv → BN → ReLU, plus a second conv of the input itself joined after the gate: the
    sweep's linear base (below the first gate) and a stateless branch above it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem, self.bn, self.side = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(2, 4, 1)
        self.body, self.head = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 5)
        self.bn.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.stem(x))) + self.side(x)
        return self.head(torch.relu(self.body(h)).flatten(1))


@pytest.mark.parametrize("chunk", [5, 64])
def test_integrated_gradients_summed_at_the_linear_base(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """IG sums the points' cotangents where the sweep reaches the network's linear base and
    sweeps the rest once per sample: equal to the per-point gradients and to autograd, with
    chunks of points that cut across samples (5 rows, 7 points per sample) or hold them all."""
    module = _InputSkip().eval()
    x = np.random.default_rng(2).normal(size=(3, 2, 8, 8)).astype(np.float32)
    ex = Explainer(export(module, torch.from_numpy(x)), device="cpu")
    # the base is the stem alone (BatchNorm folded in); the side conv runs per point
    assert ex.engine.linear_base == ex.engine.nodes[0].name
    assert [n.op_type for n in ex.engine.nodes[:3]] == ["Conv", "Relu", "Conv"]
    monkeypatch.setattr(B, "_row_chunk", lambda explainer: chunk)
    t = targets(ex, x)
    summed = B.integrated_gradients(ex, x, t, steps=7)
    monkeypatch.setattr(ex.engine, "linear_base", None)
    per_point = B.integrated_gradients(ex, x, t, steps=7)
    close(summed, per_point, rtol=1e-5)
    close(summed, x * torch_ig_mean(module.double(), np.zeros_like(x), x, t, 7))


def test_exact_integrated_gradients_completeness_and_convergence(case):
    module, ex, x = case
    t = targets(ex, x)
    idx = np.arange(len(x))
    exact = B.integrated_gradients(ex, x, t, exact=True)
    with torch.no_grad():
        xt = torch.tensor(x, dtype=torch.float64)
        gap = (module(xt) - module(torch.zeros_like(xt))).numpy()[idx, t]
    total = exact.reshape(len(x), -1).astype(np.float64).sum(axis=1)
    assert np.all(np.abs(total - gap) <= 1e-4 * np.maximum(np.abs(gap), 1.0)), (total, gap)
    pieces = B.segment_pieces(ex, x)
    assert all(p.count > 1 for p in pieces)  # the segments do cross activation boundaries
    errors = [np.abs(B.integrated_gradients(ex, x, t, steps=s) - exact).max() for s in (4, 32, 256, 2048)]
    scale = np.abs(exact).max()
    assert errors[-1] < errors[0] / 20 and errors[-1] < 5e-3 * scale, errors
    # Fine midpoint IG by autograd, independently of the piece search.
    ref = x * torch_ig_mean(module, np.zeros_like(x), x, t, 4096)
    np.testing.assert_allclose(exact, ref, atol=2e-3 * scale)


def test_exact_integrated_gradients_by_hand():
    # tiny_mlp, target 0: y0 = relu(x1) + 5·relu(x1 + x2 − 10) + 0.5. From 0 to x = (12, 0) the
    # third unit switches on at α = 5/6: IG_1 = 12·(1 + 5·(1/6)) = 22 = y0(x) − y0(0).
    ex = Explainer(tiny_mlp(), device="cpu")
    x = np.array([[12.0, 0.0]], np.float32)
    np.testing.assert_allclose(B.integrated_gradients(ex, x, 0, exact=True), [[22.0, 0.0]], rtol=1e-6)
    (pieces,) = B.segment_pieces(ex, x)
    np.testing.assert_allclose(pieces.breaks, [0.0, 5 / 6, 1.0], atol=1e-7)
    # Four midpoints 1/8 … 7/8: only 7/8 lies past 5/6, so the mean slope is 1 + 5/4.
    np.testing.assert_allclose(B.integrated_gradients(ex, x, 0, steps=4), [[27.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("method,options", [
    ("gradient", {}), ("input_x_gradient", {}), ("guided_backprop", {}), ("unwrap", {}),
    ("pathwise", {"width": 2}), ("integrated_gradients", {"steps": 8}),
    ("integrated_gradients", {"exact": True, "baseline": 0.1}),
])
def test_batch_equals_per_sample(case, method, options):
    _, ex, x = case
    batch = ex.attribute(x, method, **options)
    for i in range(len(x)):
        one = ex.attribute(x[i], method, **options)
        assert one.target.tolist() == [batch.target[i]]
        np.testing.assert_allclose(one.attribution[0], batch.attribution[i], rtol=1e-5, atol=1e-6)


def test_attribute_result_and_errors():
    ex = Explainer(tiny_mlp(), device="cpu")
    x = np.array([[1.0, 2.0], [3.0, -1.0]], np.float32)
    a = ex.attribute(x, "integrated_gradients", target=[1, 0], steps=4)
    assert a.method == "integrated_gradients" and a.options == {"steps": 4}
    assert a.target.tolist() == [1, 0] and a.attribution.shape == x.shape
    np.testing.assert_allclose(a.output, ex.record(x).scores)
    with pytest.raises(PathwiseError, match="gradient, input_x_gradient, integrated_gradients"):
        ex.attribute(x, "smoothgrad")
    with pytest.raises(PathwiseError, match="does not take option"):
        ex.attribute(x, "gradient", steps=3)
    with pytest.raises(PathwiseError, match="baseline"):
        ex.attribute(x, "integrated_gradients", baseline="blur")


def _piece_reference(margin: np.ndarray, rate: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the α interval on which every margin + (α − α_p)·rate stays ≥ 0 (numpy)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        fwd = np.where(rate < 0, margin / -rate, np.inf).min(axis=1, initial=np.inf)
        bwd = np.where(rate > 0, margin / rate, np.inf).min(axis=1, initial=np.inf)
    return alpha - bwd, alpha + fwd


def test_piece_kernels_match_a_direct_computation() -> None:
    """The compiled piece bounds of exact IG (gate kinks, max-pool window margins) against the
    margins and rates written out in numpy, windows with padding and overlap included."""
    from onnx_pathwise import kernels
    from onnx_pathwise.rules.pooling import _window_table, window_argmax

    rng = np.random.default_rng(2)
    P, alpha = 5, np.linspace(0.1, 0.9, 5)
    z = rng.standard_normal((P, 300)).astype(np.float32)
    z[:, :7] = 0.0  # exactly at the kink
    dz = rng.standard_normal((P, 300)).astype(np.float32)
    for up in (False, True):
        side = np.where((z >= 0) if up else (z > 0), 1.0, -1.0)
        ref = _piece_reference(np.maximum(side * z, 0.0), side * dz.astype(np.float64), alpha)
        lo, hi = np.full(P, -np.inf), np.full(P, np.inf)
        kernels.gate_piece(z, dz, 0.0, up, alpha, lo, hi)
        np.testing.assert_array_equal(lo, ref[0])
        np.testing.assert_array_equal(hi, ref[1])

    C, side_len = 3, 7
    table = _window_table((side_len, side_len), (4, 4), (3, 3), (2, 2), (1, 1), (1, 1, 1, 1))  # overlapping, padded
    S = side_len * side_len
    v = rng.standard_normal((P, C * S)).astype(np.float32)
    v[0, :S] = np.round(v[0, :S])  # one row with ties inside windows (a zero-width piece)
    dv = rng.standard_normal((P, C * S)).astype(np.float32)
    within = window_argmax(v.reshape(P, C, S), table)
    argmax = (within + (np.arange(C) * S)[None, :, None]).reshape(P, -1)
    margins, rates = [], []
    for r in range(P):
        m_r, q_r = [], []
        for c in range(C):
            for p in range(table.shape[0]):
                w = argmax[r, c * table.shape[0] + p]
                for t in table[p]:
                    if t >= 0 and c * S + t != w:
                        m_r.append(max(float(v[r, w]) - float(v[r, c * S + t]), 0.0))
                        q_r.append(float(dv[r, w]) - float(dv[r, c * S + t]))
        margins.append(m_r)
        rates.append(q_r)
    ref = _piece_reference(np.array(margins), np.array(rates), alpha)
    lo, hi = np.full(P, -np.inf), np.full(P, np.inf)
    kernels.window_piece(v, dv, table, S, argmax, alpha, lo, hi)
    assert np.all(hi[1:] - lo[1:] > 0)  # the other rows have room to move
    np.testing.assert_array_equal(lo, ref[0])
    np.testing.assert_array_equal(hi, ref[1])


def test_readme_methods_table_is_generated_from_the_registry() -> None:
    """The README's table between the methods-table markers is exactly ``methods_table()``;
    regenerate it with ``python -c "from onnx_pathwise.baselines import methods_table as t; print(t())"``."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- methods-table:start -->\n", "<!-- methods-table:end -->"
    assert start in readme and end in readme, "README lacks the methods-table markers"
    assert readme.split(start, 1)[1].split(end, 1)[0].strip() == B.methods_table().strip(), (
        "README's methods table is out of date")


def test_the_registry_is_what_every_consumer_enumerates(monkeypatch: pytest.MonkeyPatch) -> None:
    """One registration makes a method known to Explainer.attribute, evaluate, the streaming
    explain and the CLI's choices; a second registration of a name is refused."""
    from onnx_pathwise import cli, stream
    from onnx_pathwise.metrics import evaluate

    assert cli.METHODS == tuple(B.METHODS)
    assert set(B.METHODS["integrated_gradients"].options) == {"baseline", "steps", "exact"}
    with pytest.raises(ValueError, match="twice"):
        B.register("gradient", B.gradient, "again")

    def doubled(explainer, x, target=None, *, record=None, factor: float = 2.0):
        return factor * B.gradient(explainer, x, target, record=record)

    monkeypatch.setitem(B.METHODS, "doubled", B.Method("doubled", doubled, "Twice the gradient."))
    ex = Explainer(tiny_mlp(), device="cpu")
    x = np.array([[1.0, 2.0]], np.float32)
    a = ex.attribute(x, "doubled", factor=3.0)
    np.testing.assert_allclose(a.attribution, 3 * ex.attribute(x, "gradient").attribution)
    with pytest.raises(PathwiseError, match="does not take option"):
        ex.attribute(x, "doubled", steps=3)
    assert "doubled" in evaluate(ex, x, ["doubled"], step=1)["methods"]
    arrays, _ = stream.explain_batch(ex, x, "doubled")
    assert "weight" not in arrays and arrays["attribution"].shape == x.shape
