"""Hostile and broken inputs to every command: one case table.

Each row is a command line that must fail cleanly: exactly one ``onnx-pathwise: error:`` line on
stderr naming the file, node or tensor and the cause, the documented exit code, no traceback, and
nothing written (the temporary folder is byte-for-byte unchanged). Rows marked ``before_ort`` must
be refused before onnxruntime is asked to load anything (hazards: external data outside the
model's folder, local functions that expand enormously, tensors that would take terabytes).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import SAMPLES, make_model, run_module, runner
from numpy.lib import format as npy_format
from onnx import TensorProto, helper, numpy_helper

from onnx_pathwise import runtime
from onnx_pathwise.cli import app
from onnx_pathwise.errors import (
    DeviceError,
    InputError,
    ModelError,
    OutputError,
    PathwiseError,
    UnsupportedModelError,
)

MLP, MLP_X = SAMPLES / "mlp.onnx", SAMPLES / "mlp_inputs.npy"
USAGE, MODEL, UNSUPPORTED = PathwiseError.exit_code, ModelError.exit_code, UnsupportedModelError.exit_code
INPUT, DEVICE = InputError.exit_code, DeviceError.exit_code
assert OutputError.exit_code == USAGE

# --------------------------------------------------------------------------- bad files


def _model(nodes: list[onnx.NodeProto], inits: list[TensorProto], *, opset: int = 17,
           functions: list[onnx.FunctionProto] | None = None, extra_opsets: tuple[str, ...] = ()) -> onnx.ModelProto:
    """x (N, 2) → ... → y, built from ``nodes``."""
    return make_model(nodes, inits, name="hostile", opset=opset, functions=functions, extra_opsets=extra_opsets)


def _relu_net(w: TensorProto | None = None) -> onnx.ModelProto:
    w = w if w is not None else numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")
    return _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
                   helper.make_node("Relu", ["h"], ["y"], name="relu")], [w])


def _claims(name: str, dims: list[int]) -> TensorProto:
    """A float tensor whose dims claim ``dims`` but that stores no data at all."""
    t = TensorProto(name=name, data_type=TensorProto.FLOAT)
    t.dims.extend(dims)
    return t


def _external(tmp: Path, location: str) -> Path:
    """tmp/model/m.onnx whose weight lives in external data at ``location``."""
    folder = tmp / "model"
    folder.mkdir(exist_ok=True)
    w = numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in {"location": location, "offset": "0", "length": "16"}.items():
        w.external_data.add(key=k, value=v)
    path = folder / "m.onnx"
    onnx.save(_relu_net(w), str(path))
    return path


def _outside_bin(tmp: Path) -> Path:
    (tmp / "elsewhere").mkdir(exist_ok=True)
    path = tmp / "elsewhere" / "x.bin"
    path.write_bytes(np.eye(2, dtype=np.float32).tobytes())
    return path


def make_parent_escape(tmp: Path) -> None:
    _outside_bin(tmp)
    _external(tmp, "../elsewhere/x.bin")


def make_absolute(tmp: Path) -> None:
    _external(tmp, str(_outside_bin(tmp)))


def make_symlink(tmp: Path) -> None:
    target = _outside_bin(tmp)
    _external(tmp, "x.bin")
    (tmp / "model" / "x.bin").symlink_to(target)


def make_missing_data(tmp: Path) -> None:
    _external(tmp, "weights.bin")


def make_hardlink(tmp: Path) -> None:
    target = _outside_bin(tmp)
    _external(tmp, "x.bin")
    os.link(target, tmp / "model" / "x.bin")


def make_bad_files(tmp: Path) -> None:
    """Models that are not ONNX at all, and a few that are hostile."""
    (tmp / "empty.onnx").write_bytes(b"")
    data = MLP.read_bytes()
    (tmp / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (tmp / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp / "text.onnx").write_text("this is a text file, not a model\n" * 20)
    (tmp / "folder.onnx").mkdir()

    model = _relu_net()
    model.opset_import[0].version = 99
    onnx.save(model, str(tmp / "opset99.onnx"))

    # Tanh and Softplus inside the network: both must be named in the one error line
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="fc1"),
             helper.make_node("Tanh", ["a"], ["b"], name="squash"),
             helper.make_node("MatMul", ["b", "w"], ["c"], name="fc2"),
             helper.make_node("Softplus", ["c"], ["y"], name="smooth")]
    onnx.save(_model(nodes, [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")]),
              str(tmp / "unsupported.onnx"))

    # f0 = Relu, f_i = f_{i-1} ∘ f_{i-1}: 30 levels inline to 2**29 nodes
    imports = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    functions = [helper.make_function("local", "f0", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], imports)]
    for i in range(1, 30):
        calls = [helper.make_node(f"f{i - 1}", ["a"], ["t"], domain="local"),
                 helper.make_node(f"f{i - 1}", ["t"], ["b"], domain="local")]
        functions.append(helper.make_function("local", f"f{i}", ["a"], ["b"], calls, imports))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("f29", ["h"], ["y"], domain="local", name="deep")]
    onnx.save(_model(nodes, [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")], functions=functions,
                     extra_opsets=("local",)), str(tmp / "nested.onnx"))

    # a local function that calls itself
    recursive = helper.make_function("local", "again", ["a"], ["b"],
                                     [helper.make_node("again", ["a"], ["b"], domain="local")], imports)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("again", ["h"], ["y"], domain="local", name="loop")]
    onnx.save(_model(nodes, [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")], functions=[recursive],
                     extra_opsets=("local",)), str(tmp / "recursive.onnx"))

    # ConstantOfShape of 10^12 floats (4 TB) added to the path
    shape = numpy_helper.from_array(np.array([100000, 100000, 100], np.int64), "huge_shape")
    one = numpy_helper.from_array(np.array([1.0], np.float32))
    nodes = [helper.make_node("ConstantOfShape", ["huge_shape"], ["filler"], value=one, name="fill"),
             helper.make_node("ReduceSum", ["filler"], ["total"], keepdims=0, name="sum"),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Add", ["h", "total"], ["z"], name="shift"),
             helper.make_node("Relu", ["z"], ["y"], name="relu")]
    onnx.save(_model(nodes, [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w"), shape]),
              str(tmp / "constant_of_shape.onnx"))

    # the same through Expand of a shape computed from constants (found by shape inference)
    parts = [numpy_helper.from_array(np.array([100000], np.int64), "rows"),
             numpy_helper.from_array(np.array([100000, 100], np.int64), "cols"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    nodes = [helper.make_node("Concat", ["rows", "cols"], ["big_shape"], axis=0, name="join"),
             helper.make_node("Expand", ["one", "big_shape"], ["ones"], name="spread"),
             helper.make_node("ReduceSum", ["ones"], ["total"], keepdims=0, name="sum"),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Add", ["h", "total"], ["z"], name="shift"),
             helper.make_node("Relu", ["z"], ["y"], name="relu")]
    onnx.save(_model(nodes, [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w"), *parts]),
              str(tmp / "expand.onnx"))

    # passes validation, fails in onnxruntime's probe run (Reshape of 2 values to 3×5)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Reshape", ["h", "bad_shape"], ["r"], name="reshape"),
             helper.make_node("Relu", ["r"], ["y"], name="relu")]
    onnx.save(_model(nodes, [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w"),
                             numpy_helper.from_array(np.array([3, 5], np.int64), "bad_shape")]),
              str(tmp / "bad_reshape.onnx"))

    # a Constant node and an initializer whose dims claim terabytes, with no data behind them
    nodes = [helper.make_node("Constant", [], ["w"], value=_claims("big", [1_000_000, 1_000_000]), name="const"),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    onnx.save(_model(nodes, []), str(tmp / "big_constant.onnx"))
    onnx.save(_relu_net(_claims("w", [1_000_000, 1_000_000])), str(tmp / "big_initializer.onnx"))
    # a modest claim, still without data: must not end in numpy's reshape error
    onnx.save(_relu_net(_claims("w", [2, 2])), str(tmp / "hollow_initializer.onnx"))


def make_bad_inputs(tmp: Path) -> None:
    """Input files for samples/mlp.onnx (8 features) that must be refused, and one that must not."""
    with open(tmp / "huge_header.npy", "wb") as f:  # claims 8 TB, holds 64 bytes
        npy_format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 2 * 10**6)})
        f.write(np.zeros(16, np.float32).tobytes())
    np.save(tmp / "objects.npy", np.array([[1.0] * 8, None], dtype=object), allow_pickle=True)
    np.save(tmp / "strings.npy", np.array([["0.5"] * 8] * 2))
    np.savez(tmp / "pickled_member.npz", x=np.array([{"evil": 1}], dtype=object))
    x = np.load(MLP_X)
    nan, inf = x.copy(), x.copy()
    nan[3, 2] = np.nan
    inf[0, 0] = np.inf
    np.save(tmp / "nan.npy", nan)
    np.save(tmp / "inf.npy", inf)
    np.save(tmp / "wrong_shape.npy", x[:, :5])
    np.save(tmp / "wrong_rank.npy", x[None])
    (tmp / "out").mkdir()
    (tmp / "out" / "explanation.npz").write_bytes(b"an earlier run")
    (tmp / "taken.npz").write_bytes(b"keep me")


MAKERS: dict[str, Callable[[Path], None]] = {
    "files": make_bad_files, "inputs": make_bad_inputs, "parent_escape": make_parent_escape,
    "absolute": make_absolute, "symlink": make_symlink, "hardlink": make_hardlink,
    "missing_data": make_missing_data,
}


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    """``argv``: ``{t}`` is the test's temporary folder, ``{s}`` the samples folder."""

    argv: str
    code: int
    fragments: tuple[str, ...]
    make: str = "files"
    before_ort: bool = False  # refused before onnxruntime loads anything
    real: bool = False  # run ``python -m onnx_pathwise`` in a subprocess, not CliRunner


