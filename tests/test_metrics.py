"""Insertion/deletion AUC against a hand computation and a straightforward loop over
onnxruntime, the Gaussian blur against a direct 2-D convolution, and evaluate()."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort  # noqa: TID251 — the independent reference runs the model directly
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch_nets import cnn, export

from onnx_pathwise import Explainer, PathwiseError
from onnx_pathwise import metrics as M
from onnx_pathwise.samples import tiny_cnn, tiny_mlp


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def linear_model() -> onnx.ModelProto:
    """logits = (x·w, 0) with w = (1, 2, 3, 4): P(class 0) = sigmoid(x·w)."""
    w = np.array([[1, 2, 3, 4], [0, 0, 0, 0]], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["logits"], transB=1, name="fc")], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(2, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_auc_by_hand_on_tabular_model():
    ex = Explainer(linear_model(), device="cpu")
    x = np.ones((1, 4), np.float32)
    a = np.array([[0.1, 0.4, 0.3, 0.2]])  # order: features 1, 2, 3, 0 (weights 2, 3, 4, 1)
    # Deletion from x·w = 10: remove 2, 3, 4, 1 → logits 10, 8, 5, 1, 0.
    d = M.deletion(ex, x, a, target=0, step=1)
    assert d.changed.tolist() == [0, 1, 2, 3, 4] and d.order.tolist() == [[1, 2, 3, 0]]
    s = [sigmoid(v) for v in (10, 8, 5, 1, 0)]
    np.testing.assert_allclose(d.scores[0], s, rtol=1e-6)
    np.testing.assert_allclose(d.auc, [(s[0] / 2 + s[1] + s[2] + s[3] + s[4] / 2) / 4], rtol=1e-6)
    # Insertion from zeros (tabular substrate): logits 0, 2, 5, 9, 10; step 3 → points 0, 3, 4.
    i = M.insertion(ex, x, a, target=0, step=3)
    assert i.changed.tolist() == [0, 3, 4]
    s = [sigmoid(v) for v in (0, 9, 10)]
    np.testing.assert_allclose(i.auc, [(s[0] / 2 + s[1] + s[2] / 2) / 2], rtol=1e-6)
    # Ties go to the lower index: all-equal attributions rank features 0, 1, 2, 3.
    assert M.deletion(ex, x, np.zeros((1, 4)), target=0).order.tolist() == [[0, 1, 2, 3]]


def test_gaussian_blur_matches_conv2d():
    k = M.gaussian_kernel(11, 5.0)
    assert k.shape == (11,) and np.isclose(k.sum(), 1.0) and np.allclose(k, k[::-1])
    np.testing.assert_allclose(k[4] / k[5], math.exp(-1 / 50))
    x = np.random.default_rng(0).normal(size=(2, 3, 9, 13))
    k2 = torch.tensor(np.outer(k, k)).expand(3, 1, 11, 11)
    ref = torch.nn.functional.conv2d(torch.tensor(x), k2, padding=5, groups=3).numpy()
    np.testing.assert_allclose(M.gaussian_blur(x), ref, rtol=1e-10, atol=1e-12)
    # Channels last: the same blur with the channel axis moved.
    moved = M.gaussian_blur(np.moveaxis(x, 1, -1), channel_axis=-1)
    np.testing.assert_allclose(np.moveaxis(moved, -1, 1), ref, rtol=1e-10, atol=1e-12)


def reference_curve(proto: onnx.ModelProto, x: np.ndarray, attribution: np.ndarray, target: int, step: int,
                    kind: str, probs: bool) -> list[float]:
    """One sample, one pixel at a time, scored by onnxruntime directly."""
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])

    def score(img: np.ndarray) -> float:
        out = sess.run(None, {"x": img[None].astype(np.float32)})[0][0].astype(np.float64)
        if probs:
            return float(out[target])
        e = np.exp(out - out.max())
        return float(e[target] / e.sum())

    C, H, W = x.shape
    sal = attribution.sum(axis=0).ravel()
    order = sorted(range(H * W), key=lambda p: (-sal[p], p))
    if kind == "insertion":
        blur = torch.nn.functional.conv2d(
            torch.tensor(x[:, None], dtype=torch.float64),
            torch.tensor(np.outer(M.gaussian_kernel(), M.gaussian_kernel()))[None, None], padding=5,
        )[:, 0].numpy()
        img, source = blur.astype(np.float32), x
    else:
        img, source = x.copy(), np.zeros_like(x)
    scores = [score(img)]
    for count, p in enumerate(order, 1):
        r, c = divmod(p, W)
        img[:, r, c] = source[:, r, c]
        if count % step == 0 or count == len(order):
            scores.append(score(img))
    return scores


@pytest.mark.parametrize("model", ["tiny_cnn", "torch_cnn"])
@pytest.mark.parametrize("step", [1, 5])
def test_curves_match_loop_over_onnxruntime(model, step):
    rng = np.random.default_rng(3)
    if model == "tiny_cnn":
        proto, x = tiny_cnn(), rng.normal(size=(2, 1, 4, 4)).astype(np.float32)
    else:
        x = rng.normal(size=(2, 2, 8, 8)).astype(np.float32)
        proto = export(cnn(), torch.from_numpy(x))
    ex = Explainer(proto, device="cpu")
    # Integer-valued attributions, so ties occur and the tie rule is exercised.
    attribution = rng.integers(-2, 3, size=x.shape).astype(np.float32)
    target = np.array([0, 1])
    for kind in ("insertion", "deletion"):
        curve = getattr(M, kind)(ex, x, attribution, target=target, step=step)
        P = x.shape[2] * x.shape[3]
        assert curve.scores.shape == (2, math.ceil(P / step) + 1)
        for i in range(2):
            ref = reference_curve(proto, x[i], attribution[i], int(target[i]), step, kind, model == "tiny_cnn")
            np.testing.assert_allclose(curve.scores[i], ref, rtol=1e-5, atol=1e-7)
            n = len(ref)
            np.testing.assert_allclose(curve.auc[i], (sum(ref) - ref[0] / 2 - ref[-1] / 2) / (n - 1), rtol=1e-5)


def test_curves_run_plain_forward_passes(monkeypatch):
    """A curve's points need the scores only: no gate state is built for them (ResNet-18 at
    224²: the records' gate states were a third of `evaluate`'s time)."""
    ex = Explainer(tiny_cnn(), device="cpu")
    x = np.random.default_rng(5).normal(size=(2, 1, 4, 4)).astype(np.float32)
    attribution = np.random.default_rng(6).normal(size=x.shape)

    def no_record(*args, **kwargs):
        raise AssertionError("a curve recorded the gates")

    monkeypatch.setattr("onnx_pathwise.sweep.record_rows", no_record)
    for kind in ("insertion", "deletion"):
        assert np.isfinite(getattr(M, kind)(ex, x, attribution, step=3).auc).all()


def test_other_metrics_and_evaluate():
    ex = Explainer(tiny_mlp(), device="cpu")
    x = np.array([[1.0, 2.0], [3.0, -1.0], [12.0, 0.5]], np.float32)
    assert np.all(M.completeness_delta(ex, x) < 1e-5)
    e = ex.explain(x, width=1)
    np.testing.assert_allclose(M.path_faithfulness(ex, x, width=1), e.masked_score / e.score)
    np.testing.assert_allclose(M.sparsity(ex, x, width=1), e.sparsity)
    np.testing.assert_allclose(M.certified_radius(ex, x).l2, ex.certified_radius(x).l2)
    report = M.evaluate(
        ex, x, ["gradient", ("integrated_gradients", {"exact": True}), "unwrap", "pathwise"],
        widths=[1, "100%"], depths=[None], step=1,
    )
    json.dumps(report)  # JSON-ready
    assert set(report["methods"]) == {
        "gradient", "integrated_gradients(exact=True)", "unwrap",
        "pathwise(width=1, depth=all)", "pathwise(width=100%, depth=all)",
    }
    ig = report["methods"]["integrated_gradients(exact=True)"]["metrics"]
    assert ig["completeness_delta"]["mean"] < 1e-5
    assert report["methods"]["unwrap"]["metrics"]["completeness_delta"]["mean"] < 1e-5
    pw = report["methods"]["pathwise(width=1, depth=all)"]["metrics"]
    assert set(pw) == {"masked_score", "faithfulness", "sparsity", "insertion_auc", "deletion_auc"}
    auc = report["methods"]["gradient"]["metrics"]["deletion_auc"]
    grad = ex.attribute(x, "gradient").attribution
    np.testing.assert_allclose(auc["values"], M.deletion(ex, x, grad, step=1).auc)
    assert np.isclose(auc["mean"], np.mean(auc["values"])) and np.isclose(auc["std"], np.std(auc["values"]))
    assert set(report["samples"]) >= {"score", "probability", "certified_radius_l2", "certified_radius_linf"}
    with pytest.raises(PathwiseError, match="unknown attribution method"):
        M.evaluate(ex, x, ["lime"])
