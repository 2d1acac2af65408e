"""Pathwise explanations against an independent PyTorch implementation of docs/design.md §4.

The oracle re-derives everything with autograd in float64: frozen gates and argmax from a
recording pass, one full Jacobian per path layer (the published cost structure), the
selection rule written out afresh, and the masked network's score from a real forward pass.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import export_torch
from torch import nn

from onnx_pathwise import Explainer, PathwiseError, tiers
from onnx_pathwise.pathwise import parse_width
from onnx_pathwise.samples import tiny_mlp
from onnx_pathwise.selection import select_units

torch.manual_seed(0)


class Gated(nn.Module):
    """Base: ``g`` and ``pool`` are ReLU and max pooling in free mode, frozen (and masked /
    replaced by a leaf) in oracle mode."""

    def __init__(self) -> None:
        super().__init__()
        self.mode: str | None = None
        self.slopes: dict[str, torch.Tensor] = {}
        self.indices: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.inject: dict[str, torch.Tensor] = {}
        self.order: list[str] = []
        self.offsets: dict[str, torch.Tensor] = {}
        #: gate kind per name (default ReLU): "leaky" (α = 0.1), "relu6", or a PReLU module
        self.kinds: dict[str, object] = {}

    def act(self, name: str, z: torch.Tensor) -> torch.Tensor:
        kind = self.kinds.get(name, "relu")
        if kind == "leaky":
            return F.leaky_relu(z, 0.1)
        if kind == "relu6":
            return F.relu6(z)
        if isinstance(kind, nn.PReLU):
            return kind(z)
        return F.relu(z)

    def frozen(self, name: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slope, offset) of the gate at z; z = 0 counts as off."""
        kind = self.kinds.get(name, "relu")
        on = z > 0
        zero = torch.zeros_like(z)
        if kind == "leaky":
            return torch.where(on, 1.0, 0.1).to(z.dtype), zero
        if kind == "relu6":
            return (on & (z < 6)).to(z.dtype), torch.where(z >= 6, 6.0, 0.0).to(z.dtype)
        if isinstance(kind, nn.PReLU):
            w = kind.weight.view((1, -1) + (1,) * (z.dim() - 2)).to(z.dtype)
            return torch.where(on, torch.ones_like(z), w.expand_as(z)), zero
        return on.to(z.dtype), zero

    def g(self, name: str, z: torch.Tensor) -> torch.Tensor:
        if self.mode is None:
            return self.act(name, z)
        if self.mode == "record":
            self.order.append(name)
            self.slopes[name], self.offsets[name] = self.frozen(name, z)
            return self.act(name, z)
        h = z * self.slopes[name] + self.offsets[name]
        if name in self.inject:
            h = self.inject[name]
        if name in self.masks:
            h = h * self.masks[name]
        return h

    def pool(self, name: str, z: torch.Tensor, k: int = 2) -> torch.Tensor:
        if self.mode is None:
            return F.max_pool2d(z, k)
        if self.mode == "record":
            out, idx = F.max_pool2d(z, k, return_indices=True)
            self.indices[name] = idx
            return out
        idx = self.indices[name]
        return z.flatten(2).gather(2, idx.flatten(2)).view_as(idx)


class MLP(Gated):
    def __init__(self) -> None:
        super().__init__()
        self.f1, self.f2, self.f3 = nn.Linear(6, 12), nn.Linear(12, 10), nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f3(self.g("r2", self.f2(self.g("r1", self.f1(x)))))