U = "unwrap {t}/%s {s}/mlp_inputs.npy --out {t}/new/u.npz --device cpu"
E = "explain {s}/mlp.onnx {t}/%s --out {t}/new --device cpu"

CASES: dict[str, Case] = {
    # model files that are not models
    "model-empty": Case(U % "empty.onnx", MODEL, ("empty.onnx", "empty file"), before_ort=True),
    "model-truncated": Case(U % "truncated.onnx", MODEL, ("truncated.onnx", "not a valid ONNX protobuf")),
    "model-random-bytes": Case(U % "random.onnx", MODEL, ("random.onnx", "not a valid ONNX protobuf")),
    "model-text": Case("inspect {t}/text.onnx", MODEL, ("text.onnx", "not a valid ONNX protobuf")),
    "model-missing": Case(U % "missing.onnx", MODEL, ("missing.onnx", "no such file"), before_ort=True),
    "model-missing-real": Case(U % "missing.onnx", MODEL, ("missing.onnx", "no such file"), real=True),
    "model-directory": Case("explain {t}/folder.onnx {s}/mlp_inputs.npy --out {t}/new", MODEL,
                            ("folder.onnx", "is a directory"), before_ort=True),
    "opset-99": Case(U % "opset99.onnx", MODEL, ("opset99.onnx", "opset 99", "newer"), before_ort=True),
    "unsupported-unwrap": Case(U % "unsupported.onnx", UNSUPPORTED,
                               ("squash (Tanh", "smooth (Softplus", "2 unsupported node(s)"), before_ort=True),
    "unsupported-explain": Case("explain {t}/unsupported.onnx {s}/tiny_mlp_inputs.npy --out {t}/new --device cpu",
                                UNSUPPORTED, ("squash (Tanh", "smooth (Softplus"), before_ort=True),
    # hazards: refused before onnxruntime (or onnx's external-data loader) touches anything
    "external-data-parent": Case(U % "model/m.onnx", MODEL, ("m.onnx", "'w'", "../elsewhere/x.bin", "relative path"),
                                 make="parent_escape", before_ort=True),
    "external-data-absolute": Case(U % "model/m.onnx", MODEL, ("m.onnx", "'w'", "relative path"),
                                   make="absolute", before_ort=True),
    "external-data-symlink": Case(U % "model/m.onnx", MODEL, ("m.onnx", "'w'", "symbolic link"),
                                  make="symlink", before_ort=True),
    "external-data-hardlink": Case(U % "model/m.onnx", MODEL, ("m.onnx", "'w'", "hard link"),
                                   make="hardlink", before_ort=True),
    "external-data-hardlink-real": Case(U % "model/m.onnx", MODEL, ("m.onnx", "hard link"), make="hardlink",
                                        real=True),
    "external-data-missing": Case(U % "model/m.onnx", MODEL, ("m.onnx", "'weights.bin'", "no such file"),
                                  make="missing_data", before_ort=True),
    "function-calls-itself": Case(U % "recursive.onnx", MODEL, ("recursive.onnx", "'local.again' calls itself"),
                                  before_ort=True),
    "nested-functions": Case(U % "nested.onnx", MODEL, ("nested.onnx", "f29", "local function"), before_ort=True),
    "nested-functions-inspect": Case("inspect {t}/nested.onnx", MODEL, ("nested.onnx", "f29"), before_ort=True),
    "constant-of-shape-4TB": Case(U % "constant_of_shape.onnx", MODEL, ("constant_of_shape.onnx", "fill", "GiB"),
                                  before_ort=True),
    "expand-computed-4TB": Case(U % "expand.onnx", MODEL, ("expand.onnx", "'ones'", "GiB"), before_ort=True),
    "onnxruntime-fails-real": Case(U % "bad_reshape.onnx", MODEL,
                                   ("bad_reshape.onnx", "onnxruntime failed", "reshape"), real=True),
    "constant-claims-TB": Case(U % "big_constant.onnx", MODEL, ("big_constant.onnx", "const", "GiB"),
                               before_ort=True),
    "initializer-claims-TB": Case(U % "big_initializer.onnx", MODEL, ("big_initializer.onnx", "'w'", "GiB"),
                                  before_ort=True),
    "initializer-without-data": Case(U % "hollow_initializer.onnx", MODEL, ("hollow_initializer.onnx", "'w'"),
                                     before_ort=True),
    # input files
    "npy-huge-header": Case(E % "huge_header.npy", INPUT, ("huge_header.npy", "(1000000, 2000000)", "limit"),
                            make="inputs"),
    "npy-object-dtype": Case(E % "objects.npy", INPUT, ("objects.npy", "pickled data is never loaded"),
                             make="inputs"),
    "npy-string-dtype": Case("decompose {s}/mlp.onnx {t}/strings.npy --out {t}/new --device cpu", INPUT,
                             ("strings.npy", "not numeric"), make="inputs"),
    "npz-pickled-member": Case(E % "pickled_member.npz", INPUT, ("pickled_member.npz", "'x'", "pickled"),
                               make="inputs"),
    "npz-pickled-member-real": Case(E % "pickled_member.npz", INPUT, ("pickled_member.npz", "pickled"),
                                    make="inputs", real=True),
    "nan": Case(E % "nan.npy", INPUT, ("nan.npy", "1 value(s) are NaN or infinite"), make="inputs"),
    "inf-diff": Case("diff {s}/mlp.onnx {s}/mlp.onnx --inputs {t}/inf.npy --json {t}/new/d.json --device cpu",
                     INPUT, ("inf.npy", "NaN or infinite"), make="inputs"),
    "inf-audit": Case("audit {s}/mlp.onnx --inputs {t}/inf.npy --report json --out {t}/new/a.json --device cpu",
                      INPUT, ("inf.npy", "NaN or infinite"), make="inputs"),
    "wrong-shape": Case("decompose {s}/mlp.onnx {t}/wrong_shape.npy --out {t}/new --device cpu", INPUT,
                        ("wrong_shape.npy", "shape (16, 5)", "expected (8,) or (N, 8)"), make="inputs"),
    "wrong-rank": Case("evaluate {s}/mlp.onnx {t}/wrong_rank.npy --out {t}/new --device cpu", INPUT,
                       ("wrong_rank.npy", "shape (1, 16, 8)"), make="inputs"),
    # outputs that may not be written
    "unwrap-existing-file": Case("unwrap {s}/mlp.onnx {s}/mlp_inputs.npy --out {t}/taken.npz --device cpu", USAGE,
                                 ("taken.npz", "already exists", "--force"), make="inputs", real=True),
    "explain-existing-folder": Case("explain {s}/mlp.onnx {s}/mlp_inputs.npy --out {t}/out --device cpu", USAGE,
                                    ("out", "already holds explanation.npz", "--force"), make="inputs"),
    # options
    "device-cuda": Case("explain {s}/mlp.onnx {s}/mlp_inputs.npy --out {t}/new --device cuda", DEVICE,
                        ("device 'cuda'", "cannot use a CUDA GPU")),
    "width-abc": Case("explain {s}/mlp.onnx {s}/mlp_inputs.npy --out {t}/new --device cpu --width abc", USAGE,
                      ("--width 'abc'", "expected a count")),
    "width-0": Case("explain {s}/mlp.onnx {s}/mlp_inputs.npy --out {t}/new --device cpu --width 0", USAGE,
                    ("width 0", "at least 1")),
    "width-150%": Case("decompose {s}/mlp.onnx {s}/mlp_inputs.npy --out {t}/new --device cpu --width 150%", USAGE,
                       ("width '150%'", "(0, 100]")),
    "evaluate-width-abc": Case("evaluate {s}/mlp.onnx {s}/mlp_inputs.npy --out {t}/new --device cpu "
                               "--width 5 --width abc", USAGE, ("--width 'abc'",)),
    "width-with-gradient": Case("explain {s}/mlp.onnx {s}/mlp_inputs.npy --out {t}/new --device cpu "
                                "--method gradient --width 3", USAGE, ("--width", "--method pathwise only")),
    "audit-out-without-report": Case("audit {s}/mlp.onnx --out {t}/new/a.xml --device cpu", USAGE,
                                     ("--out needs --report",)),
    "target-out-of-range": Case("explain {s}/mlp.onnx {s}/mlp_inputs.npy --out {t}/new --device cpu --target 3",
                                USAGE, ("target 3", "out of range for 3 scores")),
    "unknown-method": Case("explain {s}/mlp.onnx {s}/mlp_inputs.npy --out {t}/new --device cpu --method lime",
                           USAGE, ("--method 'lime'", "pathwise")),
    "decompose-not-a-gate": Case("decompose {s}/mlp.onnx {s}/mlp_inputs.npy --out {t}/new --device cpu "
                                 "--layer /net/net.0/Gemm", USAGE,
                                 ("'/net/net.0/Gemm' is not a gate layer", "gate layers:")),
}
if runtime.cuda_available():
    del CASES["device-cuda"]


