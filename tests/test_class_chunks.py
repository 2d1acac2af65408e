"""Bounded memory at any K (docs/design.md §4): class-chunked and sample-chunked pathwise sweeps
equal the unchunked one on every model of the zoo, a many-class model stays under a small
memory budget, and a batch's recorded forward pass serves every chunk."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import zoo
from onnx import TensorProto, helper, numpy_helper

from onnx_pathwise import Explainer, baselines, limits, runtime, tiers
from onnx_pathwise import sweep as explainer

MODELS = [name for name in zoo.BUILDERS if name != "unsupported"]


_cache: dict[str, Explainer] = {}


def explainer_for(name: str, folder: Path) -> Explainer:
    if name not in _cache:
        path, _ = zoo.BUILDERS[name](folder / f"{name}.onnx")
        _cache[name] = Explainer(path, device="cpu", output_name="logits" if name == "multi_output" else None)
    return _cache[name]


def mlp_many(path: Path, K: int, width: int = 24, seed: int = 0) -> Path:
    """x (8,) → Gemm → Relu → Gemm → Relu → Gemm (K logits)."""
    rng = np.random.default_rng(seed)
    dims = [8, width, width, K]
    inits, nodes, prev = [], [], "x"
    for i in range(3):
        w = (rng.normal(size=(dims[i + 1], dims[i])) / np.sqrt(dims[i])).astype(np.float32)
        b = (rng.normal(size=dims[i + 1]) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = "logits" if i == 2 else f"z{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out], transB=1, name=f"gemm{i}"))
        if i < 2:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"], name=f"relu{i}"))
            prev = f"h{i}"
    graph = helper.make_graph(nodes, "many", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", K])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def same(a: Any, b: Any, what: str) -> None:
    assert len(a.path) == len(b.path)
    for i, (pa, pb) in enumerate(zip(a.path, b.path)):
        for la, lb in zip(pa, pb):
            assert np.array_equal(la.kept, lb.kept), f"{what}: sample {i} layer {la.node}"
    scale = max(float(np.abs(b.attribution).max()), 1e-6)
    assert np.abs(a.attribution - b.attribution).max() <= 1e-5 * scale, what
    assert np.abs(a.weight - b.weight).max() <= 1e-5 * max(float(np.abs(b.weight).max()), 1e-6), what
    np.testing.assert_allclose(a.masked_score, b.masked_score, rtol=1e-5, atol=1e-5 * scale)
    assert np.array_equal(a.target, b.target)


def inputs(ex: Explainer, n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n,) + ex.input_shape).astype(np.float32)


def tiny_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """No room for checkpoints: every class chunk is swept again from the scores."""
    monkeypatch.setattr(limits, "memory_budget", lambda: 1)


@pytest.mark.parametrize("name", MODELS)
def test_class_chunks_equal_unchunked_on_the_zoo(name: str, tmp_path_factory: pytest.TempPathFactory,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ex = explainer_for(name, tmp_path_factory.mktemp(name))
    x = inputs(ex)
    K = ex.num_classes
    for width in (None, "50%", 1):
        ref = ex.explain(x, width=width)
        for rows in sorted({1, 2, 3} & set(range(1, K + 1))):
            with monkeypatch.context() as m:
                m.setattr(explainer, "CLASS_CHUNK_ROWS", rows)
                same(ex.explain(x, width=width), ref, f"{name} width {width} rows {rows}")
                tiny_budget(m)
                same(ex.explain(x, width=width), ref, f"{name} width {width} rows {rows}, no checkpoints")


@pytest.mark.parametrize("name", ["cnn", "residual", "branches", "activations"])
def test_decompose_and_unwrap_chunked(name: str, tmp_path_factory: pytest.TempPathFactory,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ex = explainer_for(name, tmp_path_factory.mktemp(name))
    x = inputs(ex)
    ref = ex.decompose(x, width="30%", top=3)
    ref_in = ex.explain(x, width="30%", input_width="50%")
    uref = ex.unwrap(x)
    with monkeypatch.context() as m:
        m.setattr(explainer, "CLASS_CHUNK_ROWS", 2)
        for budget in (False, True):
            if budget:
                tiny_budget(m)
            d = ex.decompose(x, width="30%", top=3)
            assert np.array_equal(d.part_index, ref.part_index)
            np.testing.assert_allclose(d.parts, ref.parts, rtol=1e-5, atol=1e-6 * np.abs(ref.parts).max())
            np.testing.assert_allclose(d.part_score, ref.part_score, rtol=1e-5, atol=1e-7)
            e = ex.explain(x, width="30%", input_width="50%")
            same(e, ref_in, f"{name} input_width")
            assert np.array_equal(e.input_kept, ref_in.input_kept)
    with monkeypatch.context() as m:
        m.setattr(explainer, "MAX_SWEEP_ELEMENTS", 1)  # one sample and one class per sweep
        u = ex.unwrap(x)
        d = ex.decompose(x, width="30%", top=3)
    assert np.array_equal(d.part_index, ref.part_index)
    np.testing.assert_allclose(d.parts, ref.parts, rtol=1e-5, atol=1e-6 * np.abs(ref.parts).max())
    np.testing.assert_allclose(u.weight, uref.weight, rtol=1e-5, atol=1e-6 * np.abs(uref.weight).max())


@pytest.mark.parametrize("K", [100, 1000])
def test_many_classes_chunked_equal_and_batch_equals_per_sample(K: int, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ex = Explainer(mlp_many(tmp_path / "many.onnx", K), device="cpu")
    x = inputs(ex, 4, seed=K)
    for width in (None, 3):
        ref = ex.explain(x, width=width)
        for rows in (1, 3, 37):
            with monkeypatch.context() as m:
                m.setattr(explainer, "CLASS_CHUNK_ROWS", rows)
                same(ex.explain(x, width=width), ref, f"K {K} rows {rows}")
                if rows == 37:
                    tiny_budget(m)
                    got = ex.explain(x, width=width)
                    same(got, ref, f"K {K} rows {rows}, no checkpoints")
                    for i in range(len(x)):
                        one = ex.explain(x[i : i + 1], width=width)
                        assert all(np.array_equal(a.kept, b.kept) for a, b in zip(one.path[0], got.path[i]))
                        np.testing.assert_allclose(one.attribution[0], got.attribution[i], rtol=1e-5, atol=1e-6)


def test_the_budget_picks_class_chunks_and_refuses_only_below_one_class(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ex = Explainer(mlp_many(tmp_path / "many.onnx", 1000), device="cpu")
    rows = 1000
    per_row, fixed = ex.sweep.sweep_bytes(rows, 1)
    monkeypatch.setattr(limits, "memory_budget", lambda: int(fixed + 10.5 * per_row))
    samples, chunk, _ = ex.sweep.sweep_plan(rows, 4)
    assert (samples, chunk) == (1, 10)
    monkeypatch.setattr(limits, "memory_budget", lambda: int(fixed + 0.5 * per_row))
    with pytest.raises(limits.BudgetError, match="would need about"):
        ex.explain(inputs(ex, 1))
    monkeypatch.setattr(limits, "memory_budget", lambda: 2**40)
    assert ex.sweep.sweep_plan(rows, 4)[1] is None  # everything fits: one sweep, as before


CHILD = textwrap.dedent("""
    import sys, numpy as np, onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx_pathwise import Explainer
    from onnx_pathwise.samples import tiny_mlp

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    # compile the kernels (numba) on a tiny model first, chunked and not
    from onnx_pathwise import sweep as explainer
    t = Explainer(tiny_mlp(), device="cpu")
    t.explain(np.ones((1, 2), np.float32))
    explainer.CLASS_CHUNK_ROWS = 1
    t.explain(np.ones((1, 2), np.float32))
    explainer.CLASS_CHUNK_ROWS = None
    ex = Explainer(sys.argv[1], device="cpu")
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    x = np.random.default_rng(0).normal(size=(n,) + ex.input_shape).astype(np.float32)
    ex.record(x)
    base = rss("VmRSS:")
    e = ex.explain(x)
    print(base, rss("VmHWM:"), int(e.path[-1][0].count), float(e.masked_score[-1]))
