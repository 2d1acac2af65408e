"""The selection graph (docs/design.md §4, "The selection on the device"): the pathwise sweep and
selection run as one onnxruntime graph give the host sweep's kept units and explanations on
every model of the zoo whose ops have a graph form, at every width, depth and competing set;
a model with an op without one stays on the host, saying which. On the CPU provider here, on
CUDA in tests/test_cuda.py (the default selection there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import zoo
from onnx import TensorProto, helper, numpy_helper
from test_class_chunks import explainer_for, inputs, mlp_many, same
from test_single_score import inputs_both_sides, sigmoid_mlp

from onnx_pathwise import Explainer, graphsweep, rules
from onnx_pathwise import sweep as sweep_mod
from onnx_pathwise.errors import ModelError, PathwiseError

MODELS = [name for name in zoo.BUILDERS if name != "unsupported"]


def both(ex: Explainer, monkeypatch: pytest.MonkeyPatch, x: np.ndarray, **kw: object) -> tuple[Any, Any]:
    """(graph, host) explanations of x; each says which selection ran."""
    with monkeypatch.context() as m:
        m.setenv(graphsweep.ENV_VAR, "graph")
        got = ex.explain(x, **kw)
    with monkeypatch.context() as m:
        m.setenv(graphsweep.ENV_VAR, "host")
        ref = ex.explain(x, **kw)
    assert ref.selection == "host"
    return got, ref


def graph_used(ex: Explainer) -> bool:
    return bool(ex.sweep.selection_graphs)


@pytest.mark.parametrize("name", MODELS)
def test_graph_selection_equals_the_host_sweep_on_the_zoo(name: str, tmp_path_factory: pytest.TempPathFactory,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ex = explainer_for(name, tmp_path_factory.mktemp(name))
    x = inputs(ex)
    for kw in ({}, {"width": 1}, {"width": "30%", "depth": 2}, {"classes": 2}):
        got, ref = both(ex, monkeypatch, x, **kw)
        same(got, ref, f"{name} {kw}")
        assert got.selection == "graph", (name, kw)
    assert ex.sweep.selection_problem == "" and graph_used(ex), name


def sliced_mlp(path: Path) -> Path:
    """x (6,) → Gemm → Relu → Slice (every other of 8 units) → Gemm → Relu → Gemm (3 logits):
    a Slice with step 2, which has no graph form, between the scores and the lowest path layer."""
    rng = np.random.default_rng(7)
    w = [rng.normal(size=s).astype(np.float32) for s in ((8, 6), (5, 4), (3, 5))]
    nodes = [
        helper.make_node("Gemm", ["x", "w0"], ["z0"], transB=1, name="fc0"),
        helper.make_node("Relu", ["z0"], ["h0"], name="relu0"),
        helper.make_node("Slice", ["h0", "starts", "ends", "axes", "steps"], ["s0"], name="slice"),
        helper.make_node("Gemm", ["s0", "w1"], ["z1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["z1"], ["h1"], name="relu1"),
        helper.make_node("Gemm", ["h1", "w2"], ["y"], transB=1, name="fc2"),
    ]
    inits = [numpy_helper.from_array(a, f"w{i}") for i, a in enumerate(w)] + [
        numpy_helper.from_array(np.array([0], np.int64), "starts"),
        numpy_helper.from_array(np.array([8], np.int64), "ends"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(np.array([2], np.int64), "steps")]
    graph = helper.make_graph(nodes, "sliced", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_attributes_without_a_graph_form_keep_the_model_on_the_host(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ex = Explainer(sliced_mlp(tmp_path / "sliced.onnx"), device="cpu")
    x = inputs(ex, 4)
    got, ref = both(ex, monkeypatch, x)
    same(got, ref, "sliced")
    assert "step" in ex.sweep.selection_problem and "'slice'" in ex.sweep.selection_problem
    assert not graph_used(ex) and got.selection == "host"
    got, ref = both(ex, monkeypatch, x, depth=1)  # the last path layer lies above the Slice
    same(got, ref, "sliced, depth 1")
    assert graph_used(ex) and got.selection == "graph"


def test_single_score_and_many_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ex = Explainer(sigmoid_mlp(tmp_path / "binary.onnx"), device="cpu")
    x = inputs_both_sides(ex)
    for width in (None, 2):
        got, ref = both(ex, monkeypatch, x, width=width)
        same(got, ref, f"single score width {width}")
    assert graph_used(ex)
    many = Explainer(mlp_many(tmp_path / "many.onnx", 300), device="cpu")
    x = inputs(many, 4, seed=3)
    for kw in ({}, {"width": 3}, {"classes": 5}):
        got, ref = both(many, monkeypatch, x, **kw)
        same(got, ref, f"K 300 {kw}")
    # and with the scores in slices of a few units, chained one after another
    for model, xs, rows, kws in ((ex, inputs_both_sides(ex), 2, ({}, {"width": 2})),
                                 (many, x, 300, ({"width": 3}, {"classes": 5}))):
        with monkeypatch.context() as m:
            m.setattr(graphsweep, "SCORE_SLICE_BYTES", graphsweep.SCORE_BYTES_PER_ROW_UNIT * rows * 3)
            model.sweep.release_selection_graphs()
            for kw in kws:
                got, ref = both(model, monkeypatch, xs, **kw)
                same(got, ref, f"in slices {rows} {kw}")
            built = model.sweep.selection_graphs
            assert built and max(built[0].slices.values()) > 2
        model.sweep.release_selection_graphs()


def test_input_width_a_budget_too_small_and_the_cpu_stay_on_the_host(tmp_path_factory: pytest.TempPathFactory,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ex = explainer_for("cnn", tmp_path_factory.mktemp("cnn"))
    x = inputs(ex)
    got, ref = both(ex, monkeypatch, x, width="30%", input_width="50%")
    same(got, ref, "input_width")
    assert np.array_equal(got.input_kept, ref.input_kept)
    widths = {layer.name: layer.units for layer in ex.sweep.gate_layers}
    with monkeypatch.context() as m:
        m.setenv(graphsweep.ENV_VAR, "graph")
        assert ex.sweep.selection_graph(widths, ex.num_classes) is not None
        m.setattr(sweep_mod.limits, "memory_budget", lambda: 1)
        assert ex.sweep.selection_graph(widths, ex.num_classes) is None  # one sample's rows do not fit
    with monkeypatch.context() as m:
        m.setenv(graphsweep.ENV_VAR, "auto")
        assert ex.sweep.selection_graph(widths, ex.num_classes) is None  # the CPU: the host sweep
        m.setenv(graphsweep.ENV_VAR, "sideways")
        with pytest.raises(PathwiseError, match="ONNX_PATHWISE_SELECTION"):
            ex.explain(x)


def test_the_selection_graph_cuts_what_the_host_cuts(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The graph's masks themselves, against select_units on the host sweep's cotangents: the
    residual net's last path layer at width 3 (a TopK cut) and at every favouring unit."""
    ex = explainer_for("residual", tmp_path_factory.mktemp("residual"))
    x = inputs(ex, 2, seed=5)
    rec = ex.sweep.record(x)
    last = ex.sweep.gate_layers[-1]
    from onnx_pathwise import selection

    hooks_seen: dict[str, np.ndarray] = {}

    def grab(node: object, g: np.ndarray) -> np.ndarray:
        hooks_seen["g"] = g.reshape(g.shape[0], g.shape[1], -1).copy()
        return g

    K = ex.num_classes
    seeds = {ex.sweep.ir.output_name: np.broadcast_to(np.eye(K, dtype=np.float32)[:, None], (K, 2, K)).copy()}
    ex.sweep.engine.backward(seeds, rec, hooks={last.name: grab})
    target = rec.scores.argmax(axis=1)
    h = rec.states[last.name].value.reshape(2, -1)
    for width in (3, last.units):
        graph = graphsweep.SelectionGraph(ex.sweep.engine, {last.name: width}, "cpu")
        masks = graph.masks(rec, np.broadcast_to(np.arange(K)[:, None], (K, 2)), np.full(2, K), target)
        want = selection.select_units(h, hooks_seen["g"], target, width)
        assert np.array_equal(masks[last.name], want), width
        assert masks[last.name].sum() <= 2 * width


