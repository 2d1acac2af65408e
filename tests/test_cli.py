"""The ``onnx-pathwise`` command line, through Typer's CliRunner and one real subprocess."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import ROOT, SAMPLES, invoke, make_model, one_error_line, run_module, runner, vi
from onnx import helper, numpy_helper

import onnx_pathwise
from onnx_pathwise import Explainer, InputError, runtime
from onnx_pathwise.cli import EXIT_CODES, app
from onnx_pathwise.errors import (
    DeviceError,
    ModelError,
    OutputError,
    PathwiseError,
    UnsupportedModelError,
)


@pytest.fixture(scope="module")
def unsupported_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemm → Tanh → Gemm → Gelu → Gemm: two blockers, both must be listed."""
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["z1"], transB=1, name="fc1"),
        helper.make_node("Tanh", ["z1"], ["t1"], name="tanh1"),
        helper.make_node("Gemm", ["t1", "w2", "b2"], ["z2"], transB=1, name="fc2"),
        helper.make_node("Gelu", ["z2"], ["g2"], name="gelu2"),
        helper.make_node("Gemm", ["g2", "w3", "b3"], ["logits"], transB=1, name="fc3"),
    ]
    shapes = {"w1": (4, 2), "b1": (4,), "w2": (4, 4), "b2": (4,), "w3": (2, 4), "b3": (2,)}
    inits = [numpy_helper.from_array(np.ones(s, np.float32), k) for k, s in shapes.items()]
    model = make_model(nodes, inits, name="blocked", outputs=[vi("logits")], opset=20)
    path = tmp_path_factory.mktemp("models") / "blocked.onnx"
    onnx.save(model, str(path))
    return path


# --------------------------------------------------------------------------- inspect


def test_inspect_text_cnn() -> None:
    result = invoke("inspect", SAMPLES / "cnn.onnx")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "'x': float32, shape (N, 1, 16, 16)" in text
    assert "before the final Softmax" in text
    assert "Classes   4" in text
    assert "Gate layers: 2" in text and "8×16×16" in text and "2048" in text
    assert "Routing nodes: 2" in text and "MaxPool" in text
    assert "Segments: 3" in text and "Flatten → Gemm" in text
    assert "Parameters  2,276" in text


def test_inspect_text_names_a_wide_segments_first_tensors_and_counts_them(tmp_path: Path) -> None:
    """A segment that reads many tensors (a DenseNet's Concat) lists its first two and their
    count in the text table, whose rows stay readable; the JSON lists every one."""
    branches = 7
    nodes, inits = [], []
    for i in range(branches):
        inits.append(numpy_helper.from_array(np.full((3, 2), 0.1 * (i + 1), np.float32), f"w{i}"))
        nodes += [helper.make_node("Gemm", ["x", f"w{i}"], [f"branch_number_{i}_pre"], transB=1),
                  helper.make_node("Relu", [f"branch_number_{i}_pre"], [f"branch_number_{i}_out"])]
    inits.append(numpy_helper.from_array(np.ones((2, 3 * branches), np.float32), "wo"))
    nodes += [helper.make_node("Concat", [f"branch_number_{i}_out" for i in range(branches)], ["cat"], axis=1),
              helper.make_node("Gemm", ["cat", "wo"], ["y"], transB=1)]
    path = tmp_path / "wide.onnx"
    onnx.save(make_model(nodes, inits), str(path))
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "Concat" in line)
    assert "branch_number_0_out, branch_number_1_out, … (7 tensors)" in row
    assert "branch_number_2_out" not in result.stdout.split("Segments:")[1]
    assert max(len(line) for line in result.stdout.splitlines()) < 160
    info = json.loads(invoke("inspect", path, "--json").stdout)
    assert max(len(seg["inputs"]) for seg in info["segments"]) == branches