""")


def conv_many(path: Path, K: int = 1000, C: int = 16, S: int = 32) -> Path:
    """x (3, S, S) → Conv 3×3 (C) → Relu → Conv 3×3 (C) → Relu → GlobalAveragePool → Gemm (K)."""
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(C, 3, 3, 3)).astype(np.float32) / 5
    w1 = rng.normal(size=(C, C, 3, 3)).astype(np.float32) / 12
    w2 = rng.normal(size=(K, C)).astype(np.float32) / 4
    inits = [numpy_helper.from_array(a, n) for a, n in ((w0, "w0"), (w1, "w1"), (w2, "w2"),
                                                      (np.zeros(K, np.float32), "b2"))]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
        helper.make_node("Relu", ["c0"], ["h0"], name="relu0"),
        helper.make_node("Conv", ["h0", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["h1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["h1"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"], transB=1, name="head"),
    ]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, S, S])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", K])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_many_classes_stay_within_a_small_budget(tmp_path: Path) -> None:
    """K = 1000 cotangents of one sample: 1000 × 16×32×32 floats = 62.5 MiB per tensor, several
    live at once; under a 64 MiB budget the sweep goes in class chunks and finishes with its
    peak RSS about the budget above the loaded model's (measured: +79 MiB, against +258 MiB
    with every class in one sweep)."""
    path = conv_many(tmp_path / "wide.onnx")
    env = dict(os.environ, ONNX_PATHWISE_MEMORY_BUDGET="64M", OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, env=env,
                         cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    base, peak, kept, masked = out.stdout.split()
    grown = int(peak) - int(base)
    # the budget plus onnxruntime's arenas and sessions; all K rows at once grow it by ~260 MiB
    assert grown < limits.parse_size("64M") + 64 * 2**20, f"peak grew by {grown / 2**20:.0f} MiB"
    assert int(kept) > 0 and np.isfinite(float(masked))


def conv_deep(path: Path, K: int = 1000, channels: tuple[int, ...] = (16, 32, 8, 32, 16, 24), S: int = 24) -> Path:
    """x (3, S, S) → six Conv 3×3 → Relu of changing widths → GlobalAveragePool → Gemm (K): every
    layer's cotangents of all K classes are a different size (as in a ResNet's stages)."""
    rng = np.random.default_rng(1)
    inits, nodes, prev, cin = [], [], "x", 3
    for i, c in enumerate(channels):
        w = (rng.normal(size=(c, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], [f"h{i}"], name=f"relu{i}")]
        prev, cin = f"h{i}", c
    inits += [numpy_helper.from_array((rng.normal(size=(K, cin)) / 4).astype(np.float32), "wk"),
              numpy_helper.from_array(np.zeros(K, np.float32), "bk")]
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["p"], name="gap"),
              helper.make_node("Flatten", ["p"], ["f"], name="flat"),
              helper.make_node("Gemm", ["f", "wk", "bk"], ["logits"], transB=1, name="head")]
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, S, S])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", K])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


@pytest.mark.parametrize("samples", [1, 8])
def test_memory_freed_by_chunks_goes_back_when_the_process_outgrows_the_budget(tmp_path: Path, samples: int) -> None:
    """Six layers of different sizes, 1,000 classes, a 128 MiB budget: every layer is re-swept
    chunk by chunk from the scores, and what the allocator keeps of the freed chunks grew the
    process by 485 MiB before limits.Resident (158 MiB with it, measured). With 8 samples, one
    chunked sweep each, what one sample's sweep freed was where the next one started: 245 MiB
    before each sweep handed it back, 164 MiB after (measured)."""
    path = conv_deep(tmp_path / "deep.onnx")
    env = dict(os.environ, ONNX_PATHWISE_MEMORY_BUDGET="128M", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(samples)], capture_output=True, text=True,
                         env=env, cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    base, peak, kept, masked = out.stdout.split()
    grown = int(peak) - int(base)
    assert grown < 1.5 * limits.parse_size("128M"), f"peak grew by {grown / 2**20:.0f} MiB"
    assert int(kept) > 0 and np.isfinite(float(masked))


def test_resident_trims_only_past_half_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = iter([1000, 1000 + 40, 1000 + 51, 1000 + 49])
    trims: list[int] = []
    monkeypatch.setattr(limits, "resident_bytes", lambda: next(sizes))
    monkeypatch.setattr(limits, "memory_budget", lambda: 100)
    monkeypatch.setattr(limits, "release_freed", lambda: trims.append(1))
    r = limits.Resident()
    r.check()
    assert trims == []
    r.check()
    assert trims == [1]
    r.check()
    assert trims == [1]


def test_a_sweep_keeps_freed_memory_only_below_half_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a chunked sweep, freed memory stays for the next sweep while the process holds at
    most half the budget, and goes back above that, or when its size cannot be read."""
    trims: list[int] = []
    monkeypatch.setattr(limits, "memory_budget", lambda: 100)
    monkeypatch.setattr(limits, "release_freed", lambda: trims.append(1))
    for resident, trimmed in ((40, False), (50, False), (51, True), (0, True)):
        trims.clear()
        monkeypatch.setattr(limits, "resident_bytes", lambda r=resident: r)
        limits.release_freed_if_large()
        assert bool(trims) == trimmed, resident


