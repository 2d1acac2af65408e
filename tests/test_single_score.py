"""A single score (K = 1, docs/design.md §4): a binary classifier ending in one logit y (Sigmoid
peeled) competes with an implicit class 0 whose logit is 0. Kept units, W_p and the masked
score are checked against a float64 re-implementation of the rule written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_model, vi
from onnx import helper, numpy_helper

from onnx_pathwise import Explainer, PathwiseError
from onnx_pathwise.pathwise import parse_width

RNG = np.random.default_rng(3)
W1 = RNG.normal(size=(9, 4)) / 2
B1 = RNG.normal(size=9) / 4
W2 = RNG.normal(size=(7, 9)) / 3
B2 = RNG.normal(size=7) / 4
W3 = RNG.normal(size=(1, 7)) / 2
B3 = np.array([0.05])


def sigmoid_mlp(path: Path) -> Path:
    """x (4,) → Gemm 9 → Relu → Gemm 7 → Relu → Gemm 1 → Sigmoid."""
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), n)
             for a, n in ((W1, "w1"), (B1, "b1"), (W2, "w2"), (B2, "b2"), (W3, "w3"), (B3, "b3"))]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["z1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["z1"], ["h1"], name="relu1"),
        helper.make_node("Gemm", ["h1", "w2", "b2"], ["z2"], transB=1, name="fc2"),
        helper.make_node("Relu", ["z2"], ["h2"], name="relu2"),
        helper.make_node("Gemm", ["h2", "w3", "b3"], ["y"], transB=1, name="fc3"),
        helper.make_node("Sigmoid", ["y"], ["p"], name="prob"),
    ]
    onnx.save(make_model(nodes, inits, name="binary", inputs=[vi("x", ["N", 4])], outputs=[vi("p", ["N", 1])],
                         ir_version=8), str(path))
    return path


@pytest.fixture(scope="module")
def ex(tmp_path_factory: pytest.TempPathFactory) -> Explainer:
    return Explainer(sigmoid_mlp(tmp_path_factory.mktemp("binary") / "binary.onnx"), device="cpu")


def select(h: np.ndarray, J: np.ndarray, side: int, width: int) -> np.ndarray:
    """The rule over the two logits [0, y]: P_i = σ(C_i) for class 1, σ(−C_i) for class 0,
    C_i = h_i·∂y/∂h_i; candidates by P descending (ties to the lower index), the first
    ``width`` with P > 1/2, else the first candidate."""
    C = h * J
    P = 1.0 / (1.0 + np.exp(-(C if side == 1 else -C)))
    order = np.argsort(-P, kind="stable")
    keep = [i for i in order[:width] if P[i] > 0.5]
    mask = np.zeros(h.size, bool)
    mask[keep if keep else [order[0]]] = True
    return mask


def oracle(x: np.ndarray, side: int, width: object) -> tuple[list[np.ndarray], np.ndarray, float]:
    """(kept masks [relu1, relu2], W_p, masked score) in float64 for one sample."""
    x = x.astype(np.float64)
    z1 = W1 @ x + B1
    s1 = (z1 > 0).astype(float)
    h1 = z1 * s1
    z2 = W2 @ h1 + B2
    s2 = (z2 > 0).astype(float)
    h2 = z2 * s2
    m2 = select(h2, W3[0], side, parse_width(width, 7))  # type: ignore[arg-type]
    J1 = W2.T @ (m2 * s2 * W3[0])
    m1 = select(h1, J1, side, parse_width(width, 9))  # type: ignore[arg-type]

    def masked_y(v: np.ndarray) -> float:  # frozen gates, units outside the path cut
        a = (W1 @ v + B1) * s1 * m1
        b = (W2 @ a + B2) * s2 * m2
        return float(W3[0] @ b + B3[0])

    sign = 1.0 if side == 1 else -1.0
    y0 = masked_y(x)
    W = np.array([masked_y(x + e) - y0 for e in np.eye(4)])  # exact: the masked network is affine
    return [m1, m2], sign * W, sign * y0


def inputs_both_sides(ex: Explainer) -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32) * 2
    y = ex.record(x).scores[:, 0]
    pos, neg = x[y >= 0][:3], x[y < 0][:3]
    assert len(pos) == 3 and len(neg) == 3
    return np.concatenate([pos, neg])


def test_the_model_has_one_score(ex: Explainer) -> None:
    assert ex.num_classes == 1
    assert "Sigmoid" in ex.ir.peeled


@pytest.mark.parametrize("width", [1, "50%", None])
def test_kept_units_and_weights_equal_the_rule(ex: Explainer, width: object) -> None:
    x = inputs_both_sides(ex)
    y = ex.record(x).scores[:, 0].astype(np.float64)
    for target in (None, 0, 1):
        e = ex.explain(x, target=target, width=width)  # type: ignore[arg-type]
        sides = (y >= 0).astype(int) if target is None else np.full(len(x), target)
        assert e.target.tolist() == sides.tolist()
        np.testing.assert_allclose(e.score, np.where(sides == 1, y, -y), rtol=1e-6)
        for i in range(len(x)):
            masks, W, masked = oracle(x[i], int(sides[i]), width)
            assert [p.kept.tolist() for p in e.path[i]] == [np.flatnonzero(m).tolist() for m in masks]
            np.testing.assert_allclose(e.weight[i], W, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(e.attribution[i], W * x[i], rtol=1e-4, atol=1e-5)
            assert abs(e.masked_score[i] - masked) < 1e-4 * max(1.0, abs(masked))


def test_not_one_unit_per_layer(ex: Explainer) -> None:
    """The old silent behaviour (a softmax over one class is always 1) kept one unit."""
    e = ex.explain(inputs_both_sides(ex))
    assert max(p.count for path in e.path for p in path) > 1


def test_class_chunks_and_baselines_follow_the_side(ex: Explainer, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnx_pathwise import sweep as explainer

    x = inputs_both_sides(ex)
    ref = ex.explain(x, width="50%")
    monkeypatch.setattr(explainer, "CLASS_CHUNK_ROWS", 1)
    got = ex.explain(x, width="50%")
    for a, b in zip(got.path, ref.path):
        assert [p.kept.tolist() for p in a] == [p.kept.tolist() for p in b]
    np.testing.assert_allclose(got.attribution, ref.attribution, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(explainer, "CLASS_CHUNK_ROWS", None)
    g1 = ex.attribute(x, "gradient", target=1).attribution
    g0 = ex.attribute(x, "gradient", target=0).attribution
    np.testing.assert_allclose(g0, -g1)
    auto = ex.attribute(x, "gradient")
    assert auto.target.tolist() == ref.target.tolist()
    depth0 = ex.explain(x, depth=0)  # Input×Gradient of the side's log-odds
    np.testing.assert_allclose(depth0.attribution, ex.attribute(x, "input_x_gradient").attribution, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(ex.attribute(x, "unwrap").attribution, depth0.attribution, rtol=1e-5, atol=1e-6)


def test_targets_are_the_two_sides(ex: Explainer) -> None:
    with pytest.raises(PathwiseError, match="0 or 1"):
        ex.explain(np.zeros(4, np.float32), target=2)


def test_a_scikit_learn_binary_classifier_peels_to_its_one_logit(tmp_path: Path) -> None:
    """skl2onnx writes a binary MLPClassifier's head as Concat(1 − σ(z), σ(z)): it is peeled to
    the one logit z, which equals log(p / (1 − p)) of scikit-learn's own probabilities; the
    single-score rule explains the predicted side, exactly (W x + b = ±z)."""
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] - 0.5 * X[:, 2] > 0).astype(int)
    clf = MLPClassifier((8, 6), max_iter=500, random_state=0).fit(X, y)
    path = tmp_path / "binary.onnx"
    onnx.save(skl2onnx.to_onnx(clf, X[:1], options={"zipmap": False}), path)
    ex = Explainer(path, device="cpu")
    assert ex.num_classes == 1 and "Sigmoid" in ex.ir.peeled and "Concat(1 - p, p)" in ex.ir.peeled
    x = X[:16]
    h = x.astype(np.float64)
    for W, b in zip(clf.coefs_[:-1], clf.intercepts_[:-1]):
        h = np.maximum(h @ W + b, 0)
    z = (h @ clf.coefs_[-1] + clf.intercepts_[-1])[:, 0]  # the logit, from scikit-learn's weights
    np.testing.assert_allclose(1 / (1 + np.exp(-z)), clf.predict_proba(x)[:, 1], rtol=1e-6)
    u = ex.unwrap(x)
    np.testing.assert_allclose(u.output[:, 0], z, rtol=1e-5, atol=1e-5)
    assert float(u.delta.max()) < 1e-4
    e = ex.explain(x)
    np.testing.assert_array_equal(e.target, clf.predict(x))  # the predicted side
    side = np.where(e.target == 1, 1.0, -1.0)
    np.testing.assert_allclose(e.score, side * u.output[:, 0], rtol=1e-6)
    full = ex.explain(x, width=None, depth=0)  # depth 0: Input×Gradient of ±z
    np.testing.assert_allclose(full.attribution, side[:, None] * u.weight[:, 0] * x, rtol=1e-5, atol=1e-6)


def test_inspect_says_one_score(ex: Explainer) -> None:
    from onnx_pathwise.render import _describe_text, describe

    text = _describe_text(describe(ex, "m.onnx"))
    assert "1 score per sample (a single logit: classes 0 and 1 are its two sides)" in text