def test_inspect_json_mlp() -> None:
    result = invoke("inspect", SAMPLES / "mlp.onnx", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["analysable"] is True
    assert info["input"] == {"name": "x", "shape": ["N", 8], "dtype": "float32", "batch_fixed_in_file": False}
    assert info["output"]["name"] == "probs" and info["output"]["peeled"] == ["Softmax"]
    assert info["output"]["classes"] == 3
    assert [(g["op_type"], g["units"]) for g in info["gate_layers"]] == [("Relu", 16), ("Relu", 16)]
    assert [s["parameters"] for s in info["segments"]] == [8 * 16 + 16, 16 * 16 + 16, 16 * 3 + 3]
    assert info["parameters"] == 467
    assert info["routing"] == []
    assert info["segments"][0]["inputs"] == ["x"]


def test_inspect_tiny_mlp_matches_its_docstring() -> None:
    info = json.loads(invoke("inspect", SAMPLES / "tiny_mlp.onnx", "--json").stdout)
    assert [(g["name"], g["units"]) for g in info["gate_layers"]] == [("relu1", 3)]
    assert info["output"] == {"name": "logits", "explained": "logits", "peeled": [], "classes": 2}
    assert [s["nodes"] for s in info["segments"]] == [["fc1"], ["fc2"]]
    assert info["parameters"] == 17


def test_inspect_unsupported_lists_every_blocker(unsupported_model: Path) -> None:
    result = invoke("inspect", unsupported_model)
    assert result.exit_code == 1, result.output
    assert "not analysable: 2 node(s)" in result.stdout
    assert "tanh1 (Tanh, opset 20)" in result.stdout and "gelu2 (Gelu, opset 20)" in result.stdout
    assert "Supported ops:" in result.stdout and "Relu" in result.stdout

    result = invoke("inspect", unsupported_model, "--json")
    assert result.exit_code == 1
    info = json.loads(result.stdout)
    assert info["analysable"] is False
    assert [p.split(" ")[0] for p in info["problems"]] == ["tanh1", "gelu2"]
    assert "Relu" in info["supported"]


def test_inspect_unreadable_model(tmp_path: Path) -> None:
    line = one_error_line(invoke("inspect", tmp_path / "missing.onnx"), ModelError.exit_code)
    assert "missing.onnx: no such file" in line
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01garbage" * 10)
    one_error_line(invoke("inspect", tmp_path / "junk.onnx"), ModelError.exit_code)


# --------------------------------------------------------------------------- unwrap


def test_unwrap_writes_npz(tmp_path: Path) -> None:
    out = tmp_path / "new" / "folder" / "unwrap.npz"  # missing folders are created
    result = invoke("unwrap", SAMPLES / "cnn.onnx", SAMPLES / "cnn_inputs.npy", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"wrote .*unwrap\.npz: 8 sample\(s\) × 4 scores .* max completeness delta \S+\n",
                        result.stdout), result.stdout
    x = np.load(SAMPLES / "cnn_inputs.npy")
    with np.load(out, allow_pickle=False) as data:
        assert sorted(data.files) == ["bias", "delta", "output", "weight"]
        W, b, y, delta = data["weight"], data["bias"], data["output"], data["delta"]
    assert W.shape == (8, 4, 1, 16, 16) and b.shape == (8, 4) and y.shape == (8, 4) and delta.shape == (8,)
    assert float(delta.max()) < 1e-4 * max(1.0, float(np.abs(y).max()))
    np.testing.assert_allclose(np.einsum("nkd,nd->nk", W.reshape(8, 4, -1), x.reshape(8, -1)) + b, y,
                               rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in out.parent.iterdir()) == ["unwrap.npz"]


def test_unwrap_single_sample_without_batch_axis_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "in.npz", inputs=np.array([1.0, 2.0], np.float32), note=np.zeros(1))
    out = tmp_path / "u.npz"
    result = invoke("unwrap", SAMPLES / "tiny_mlp.onnx", tmp_path / "in.npz", "-o", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    with np.load(out) as data:
        np.testing.assert_allclose(data["weight"][0], np.eye(2), atol=1e-6)  # the docstring's W_x = I
        np.testing.assert_allclose(data["bias"][0], [0.5, -0.5], atol=1e-6)


def _bad_input(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.npy"
    if case == "random":
        path.write_bytes(np.random.default_rng(0).bytes(300))
    elif case == "pickled":
        np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    elif case == "raw_pickle":
        path.write_bytes(pickle.dumps(np.ones((2, 8))))
    elif case == "wrong_shape":
        np.save(path, np.ones((2, 7), np.float32))
    elif case == "nan":
        x = np.ones((2, 8), np.float32)
        x[1, 3] = np.nan
        np.save(path, x)
    elif case == "strings":
        np.save(path, np.array(["a"] * 8))
    elif case == "truncated":
        path.write_bytes((SAMPLES / "mlp_inputs.npy").read_bytes()[:-7])
    return path  # "missing": never created


@pytest.mark.parametrize("case", ["missing", "random", "pickled", "raw_pickle", "wrong_shape", "nan",
                                  "strings", "truncated"])
def test_unwrap_bad_input_one_line_no_output(tmp_path: Path, case: str) -> None:
    bad = _bad_input(tmp_path, case)
    out = tmp_path / "out" / "u.npz"
    result = invoke("unwrap", SAMPLES / "mlp.onnx", bad, "--out", out, "--device", "cpu")
    line = one_error_line(result, InputError.exit_code)
    assert str(bad) in line
    assert not out.exists() and not out.parent.exists()


def test_unwrap_unsupported_model(unsupported_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "u.npz"
    result = invoke("unwrap", unsupported_model, SAMPLES / "tiny_mlp_inputs.npy", "-o", out, "--device", "cpu")
    line = one_error_line(result, UnsupportedModelError.exit_code)
    assert "tanh1" in line and "gelu2" in line
    assert not out.exists()


def test_existing_output_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "u.npz"
    out.write_bytes(b"keep me")
    args = ["unwrap", SAMPLES / "tiny_mlp.onnx", SAMPLES / "tiny_mlp_inputs.npy", "--out", out, "--device", "cpu"]
    line = one_error_line(invoke(*args), OutputError.exit_code)
    assert "already exists" in line and "--force" in line
    assert out.read_bytes() == b"keep me"
    assert invoke(*args, "--force").exit_code == 0
    with np.load(out) as data:
        assert data["weight"].shape == (1, 2, 2)


def test_output_that_is_a_directory(tmp_path: Path) -> None:
    args = ["unwrap", SAMPLES / "tiny_mlp.onnx", SAMPLES / "tiny_mlp_inputs.npy", "--out", tmp_path]
    for extra in ([], ["--force"]):
        line = one_error_line(invoke(*args, *extra, "--device", "cpu"), OutputError.exit_code)
        assert "is a directory" in line


def test_output_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = invoke("unwrap", SAMPLES / "tiny_mlp.onnx", SAMPLES / "tiny_mlp_inputs.npy",
                    "--out", tmp_path / "file" / "u.npz", "--device", "cpu")
    assert "is not a folder" in one_error_line(result, OutputError.exit_code)


@pytest.mark.skipif(runtime.cuda_available(), reason="a usable CUDA GPU is present")
def test_cuda_unavailable(tmp_path: Path) -> None:
    result = invoke("unwrap", SAMPLES / "tiny_mlp.onnx", SAMPLES / "tiny_mlp_inputs.npy",
                    "--out", tmp_path / "u.npz", "--device", "cuda")
    assert "cuda" in one_error_line(result, DeviceError.exit_code)
    assert not (tmp_path / "u.npz").exists()


def test_debug_keeps_the_traceback(tmp_path: Path) -> None:
    result = invoke("--debug", "unwrap", SAMPLES / "tiny_mlp.onnx", tmp_path / "missing.npy",
                    "--out", tmp_path / "u.npz", "--device", "cpu")
    assert isinstance(result.exception, InputError)


def test_unexpected_errors_are_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(self: Explainer, x: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(Explainer, "unwrap", bug)
    result = invoke("unwrap", SAMPLES / "tiny_mlp.onnx", SAMPLES / "tiny_mlp_inputs.npy",
                    "--out", tmp_path / "u.npz", "--device", "cpu")
    assert isinstance(result.exception, ZeroDivisionError)
    assert not (tmp_path / "u.npz").exists()


def test_help_and_version() -> None:
    result = invoke("--help")
    assert result.exit_code == 0 and "inspect" in result.stdout and "unwrap" in result.stdout
    assert "Exit codes" in result.stdout
    assert invoke("--version").stdout.strip() == f"onnx-pathwise {onnx_pathwise.__version__}"


@pytest.mark.parametrize("command", ["", "inspect", "unwrap", "explain", "decompose", "evaluate", "audit", "diff"])
def test_help_reads_whole_at_80_columns(command: str) -> None:
    """No help text is cut off with an ellipsis (a word longer than its column) and no paragraph
    breaks mid-sentence where its docstring did (typer keeps a docstring's line breaks)."""
    result = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "…" not in result.stdout
    # A description line that stops well short of the width while its paragraph goes on is a
    # docstring's line break printed as it is.
    text = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith(("│", "╭", "╰"))]
    for line, following in zip(text, text[1:]):
        if not line.startswith("Usage") and following[:1].islower():
            assert len(line) > 60, (line, following)


# --------------------------------------------------------------------------- the real entry point


def test_python_m_entry_point(tmp_path: Path) -> None:
    out = tmp_path / "u.npz"
    base = ["unwrap", str(SAMPLES / "mlp.onnx")]
    ok = run_module(*base, str(SAMPLES / "mlp_inputs.npy"), "--out", str(out), "--device", "cpu",
                    cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"wrote {out}: 16 sample(s) × 3 scores")
    with np.load(out) as data:
        assert data["weight"].shape == (16, 3, 8)

    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    failed = run_module(*base, str(bad), "--out", str(tmp_path / "v.npz"), "--device", "cpu",
                        cwd=tmp_path, timeout=120)
    assert failed.returncode == InputError.exit_code
    assert failed.stderr.strip().splitlines() == [failed.stderr.strip()]
    assert failed.stderr.startswith("onnx-pathwise: error: ") and "Traceback" not in failed.stderr
    assert not (tmp_path / "v.npz").exists()


# --------------------------------------------------------------------------- README stays true


README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_exit_code_table_matches_the_code() -> None:
    section = README.split("### Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", section, flags=re.M))
    expected = {str(code): f"{short}: {text}" for code, (short, text) in EXIT_CODES.items()}
    expected["0"], expected["1"] = EXIT_CODES[0][0], EXIT_CODES[1][1]
    assert rows == expected
    codes = {cls.exit_code for cls in (PathwiseError, ModelError, UnsupportedModelError, InputError,
                                       OutputError, DeviceError)}
    assert codes <= set(EXIT_CODES)


def test_readme_starts_with_the_two_commands() -> None:
    block = README.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert block == [
        "pip install . && onnx-pathwise explain samples/cnn.onnx samples/cnn_inputs.npy --out out/explain",
        "pip install '.[test]' && python -m pytest",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q '.[test]'" in ci and "python -m pytest" in ci


def test_readme_lists_every_module() -> None:
    package = ROOT / "onnx_pathwise"
    modules = [p.relative_to(package).as_posix() for p in sorted(package.rglob("*.py"))]
    missing = [m for m in modules if f"`{m}`" not in README]
    assert not missing, f"README 'Code organisation' does not list {missing}"


def test_samples_are_small() -> None:
    for path in SAMPLES.iterdir():
        if path.suffix in (".onnx", ".npy"):
            assert path.stat().st_size < 200_000, path


def test_the_command_exits_fast_with_its_code_and_every_byte_written(tmp_path: Path) -> None:
    """``onnx-pathwise`` ends with os._exit once its outputs are written (cli.shell.run): the
    exit code, stdout read through a pipe and stderr are whole, and the files are complete."""
    done = run_module("inspect", SAMPLES / "cnn.onnx", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["input"]  # the whole JSON arrived before the exit
    done = run_module("explain", SAMPLES / "mlp.onnx", SAMPLES / "mlp_inputs.npy", "--out", tmp_path / "o",
                      "--device", "cpu")
    assert done.returncode == 0 and "wrote 2 file(s)" in done.stdout, done.stderr
    n = np.load(SAMPLES / "mlp_inputs.npy").shape[0]
    assert np.load(tmp_path / "o" / "explanation.npz")["attribution"].shape[0] == n
    json.loads((tmp_path / "o" / "explanation.json").read_text())
    done = run_module("explain", tmp_path / "missing.onnx", SAMPLES / "mlp_inputs.npy", "--out", tmp_path / "p")
    assert done.returncode == 3 and done.stderr.strip() == f"onnx-pathwise: error: {tmp_path / 'missing.onnx'}: no such file"