def _argv(case: Case, tmp: Path) -> list[str]:
    return [a.format(t=tmp, s=SAMPLES) for a in case.argv.split()]


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path below ``folder`` with its content (None for folders); links are not followed."""
    out: dict[str, bytes | None] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = None if p.is_dir() or p.is_symlink() else p.read_bytes()
    return out


@pytest.fixture
def no_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every onnxruntime session and external-data load the command attempts."""
    calls: list[str] = []

    def forbidden(what: str) -> Callable[..., None]:
        def record(*args: object, **kwargs: object) -> None:
            calls.append(what)
            raise AssertionError(f"{what} called before the model was refused")
        return record

    monkeypatch.setattr(runtime.ort, "InferenceSession", forbidden("onnxruntime.InferenceSession"))
    monkeypatch.setattr("onnx.external_data_helper.load_external_data_for_model",
                        forbidden("load_external_data_for_model"))
    return calls


def _run(case: Case, tmp: Path) -> tuple[int, str, str, BaseException | None]:
    argv = _argv(case, tmp)
    if case.real:
        done = run_module(*argv, cwd=tmp, timeout=120)
        return done.returncode, done.stdout, done.stderr, None
    result = runner.invoke(app, argv)
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.stdout, result.stderr, exc


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_refused_with_one_line(case: Case, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    MAKERS[case.make](tmp_path)
    calls = request.getfixturevalue("no_onnxruntime") if case.before_ort and not case.real else None
    before = _snapshot(tmp_path)
    start = time.perf_counter()
    code, stdout, stderr, exc = _run(case, tmp_path)
    elapsed = time.perf_counter() - start

    assert exc is None, f"unexpected {type(exc).__name__}: {exc}"
    assert code == case.code and code > 0, (code, stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-pathwise: error: "), stderr
    assert "Traceback" not in stderr and stdout == ""
    for fragment in case.fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert _snapshot(tmp_path) == before, "the failed command wrote or changed files"
    if calls is not None:
        assert calls == [], calls
        assert elapsed < 5, f"refusing took {elapsed:.1f} s"


@pytest.mark.parametrize("name", ["model-truncated", "nested-functions", "npy-huge-header", "width-abc"])
def test_debug_shows_the_traceback(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    MAKERS[case.make](tmp_path)
    result = runner.invoke(app, ["--debug", *_argv(case, tmp_path)])
    assert isinstance(result.exception, PathwiseError) and result.exception.exit_code == case.code
    assert "onnx-pathwise: error:" not in result.stderr


def test_debug_traceback_in_a_real_process(tmp_path: Path) -> None:
    done = run_module("--debug", "inspect", str(tmp_path / "no.onnx"), timeout=120)
    assert done.returncode != 0 and "Traceback" in done.stderr and "ModelError" in done.stderr


def test_integer_inputs_are_converted(tmp_path: Path) -> None:
    """Documented: any numeric dtype is accepted and converted to the model's input dtype."""
    np.save(tmp_path / "ints.npy", np.array([[1, 2], [3, -4]], np.int64))
    out = tmp_path / "u.npz"
    result = runner.invoke(app, ["unwrap", str(SAMPLES / "tiny_mlp.onnx"), str(tmp_path / "ints.npy"),
                                 "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with np.load(out) as data:
        assert data["weight"].dtype == np.float32 and data["weight"].shape == (2, 2, 2)
        np.testing.assert_allclose(data["weight"][0], np.eye(2), atol=1e-6)  # x = (1, 2): W_x = I


def test_bool_inputs_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "flags.npy", np.ones((2, 2), bool))
    result = runner.invoke(app, ["unwrap", str(SAMPLES / "tiny_mlp.onnx"), str(tmp_path / "flags.npy"),
                                 "--out", str(tmp_path / "u.npz"), "--device", "cpu"])
    assert result.exit_code == INPUT and "flags.npy: dtype bool is not numeric" in result.stderr
    assert not (tmp_path / "u.npz").exists()


def test_audit_reports_a_hostile_model_without_running_it(tmp_path: Path, no_onnxruntime: list[str]) -> None:
    """audit turns a refused model into a failed check (exit 1), quickly, without onnxruntime."""
    make_bad_files(tmp_path)
    result = runner.invoke(app, ["audit", str(tmp_path / "nested.onnx"), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.stdout and "f29" in result.stdout
    assert no_onnxruntime == []


def test_kernels_compile_without_a_writable_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """numba refuses cache=True when no cache location is writable (a read-only install and no
    home directory): the kernels then compile without the on-disk cache instead of failing."""
    from onnx_pathwise import kernels

    real = kernels.njit

    def no_cache(**options):  # type: ignore[no-untyped-def]
        if options.get("cache"):
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x.py'")
        return real(**options)

    monkeypatch.setattr(kernels, "njit", no_cache)

    @kernels._compiled()
    def twice(a):  # type: ignore[no-untyped-def]
        return 2 * a

    assert twice(np.arange(3)).tolist() == [0, 2, 4]