class Activations(Gated):
    """LeakyReLU, PReLU (per-unit slopes, some negative) and ReLU6 (Clip; some units saturate)."""

    def __init__(self) -> None:
        super().__init__()
        self.f1, self.f2, self.f3, self.f4 = nn.Linear(6, 12), nn.Linear(12, 10), nn.Linear(10, 8), nn.Linear(8, 4)
        with torch.no_grad():
            self.f3.weight.mul_(4.0)  # pre-activations beyond 6: saturated ReLU6 units
            self.f3.bias.add_(6.0)
        self.pr = nn.PReLU(10)
        with torch.no_grad():
            self.pr.weight.copy_(torch.linspace(-0.3, 0.5, 10))
        self.kinds = {"r1": "leaky", "r2": self.pr, "r3": "relu6"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.g("r2", self.f2(self.g("r1", self.f1(x))))
        return self.f4(self.g("r3", self.f3(h)))


class CNN(Gated):
    """Conv-BN-ReLU-MaxPool twice, then a dense ReLU layer."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.f1, self.f2 = nn.Linear(6 * 2 * 2, 8), nn.Linear(8, 5)
        self.b1.running_mean.uniform_(-0.2, 0.2)
        self.b1.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool("p1", self.g("r1", self.b1(self.c1(x))))
        h = self.pool("p2", self.g("r2", self.c2(h)))
        return self.f2(self.g("r3", self.f1(h.flatten(1))))


class Residual(Gated):
    """A residual block with a strided 1×1 shortcut, joined by Add."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(2, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.sc = nn.Conv2d(4, 6, 1, stride=2)
        self.fc = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = self.g("r0", self.c0(x))
        h1 = self.g("r1", self.c1(h0))
        h = self.g("r2", self.c2(h1) + self.sc(h0))
        return self.fc(h.flatten(1))


class Branches(Gated):
    """Two parallel branches joined by Concat."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(1, 3, 3, padding=1)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.g("r0", self.c0(x))
        ha = self.g("ra", self.a(h))
        hb = self.g("rb", self.b(h))
        return self.fc(torch.cat([ha, hb], 1).flatten(1))


def oracle(model: Gated, x: np.ndarray, width: object, depth: int | None) -> dict[str, object]:
    """docs/design.md §4 written independently with autograd, in float64, one sample at a time."""
    m = model.double().eval()
    xt = torch.tensor(x, dtype=torch.float64)[None]
    m.mode, m.order, m.masks, m.inject = "record", [], {}, {}
    with torch.no_grad():
        logits = m(xt)[0]
    K = logits.numel()
    c = int(logits.argmax())
    layers = list(m.order)
    chosen = layers if depth is None else layers[len(layers) - depth:] if depth else []
    m.mode = "frozen"
    kept: dict[str, np.ndarray] = {}
    for name in reversed(chosen):
        with torch.no_grad():
            m.inject = {}
            # h of the layer at x (unmasked, frozen = recorded values)
            m.mode = "record"
            m.order = []
            captured: dict[str, torch.Tensor] = {}
            orig = m.g

            def cap(n: str, z: torch.Tensor, orig=orig, captured=captured) -> torch.Tensor:  # type: ignore[no-untyped-def]
                out = orig(n, z)
                captured[n] = out
                return out

            m.g = cap  # type: ignore[method-assign]
            m(xt)
            m.g = orig  # type: ignore[method-assign]
            m.mode = "frozen"
        h = captured[name].detach().clone().requires_grad_(True)
        m.inject = {name: h}
        out = m(xt)[0]
        J = torch.stack([torch.autograd.grad(out[k], h, retain_graph=True)[0].flatten() for k in range(K)])
        hv = h.detach().flatten()
        C = (hv[None, :] * J).double()  # (K, u)
        logp = C[c] - torch.logsumexp(C, dim=0)
        u = hv.numel()
        w = u if width is None else parse_width(width, u)  # type: ignore[arg-type]
        order = sorted(range(u), key=lambda i: (-float(logp[i]), i))[:w]
        keep = [i for i in order if float(logp[i]) > -math.log(K)] or order[:1]
        mask = torch.zeros(u, dtype=torch.float64)
        mask[keep] = 1.0
        m.masks[name] = mask.view_as(hv).view(h.shape)
        kept[name] = np.array(sorted(keep))
        m.inject = {}
    xg = xt.clone().requires_grad_(True)
    y = m(xg)[0, c]
    (W,) = torch.autograd.grad(y, xg)
    m.mode = None
    return {
        "target": c,
        "kept": [kept[n] for n in chosen],
        "weight": W[0].numpy(),
        "masked": float(y),
        "names": chosen,
    }


@pytest.fixture(scope="module", params=[MLP, Activations, CNN, Residual, Branches], ids=lambda c: c.__name__)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Gated, Explainer, np.ndarray]:
    torch.manual_seed(1)
    model = request.param().eval()
    shape = {"MLP": (6,), "Activations": (6,), "CNN": (2, 8, 8), "Residual": (2, 6, 6), "Branches": (1, 4, 4)}[request.param.__name__]
    path = tmp_path_factory.mktemp("pw") / f"{request.param.__name__}.onnx"
    export_torch(model, (torch.randn(1, *shape),), path)
    x = np.random.default_rng(3).normal(size=(3,) + shape).astype(np.float32)
    return model, Explainer(path, device="cpu"), x


@pytest.mark.parametrize("width,depth", [(None, None), (3, None), ("25%", None), (2, 1), (None, 0), ("10%", 2)])
def test_matches_independent_torch(case: tuple[Gated, Explainer, np.ndarray], width: object, depth: int | None) -> None:
    model, ex, x = case
    res = ex.explain(x, width=width, depth=depth)  # type: ignore[arg-type]
    for i in range(x.shape[0]):
        ref = oracle(model, x[i].astype(np.float64), width, depth)
        assert res.target[i] == ref["target"]
        assert [p.node for p in res.path[i]] and len(res.path[i]) == len(ref["names"]) or not ref["names"]
        for ours, theirs in zip(res.path[i], ref["kept"]):  # type: ignore[arg-type]
            np.testing.assert_array_equal(ours.kept, theirs)
        W = ref["weight"]
        scale = np.abs(W).max() + 1e-12
        np.testing.assert_allclose(res.weight[i], W, atol=1e-3 * scale, rtol=1e-3)
        np.testing.assert_allclose(res.attribution[i], W * x[i], atol=1e-3 * scale * np.abs(x[i]).max(), rtol=1e-3)
        assert abs(res.masked_score[i] - ref["masked"]) < 1e-3 * (abs(ref["masked"]) + 1)


def test_batch_equals_per_sample(case: tuple[Gated, Explainer, np.ndarray]) -> None:
    _, ex, x = case
    full = ex.explain(x, width=3)
    for i in range(x.shape[0]):
        one = ex.explain(x[i : i + 1], width=3)
        np.testing.assert_allclose(one.attribution[0], full.attribution[i], rtol=1e-5, atol=1e-6)
        assert [p.kept.tolist() for p in one.path[0]] == [p.kept.tolist() for p in full.path[i]]


def test_depth_zero_is_input_x_gradient(case: tuple[Gated, Explainer, np.ndarray]) -> None:
    _, ex, x = case
    e = ex.explain(x, depth=0)
    u = ex.unwrap(x)
    W = u.weight[np.arange(x.shape[0]), e.target]
    np.testing.assert_allclose(e.attribution, W * x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e.masked_score, e.score, rtol=1e-4, atol=1e-4)
    assert e.path[0] == []


def test_depth_beyond_layers_means_all(case: tuple[Gated, Explainer, np.ndarray]) -> None:
    _, ex, x = case
    a, b = ex.explain(x, width=2), ex.explain(x, width=2, depth=99)
    np.testing.assert_array_equal(a.attribution, b.attribution)


def test_decomposition_sums_to_attribution(case: tuple[Gated, Explainer, np.ndarray]) -> None:
    _, ex, x = case
    for group in ("unit", "channel"):
        d = ex.decompose(x, top=3, group=group, width="50%")
        e = ex.explain(x, width="50%")
        np.testing.assert_allclose(d.attribution, e.attribution, rtol=1e-5, atol=1e-6)
        total = d.parts.sum(axis=1) + d.rest + d.bypass
        np.testing.assert_allclose(total, d.attribution, rtol=1e-5, atol=1e-5)
        assert d.delta.max() < 1e-4 * (np.abs(d.attribution).max() + 1e-6)
        # ranked by contribution, descending
        assert np.all(np.diff(np.where(d.part_active, d.part_score, -1e300), axis=1) <= 1e-12)


def test_decomposition_at_every_layer_with_all_parts() -> None:
    """Parts over every unit of a layer that every path crosses add up to the attribution."""
    ex = Explainer(tiny_mlp(), device="cpu")
    x = np.array([[1.0, 2.0], [3.0, -1.0]], np.float32)
    d = ex.decompose(x, top=3)
    assert d.crosses_all
    np.testing.assert_allclose(d.parts.sum(axis=1) + d.rest, d.attribution, atol=1e-6)
    np.testing.assert_allclose(d.bypass, 0, atol=1e-6)


def test_hand_computed_tiny_mlp() -> None:
    """At x = (1, 2): h = (1, 2, 0), J rows e_k (+5 on the off unit), logits (1.5, 1.5).

    Target 0 (first argmax). Unit 0: C = (1, 0) → P = e/(e+1) > 1/2 kept; unit 1: C = (0, 2)
    → P < 1/2 cut; unit 2: h = 0 → P = 1/2, not > 1/2, cut. W_p = (1, 0), b_p = 0.5.
    """
    ex = Explainer(tiny_mlp(), device="cpu")
    e = ex.explain(np.array([1.0, 2.0], np.float32))
    assert e.target.tolist() == [0]
    assert e.path[0][0].kept.tolist() == [0]
    np.testing.assert_allclose(e.weight[0], [1.0, 0.0])
    np.testing.assert_allclose(e.bias[0], 0.5)
    np.testing.assert_allclose(e.masked_score[0], 1.5)
    e1 = ex.explain(np.array([1.0, 2.0], np.float32), target=1)
    assert e1.path[0][0].kept.tolist() == [1]
    np.testing.assert_allclose(e1.attribution[0], [0.0, 2.0])


def test_selection_rule_ties_and_fallback() -> None:
    h = np.array([[1.0, 1.0, 1.0, 0.0]])
    J = np.zeros((2, 1, 4))
    J[0, 0] = [1.0, 1.0, 1.0, 1.0]  # three equal candidates favour class 0
    m = select_units(h, J, np.array([0]), 2)
    assert m[0].tolist() == [True, True, False, False]  # ties → lower index
    # nobody favours class 1: keep the first candidate only
    m1 = select_units(h, J, np.array([1]), 4)
    assert m1.sum() == 1 and m1[0, 3]  # P = 1/2 for the off unit beats P < 1/2 of the others


@pytest.mark.parametrize("scale", [1e-7, 1e-4, 3e-3, 1e-1, 30.0, 300.0])
@pytest.mark.parametrize("K", [2, 10])
def test_unit_excess_matches_float64_logsumexp(scale: float, K: int) -> None:
    """The unit scores (log1p of the mean expm1, or log-sum-exp past exp's range: scale 300)
    against torch's float64 log-softmax: same candidates, e = log(K·P) to float64 round-off."""
    from onnx_pathwise.scores import unit_excess

    rng = np.random.default_rng(int(scale * 1e7) % 2**32 + K)
    n, u, c = 3, 4000, 1
    h = rng.standard_normal((n, u)).astype(np.float32)  # negative h: LeakyReLU-like gates
    h[:, ::5] = 0.0  # off units
    J = (rng.standard_normal((K, n, u)) * scale).astype(np.float32)
    J[:, :, ::7] *= 100  # a mix of spreads around the series limit
    J[:, :, 10:20] = 0.0  # cut above
    J[:, :, 30] = J[:, :, 31]  # exact ties between units
    h[:, 30] = h[:, 31]
    for i in range(n):
        C = torch.from_numpy(h[i].astype(np.float64)) * torch.from_numpy(J[:, i].astype(np.float64))
        ref = (torch.log_softmax(C, dim=0)[c] + math.log(K)).numpy()
        got, out = unit_excess(h[i], J[:, i], c)  # J[:, i] is a strided view
        expected = np.flatnonzero(ref > 0)
        # membership can differ only at round-off distance from P = 1/K
        assert np.all(np.abs(ref[np.setxor1d(got, expected)]) < 1e-15)
        assert got.size and np.all(np.diff(got) > 0)
        np.testing.assert_allclose(out, ref[got], rtol=1e-12, atol=1e-15)
        if 30 in got and 31 in got:
            assert out[np.searchsorted(got, 30)] == out[np.searchsorted(got, 31)]


def test_a_single_scores_implicit_zero_row_gives_the_bits_of_the_full_rows() -> None:
    """A single score's selection scores [0, J] without building the zero row over every unit
    (zero_row): the same candidates and the same bits of every score as the two full rows, both
    sides as target, float32 and float64, signed zeros, off units and scores past exp's range;
    select_units keeps the same units, with and without a width, and with counts."""
    from onnx_pathwise.scores import unit_excess

    rng = np.random.default_rng(21)
    n, u = 3, 2999
    for dtype in (np.float32, np.float64):
        h = rng.standard_normal((n, u)).astype(dtype)
        h[:, ::5] = 0.0
        h[:, 1::7] = -0.0
        J = (rng.standard_normal((1, n, u)) * np.where(rng.random((1, 1, u)) < 0.05, 1e3, 1.0)).astype(dtype)
        J[:, :, 10:20] = 0.0
        J[:, :, 20:25] = -0.0
        full = np.concatenate([np.zeros((1, n, u), dtype), J])
        for i in range(n):
            for c in (0, 1):
                ia, ea = unit_excess(h[i], full[:, i], c)
                ib, eb = unit_excess(h[i], J[:, i], c, zero_row=True)
                assert ia.size > 100
                assert np.array_equal(ia, ib)
                assert np.array_equal(ea.view(np.uint64), eb.view(np.uint64))
        target = np.array([0, 1, 1])
        for width, counts in ((10**9, None), (7, None), (3, np.array([2, 2, 2]))):
            want = select_units(h, full, target, width, counts)
            assert np.array_equal(select_units(h, J, target, width, counts, zero_row=True), want)
        # nobody favours the target: the first candidate of the full order, in both forms
        off = np.zeros_like(h)
        assert np.array_equal(select_units(off, J, target, 5, zero_row=True), select_units(off, full, target, 5))


def test_unit_scores_are_the_same_bits_in_both_tiers(monkeypatch: pytest.MonkeyPatch) -> None:
    """unit_excess's necessary test and centred scores in numpy and compiled (onnx_pathwise.tiers):
    the same candidates and the same bits of every score, float32 and float64, strided views,
    off units, signed zeros, cut units, ties and scores past exp's range; the numpy form's row
    sum has the bits of numpy's float64 reduction (but for the sign of a zero sum)."""
    from onnx_pathwise import scores

    rng = np.random.default_rng(17)
    n, u = 2, 3001
    for dtype in (np.float32, np.float64):
        for K, scale in ((2, 1e-3), (10, 1.0), (10, 300.0), (37, 1e-7)):
            h = rng.standard_normal((n, u)).astype(dtype)
            h[:, ::5] = 0.0
            h[:, 1::7] = -0.0
            J = (rng.standard_normal((K, n, u)) * scale).astype(dtype)
            J[:, :, ::9] *= 100
            J[:, :, 10:20] = 0.0
            J[:, :, 20:25] = -0.0
            for i in range(n):
                Ji = J[:, i]  # a strided view
                s, ref = scores._row_sum(Ji), np.add.reduce(Ji, axis=0, dtype=np.float64)
                nonzero = ref != 0  # numpy's reduction starts from +0: -0 + -0 comes out +0
                assert np.array_equal(s, ref) and np.array_equal(s[nonzero].view(np.uint64),
                                                                 ref[nonzero].view(np.uint64))
                got = {}
                for tier in ("numpy", "compiled"):
                    monkeypatch.setenv("ONNX_PATHWISE_KERNELS", tier)
                    assert (tiers.compiled() is None) == (tier == "numpy")
                    got[tier] = scores.unit_excess(h[i], Ji, 1)
                (ia, ea), (ib, eb) = got["numpy"], got["compiled"]
                assert ia.size > 50
                assert np.array_equal(ia, ib)
                assert np.array_equal(ea.view(np.uint64), eb.view(np.uint64))


def test_unit_excess_resolves_p_near_one_over_k() -> None:
    """Units whose P sits within 1e-12 of 1/K: the excess e = log(K·P) comes out to ~1e-19
    (checked against a long-double evaluation), far below log-sum-exp's ~4e-16 round-off of
    log Σ − log K, so the order of near-indifferent units is their true order."""
    from onnx_pathwise.scores import unit_excess

    rng = np.random.default_rng(3)
    K, u = 1000, 3000
    h = rng.uniform(0.5, 2.0, u).astype(np.float32)
    J = (rng.standard_normal((K, u)) * 1e-13).astype(np.float32)
    got, e = unit_excess(h, J, 7)
    C = h[got].astype(np.longdouble) * J[:, got].astype(np.longdouble)
    d = C - C.mean(axis=0)
    ref = d[7] - np.log1p(np.expm1(d).mean(axis=0))
    assert got.size > 100 and float(np.abs(e).max()) < 1e-11
    assert float(np.abs(e - ref).max()) < 1e-18


def test_in_parallel_runs_nested_tasks_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    """tiers.in_parallel keeps results in order, and a task that calls it again runs its own
    tasks in turn: with one pool thread a nested call that waited on the pool would hang."""
    import threading

    monkeypatch.setattr(tiers, "workers", lambda: 2)
    threads: set[str] = set()

    def inner(i: int) -> int:
        threads.add(threading.current_thread().name)
        return i * i

    def outer(k: int) -> list[int]:
        return tiers.in_parallel([lambda i=i: inner(10 * k + i) for i in range(3)])

    done: list[list[list[int]]] = []
    worker = threading.Thread(target=lambda: done.append(tiers.in_parallel([lambda k=k: outer(k) for k in range(4)])),
                              daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "nested in_parallel hung"
    assert done == [[[(10 * k + i) ** 2 for i in range(3)] for k in range(4)]]
    assert any(name.startswith("onnx-pathwise") for name in threads)  # the pool did take part


def test_unit_scores_split_across_threads_are_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large layers are scored in chunks on several threads: same candidates, same scores."""
    from onnx_pathwise import selection

    rng = np.random.default_rng(11)
    K, u = 10, 7001
    h = np.maximum(rng.standard_normal(u), 0).astype(np.float32)
    J = (rng.standard_normal((K, u)) * 1e-3).astype(np.float32)
    whole = selection._candidates(h, J, 4)
    before = select_units(h[None], J[:, None], np.array([4]), 50)
    monkeypatch.setattr(selection, "PARALLEL_UNITS", 1000)
    monkeypatch.setattr(tiers, "workers", lambda: 3)
    split = selection._candidates(h, J, 4)
    assert whole[0].size > 100
    np.testing.assert_array_equal(split[0], whole[0])
    np.testing.assert_array_equal(split[1], whole[1])
    np.testing.assert_array_equal(select_units(h[None], J[:, None], np.array([4]), 50), before)


def test_width_parsing() -> None:
    assert parse_width("5%", 100) == 5
    assert parse_width("0.1%", 100) == 1  # max(1, round(0.1))
    assert parse_width("2.5%", 100) == 2  # Python's round: banker's rounding of 2.5
    assert parse_width("3.5%", 100) == 4
    assert parse_width(500, 10) == 10
    assert parse_width(None, 7) == 7
    for bad in ("x", "0%", "150%", 0, -1, 1.5):
        with pytest.raises(PathwiseError):
            parse_width(bad, 10)  # type: ignore[arg-type]


def test_targets_per_sample_and_permutation() -> None:
    ex = Explainer(tiny_mlp(), device="cpu")
    x = np.array([[1.0, 2.0], [3.0, -1.0]], np.float32)
    e = ex.explain(x, target=[1, 0])
    assert e.target.tolist() == [1, 0]
    a = ex.explain(x[::-1].copy(), target=[0, 1])
    np.testing.assert_allclose(a.attribution[::-1], e.attribution)


def test_large_batches_are_chunked_with_the_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnx_pathwise import sweep as sweep_mod

    ex = Explainer(tiny_mlp(), device="cpu")
    x = np.random.default_rng(0).normal(size=(7, 2)).astype(np.float32)
    whole_e, whole_u = ex.explain(x, target=[0, 1, 0, 1, 0, 1, 0]), ex.unwrap(x)
    monkeypatch.setattr(sweep_mod, "MAX_SWEEP_ELEMENTS", 20)  # a few samples per sweep
    e, u = ex.explain(x, target=[0, 1, 0, 1, 0, 1, 0]), ex.unwrap(x)
    np.testing.assert_array_equal(e.attribution, whole_e.attribution)
    np.testing.assert_array_equal(e.target, whole_e.target)
    assert [[p.kept.tolist() for p in s] for s in e.path] == [[p.kept.tolist() for p in s] for s in whole_e.path]
    np.testing.assert_array_equal(u.weight, whole_u.weight)
    np.testing.assert_array_equal(u.delta, whole_u.delta)


def test_kept_units_are_the_same_bits_in_both_tiers(monkeypatch: pytest.MonkeyPatch) -> None:
    """keep_units in numpy and as the compiled loop (onnx_pathwise.tiers): the kept entries
    times their slopes, +0 elsewhere (not -0, not NaN, whatever the cut unit's cotangent: a
    multiply by the mask would give both), bit for bit; batch and single sample."""
    from onnx_pathwise.selection import keep_units

    rng = np.random.default_rng(8)
    for n in (1, 3):
        g = rng.standard_normal((7, n, 500)).astype(np.float32)
        mask = rng.random((n, 500)) < 0.2
        g[:, ~mask] *= -1.0  # negative cotangents on cut units: -0 from a multiply
        cut = np.flatnonzero(~mask[0])
        g[0, 0, cut[:2]] = [np.inf, np.nan]
        slope = rng.random((n, 500)).astype(np.float32)
        got = {}
        for tier in ("numpy", "compiled"):
            monkeypatch.setenv("ONNX_PATHWISE_KERNELS", tier)
            got[tier] = (keep_units(g, mask, slope), keep_units(g, mask))
        for a, b in zip(got["numpy"], got["compiled"]):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
        want = np.where(mask, g * slope, np.float32(0.0)), np.where(mask, g, np.float32(0.0))
        for a, w in zip(got["numpy"], want):
            assert np.array_equal(a.view(np.uint32), w.view(np.uint32))
