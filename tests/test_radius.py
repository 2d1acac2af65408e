"""Certified radius: hand-computed max-pool margins, chunked tangents, opt-in for large inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_pathwise import Explainer, InputError
from onnx_pathwise import sweep as sweep_mod
from onnx_pathwise.samples import tiny_cnn


def _pool_only() -> onnx.ModelProto:
    """x (1×2×4) → MaxPool 2×2 stride 2 → Flatten → Gemm(identity): no gates at all."""
    nodes = [
        helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_max_pool_margin_sets_the_radius() -> None:
    """Windows [[1, 5], [2, 3]] and [[7, 0], [6.5, 4]]: the tightest margin is 7 − 6.5 = 0.5
    between two input elements, whose gradient difference e_i − e_j has L2 norm √2 and L1
    norm 2: radii 0.5/√2 (L2) and 0.5/2 (L∞)."""
    x = np.array([[[[1, 5, 7, 0], [2, 3, 6.5, 4]]]], np.float32)
    r = Explainer(_pool_only(), device="cpu").certified_radius(x)
    np.testing.assert_allclose(r.l2, [0.5 / np.sqrt(2)], rtol=1e-6)
    np.testing.assert_allclose(r.linf, [0.25], rtol=1e-6)
    assert "window 1" in r.l2_unit[0]


def test_chunked_tangents_give_the_same_radius(monkeypatch: pytest.MonkeyPatch) -> None:
    ex = Explainer(tiny_cnn(), device="cpu")
    x = np.random.default_rng(0).normal(size=(3, 1, 4, 4)).astype(np.float32)
    whole = ex.certified_radius(x)
    monkeypatch.setattr(sweep_mod, "MAX_SWEEP_ELEMENTS", 50)  # one input element per chunk
    chunked = ex.certified_radius(x)
    np.testing.assert_allclose(chunked.l2, whole.l2, rtol=1e-6)
    np.testing.assert_allclose(chunked.linf, whole.linf, rtol=1e-6)
    assert chunked.l2_unit == whole.l2_unit


def test_radius_keeps_the_activation_pattern_inside_and_not_beyond() -> None:
    ex = Explainer(tiny_cnn(), device="cpu")
    x = np.random.default_rng(1).normal(size=(1, 1, 4, 4)).astype(np.float32)
    r = ex.certified_radius(x)
    base = ex.record(x)
    rng = np.random.default_rng(2)
    for _ in range(20):
        d = rng.normal(size=x.shape)
        d *= 0.99 * r.l2[0] / np.linalg.norm(d)
        rec = ex.record((x + d).astype(np.float32))
        for name, st in base.states.items():
            got = rec.states[name]
            if hasattr(st, "slope"):
                np.testing.assert_array_equal(got.slope, st.slope)
            else:
                np.testing.assert_array_equal(got.argmax, st.argmax)


def test_large_inputs_must_opt_in() -> None:
    ex = Explainer(tiny_cnn(), device="cpu")
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(InputError, match="max_input_size"):
        ex.certified_radius(x, max_input_size=8)
    assert np.isfinite(ex.certified_radius(x + 0.1, max_input_size=16).l2).all()


# --------------------------------------------------------------------------- memory budget


def _wide_cnn() -> onnx.ModelProto:
    """x (1×16×16) → Conv 32 3×3 pad 1 → Relu → MaxPool 2 → Flatten → Gemm 3: each input
    tangent carries ~20k elements per sample, so 256 of them do not fit 64 MiB at once."""
    rng = np.random.default_rng(0)
    inits = {"w": rng.normal(size=(32, 1, 3, 3)).astype(np.float32), "b": rng.normal(size=32).astype(np.float32),
             "v": (rng.normal(size=(3, 32 * 8 * 8)) * 0.05).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "v"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_radius_chunks_follow_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnx_pathwise import limits

    ex = Explainer(_wide_cnn(), device="cpu")
    x = np.random.default_rng(3).normal(size=(2, 1, 16, 16)).astype(np.float32)
    chunks: list[int] = []
    real = ex.engine.tangent_env

    def spy(t: np.ndarray, rec: object) -> dict[str, np.ndarray]:
        chunks.append(t.shape[0])
        return real(t, rec)  # type: ignore[arg-type]

    monkeypatch.setattr(ex.engine, "tangent_env", spy)
    monkeypatch.setattr(sweep_mod, "MAX_SWEEP_ELEMENTS", 1 << 30)  # the budget alone sets the chunks
    try:
        limits.set_memory_budget("4G")
        whole = ex.certified_radius(x)
        assert chunks == [256]  # one chunk when everything fits
        chunks.clear()
        limits.set_memory_budget("64M")
        small = ex.certified_radius(x)
    finally:
        limits.set_memory_budget(None)
    assert len(chunks) >= 3 and sum(chunks) == 256, chunks
    np.testing.assert_allclose(small.l2, whole.l2, rtol=1e-6)
    np.testing.assert_allclose(small.linf, whole.linf, rtol=1e-6)
    assert small.l2_unit == whole.l2_unit and small.linf_unit == whole.linf_unit


def test_radius_refuses_with_the_estimate_when_one_tangent_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    from onnx_pathwise import limits

    ex = Explainer(_wide_cnn(), device="cpu")
    x = np.zeros((1, 1, 16, 16), np.float32)
    monkeypatch.setattr(limits, "memory_budget", lambda: 100_000)  # below the public minimum: internal only
    with pytest.raises(limits.BudgetError, match="certified radius"):
        ex.certified_radius(x)


# --------------------------------------------------------------------------- onnxruntime failures


class _Silent:
    """A session whose run fails with an exception that carries no message."""

    def __init__(self, message: str = "") -> None:
        self.message = message

    def run(self, *args: object, **kwargs: object) -> object:
        raise RuntimeError(self.message)


@pytest.mark.parametrize("message", ["", "   \n\t "])
def test_an_empty_onnxruntime_message_still_gives_a_cause(monkeypatch: pytest.MonkeyPatch, message: str) -> None:
    from onnx_pathwise import ModelError, runtime

    ex = Explainer(tiny_cnn(), device="cpu")
    x = np.zeros((1, 1, 4, 4), np.float32)
    rec = ex.sweep.recorder_for()
    monkeypatch.setattr(rec, "_session", _Silent(message))
    with pytest.raises(ModelError) as info:
        ex.record(x)
    text = str(info.value)
    assert text == "onnxruntime failed running the forward record (input shape (1, 1, 4, 4)): " \
                   "RuntimeError without a message"
    assert "\n" not in text

    # the conv adjoint kernel of the backward sweep
    kernels = runtime.OpKernels("cpu")
    w = np.ones((2, 1, 3, 3), np.float32)
    kernels.conv_adjoint(np.ones((1, 2, 2, 2), np.float32), w, (4, 4), [1, 1], [1, 1], [0, 0, 0, 0], 1)
    for key, (weights, _) in list(kernels._cache.items()):
        kernels._cache[key] = (weights, _Silent(message))  # type: ignore[assignment]
    with pytest.raises(ModelError, match=r"^onnxruntime failed running the conv adjoint kernel \(input "
                                         r"\(1, 2, 2, 2\), weights \(2, 1, 3, 3\)\) in its ConvTranspose op: "
                                         r"RuntimeError without a message$"):
        kernels.conv_adjoint(np.ones((1, 2, 2, 2), np.float32), w, (4, 4), [1, 1], [1, 1], [0, 0, 0, 0], 1)

    # creating a session, and the analysis run of the loader
    def fail(*args: object, **kwargs: object) -> object:
        raise RuntimeError(message)

    monkeypatch.setattr(runtime.ort, "InferenceSession", fail)
    with pytest.raises(ModelError, match="^model: onnxruntime failed creating the session for the analysis run: "
                                         "RuntimeError without a message$"):
        Explainer(tiny_cnn(), device="cpu")
    with pytest.raises(ModelError, match="^onnxruntime failed creating a session for the model: "
                                         "RuntimeError without a message$"):
        runtime.session(tiny_cnn())


def test_onnxruntime_messages_keep_their_first_line() -> None:
    from onnx_pathwise import runtime

    err = runtime.failure(RuntimeError("\n  [ONNXRuntimeError] : 6 : boom\nmore detail\n"), "running the record",
                          node="conv1", op="Conv")
    assert str(err) == "onnxruntime failed running the record at node 'conv1' (Conv): [ONNXRuntimeError] : 6 : boom"


def test_the_cli_prints_one_line_with_a_cause_for_a_silent_onnxruntime(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from onnx_pathwise import runtime
    from onnx_pathwise.cli import app

    path = f"{tmp_path}/cnn.onnx"
    onnx.save(tiny_cnn(), path)
    np.save(f"{tmp_path}/x.npy", np.zeros((1, 1, 4, 4), np.float32))

    class Silent:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("")

    monkeypatch.setattr(runtime.ort, "InferenceSession", Silent)
    result = CliRunner().invoke(app, ["explain", path, f"{tmp_path}/x.npy", "--out", f"{tmp_path}/out",
                                      "--device", "cpu"])
    assert result.exit_code == 3, result.output
    assert result.stderr.strip() == (f"onnx-pathwise: error: {path}: onnxruntime failed creating the session "
                                     "for the analysis run: RuntimeError without a message")
