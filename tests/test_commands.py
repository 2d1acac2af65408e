"""The commands after inspect/unwrap: explain, decompose, evaluate, audit, diff.

Each test runs the command through Typer's CliRunner on a bundled sample and checks what it
wrote (files, array keys and shapes, the JSON structure its help documents, PNGs for image inputs
only) against the library.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import ROOT, SAMPLES, make_model, run
from onnx import helper, numpy_helper

from onnx_pathwise import Explainer
from onnx_pathwise.audit_edits import last_weight, randomize_initializer
from onnx_pathwise.cli import app

CNN, CNN_X = SAMPLES / "cnn.onnx", SAMPLES / "cnn_inputs.npy"  # 8 images 1×16×16, 4 classes
MLP, MLP_X = SAMPLES / "mlp.onnx", SAMPLES / "mlp_inputs.npy"  # 16 rows of 8 features, 3 classes
CNN_LAST_GATE = "/features/features.6/Relu"  # 16 channels × 8 × 8 = 1024 units
MLP_GATES = ["/net/net.1/Relu", "/net/net.3/Relu"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
AUDIT_CHECKS = ["analysable", "onnxruntime loads", "completeness", "batch equals per-sample", "deterministic",
                "cpu vs cuda", "randomised weights change explanations"]

def pngs(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.glob("*.png"))
    for name in names:
        assert (folder / name).read_bytes().startswith(PNG_MAGIC), name
    return names


@pytest.fixture(scope="module")
def cnn() -> Explainer:
    return Explainer(CNN, device="cpu")


@pytest.fixture(scope="module")
def mlp() -> Explainer:
    return Explainer(MLP, device="cpu")


# --------------------------------------------------------------------------- explain


def test_explain_pathwise_image(tmp_path: Path, cnn: Explainer) -> None:
    out = tmp_path / "exp"
    result = run("explain", CNN, CNN_X, "--out", out, "--width", "5%", "--depth", "1", "--input-width", "10%",
                 "--device", "cpu")
    assert result.stdout.startswith(f"wrote 10 file(s) to {out}: 8 sample(s), method pathwise, faithfulness")
    assert sorted(p.name for p in out.iterdir()) == ["explanation.json", "explanation.npz"] + [
        f"sample_{i}.png" for i in range(8)]
    assert len(pngs(out)) == 8

    x = np.load(CNN_X)
    with np.load(out / "explanation.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    assert sorted(arrays) == ["attribution", "bias", "masked_score", "output", "target", "weight"]
    A, W = arrays["attribution"], arrays["weight"]
    assert A.shape == W.shape == (8, 1, 16, 16)
    assert arrays["bias"].shape == arrays["masked_score"].shape == arrays["target"].shape == (8,)
    assert arrays["output"].shape == (8, 4)
    np.testing.assert_array_equal(arrays["target"], arrays["output"].argmax(1))
    np.testing.assert_allclose(A, W * x, rtol=1e-6, atol=1e-7)  # A = W_p ⊙ x
    np.testing.assert_allclose((W * x).reshape(8, -1).sum(1) + arrays["bias"], arrays["masked_score"],
                               rtol=1e-4, atol=1e-4)
    assert ((A.reshape(8, -1) != 0).sum(1) <= round(256 * 0.10)).all()  # --input-width 10%

    lib = cnn.explain(x, width="5%", depth=1, input_width="10%")
    np.testing.assert_allclose(A, lib.attribution, rtol=1e-5, atol=1e-6)

    report = json.loads((out / "explanation.json").read_text())
    assert report["method"] == "pathwise" and report["model"] == str(CNN)
    assert report["options"] == {"width": "5%", "depth": 1, "input_width": "10%", "classes": "all",
                                 "selection": "host"}
    assert len(report["samples"]) == 8
    for i, s in enumerate(report["samples"]):
        assert set(s) == {"target", "score", "masked_score", "faithfulness", "sparsity", "path"}
        assert s["target"] == arrays["target"][i]
        assert s["masked_score"] == pytest.approx(float(arrays["masked_score"][i]), rel=1e-6)
        [layer] = s["path"]  # --depth 1: only the last gate layer is a path layer
        assert layer["node"] == CNN_LAST_GATE and layer["units"] == 1024
        assert 1 <= layer["count"] == len(set(layer["kept"])) <= round(1024 * 0.05)
        assert all(0 <= k < 1024 for k in layer["kept"])
        assert layer["kept"] == lib.path[i][0].kept.tolist()


def test_explain_pathwise_tabular_in_chunks(tmp_path: Path, mlp: Explainer) -> None:
    x = np.concatenate([np.load(MLP_X)] * 2)  # 32 rows: two chunks of 16
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "exp"
    run("explain", MLP, tmp_path / "x.npy", "--out", out, "--width", "3", "--device", "cpu")
    assert sorted(p.name for p in out.iterdir()) == ["explanation.json", "explanation.npz"]  # no PNG
    lib = mlp.explain(x, width=3)
    with np.load(out / "explanation.npz") as data:
        assert data["attribution"].shape == (32, 8)
        np.testing.assert_allclose(data["attribution"], lib.attribution, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(data["attribution"][:16], data["attribution"][16:])
    report = json.loads((out / "explanation.json").read_text())
    assert len(report["samples"]) == 32
    for s in report["samples"]:
        assert [p["node"] for p in s["path"]] == MLP_GATES
        assert all(1 <= p["count"] <= 3 and p["units"] == 16 for p in s["path"])


def test_explain_gradient(tmp_path: Path, mlp: Explainer) -> None:
    out = tmp_path / "grad"
    result = run("explain", MLP, MLP_X, "--out", out, "--method", "gradient", "--target", "2", "--device", "cpu")
    assert "16 sample(s), method gradient" in result.stdout
    x = np.load(MLP_X)
    with np.load(out / "explanation.npz") as data:
        assert sorted(data.files) == ["attribution", "output", "target"]
        assert (data["target"] == 2).all()
        W = mlp.unwrap(x).weight  # the gradient of logit 2 is row 2 of W_x
        np.testing.assert_allclose(data["attribution"], W[:, 2], rtol=1e-5, atol=1e-6)
    report = json.loads((out / "explanation.json").read_text())
    assert report["method"] == "gradient" and report["options"] == {}
    assert set(report["samples"][0]) == {"target", "score"}
    assert not list(out.glob("*.png"))


def test_explain_integrated_gradients_exact(tmp_path: Path, mlp: Explainer) -> None:
    out = tmp_path / "ig"
    run("explain", MLP, MLP_X, "--out", out, "--method", "integrated_gradients", "--exact", "--device", "cpu")
    x = np.load(MLP_X)
    zero = mlp.record(np.zeros_like(x)).scores
    with np.load(out / "explanation.npz") as data:
        A, y, t = data["attribution"], data["output"], data["target"]
    idx = np.arange(len(t))
    # completeness: the attributions add up to f(x) - f(baseline 0) for the target
    np.testing.assert_allclose(A.sum(1), y[idx, t] - zero[idx, t], rtol=1e-4, atol=1e-4)
    report = json.loads((out / "explanation.json").read_text())
    assert report["options"] == {"steps": 32, "exact": True}


# --------------------------------------------------------------------------- decompose


def test_decompose_channels_image(tmp_path: Path, cnn: Explainer) -> None:
    out = tmp_path / "dec"
    result = run("decompose", CNN, CNN_X, "--out", out, "--group", "channel", "--top", "3", "--device", "cpu")
    assert f"layer '{CNN_LAST_GATE}'" in result.stdout
    assert len(pngs(out)) == 8
    with np.load(out / "decomposition.npz") as data:
        d = {k: data[k] for k in data.files}
    assert sorted(d) == ["attribution", "bypass", "output", "part_index", "part_score", "parts", "rest", "target"]
    assert d["parts"].shape == (8, 3, 1, 16, 16) and d["part_index"].shape == d["part_score"].shape == (8, 3)
    assert d["rest"].shape == d["bypass"].shape == d["attribution"].shape == (8, 1, 16, 16)
    assert ((0 <= d["part_index"]) & (d["part_index"] < 16)).all()  # channels of the last gate layer
    assert (np.diff(d["part_score"], axis=1) <= 0).all()  # ranked by contribution
    np.testing.assert_allclose(d["parts"].sum(1) + d["rest"] + d["bypass"], d["attribution"], atol=1e-5)
    np.testing.assert_allclose(d["attribution"], cnn.explain(np.load(CNN_X)).attribution, rtol=1e-5, atol=1e-6)

    report = json.loads((out / "decomposition.json").read_text())
    assert report["layer"] == CNN_LAST_GATE and report["group"] == "channel"
    assert isinstance(report["crosses_all_paths"], bool)
    for i, s in enumerate(report["samples"]):
        assert s["target"] == d["target"][i] and s["delta"] < 1e-4
        assert [p["channel"] for p in s["parts"]] == d["part_index"][i].tolist()
        assert all(set(p) == {"channel", "score", "active"} for p in s["parts"])


def test_decompose_figure_names_a_unit_by_channel_and_position() -> None:
    from onnx_pathwise.cli.commands import _part_name

    assert _part_name("unit", 15432, (512, 7, 7)) == "unit 15432 (c 314, 6, 4)"
    assert 15432 == 314 * 49 + 6 * 7 + 4
    assert _part_name("channel", 3, (16, 8, 8)) == "channel 3"
    assert _part_name("unit", 5, (24,)) == "unit 5"


def test_decompose_units_tabular(tmp_path: Path) -> None:
    out = tmp_path / "dec"
    run("decompose", MLP, MLP_X, "--out", out, "--top", "2", "--layer", MLP_GATES[0], "--device", "cpu")
    assert sorted(p.name for p in out.iterdir()) == ["decomposition.json", "decomposition.npz"]
    with np.load(out / "decomposition.npz") as data:
        assert data["parts"].shape == (16, 2, 8)
        assert ((0 <= data["part_index"]) & (data["part_index"] < 16)).all()
    report = json.loads((out / "decomposition.json").read_text())
    assert report["layer"] == MLP_GATES[0] and report["group"] == "unit"
    assert all(len(s["parts"]) == 2 and "unit" in s["parts"][0] for s in report["samples"])


# --------------------------------------------------------------------------- evaluate


def test_evaluate_width_sweep(tmp_path: Path) -> None:
    out = tmp_path / "ev"
    result = run("evaluate", CNN, CNN_X, "--out", out, "--methods", "pathwise,gradient", "--width", "5%",
                 "--width", "50%", "--device", "cpu")
    assert "insertion_auc" in result.stdout and f"wrote 3 file(s) to {out}" in result.stdout
    assert pngs(out) == ["curves.png", "width_sweep.png"]
    report = json.loads((out / "evaluation.json").read_text())
    assert report["n"] == 8 and report["model"] == str(CNN)
    labels = list(report["methods"])
    assert len(labels) == 3 and labels[-1] == "gradient"
    assert all(label.startswith("pathwise(width=") for label in labels[:2])
    for info in report["methods"].values():
        for name in ("insertion_auc", "deletion_auc"):
            metric = info["metrics"][name]
            assert len(metric["values"]) == 8 and 0 <= metric["mean"] <= 1
    for label in labels[:2]:
        assert len(report["methods"][label]["metrics"]["faithfulness"]["values"]) == 8
    assert {"score", "probability"} <= set(report["samples"])


def test_evaluate_one_width_no_sweep(tmp_path: Path) -> None:
    out = tmp_path / "ev"
    run("evaluate", MLP, MLP_X, "--out", out, "--methods", "pathwise", "--width", "4", "--device", "cpu")
    assert pngs(out) == ["curves.png"]
    assert len(json.loads((out / "evaluation.json").read_text())["methods"]) == 1


# --------------------------------------------------------------------------- audit


@pytest.fixture(scope="module")
def blocked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemm → Tanh → Gemm → Erf → Gemm: two blockers."""
    nodes = [helper.make_node("Gemm", ["x", "w"], ["a"], name="fc1"),
             helper.make_node("Tanh", ["a"], ["b"], name="tanh1"),
             helper.make_node("Gemm", ["b", "w"], ["c"], name="fc2"),
             helper.make_node("Erf", ["c"], ["d"], name="erf2"),
             helper.make_node("Gemm", ["d", "w"], ["y"], name="fc3")]
    model = make_model(nodes, [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")], name="blocked")
    path = tmp_path_factory.mktemp("models") / "blocked.onnx"
    onnx.save(model, str(path))
    return path


def test_audit_passes_on_the_cnn_sample() -> None:
    result = run("audit", CNN, "--device", "cpu")
    lines = result.stdout.splitlines()
    assert lines[0] == f"audit of {CNN}" and lines[-1] == "PASSED: 7 of 7 checks passed or skipped"
    assert [line.split()[0] for line in lines[1:-1]].count("FAIL") == 0


def test_audit_analyses_the_model_once_and_randomises_from_the_explainers_arrays(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One analysis for the checks (the randomised copy gets its own), and the randomised model
    is the original with only its last weight redrawn (built from the lean model and arrays)."""
    from onnx_pathwise import audit as audit_mod
    from onnx_pathwise import frontend

    loads: list[object] = []
    real = frontend.load
    monkeypatch.setattr(frontend, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    report = audit_mod.audit(CNN, device="cpu")
    assert report.passed and len(loads) == 2
    original = onnx.load(str(CNN))
    redrawn = loads[1]
    assert isinstance(redrawn, onnx.ModelProto)
    before = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in redrawn.graph.initializer}
    changed = [name for name in before if not np.array_equal(before[name], after[name])]
    assert set(before) == set(after) and len(changed) == 1


def test_audit_explains_the_batch_once_and_fails_when_runs_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch's explanation is made once and shared by the per-sample, determinism and
    randomisation checks (4 generated inputs: 1 batch + 4 single + 1 second run + 1 redrawn
    model); a second run that differs in its attributions, or a sample whose path differs
    from its batch's, fails its check."""
    import dataclasses

    from onnx_pathwise import audit as audit_mod

    calls: list[int] = []
    real = Explainer.explain
    monkeypatch.setattr(Explainer, "explain", lambda self, x, *a, **k: calls.append(len(x)) or real(self, x, *a, **k))
    report = audit_mod.audit(MLP, device="cpu")
    assert report.passed and calls == [4, 1, 1, 1, 1, 4, 4]

    def status(report: object) -> dict[str, str]:
        return {c.name: c.status for c in report.checks}  # type: ignore[attr-defined]

    def nudged(self, x, *a, **k):  # every run after the first gives other attributions
        e = real(self, x, *a, **k)
        calls.append(len(x))
        return e if len(calls) == 1 else dataclasses.replace(e, attribution=e.attribution * (1 + 1e-3))

    calls.clear()
    monkeypatch.setattr(Explainer, "explain", nudged)
    got = status(audit_mod.audit(MLP, device="cpu"))
    assert got["deterministic"] == "fail" and got["batch equals per-sample"] == "fail"

    def moved(self, x, *a, **k):  # a single sample's path loses a unit
        e = real(self, x, *a, **k)
        if len(x) > 1:
            return e
        layer = e.path[0][0]
        return dataclasses.replace(e, path=[[dataclasses.replace(layer, kept=layer.kept[1:])] + e.path[0][1:]])

    monkeypatch.setattr(Explainer, "explain", moved)
    got = status(audit_mod.audit(MLP, device="cpu"))
    assert got["batch equals per-sample"] == "fail" and got["deterministic"] == "pass"


def test_audit_and_diff_take_the_competing_classes_and_name_them(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`--classes N` reaches every pathwise explanation audit and diff make (a 1,000-class model
    took 9.4 minutes to audit with all of them) and every report names it; the default is all."""
    from onnx_pathwise import audit as audit_mod

    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(16, 6)).astype(np.float32), rng.normal(size=(40, 16)).astype(np.float32)
    model = make_model([helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["r"]),
                        helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)],
                       [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
                       inputs=[helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 6])])
    path = tmp_path / "many.onnx"
    onnx.save(model, str(path))
    np.save(tmp_path / "x.npy", rng.normal(size=(3, 6)).astype(np.float32))
    asked: list[object] = []
    real = Explainer.explain
    monkeypatch.setattr(Explainer, "explain", lambda self, x, *a, **k: asked.append(k.get("classes")) or real(self, x, *a, **k))

    audited = run("audit", path, "--classes", "5", "--report", "json", "--device", "cpu")
    assert asked and set(asked) == {5}
    report = json.loads(audited.stdout)
    assert report["passed"] and report["options"] == {"width": None, "classes": 5}
    assert "pathwise with 5 competing classes" in audited.stderr.splitlines()[0]
    junit = run("audit", path, "--classes", "5", "--report", "junit", "--device", "cpu").stdout
    assert '<property name="classes" value="5" />' in junit
    asked.clear()
    assert audit_mod.audit(path, device="cpu").options["classes"] == "all" and set(asked) == {None}

    asked.clear()
    out = tmp_path / "diff.json"
    diffed = run("diff", path, path, "--inputs", tmp_path / "x.npy", "--classes", "5", "--json", out,
                 "--min-overlap", "1", "--device", "cpu")
    assert set(asked) == {5} and "pathwise with 5 competing classes" in diffed.stdout.splitlines()[0]
    assert json.loads(out.read_text())["classes"] == 5
    # the same explanations as explain's own with five competing classes
    ex = Explainer(path, device="cpu")
    x = np.load(tmp_path / "x.npy")
    assert not np.array_equal(ex.explain(x, classes=5).attribution, ex.explain(x).attribution)


def test_audit_lists_the_blockers(blocked: Path) -> None:
    result = run("audit", blocked, "--device", "cpu", code=1)
    failed = [line for line in result.stdout.splitlines() if line.split()[:1] == ["FAIL"]]
    assert len(failed) == 1 and "analysable" in failed[0]
    assert "tanh1 (Tanh" in failed[0] and "erf2 (Erf" in failed[0]
    assert result.stdout.rstrip().splitlines()[-1].startswith("FAILED")


def test_audit_junit_report(tmp_path: Path, blocked: Path) -> None:
    out = tmp_path / "reports" / "audit.xml"
    result = run("audit", MLP, "--report", "junit", "--out", out, "--device", "cpu")
    assert "PASSED" in result.stdout  # the text still goes to stdout
    suite = ET.parse(out).getroot().find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == AUDIT_CHECKS
    assert suite.get("tests") == str(len(cases)) and suite.get("failures") == "0"
    skipped = [c.get("name") for c in cases if c.find("skipped") is not None]
    assert suite.get("skipped") == str(len(skipped))

    run("audit", blocked, "--report", "junit", "--out", tmp_path / "blocked.xml", "--device", "cpu", code=1)
    suite = ET.parse(tmp_path / "blocked.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "1"
    failure = suite.find("testcase[@name='analysable']/failure")
    assert failure is not None and "tanh1" in (failure.get("message") or "")


def test_audit_json_report_on_stdout(blocked: Path) -> None:
    result = run("audit", MLP, "--report", "json", "--device", "cpu")
    report = json.loads(result.stdout)  # the machine report alone on stdout, the text on stderr
    assert "PASSED" in result.stderr
    assert report["model"] == str(MLP) and report["passed"] is True
    assert [c["name"] for c in report["checks"]] == AUDIT_CHECKS
    for check in report["checks"]:
        assert set(check) == {"name", "status", "detail", "seconds", "values"}
        assert check["status"] in ("pass", "skip")
    completeness = report["checks"][2]["values"]
    assert len(completeness["delta"]) == 4 and completeness["relative"] < 1e-4  # 4 generated inputs

    report = json.loads(run("audit", blocked, "--report", "json", "--device", "cpu", code=1).stdout)
    assert report["passed"] is False
    blockers = report["checks"][0]["values"]["blockers"]
    assert [b.split(" ")[0] for b in blockers] == ["tanh1", "erf2"]


# --------------------------------------------------------------------------- diff


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory, mlp: Explainer) -> Path:
    """samples/mlp.onnx with its last weight matrix redrawn (same mean and spread)."""
    name = last_weight(mlp.source_ir, mlp.proto)
    assert name is not None
    path = tmp_path_factory.mktemp("models") / "mlp_retrained.onnx"
    onnx.save(randomize_initializer(mlp.proto, name, seed=3), str(path))
    return path


def test_diff_against_itself(tmp_path: Path) -> None:
    out = tmp_path / "diff.json"
    result = run("diff", MLP, MLP, "--inputs", MLP_X, "--json", out, "--fail-below", "0.99", "--min-overlap", "1",
                 "--max-changes", "0", "--device", "cpu")
    assert result.stdout.rstrip().endswith("PASSED") and "predictions changed   0 of 16" in result.stdout
    report = json.loads(out.read_text())
    assert set(report) == {"old", "new", "samples", "layers", "prediction_changes", "mean_correlation",
                           "mean_jaccard", "failures", "classes", "passed"}
    assert report["classes"] == "all"
    assert report["passed"] is True and report["failures"] == [] and report["prediction_changes"] == 0
    assert report["mean_correlation"] == pytest.approx(1.0) and report["mean_jaccard"] == 1.0
    assert report["layers"] == {g: 1.0 for g in MLP_GATES}
    assert len(report["samples"]) == 16
    for s in report["samples"]:
        assert s["old_prediction"] == s["new_prediction"] and s["correlation"] == pytest.approx(1.0)
        assert s["jaccard"] == {g: 1.0 for g in MLP_GATES}


def test_diff_against_a_retrained_copy(tmp_path: Path, retrained: Path) -> None:
    result = run("diff", MLP, retrained, "--inputs", MLP_X, "--device", "cpu")  # no threshold: reports only
    assert result.stdout.rstrip().endswith("PASSED")

    out = tmp_path / "diff.json"
    result = run("diff", MLP, retrained, "--inputs", MLP_X, "--json", out, "--fail-below", "0.99",
                 "--device", "cpu", code=1)
    assert "FAILED: mean attribution correlation" in result.stdout and "< 0.99" in result.stdout
    report = json.loads(out.read_text())
    assert report["passed"] is False and len(report["failures"]) == 1
    assert report["mean_correlation"] < 0.99
    assert report["prediction_changes"] == sum(s["old_prediction"] != s["new_prediction"] for s in report["samples"])
    assert set(report["layers"]) == set(MLP_GATES) and report["mean_jaccard"] < 1


def test_readme_documents_every_command() -> None:
    """README's command-line section has a table row and an example for every command."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    names = [c.name or c.callback.__name__ for c in app.registered_commands if c.callback is not None]
    assert {"inspect", "unwrap", "explain", "decompose", "evaluate", "audit", "diff"} <= set(names)
    for name in names:
        assert f"| `onnx-pathwise {name} " in section, name
        assert f"\nonnx-pathwise {name} " in section, name