@pytest.mark.parametrize("name", MODELS)
def test_the_adjoint_graph_carries_the_host_sweeps_cotangents(name: str, tmp_path_factory: pytest.TempPathFactory,
                                                              ) -> None:
    """``AdjointGraph`` (onnxruntime's own backward, no selection): every class's cotangents at
    the lowest gate layer equal the host engine's sweep without hooks, sample by sample, to
    float32 round-off; the graph forms of every op on the way are what is checked."""
    ex = explainer_for(name, tmp_path_factory.mktemp(name))
    x = inputs(ex, 2, seed=3)
    rec = ex.sweep.record(x)
    layers = [layer.name for layer in ex.sweep.gate_layers]
    graph = graphsweep.AdjointGraph(ex.sweep.engine, layers)
    assert graph.layer == layers[0]
    node = next(n for n in ex.sweep.engine.nodes if n.name == graph.layer)
    K = ex.num_classes
    score_shape = ex.sweep.ir.shapes[ex.sweep.ir.output_name]
    seeds = np.eye(K, dtype=np.float32).reshape((K,) + score_shape)
    cut = ex.sweep.engine.backward_to({ex.sweep.ir.output_name: np.repeat(seeds[:, None], 2, axis=1)}, rec,
                                      graph.layer)
    want = cut[node.outputs[0]]
    for i in range(2):
        got = graph.cotangents(rec, i, seeds)
        assert got.shape == (K,) + want.shape[2:], name
        scale = max(float(np.abs(want[:, i]).max()), 1e-30)
        assert float(np.abs(got - want[:, i]).max()) <= 1e-5 * scale, (name, i)
        assert np.abs(want[:, i]).max() > 0, name  # a sweep that carried nothing would pass