def test_the_chunked_sweep_ends_by_releasing_what_is_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A class-chunked explanation hands its freed memory back through release_freed_if_large
    at the end of its chunked sweep (the policy above), never unconditionally."""
    path = conv_deep(tmp_path / "deep.onnx", K=40, S=8)
    ex = Explainer(path, device="cpu")
    monkeypatch.setattr(explainer, "CLASS_CHUNK_ROWS", 7)
    calls: list[str] = []
    monkeypatch.setattr(limits, "release_freed_if_large", lambda: calls.append("if large"))
    monkeypatch.setattr(limits, "release_freed", lambda: calls.append("always"))
    ex.explain(np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32))
    assert calls == ["if large"]


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="no /proc/self/statm here")
def test_resident_size_follows_the_process_and_each_forked_child() -> None:
    """resident_bytes reads a descriptor it keeps open: it sees the process grow, and a forked
    child reads its own size, not its parent's through the inherited descriptor."""
    before = limits.resident_bytes()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, written
    grown = limits.resident_bytes() - before
    assert 48 * 2**20 < grown < 96 * 2**20, grown
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            mine = limits.resident_bytes()
            extra = np.ones(128 * 2**20 // 8)  # the child alone grows by 128 MiB
            os.write(write, str(limits.resident_bytes() - mine).encode())
            del extra
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child_grew = int(os.read(read, 64))
    os.close(read)
    assert 96 * 2**20 < child_grew < 192 * 2**20, child_grew
    assert limits.resident_bytes() - before < 96 * 2**20  # the parent did not see it
    del block


# --------------------------------------------------------------------------- one record per sample


@pytest.fixture()
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    rows: list[int] = []
    run = runtime.Recorder.run

    def counting(self: runtime.Recorder, x: np.ndarray) -> dict[str, np.ndarray]:
        rows.append(int(x.shape[0]))
        return run(self, x)

    monkeypatch.setattr(runtime.Recorder, "run", counting)
    return rows


def test_each_sample_sweep_leaves_room_for_the_explanations_already_made(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch explained sample by sample keeps each sample's explanation while the next is
    swept: the memory plan's checkpoint store of sample i is the plan's less the bytes of the
    explanations of samples 0 … i − 1 (kept units included: about 38 MB a sample on
    DenseNet-121), and the results do not change."""
    from onnx_pathwise import explain as explain_mod
    from onnx_pathwise import pathwise

    path = conv_deep(tmp_path / "deep.onnx", K=40, S=8)
    ex = Explainer(path, device="cpu")
    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    whole = ex.explain(x)
    monkeypatch.setattr(limits, "memory_budget", lambda: 2**30)
    monkeypatch.setattr(explainer, "CLASS_CHUNK_ROWS", 7)
    monkeypatch.setattr(explainer, "MAX_SWEEP_ELEMENTS", 1)  # one sample per sweep
    singles = [ex.explain(x[i : i + 1]) for i in range(3)]
    stores: list[float] = []
    init = pathwise.PathSweep.__init__

    def spy(self: Any, *args: Any, **kwargs: Any) -> None:
        stores.append(kwargs["store_bytes"])
        init(self, *args, **kwargs)

    monkeypatch.setattr(pathwise.PathSweep, "__init__", spy)
    got = ex.explain(x)
    sizes = [explain_mod._result_bytes(e) for e in singles]
    assert sizes[0] > 0 and len(stores) == 3
    assert stores[1] == stores[0] - sizes[0] and stores[2] == stores[0] - sizes[0] - sizes[1]
    np.testing.assert_allclose(got.attribution, whole.attribution, rtol=1e-5, atol=1e-6)
    assert [[p.kept.tolist() for p in s] for s in got.path] == [[p.kept.tolist() for p in s] for s in whole.path]


def test_chunks_reuse_the_recorded_forward_pass(tmp_path_factory: pytest.TempPathFactory, recorded: list[int],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ex = explainer_for("cnn", tmp_path_factory.mktemp("cnn"))
    x = inputs(ex, 5)
    want = {m: ex.attribute(x, m).attribution for m in ("gradient", "pathwise", "unwrap")}
    ig = ex.attribute(x, "integrated_gradients", steps=4).attribution
    monkeypatch.setattr(baselines, "MAX_ROWS", 2)  # rows per sweep: chunks of 2 samples
    monkeypatch.setattr(explainer, "MAX_SWEEP_ELEMENTS", 1)  # one sample per pathwise/unwrap sweep
    for method in ("gradient", "pathwise", "unwrap"):
        recorded.clear()
        got = ex.attribute(x, method).attribution
        assert recorded == [5], method  # the batch once, no second forward pass per chunk
        np.testing.assert_allclose(got, want[method], rtol=1e-5, atol=1e-6)
    recorded.clear()
    got = ex.attribute(x, "integrated_gradients", steps=4).attribution
    assert sum(recorded) == 5 + 5 * 4  # the batch, then each interpolation point once
    np.testing.assert_allclose(got, ig, rtol=1e-5, atol=1e-6)
    recorded.clear()
    ex.explain(x)
    ex.unwrap(x)
    assert sum(recorded) == 10  # chunk by chunk, each sample once per call


# --------------------------------------------------------------------------- competing classes


def three_classes(path: Path) -> Path:
    """h = Relu(x), logits = A h + c with A = [[2, 1], [0, 0.5], [0, 3]], c = [0, 0, −5]. At
    x = (1, 1): logits (3, 0.5, −2), target 0. Unit 1 contributes C = (1, 0.5, 3): against all
    three classes softmax(C)[0] < 1/3, it is cut; against the top two (0, 1) σ(0.5) > 1/2, kept."""
    A = np.array([[2, 1], [0, 0.5], [0, 3]], np.float32)
    inits = [numpy_helper.from_array(A.T.copy(), "a"), numpy_helper.from_array(np.array([0, 0, -5], np.float32), "c")]
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("Gemm", ["h", "a", "c"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "three", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_restricting_the_competing_classes_changes_the_kept_set(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ex = Explainer(three_classes(tmp_path / "three.onnx"), device="cpu")
    x = np.array([[1.0, 1.0]], np.float32)
    full = ex.explain(x)
    top2 = ex.explain(x, classes=2)
    assert full.path[0][0].kept.tolist() == [0] and full.classes is None
    assert top2.path[0][0].kept.tolist() == [0, 1] and top2.classes == 2
    np.testing.assert_allclose(top2.attribution, [[2.0, 1.0]])
    # the target joins the top N when it is not among them: class 2 with the top 2 → {0, 1, 2}
    assert ex.explain(x, target=2, classes=2).path[0][0].kept.tolist() == ex.explain(x, target=2).path[0][0].kept.tolist()
    monkeypatch.setattr(explainer, "CLASS_CHUNK_ROWS", 1)
    assert ex.explain(x, classes=2).path[0][0].kept.tolist() == [0, 1]
    with pytest.raises(Exception, match="at least 2"):
        ex.explain(x, classes=1)


@pytest.mark.parametrize("name", ["cnn", "residual"])
def test_classes_all_and_k_equal_the_default(name: str, tmp_path_factory: pytest.TempPathFactory,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ex = explainer_for(name, tmp_path_factory.mktemp(name))
    x = inputs(ex)
    ref = ex.explain(x, width="20%")
    for classes in ("all", ex.num_classes, ex.num_classes + 5):
        got = ex.explain(x, width="20%", classes=classes)
        assert all(np.array_equal(a.kept, b.kept) for pa, pb in zip(got.path, ref.path) for a, b in zip(pa, pb))
        assert np.array_equal(got.attribution, ref.attribution)
    # a subset, chunked or not, and a batch equal to its samples
    sub = ex.explain(x, width="20%", classes=3)
    monkeypatch.setattr(explainer, "CLASS_CHUNK_ROWS", 2)
    same(ex.explain(x, width="20%", classes=3), sub, f"{name} classes=3 chunked")
    for i in range(len(x)):
        one = ex.explain(x[i : i + 1], width="20%", classes=3)
        assert all(np.array_equal(a.kept, b.kept) for a, b in zip(one.path[0], sub.path[i]))


def test_cli_classes_on_explain_decompose_and_evaluate(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from onnx_pathwise.cli import app

    model = three_classes(tmp_path / "three.onnx")
    np.save(tmp_path / "x.npy", np.array([[1.0, 1.0], [0.5, 2.0]], np.float32))
    runner = CliRunner()

    def run(*args: str) -> Any:
        out = runner.invoke(app, [str(a) for a in args])
        assert out.exit_code == 0, out.output
        return out

    run("explain", str(model), str(tmp_path / "x.npy"), "-o", str(tmp_path / "e2"), "--classes", "2")
    run("explain", str(model), str(tmp_path / "x.npy"), "-o", str(tmp_path / "ea"))
    e2 = json.loads((tmp_path / "e2" / "explanation.json").read_text())
    ea = json.loads((tmp_path / "ea" / "explanation.json").read_text())
    assert e2["options"]["classes"] == 2 and ea["options"]["classes"] == "all"
    assert e2["samples"][0]["path"][0]["kept"] == [0, 1] and ea["samples"][0]["path"][0]["kept"] == [0]
    run("decompose", str(model), str(tmp_path / "x.npy"), "-o", str(tmp_path / "d"), "--classes", "2")
    assert json.loads((tmp_path / "d" / "decomposition.json").read_text())["classes"] == 2
    run("evaluate", str(model), str(tmp_path / "x.npy"), "-o", str(tmp_path / "v"), "--methods", "pathwise",
        "--classes", "2")
    methods = json.loads((tmp_path / "v" / "evaluation.json").read_text())["methods"]
    assert [m["options"] for m in methods.values()] == [{"classes": 2}]
    bad = runner.invoke(app, ["explain", str(model), str(tmp_path / "x.npy"), "-o", str(tmp_path / "b"),
                              "--classes", "one"])
    assert bad.exit_code == 2 and "classes" in bad.output


def test_progress_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capfd: pytest.CaptureFixture[str]) -> None:
    ex = Explainer(mlp_many(tmp_path / "many.onnx", 100), device="cpu")
    x = inputs(ex, 1)
    monkeypatch.setattr(explainer, "CLASS_CHUNK_ROWS", 10)
    quiet = ex.explain(x)
    assert capfd.readouterr().err == ""
    ex.progress = True
    same(ex.explain(x), quiet, "with a progress bar")


def test_evaluate_shows_its_own_bar_over_class_chunked_sweeps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`evaluate` with a bar runs its pathwise sweeps (class chunks, which have a bar of their
    own) with theirs off: one bar on the terminal, not two drawn over each other (and before
    rich 14, a LiveError). Same results; the explainer's setting is back afterwards."""
    from onnx_pathwise import metrics, pathwise

    ex = Explainer(mlp_many(tmp_path / "many.onnx", 100), device="cpu")
    x = inputs(ex, 2)
    monkeypatch.setattr(explainer, "CLASS_CHUNK_ROWS", 10)
    quiet = metrics.evaluate(ex, x, ["pathwise"], step=4)
    sweep_bars: list[bool] = []
    real = pathwise.progress_bar

    def spy(show: bool, total: int, what: str) -> Any:
        sweep_bars.append(show)
        return real(show, total, what)

    monkeypatch.setattr(pathwise, "progress_bar", spy)
    ex.progress = True
    shown = metrics.evaluate(ex, x, ["pathwise"], step=4, progress=True)
    assert sweep_bars and not any(sweep_bars)
    assert ex.progress is True
    assert shown["methods"] == quiet["methods"]
    ex.explain(x)
    assert sweep_bars[-1] is True


def test_the_command_line_shows_the_class_chunk_progress_at_a_terminal(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI switches the class-chunk progress bar on when stderr is a terminal, off otherwise
    (pipes, CI logs), where the API leaves it off unless asked."""
    import io

    from onnx_pathwise.cli import plumbing

    path = mlp_many(tmp_path / "many.onnx", 20)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert plumbing._open_explainer(path, "cpu").progress is True
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert plumbing._open_explainer(path, "cpu").progress is False
    assert Explainer(path, device="cpu").progress is False


def test_the_vectorised_exponential_is_libm_to_an_ulp() -> None:
    from onnx_pathwise import kernels

    rng = np.random.default_rng(0)
    x = -np.concatenate([rng.exponential(1.0, 20000), rng.uniform(0.0, 760.0, 20000), rng.exponential(1e-6, 2000),
                         [0.0, 5e-324, 1e-300, 1e-17, np.log(2) / 2, 700.0, 707.9, 708.0, 709.0, 745.2, np.inf]])
    got = np.array([kernels.exp_nonpositive(v) for v in x])
    want = np.exp(x)
    normal = x >= -708.0
    assert np.all(np.abs(got[normal] - want[normal]) <= 2.3e-16 * want[normal])
    assert np.all(got[~normal] <= 3.4e-308) and np.all(got >= 0.0)
    assert got[x == 0.0][0] == 1.0


def test_chunked_log_sum_exp_equals_numpy_over_all_rows() -> None:
    """kernels.lse_accumulate fed K rows in uneven chunks (some padded) against logsumexp of the
    whole (K, u) matrix in float64, including units with h = 0 and rows far apart."""
    from onnx_pathwise import kernels

    rng = np.random.default_rng(3)
    K, n, u = 37, 2, 1001
    J = (rng.normal(size=(K, n, u)) * np.where(rng.random((K, 1, u)) < 0.1, 50.0, 1e-3)).astype(np.float32)
    h = np.maximum(rng.normal(size=(n, u)), 0.0).astype(np.float32)
    i, c = 1, 11
    s, top, acc, jc, scratch = np.zeros(u), np.zeros(u), np.zeros(u), np.zeros(u), np.empty(u)
    for a, b, pad in ((0, 5, 2), (5, 6, 0), (6, 30, 3), (30, 37, 1)):
        g = np.concatenate([J[a:b], np.full((pad, n, u), 7.0, np.float32)])  # padding never counts
        kernels.lse_accumulate(h[i], g, i, b - a, c - a if a <= c < b else -1, s, top, acc, jc, scratch)
    C = h[i].astype(np.float64) * J[:, i].astype(np.float64)
    m = C.max(0)
    want = m + np.log(np.exp(C - m).sum(0))
    np.testing.assert_allclose(top + np.log(acc), want, rtol=0, atol=1e-13 * max(1.0, float(np.abs(want).max())))
    assert np.array_equal(s, np.cumsum(J[:, i].astype(np.float64), axis=0)[-1])
    assert np.array_equal(jc, J[c, i].astype(np.float64))


def test_unit_sums_split_across_threads_are_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """UnitStats.add splits a large layer's units across threads (each unit's sums are its
    own): the sums and the kept units equal one thread's, bit for bit."""
    from onnx_pathwise import selection
    from onnx_pathwise.pathwise import Competing

    rng = np.random.default_rng(5)
    K, n, u = 23, 2, 999
    J = (rng.normal(size=(K, n, u)) * np.where(rng.random((K, 1, u)) < 0.1, 30.0, 1e-2)).astype(np.float32)
    h = np.maximum(rng.normal(size=(n, u)), 0.0).astype(np.float32)
    comp = Competing(classes=np.tile(np.arange(K)[:, None], (1, n)), count=np.array([K, K - 3]),
                     target_row=np.array([4, 17]), carry_row=np.array([4, 17]), sign=np.ones(n), every=False)
    results = []
    for parallel_units, workers in ((1 << 30, 1), (100, 3)):
        monkeypatch.setattr(selection, "PARALLEL_UNITS", parallel_units)
        monkeypatch.setattr(tiers, "workers", lambda w=workers: w)
        stats = selection.UnitStats(h, comp)
        for a, b in ((0, 9), (9, 10), (10, K)):
            stats.add(a, J[a:b])
        results.append((stats.s.copy(), stats.top.copy(), stats.acc.copy(), stats.jc.copy(), stats.select(40)))
    (one, split) = results
    for x, y in zip(one, split):
        assert np.array_equal(x, y)


def test_a_chunked_selection_limits_blas_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The class chunks' thousands of sweeps share one BLAS limit (setting it costs 0.1 ms):
    a nested engine.single_threaded_blas does nothing, the outer one sets and lifts it, and a
    sweep of more rows than SMALL_SWEEP_ROWS keeps numpy's threads."""
    from onnx_pathwise import engine

    entered: list[int] = []

    class Counting:
        def limit(self, limits: int, user_api: str) -> Any:
            import contextlib

            entered.append(limits)
            return contextlib.nullcontext()

    monkeypatch.setattr(engine, "_blas", lambda: Counting())
    ex = Explainer(mlp_many(tmp_path / "many.onnx", 60), device="cpu")
    x = inputs(ex, 2)
    ref = ex.explain(x)
    monkeypatch.setattr(explainer, "CLASS_CHUNK_ROWS", 7)
    entered.clear()
    got = ex.explain(x)
    same(got, ref, "chunks of 7")
    # 9 chunks × 2 layers of sweeps per sample: one limit for them all, one for the final sweep
    assert 1 <= len(entered) <= 2 * len(x), entered
    entered.clear()
    with engine.single_threaded_blas():
        with engine.single_threaded_blas():
            pass
    assert entered == [1]
    with engine.blas_for(engine.SMALL_SWEEP_ROWS + 1):
        pass
    assert entered == [1]


def test_the_heap_is_reused_only_while_a_sweep_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """limits.reused_heap: glibc's thresholds are raised once for the outermost call (nested calls,
    an exception inside) and set to glibc's dynamic ceiling when it ends; the explanation is
    the same."""
    calls: list[tuple[str, int, int]] = []
    monkeypatch.setattr(limits, "_mallopt", lambda: lambda p, v: calls.append(("set", p, v)) or 1)
    with limits.reused_heap():
        with limits.reused_heap():
            pass
        with pytest.raises(ValueError), limits.reused_heap():
            raise ValueError
        largest = limits.heap_array_limit()
        assert calls == [("set", -3, largest), ("set", -1, 2 * largest)]
        assert 128 * 1024 <= largest <= max(128 * 1024, limits.memory_budget() // 16)
    # glibc's dynamic ceiling, not its 128 KiB defaults: the first mallopt turns the dynamic
    # threshold off for good, and 128 KiB would page-fault the host program's every large array
    ceiling = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
    assert calls[2:] == [("set", -3, ceiling), ("set", -1, 2 * ceiling)]
    assert limits._heap_users == 0
    monkeypatch.undo()
    ex = Explainer(mlp_many(tmp_path / "m.onnx", 30), device="cpu")
    x = inputs(ex)
    monkeypatch.setattr(limits, "_mallopt", lambda: None)
    plain = ex.explain(x)
    monkeypatch.undo()
    same(ex.explain(x), plain, "reused heap")


def test_sessions_share_the_loaders_weight_arrays_and_record_the_same(tmp_path: Path) -> None:
    """The record session reads big initializers from the loader's arrays (declared external to
    onnxruntime, data not copied into the protobuf) and records exactly what a session built
    from the plain file records; shape inference runs on a copy without the big data."""
    from onnx_pathwise.load.protos import without_large_data

    path = conv_deep(tmp_path / "deep.onnx", K=1000)
    whole = onnx.load(str(path))
    ex = Explainer(path, device="cpu")
    arrays = ex.source_ir.constants
    rec = ex.sweep.recorder_for(False)
    recorded, shared = runtime._with_outputs(whole, rec.names, arrays)
    assert "wk" in shared and shared["wk"] is arrays["wk"]  # 1000 × 24 floats: shared
    assert "w0" not in shared  # 1.6 kB: not worth it, stays inline
    assert recorded.ByteSize() < whole.ByteSize() - 90_000  # wk is 96,000 bytes
    # the explainer keeps the model without wk's data (its one copy is the loader's array) ...
    assert ex.proto.ByteSize() < whole.ByteSize() - 90_000
    assert runtime._with_outputs(ex.proto, rec.names, arrays)[1].keys() == shared.keys()
    # ... and filled() gives the whole model back
    assert runtime.filled(ex.proto, arrays).SerializeToString() == whole.SerializeToString()
    plain = runtime.Recorder(whole, ex.ir.input_name, rec.names, "cpu")
    x = inputs(ex, 2)
    got, want = rec.run(x), plain.run(x)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    # the analysis run feeds the shared arrays as inputs: the same values
    fed = runtime.probe(whole, rec.names, {ex.ir.input_name: x}, arrays)
    assert all(np.array_equal(fed[k], want[k]) for k in want)
    light = without_large_data(whole)
    assert light.ByteSize() < whole.ByteSize() - 90_000  # wk is 96,000 bytes
    full = onnx.shape_inference.infer_shapes(whole, data_prop=True).graph.value_info
    assert [str(v) for v in onnx.shape_inference.infer_shapes(light, data_prop=True).graph.value_info] == \
        [str(v) for v in full]


def test_checkpoints_hold_no_larger_array_alive() -> None:
    """A stored cut owns what it is counted for: a slice of a larger cotangent (a Concat's
    adjoint) is copied, an array that owns its memory or reshapes one is kept as it is."""
    from onnx_pathwise.pathwise import _owned

    whole = np.arange(24.0).reshape(2, 12)
    cut = {"slice": whole[:, 4:8], "own": np.ones((2, 3)), "view": np.ones((2, 6)).reshape(2, 2, 3)}
    kept = _owned(cut)
    assert kept["own"] is cut["own"] and kept["view"] is cut["view"]
    assert kept["slice"] is not cut["slice"] and kept["slice"].base is None
    np.testing.assert_array_equal(kept["slice"], whole[:, 4:8])