def test_every_registered_op_has_a_graph_form() -> None:
    """A new op gets its ``emit`` too (docs/design.md §9), or its models silently lose the
    selection graph on CUDA; the attribute values an emit refuses are listed in §4."""
    missing = sorted(op for op, rule in rules.RULES.items() if rule.emit is None and rule.role != "terminal")
    assert not missing, f"ops without a graph form: {missing}"
    design = (Path(__file__).parent.parent / "docs" / "design.md").read_text()
    section = design.split("**The selection on the device.**")[1].split("\n**")[0]
    for op in ("MatMul", "Gemm", "Slice", "Gather"):  # the ops whose emit refuses some attributes
        assert f"`{op}`" in section, op


def test_a_graph_that_fails_on_the_device_falls_back_to_the_host_with_one_line(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    ex = explainer_for("residual", tmp_path_factory.mktemp("residual"))
    x = inputs(ex)
    _, ref = both(ex, monkeypatch, x)
    capfd.readouterr()

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise ModelError("onnxruntime failed running the pathwise selection graph: out of memory")

    monkeypatch.setattr(graphsweep.SelectionGraph, "masks", out_of_memory)
    monkeypatch.setenv(graphsweep.ENV_VAR, "graph")
    monkeypatch.setattr(sweep_mod, "MAX_SWEEP_ELEMENTS", 1)  # one sample per sweep: three sweeps
    got = ex.explain(x)
    same(got, ref, "fallback")
    assert got.selection == "host"
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "out of memory" in err[0] and "on the host" in err[0]
    assert "out of memory" in ex.sweep.selection_problem
    ex.sweep.release_selection_graphs()  # the cached explainer serves other tests


def test_a_graph_onnxruntime_refuses_falls_back_to_the_host_with_one_line(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    from onnx_pathwise import runtime

    ex = explainer_for("cnn", tmp_path_factory.mktemp("cnn"))
    x = inputs(ex)
    _, ref = both(ex, monkeypatch, x, width=2)
    capfd.readouterr()
    real = runtime.session

    def refuse(model: object, *args: object, what: str = "", **kwargs: object) -> object:
        if "selection graph" in what:
            raise ModelError("onnxruntime failed creating the pathwise selection graph's session: no kernel")
        return real(model, *args, what=what, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime, "session", refuse)
    monkeypatch.setenv(graphsweep.ENV_VAR, "graph")
    ex.sweep.release_selection_graphs()
    try:
        same(ex.explain(x, width=2), ref, "refused")
        same(ex.explain(x, width=2), ref, "refused, again")
    finally:
        ex.sweep.release_selection_graphs()
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "no kernel" in err[0] and "on the host" in err[0]


def _ancestors(model: onnx.ModelProto) -> tuple[dict[str, Any], dict[str, list[Any]], Any]:
    """(producer of each tensor, consumers of each tensor, ancestors of a node: the first
    outputs of the nodes it reads from, transitively)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def ancestors(node: Any) -> set[str]:
        seen: set[str] = set()
        todo = list(node.input)
        while todo:
            t = todo.pop()
            p = producer.get(t)
            if p is not None and p.output[0] not in seen:
                seen.add(p.output[0])
                todo.extend(p.input)
        return seen

    return producer, consumers, ancestors


def test_score_slices_free_their_products_whatever_the_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory of the float64 scores does not depend on onnxruntime's choice of order: each
    product C = h·J/2 is last read by the subtraction of its maximum, which waits for every
    other reader of C (the necessary test), and each slice of units starts only once the slice
    before has its results. Before, onnxruntime's order kept every slice's products alive
    until the last slice was scored."""
    ex = explainer_for("cnn", tmp_path)
    rows = max(2, ex.num_classes)
    monkeypatch.setattr(graphsweep, "SCORE_SLICE_BYTES", graphsweep.SCORE_BYTES_PER_ROW_UNIT * rows * 5)
    monkeypatch.setenv(graphsweep.ENV_VAR, "graph")
    ex.sweep.release_selection_graphs()
    try:
        ex.explain(inputs(ex))
        graph = ex.sweep.selection_graphs[0]
    finally:
        ex.sweep.release_selection_graphs()
    assert max(graph.slices.values()) > 2
    producer, consumers, ancestors = _ancestors(graph.model)
    products = [n for n in graph.model.graph.node if n.op_type == "Mul"
                and any(producer.get(i) is not None and producer[i].op_type == "Cast"
                        and producer[i].attribute[0].i == TensorProto.DOUBLE
                        and producer[producer[i].input[0]].op_type in ("Slice", "Reshape", "Concat")
                        for i in n.input if i in producer)
                and len(consumers.get(n.output[0], [])) > 2]
    assert len(products) >= sum(graph.slices.values())
    lasts = []
    for C in products:
        readers = consumers[C.output[0]]
        last = [r for r in readers if all(o.output[0] in ancestors(r) for o in readers if o is not r)]
        assert len(last) == 1 and last[0].op_type == "Sub", [r.op_type for r in readers]
        lasts.append(last[0])
    # each slice of a layer, after the first, starts after the one before it is done
    slices = [n for n in graph.model.graph.node if n.op_type == "Slice" and producer.get(n.input[1]) is not None]
    assert slices
    for sl in slices:
        before = ancestors(sl)
        assert any(last.output[0] in before for last in lasts), sl.output[0]


@pytest.mark.parametrize("name", ["cnn", "residual", "activations"])
def test_scores_in_slices_of_units_select_the_same(name: str, tmp_path_factory: pytest.TempPathFactory,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer's float64 scores in slices of a few units (as on a device short of memory): the
    same masks as the host's, at every favouring unit and at a TopK width."""
    ex = explainer_for(name, tmp_path_factory.mktemp(name))
    x = inputs(ex)
    rows = max(2, ex.num_classes)
    monkeypatch.setattr(graphsweep, "SCORE_SLICE_BYTES", graphsweep.SCORE_BYTES_PER_ROW_UNIT * rows * 7)
    ex.sweep.release_selection_graphs()
    try:
        for kw in ({}, {"width": 2}):
            got, ref = both(ex, monkeypatch, x, **kw)
            same(got, ref, f"{name} {kw} in slices")
        built = ex.sweep.selection_graphs
        assert built and max(built[0].slices.values()) > 1
    finally:
        ex.sweep.release_selection_graphs()
