"""Hostile model, input and external-data files (issue 11, items 2 and 3).

A CI job runs the tool on model files from pull requests, in a working directory that holds the
job's secrets. Every case here builds a hostile file with the onnx helper API and checks: the
documented exit code, one ``onnx-pathwise: error:`` line naming the culprit (tensor, node or
file), no traceback, nothing written, nothing read from outside the model's folder (a secret is
planted in the working directory and in the model folder's parent; its bytes appear in no
output), and no hang (FIFO cases run in a subprocess or a thread with a timeout).
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from helpers import run_module, runner
from onnx import TensorProto, helper, numpy_helper

from onnx_pathwise import Explainer, frontend, io, load, runtime
from onnx_pathwise.cli import app
from onnx_pathwise.errors import InputError, ModelError
from onnx_pathwise.load import external

MODEL_EXIT, INPUT_EXIT = ModelError.exit_code, InputError.exit_code
#: The weight every hostile model would read: hand-checkable, 16 bytes.
W = np.array([[1.25, -0.5], [0.75, 1.5]], np.float32)
#: The planted secret: 16 bytes that would make a plausible weight matrix too.
SECRET = np.array([[1.0137, 1.7243], [1.3391, 1.8867]], np.float32)
X = np.array([[1.0, 2.0], [0.5, 0.25]], np.float32)


# --------------------------------------------------------------------------- the site


@dataclass(frozen=True)
class Site:
    """``job/`` is the working directory (a secret in it), ``pr/`` the folder a pull request
    brought (a secret in it), ``pr/model/`` the model's folder, ``pr/x.npy`` the inputs."""

    root: Path

    @property
    def cwd(self) -> Path:
        return self.root / "job"

    @property
    def folder(self) -> Path:
        return self.root / "pr" / "model"

    @property
    def model(self) -> Path:
        return self.folder / "m.onnx"

    @property
    def inputs(self) -> Path:
        return self.root / "pr" / "x.npy"


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Site:
    s = Site(tmp_path)
    s.folder.mkdir(parents=True)
    s.cwd.mkdir()
    for secret in (s.cwd / "secret", s.root / "pr" / "secret"):
        secret.write_bytes(SECRET.tobytes())
    np.save(s.inputs, X)
    monkeypatch.chdir(s.cwd)
    return s


def _snapshot(folder: Path) -> dict[str, Any]:
    """Every path below ``folder`` with its content or kind; links are not followed."""
    out: dict[str, Any] = {}
    for p in sorted(folder.rglob("*")):
        mode = p.lstat().st_mode
        rel = p.relative_to(folder).as_posix()
        out[rel] = p.read_bytes() if stat.S_ISREG(mode) else stat.S_IFMT(mode)
    return out


def _leaks(text: str | bytes) -> bool:
    """Whether ``text`` shows the secret: its bytes, any of its 4-byte values, or its digits."""
    data = text.encode("utf-8", "replace") if isinstance(text, str) else text
    if any(v.tobytes() in data for v in SECRET.reshape(-1)):
        return True
    return any(f"{v:.3f}".encode() in data for v in SECRET.reshape(-1))


@pytest.fixture
def no_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records (and refuses) every onnxruntime session the code under test tries to create."""
    calls: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        calls.append("InferenceSession")
        raise AssertionError("onnxruntime was asked to load a model that should have been refused")

    monkeypatch.setattr(runtime.ort, "InferenceSession", refuse)
    return calls


@pytest.fixture
def ort_models(monkeypatch: pytest.MonkeyPatch) -> list[onnx.ModelProto]:
    """Every model handed to onnxruntime, parsed back (sessions still run)."""
    seen: list[onnx.ModelProto] = []
    real = runtime.ort.InferenceSession

    def spy(data: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(onnx.load_model_from_string(data) if isinstance(data, bytes) else onnx.load(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(runtime.ort, "InferenceSession", spy)
    return seen


def _within(seconds: float, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a daemon thread; fail (instead of hanging) when it blocks."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed back to the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for more than {seconds} s"
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _cli(site: Site, *argv: str) -> tuple[int, str, str]:
    """Run ``python -m onnx_pathwise`` in a real process, in the job's working directory."""
    done = run_module(*argv, cwd=site.cwd, timeout=30)
    return done.returncode, done.stdout, done.stderr


def _in_process(*argv: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(argv))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def _assert_refused(code: int, stdout: str, stderr: str, expected: int, *fragments: str) -> str:
    assert code == expected, (code, stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnx-pathwise: error: "), stderr
    assert "Traceback" not in stderr and stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not _leaks(stdout) and not _leaks(stderr)
    return lines[0]


def _unwrap_argv(site: Site, model: Path | None = None) -> list[str]:
    return ["unwrap", str(model or site.model), str(site.inputs), "--out", str(site.root / "out.npz"),
            "--device", "cpu"]


# --------------------------------------------------------------------------- models


def _graph(nodes: list[onnx.NodeProto], inits: list[TensorProto], *, in_dims: list[Any] | None = None,
           name: str = "hostile", outputs: list[str] = ("y",)) -> onnx.GraphProto:  # type: ignore[assignment]
    return helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_dims or ["N", 2])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], initializer=inits)


def _model(graph: onnx.GraphProto, *, functions: list[onnx.FunctionProto] = (),  # type: ignore[assignment]
           opset: int = 17) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("local", 1)] if functions else [])
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = 9
    return model


def _relu_net(w: TensorProto | None = None, extra_nodes: list[onnx.NodeProto] = (),  # type: ignore[assignment]
              extra_inits: list[TensorProto] = ()) -> onnx.ModelProto:  # type: ignore[assignment]
    """x (N, 2) → MatMul(x, w) → Relu → y; ``w`` defaults to :data:`W` as an initializer."""
    inits = [w if w is not None else numpy_helper.from_array(W, "w"), *extra_inits]
    nodes = [*extra_nodes, helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    return _model(_graph(nodes, inits))


def _external(name: str, location: str | None, *, dims: tuple[int, ...] = (2, 2),
              data_type: int = TensorProto.FLOAT, **fields: str | None) -> TensorProto:
    """A tensor whose 16 bytes live in external data at ``location`` (``fields`` override
    offset/length/checksum or add keys; None leaves a key out)."""
    t = TensorProto(name=name, data_type=data_type, data_location=TensorProto.EXTERNAL)
    t.dims.extend(dims)
    entries = {"location": location, "offset": "0", "length": "16", **fields}
    for key, value in entries.items():
        if value is not None:
            t.external_data.add(key=key, value=value)
    return t


def _with(t: TensorProto, raw_data: bytes | None = None, float_data: list[float] | None = None) -> TensorProto:
    """``t`` with values stored inline too."""
    if raw_data is not None:
        t.raw_data = raw_data
    if float_data is not None:
        t.float_data.extend(float_data)
    return t


def _sparse(values: TensorProto, indices: TensorProto) -> onnx.SparseTensorProto:
    s = onnx.SparseTensorProto(values=values, indices=indices)
    s.dims.extend([2, 2])
    return s


def _const(name: str, t: TensorProto) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [name], name=f"const_{name}")
    node.attribute.append(helper.make_attribute("value", t))
    return node


def _branch(name: str, nodes: list[onnx.NodeProto], inits: list[TensorProto] = ()) -> onnx.GraphProto:  # type: ignore[assignment]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                             initializer=list(inits))


def _if(t: TensorProto, in_then_init: bool, output: str = "side") -> onnx.NodeProto:
    """If(cond) whose then-branch holds ``t`` (an initializer of the branch or a Constant)."""
    then = (_branch("then", [helper.make_node("Identity", [t.name], ["out"])], [t]) if in_then_init
            else _branch("then", [_const("out", t)]))
    other = _branch("else", [_const("out", numpy_helper.from_array(W, "v"))])
    return helper.make_node("If", ["cond"], [output], name="branch", then_branch=then, else_branch=other)


def _side(nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """The ReLU net plus ``nodes`` computing an unused ``side`` output from a constant ``cond``."""
    cond = numpy_helper.from_array(np.array(True), "cond")
    model = _relu_net(extra_nodes=nodes, extra_inits=[cond])
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, None))
    return model


def _loop_body(inner: list[onnx.NodeProto]) -> onnx.GraphProto:
    return helper.make_graph(
        [*inner, helper.make_node("Identity", ["c_in"], ["c_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])


def _loop(inner: list[onnx.NodeProto]) -> onnx.NodeProto:
    return helper.make_node("Loop", ["", "cond"], ["side"], name="loop", body=_loop_body(inner))


def at_initializer(t: TensorProto) -> onnx.ModelProto:
    t.name = "w"
    return _relu_net(t)


def at_constant(t: TensorProto) -> onnx.ModelProto:
    model = _relu_net()
    del model.graph.initializer[:]
    model.graph.node.insert(0, _const("w", t))
    return model


def at_constant_sparse(t: TensorProto) -> onnx.ModelProto:
    del t.dims[:]
    t.dims.append(4)
    node = helper.make_node("Constant", [], ["side"], name="const_sparse")
    idx = numpy_helper.from_array(np.arange(4, dtype=np.int64), "idx")
    node.attribute.append(helper.make_attribute("sparse_value", _sparse(t, idx)))
    return _side([node])


def at_sparse_values(t: TensorProto) -> onnx.ModelProto:
    del t.dims[:]
    t.dims.append(4)
    model = _relu_net()
    model.graph.sparse_initializer.append(
        _sparse(t, numpy_helper.from_array(np.arange(4, dtype=np.int64), "idx")))
    return model


def at_sparse_indices(t: TensorProto) -> onnx.ModelProto:
    del t.dims[:]
    t.dims.append(2)
    t.data_type = TensorProto.INT64  # 2 int64 = 16 bytes
    model = _relu_net()
    model.graph.sparse_initializer.append(
        _sparse(numpy_helper.from_array(np.ones(2, np.float32), "s"), t))
    return model


def at_if_initializer(t: TensorProto) -> onnx.ModelProto:
    return _side([_if(t, in_then_init=True)])


def at_if_constant(t: TensorProto) -> onnx.ModelProto:
    return _side([_if(t, in_then_init=False)])


def at_loop_body(t: TensorProto) -> onnx.ModelProto:
    return _side([_loop([_const("out", t)])])


def at_nested(t: TensorProto) -> onnx.ModelProto:
    """Loop body → If then-branch → Constant."""
    return _side([_loop([_if(t, in_then_init=False, output="out")])])


def at_nested_initializer(t: TensorProto) -> onnx.ModelProto:
    """Loop body → If then-branch initializer."""
    return _side([_loop([_if(t, in_then_init=True, output="out")])])


def at_function(t: TensorProto) -> onnx.ModelProto:
    body = [_const("c", t), helper.make_node("MatMul", ["a", "c"], ["b"])]
    fn = helper.make_function("local", "Dense", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("Dense", ["x"], ["h"], domain="local", name="dense"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    return _model(_graph(nodes, []), functions=[fn])


def at_tensors_attribute(t: TensorProto) -> onnx.ModelProto:
    model = _relu_net()
    model.graph.node[1].attribute.append(helper.make_attribute("extra", [t]))
    return model


def at_training_info(t: TensorProto) -> onnx.ModelProto:
    model = _relu_net()
    info = model.training_info.add()
    info.initialization.CopyFrom(helper.make_graph([], "init", [], [], initializer=[t]))
    return model


PLACES: dict[str, Callable[[TensorProto], onnx.ModelProto]] = {
    "initializer": at_initializer,
    "constant": at_constant,
    "constant-sparse": at_constant_sparse,
    "sparse-values": at_sparse_values,
    "sparse-indices": at_sparse_indices,
    "if-initializer": at_if_initializer,
    "if-constant": at_if_constant,
    "loop-body": at_loop_body,
    "loop-if-constant": at_nested,
    "loop-if-initializer": at_nested_initializer,
    "function": at_function,
    "tensors-attribute": at_tensors_attribute,
    "training-info": at_training_info,
}


def _save(site: Site, place: str, location: str | None, **fields: str | None) -> str:
    """Save the model with its external tensor ``secret_w`` at ``place``; return the name the
    error must show."""
    t = _external("secret_w", location, **fields)
    model = PLACES[place](t)
    onnx.save(model, str(site.model))
    return "'w'" if place == "initializer" else "'secret_w'" if "sparse" not in place else "sparse"


# --------------------------------------------------------------------------- pointing at the secret


def _hardlink(site: Site) -> str:
    os.link(site.root / "pr" / "secret", site.folder / "hard.bin")
    return "hard.bin"


def _symlink(site: Site) -> str:
    (site.folder / "link.bin").symlink_to(site.root / "pr" / "secret")
    return "link.bin"


def _linked_folder(site: Site) -> str:
    (site.folder / "up").symlink_to(site.root / "pr", target_is_directory=True)
    return "up/secret"


def _fifo(site: Site) -> str:
    os.mkfifo(site.folder / "pipe.bin")
    return "pipe.bin"


def _socket_file(site: Site) -> str:
    """A Unix socket in the model's folder (bound by a relative name: socket paths are short)."""
    here = os.getcwd()
    os.chdir(site.folder)
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind("sock.bin")
    finally:
        os.chdir(here)
    return "sock.bin"


#: kind → (set-up returning the location, what the one error line says)
POINTERS: dict[str, tuple[Callable[[Site], str], str]] = {
    "cwd-relative": (lambda s: "secret", "no such file in the model's folder"),
    "parent": (lambda s: "../secret", "relative path inside the model's folder"),
    "inner-dotdot": (lambda s: "sub/../../secret", "relative path inside the model's folder"),
    "absolute": (lambda s: str(s.cwd / "secret"), "relative path inside the model's folder"),
    "backslash": (lambda s: "..\\secret", "relative path inside the model's folder"),
    "symlink": (_symlink, "symbolic link"),
    "linked-folder": (_linked_folder, "linked folder"),
    "hardlink": (_hardlink, "hard link"),
    "fifo": (_fifo, "FIFO"),
    "socket": (_socket_file, "socket"),
}


@pytest.mark.parametrize("pointer", list(POINTERS))
@pytest.mark.parametrize("place", list(PLACES))
def test_external_data_outside_the_folder_is_refused_everywhere(
    site: Site, place: str, pointer: str, no_onnxruntime: list[str]
) -> None:
    """Every place a tensor can live × every way to point outside the model's folder: a
    ModelError naming the tensor, before onnxruntime sees anything, without blocking."""
    setup, fragment = POINTERS[pointer]
    culprit = _save(site, place, setup(site))
    before = _snapshot(site.root)
    with pytest.raises(ModelError) as info:
        _within(20, lambda: Explainer(site.model, device="cpu"))
    message = str(info.value)
    assert message.startswith(str(site.model)) and fragment in message and culprit in message, message
    assert "\n" not in message and not _leaks(message)
    assert no_onnxruntime == []
    assert _snapshot(site.root) == before


@pytest.mark.parametrize("place", ["initializer", "if-constant", "loop-if-initializer", "function",
                                   "sparse-indices"])
@pytest.mark.parametrize("pointer", ["cwd-relative", "parent", "linked-folder"])
def test_cli_never_shows_the_secret(site: Site, place: str, pointer: str) -> None:
    """The CLI in-process, in the job's working directory: exit 3, one line, nothing written."""
    culprit = _save(site, place, POINTERS[pointer][0](site))
    before = _snapshot(site.root)
    code, out, err = _in_process(*_unwrap_argv(site))
    _assert_refused(code, out, err, MODEL_EXIT, "m.onnx", culprit, POINTERS[pointer][1])
    assert _snapshot(site.root) == before


@pytest.mark.parametrize("place", ["if-initializer", "loop-if-constant"])
def test_cli_secret_in_a_branch_real_process(site: Site, place: str) -> None:
    """The issue's leak: external data inside an If/Loop body that onnxruntime resolved against
    the working directory. In a real process: refused, nothing of the secret anywhere."""
    _save(site, place, "secret")
    before = _snapshot(site.root)
    code, out, err = _cli(site, *_unwrap_argv(site))
    _assert_refused(code, out, err, MODEL_EXIT, "'secret_w'", "no such file in the model's folder")
    assert _snapshot(site.root) == before


def test_cli_external_data_fifo_does_not_block(site: Site) -> None:
    _save(site, "loop-if-initializer", _fifo(site))
    code, out, err = _cli(site, *_unwrap_argv(site))
    _assert_refused(code, out, err, MODEL_EXIT, "pipe.bin", "FIFO")


# --------------------------------------------------------------------------- the fields


FIELDS: dict[str, tuple[dict[str, str | None], str]] = {
    "offset-abc": ({"offset": "abc"}, "offset 'abc' is not a non-negative integer"),
    "offset-negative": ({"offset": "-1"}, "offset '-1' is not a non-negative integer"),
    "length-negative": ({"length": "-5"}, "length '-5' is not a non-negative integer"),
    "length-float": ({"length": "1e3"}, "length '1e3'"),
    "length-space": ({"length": " 16"}, "length ' 16'"),
    "length-huge": ({"length": "9" * 40}, "not a non-negative integer"),
    "offset-past-end": ({"offset": "99"}, "outside the file (16 bytes)"),
    "length-past-end": ({"length": "32"}, "outside the file (16 bytes)"),
    "length-short": ({"offset": "8", "length": "8"}, ": 8 bytes, but shape"),
    "no-length-short": ({"offset": "4", "length": None}, ": 12 bytes, but shape"),
    "unknown-key": ({"owner": "root"}, "unknown external-data key 'owner'"),
    "checksum-not-sha1": ({"checksum": "xyz"}, "checksum 'xyz' is not a SHA-1 digest"),
    "checksum-wrong": ({"checksum": "0" * 40}, "matches neither"),
}


@pytest.mark.parametrize("place", ["initializer", "loop-if-initializer", "function", "sparse-values"])
@pytest.mark.parametrize("case", list(FIELDS))
def test_external_data_fields_are_validated(site: Site, case: str, place: str, no_onnxruntime: list[str]) -> None:
    fields, fragment = FIELDS[case]
    (site.folder / "w.bin").write_bytes(W.tobytes())
    culprit = _save(site, place, "w.bin", **fields)
    with pytest.raises(ModelError) as info:
        load.read_model(site.model)
    assert fragment in str(info.value) and culprit in str(info.value), str(info.value)
    assert no_onnxruntime == []


def test_nothing_is_read_before_every_reference_passed(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """A good reference first and a bad one deeper in the model: refused without reading a byte."""
    (site.folder / "w.bin").write_bytes(W.tobytes())
    model = at_loop_body(_external("secret_w", "../secret"))
    model.graph.initializer[0].CopyFrom(_external("w", "w.bin"))
    onnx.save(model, str(site.model))
    parsed = onnx.load(str(site.model), load_external_data=False)
    reads: list[object] = []
    monkeypatch.setattr(external, "open_regular", lambda *a, **k: reads.append(a))
    monkeypatch.setattr(os, "pread", lambda *a: reads.append(a))
    with pytest.raises(ModelError, match=r"'secret_w'\) stores its data in '../secret'"):
        load.load_external_data(parsed, site.model)
    assert reads == []


@pytest.mark.parametrize("location", [None, ""])
def test_external_data_without_location(site: Site, location: str | None) -> None:
    _save(site, "if-constant", location)
    code, out, err = _in_process(*_unwrap_argv(site))
    _assert_refused(code, out, err, MODEL_EXIT, "'secret_w'", "names no location")


def test_external_data_key_given_twice(site: Site) -> None:
    (site.folder / "w.bin").write_bytes(W.tobytes())
    t = _external("w", "w.bin")
    t.external_data.add(key="location", value="../secret")
    onnx.save(_relu_net(t), str(site.model))
    code, out, err = _in_process(*_unwrap_argv(site))
    _assert_refused(code, out, err, MODEL_EXIT, "'w'", "'location' is given twice")


@pytest.mark.parametrize("case", ["offset-abc", "length-negative"])
def test_cli_bad_fields(site: Site, case: str) -> None:
    """The issue's tracebacks: offset "abc", length -5 — now exit 3, one line."""
    (site.folder / "w.bin").write_bytes(W.tobytes())
    fields, fragment = FIELDS[case]
    _save(site, "initializer", "w.bin", **fields)
    code, out, err = _in_process(*_unwrap_argv(site))
    _assert_refused(code, out, err, MODEL_EXIT, "'w'", fragment)


# --------------------------------------------------------------------------- external data that is fine


@pytest.mark.parametrize("place", list(PLACES))
def test_external_data_inside_the_folder_is_loaded_by_us(site: Site, place: str) -> None:
    """Legitimate external data (in a subfolder) is read by the loader into the ModelProto: no
    external reference is left for onnxruntime to resolve."""
    (site.folder / "data").mkdir()
    (site.folder / "data" / "w.bin").write_bytes(b"junk" + W.tobytes() + b"tail")
    digest = hashlib.sha1(W.tobytes()).hexdigest()
    _save(site, place, "data/w.bin", offset="4", checksum=digest)
    model = load.read_model(site.model)
    assert load.external_references(model) == []
    tensors, _ = load.all_tensors(model)
    loaded = [t for _, t in tensors if t.name == ("w" if place == "initializer" else "secret_w")]
    assert len(loaded) == 1 and loaded[0].raw_data == W.tobytes()
    assert loaded[0].data_location == TensorProto.DEFAULT and not loaded[0].external_data


def test_checksum_of_the_whole_file_is_accepted(site: Site) -> None:
    data = W.tobytes() + b"other tensors"
    (site.folder / "w.bin").write_bytes(data)
    _save(site, "initializer", "w.bin", checksum=hashlib.sha1(data).hexdigest().upper())
    assert load.external_references(load.read_model(site.model)) == []


@pytest.mark.parametrize("place", ["initializer", "constant"])
def test_external_weights_explained_exactly_without_external_references_in_onnxruntime(
    site: Site, place: str, ort_models: list[onnx.ModelProto]
) -> None:
    (site.folder / "w.bin").write_bytes(W.tobytes())
    _save(site, place, "w.bin")
    result = Explainer(site.model, device="cpu").unwrap(X)
    np.testing.assert_allclose(result.weight[0], W.T, atol=1e-6)  # x = (1, 2): both units active
    assert float(result.delta.max()) < 1e-5
    assert ort_models, "onnxruntime was never used"
    for model in ort_models:
        assert load.external_references(model) == []


def test_in_memory_model_with_external_references_is_refused(site: Site) -> None:
    (site.folder / "w.bin").write_bytes(W.tobytes())
    _save(site, "if-initializer", "w.bin")
    model = onnx.load(str(site.model), load_external_data=False)
    with pytest.raises(ModelError, match="pass the model's file path") as info:
        Explainer(model, device="cpu")
    assert "'secret_w'" in str(info.value) and "'w.bin'" in str(info.value)


def test_runtime_refuses_external_references(site: Site) -> None:
    """Defence in depth: whatever path a model took, onnxruntime never resolves external data."""
    model = at_loop_body(_external("secret_w", "secret"))
    with pytest.raises(ModelError, match="'secret_w'.*refusing to let onnxruntime resolve it"):
        runtime.session(model)
    with pytest.raises(ModelError, match="'secret_w'"):
        runtime.session(model.SerializeToString())


# --------------------------------------------------------------------------- special files


@pytest.fixture
def special(site: Site) -> Iterator[dict[str, Path]]:
    os.mkfifo(site.root / "pr" / "pipe")
    short = Path(f"/tmp/opw-{os.getpid()}-{id(site)}.sock")  # AF_UNIX paths are short
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(short))
    (site.root / "pr" / "to_zero").symlink_to("/dev/zero")
    yield {"fifo": site.root / "pr" / "pipe", "device": Path("/dev/zero"), "socket": short,
           "proc": Path("/proc/self/environ"), "link-to-device": site.root / "pr" / "to_zero"}
    sock.close()
    short.unlink(missing_ok=True)


SPECIAL = {"fifo": "FIFO", "device": "character device", "socket": "socket", "proc": "under /proc",
           "link-to-device": "character device"}


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_special_model_paths_are_refused_unopened(site: Site, special: dict[str, Path], kind: str,
                                                  no_onnxruntime: list[str]) -> None:
    path = special[kind]
    with pytest.raises(ModelError) as info:
        _within(20, lambda: load.read_model(path))
    assert str(info.value).startswith(str(path)) and SPECIAL[kind] in str(info.value)


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_special_input_paths_are_refused_unopened(special: dict[str, Path], kind: str) -> None:
    path = special[kind]
    with pytest.raises(InputError) as info:
        _within(20, lambda: io.load_array(path))
    assert str(info.value).startswith(str(path)) and SPECIAL[kind] in str(info.value)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_cli_special_model_real_process(site: Site, special: dict[str, Path], kind: str) -> None:
    code, out, err = _cli(site, *_unwrap_argv(site, special[kind]))
    _assert_refused(code, out, err, MODEL_EXIT, str(special[kind]), SPECIAL[kind])


@pytest.mark.parametrize("kind", ["fifo", "proc"])
def test_cli_special_input_real_process(site: Site, special: dict[str, Path], kind: str) -> None:
    onnx.save(_relu_net(), str(site.model))
    code, out, err = _cli(site, "explain", str(site.model), str(special[kind]), "--out", str(site.root / "o"),
                          "--device", "cpu")
    _assert_refused(code, out, err, INPUT_EXIT, str(special[kind]), SPECIAL[kind])
    assert not (site.root / "o").exists()


def test_swapped_file_is_caught_on_the_descriptor(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """A regular file checked by path and a FIFO opened (a swap between the two): the
    descriptor's fstat catches it, and O_NONBLOCK kept the open from blocking."""
    onnx.save(_relu_net(), str(site.model))
    fifo = site.root / "pr" / "pipe"
    os.mkfifo(fifo)
    real_open = os.open
    monkeypatch.setattr(io.os, "open", lambda path, flags, *a, **k: real_open(fifo, flags, *a, **k))
    with pytest.raises(ModelError, match="changed while it was being opened"):
        _within(20, lambda: load.read_model(site.model))


# --------------------------------------------------------------------------- stored tensors


def _typed(name: str, data_type: int, dims: list[int], **fields: Any) -> TensorProto:
    t = TensorProto(name=name, data_type=data_type)
    t.dims.extend(dims)
    for key, value in fields.items():
        if key == "raw_data":
            t.raw_data = value
        else:
            getattr(t, key).extend(value)
    return t


def _reshape_net(shape: TensorProto) -> onnx.ModelProto:
    return _relu_net(extra_nodes=[], extra_inits=[shape])


TENSORS: dict[str, tuple[Callable[[], onnx.ModelProto], tuple[str, ...]]] = {
    "type-0": (lambda: _relu_net(_typed("w", 0, [2, 2], float_data=W.reshape(-1).tolist())),
               ("initializer 'w'", "data type 0")),
    "type-0-raw": (lambda: _relu_net(_typed("w", 0, [2, 2], raw_data=W.tobytes())), ("'w'", "data type 0")),
    "type-999": (lambda: _relu_net(_typed("w", 999, [2, 2], raw_data=W.tobytes())), ("'w'", "unknown data type 999")),
    "int64-with-float-data": (lambda: _reshape_net(_typed("shape", TensorProto.INT64, [2], float_data=[1.0, 2.0])),
                              ("'shape'", "INT64 but stores its values in float_data")),
    "raw-wrong-length": (lambda: _relu_net(_typed("w", TensorProto.FLOAT, [2, 2], raw_data=b"\0" * 12)),
                         ("'w'", "(16 bytes of FLOAT) but stores 12 bytes")),
    "raw-and-float-data": (lambda: _relu_net(_typed("w", TensorProto.FLOAT, [2, 2], raw_data=W.tobytes(),
                                                    float_data=W.reshape(-1).tolist())), ("'w'", "twice")),
    "external-and-raw": (lambda: _relu_net(_with(_external("w", "w.bin"), raw_data=W.tobytes())),
                         ("'w'", "stores its values twice, in raw_data and in external data")),
    "external-and-float-data": (lambda: _relu_net(_with(_external("w", "w.bin"), float_data=W.reshape(-1).tolist())),
                                ("'w'", "stores its values twice, in float_data and in external data")),
    "string-raw": (lambda: _reshape_net(_typed("s", TensorProto.STRING, [1], raw_data=b"abc")),
                   ("'s'", "STRING but stores raw_data")),
    "type-0-in-branch": (lambda: at_if_constant(_typed("secret_w", 0, [2, 2], float_data=[1.0] * 4)),
                         ("'secret_w'", "subgraph 'then_branch'", "'branch' (If)", "data type 0")),
    "mismatch-in-function": (lambda: at_function(_typed("secret_w", TensorProto.DOUBLE, [2, 2],
                                                        float_data=[1.0] * 4)),
                             ("'secret_w'", "local function 'local.Dense'", "DOUBLE but stores its values in float_data")),
    "sparse-values-mismatch": (lambda: at_sparse_values(_typed("v", TensorProto.FLOAT, [4], raw_data=b"\0" * 3)),
                               ("sparse initializer", "(values)")),
}


@pytest.mark.parametrize("case", list(TENSORS))
def test_malformed_tensors_are_model_errors(site: Site, case: str, no_onnxruntime: list[str]) -> None:
    make, fragments = TENSORS[case]
    model = make()
    site.model.write_bytes(model.SerializeToString())  # as is: onnx.save would move raw_data out to external data
    with pytest.raises(ModelError) as info:
        Explainer(site.model, device="cpu")
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert no_onnxruntime == []


def _key(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    out = bytearray()
    for value in ((number << 3) | 2, len(payload)):
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out) + payload


def _graph_in_two_parts(*raw: bytes, padding: bytes = b"") -> bytes:
    """_relu_net's file with its weight ``w`` moved to a second occurrence of the model's graph
    field (protobuf merges the two), after ``padding`` (more graph fields), and stored as one
    raw_data field per entry of ``raw`` (the last one counts)."""
    model = _relu_net()
    del model.graph.initializer[:]
    w = _typed("w", TensorProto.FLOAT, [2, 2]).SerializeToString() + b"".join(_key(9, r) for r in raw)
    return model.SerializeToString() + _key(7, padding + _key(5, w))


@pytest.mark.parametrize("raw, fragment", [
    ((W.tobytes(),), None),
    ((b"\0" * 12, W.tobytes()), None),
    ((W.tobytes(), b"\0" * 12), "(16 bytes of FLOAT) but stores 12 bytes"),
    ((b"\0" * 20,), "(16 bytes of FLOAT) but stores 20 bytes"),
])
def test_raw_data_lengths_are_read_from_the_file_as_protobuf_parses_it(site: Site, raw: tuple[bytes, ...],
                                                                      fragment: str | None) -> None:
    """The file path reads the initializers' raw_data lengths from the file's bytes (reading them
    from the parsed message copies every weight): a graph given in two parts is merged and a
    later raw_data replaces an earlier one, as protobuf does, so a wrong length is refused and a
    right one explained; the lengths equal the parsed message's, and bytes that end inside a
    field give none (the message's are read then)."""
    data = _graph_in_two_parts(*raw)
    parsed = onnx.load_model_from_string(data)
    assert load.resources.raw_data_sizes(data) == [len(t.raw_data) for t in parsed.graph.initializer]
    assert load.resources.raw_data_sizes(data[:-3]) is None
    site.model.write_bytes(data)
    if fragment is None:  # the same model as _relu_net's plain file
        x = np.array([[1.0, 2.0], [-3.0, 0.5]], np.float32)
        got = Explainer(site.model, device="cpu").unwrap(x).weight
        np.testing.assert_array_equal(got, Explainer(_relu_net(), device="cpu").unwrap(x).weight)
    else:
        with pytest.raises(ModelError) as info:
            Explainer(site.model, device="cpu")
        assert "initializer 'w'" in str(info.value) and fragment in str(info.value)


def test_a_file_of_many_empty_fields_is_not_walked_field_by_field(site: Site) -> None:
    """Walking a file's fields for the raw_data lengths is a Python loop: past
    MAX_WALKED_FIELDS it gives up at once and the loader reads the message's lengths, so a file
    of a million empty fields in its graph neither hangs the walk nor changes the verdict."""
    import time

    padding = _key(99, b"") * (load.resources.MAX_WALKED_FIELDS + 10)  # unknown graph fields
    for raw, refused in ((W.tobytes(), False), (b"\0" * 12, True)):
        data = _graph_in_two_parts(raw, padding=padding)
        start = time.perf_counter()
        assert load.resources.raw_data_sizes(data) is None
        assert time.perf_counter() - start < 5.0
        site.model.write_bytes(data)
        if refused:
            with pytest.raises(ModelError) as info:
                Explainer(site.model, device="cpu")
            assert "(16 bytes of FLOAT) but stores 12 bytes" in str(info.value)
        else:
            Explainer(site.model, device="cpu").explain(np.array([[1.0, 2.0]], np.float32))


def _rename_bytes(model: onnx.ModelProto, name: str) -> bytes:
    """The serialized model with the first byte of every occurrence of ``name`` set to 0xFF:
    a name that protobuf hands out as bytes, not str."""
    data = model.SerializeToString()
    assert data.count(name.encode()) >= 1
    return data.replace(name.encode(), b"\xff" + name.encode()[1:])


def _named_net() -> onnx.ModelProto:
    nodes = [helper.make_node("Gemm", ["input_pixels", "weights_matrix", "bias_vector"], ["hidden_values"],
                              name="dense_layer_one", transB=1),
             helper.make_node("Relu", ["hidden_values"], ["scores_out"], name="relu_gate")]
    graph = helper.make_graph(
        nodes, "named", [helper.make_tensor_value_info("input_pixels", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("scores_out", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(W, "weights_matrix"),
                     numpy_helper.from_array(np.zeros(2, np.float32), "bias_vector")])
    return _model(graph)


NAMES = ["dense_layer_one", "hidden_values", "input_pixels", "scores_out", "weights_matrix", "transB"]


@pytest.mark.parametrize("name", NAMES)
def test_names_that_are_not_utf8_are_model_errors(site: Site, name: str, no_onnxruntime: list[str]) -> None:
    site.model.write_bytes(_rename_bytes(_named_net(), name))
    code, out, err = _in_process(*_unwrap_argv(site))
    _assert_refused(code, out, err, MODEL_EXIT, "m.onnx: model.graph.", "not valid UTF-8", "\\xff")
    with pytest.raises(ModelError, match="not valid UTF-8"):
        frontend.load(onnx.load_model_from_string(_rename_bytes(_named_net(), name)))


def test_external_data_location_that_is_not_utf8(site: Site) -> None:
    (site.folder / "weights_file.bin").write_bytes(W.tobytes())
    _save(site, "if-initializer", "weights_file.bin")
    site.model.write_bytes(site.model.read_bytes().replace(b"weights_file", b"\xfeeights_file"))
    code, out, err = _in_process(*_unwrap_argv(site))
    _assert_refused(code, out, err, MODEL_EXIT, ".external_data[0].value is not valid UTF-8", "\\xfeeights_file")


# --------------------------------------------------------------------------- weights and declared sizes


def _bn_net(var: np.ndarray) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.ones(2, np.float32), "scale"),
             numpy_helper.from_array(np.zeros(2, np.float32), "bias"),
             numpy_helper.from_array(np.zeros(2, np.float32), "mean"),
             numpy_helper.from_array(var.astype(np.float32), "var")]
    nodes = [helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["h"], name="bn"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    return _model(_graph(nodes, inits))


def _folded_nan() -> onnx.ModelProto:
    zero = numpy_helper.from_array(np.zeros((2, 2), np.float32), "zero")
    div = helper.make_node("Div", ["zero", "zero"], ["w"], name="zero_by_zero")
    model = _relu_net(extra_nodes=[div], extra_inits=[zero])
    model.graph.initializer.remove(model.graph.initializer[0])
    return model


def _with_bias(b: np.ndarray) -> onnx.ModelProto:
    model = _relu_net()
    model.graph.node[1].input[0] = "hb"
    model.graph.node.insert(1, helper.make_node("Add", ["h", "b"], ["hb"], name="add_bias"))
    model.graph.initializer.append(numpy_helper.from_array(b.astype(np.float32), "b"))
    return model


NON_FINITE: dict[str, tuple[Callable[[], onnx.ModelProto], tuple[str, ...]]] = {
    "nan-weight": (lambda: _relu_net(numpy_helper.from_array(np.array([[1, np.nan], [0, 1]], np.float32), "w")),
                   ("constant 'w'", "node 'fc' (MatMul)", "1 NaN value(s) of 4")),
    "inf-bias": (lambda: _with_bias(np.array([0, -np.inf])), ("constant 'b'", "'add_bias' (Add)", "1 infinite")),
    "inf-batchnorm-var": (lambda: _bn_net(np.array([1, np.inf])), ("constant 'var'", "(BatchNormalization)")),
    "nan-folded": (_folded_nan, ("constant 'w'", "4 NaN")),
    "nan-in-constant-node": (lambda: at_constant(numpy_helper.from_array(np.full((2, 2), np.nan, np.float32))),
                             ("constant 'w'",)),
}


@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_weights_on_the_path_are_model_errors(site: Site, case: str) -> None:
    make, fragments = NON_FINITE[case]
    onnx.save(make(), str(site.model))
    code, out, err = _in_process(*_unwrap_argv(site))
    _assert_refused(code, out, err, MODEL_EXIT, "m.onnx", *fragments)
    assert not (site.root / "out.npz").exists()


def test_non_finite_weights_off_the_path_and_infinite_clip_bounds_are_fine(site: Site) -> None:
    unused = numpy_helper.from_array(np.full(3, np.nan, np.float32), "unused")
    lo, hi = (numpy_helper.from_array(np.array(v, np.float32), n) for v, n in ((0.0, "lo"), (np.inf, "hi")))
    model = _relu_net(extra_inits=[unused, lo, hi])
    model.graph.node[1].CopyFrom(helper.make_node("Clip", ["h", "lo", "hi"], ["y"], name="clip"))
    result = Explainer(model, device="cpu").unwrap(X)
    np.testing.assert_allclose(result.weight[0], W.T, atol=1e-6)


@pytest.mark.parametrize("dims", [["N", 2**31], [1, 2**31, 256], ["N", 3, 2**20, 2**20]])
def test_declared_input_size_checked_before_allocating(site: Site, dims: list[Any],
                                                       no_onnxruntime: list[str]) -> None:
    """The issue's MemoryError: a declared input dimension of 2**31 (2 TiB with 256 channels)."""
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["h"], name="sum", keepdims=0),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    onnx.save(_model(_graph(nodes, [axes], in_dims=dims)), str(site.model))
    with pytest.raises(ModelError, match=r"input 'x' declares shape .* per sample, more than the limit"):
        Explainer(site.model, device="cpu")
    assert no_onnxruntime == []


def test_shape_only_subgraph_size_checked_before_running(site: Site, no_onnxruntime: list[str]) -> None:
    """ConstantOfShape (N, 2**20, 2**12) with N read from the input's shape: 16 GiB per sample
    that onnxruntime would allocate in the probe run; shape inference sees it first."""
    inits = [numpy_helper.from_array(np.array([2**20, 2**12], np.int64), "big"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "zero", "one"], ["n"]),
             helper.make_node("Concat", ["n", "big"], ["target"], axis=0),
             helper.make_node("ConstantOfShape", ["target"], ["wide"], name="widen"),
             helper.make_node("ReduceSum", ["wide"], ["total"], keepdims=1),
             helper.make_node("Add", ["h", "total"], ["h2"], name="add_total")]
    model = _relu_net(extra_inits=inits)
    model.graph.node[-1].input[0] = "h2"
    model.graph.node.extend(nodes)
    onnx.save(model, str(site.model))
    with pytest.raises(ModelError, match=r"'wide' would have shape \[1, 1048576, 4096\]"):
        Explainer(site.model, device="cpu")
    assert no_onnxruntime == []


# --------------------------------------------------------------------------- the issue's seeded mutants


ISSUE_MUTANTS: dict[str, tuple[Callable[[Site], None], tuple[str, ...]]] = {
    "data-type-0": (lambda s: onnx.save(TENSORS["type-0"][0](), str(s.model)), ("'w'", "data type 0")),
    "data-does-not-match-type": (lambda s: onnx.save(TENSORS["int64-with-float-data"][0](), str(s.model)),
                                 ("'shape'", "float_data")),
    "name-compares-as-bytes": (lambda s: s.model.write_bytes(_rename_bytes(_named_net(), "weights_matrix")),
                               ("not valid UTF-8",)),
    "input-dim-2**31": (lambda s: onnx.save(_relu_net_declared([1, 2**31, 256]), str(s.model)),
                        ("input 'x' declares shape [1, 2147483648, 256]", "2.0 TiB")),
    "nan-weights": (lambda s: onnx.save(NON_FINITE["nan-weight"][0](), str(s.model)), ("constant 'w'", "NaN")),
}


def _relu_net_declared(dims: list[Any]) -> onnx.ModelProto:
    model = _relu_net()
    shape = model.graph.input[0].type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        shape.dim.add().dim_value = d
    return model


@pytest.mark.parametrize("case", list(ISSUE_MUTANTS))
def test_issue_mutants_real_process(site: Site, case: str) -> None:
    make, fragments = ISSUE_MUTANTS[case]
    make(site)
    before = _snapshot(site.root)
    code, out, err = _cli(site, *_unwrap_argv(site))
    _assert_refused(code, out, err, MODEL_EXIT, "m.onnx", *fragments)
    assert _snapshot(site.root) == before


@pytest.mark.parametrize("report", ["text", "json", "junit"])
def test_audit_fails_a_hostile_model_without_running_it(site: Site, report: str,
                                                       no_onnxruntime: list[str]) -> None:
    """audit, the CI gate: the model-readable check fails (exit 1) with the reason, onnxruntime
    never sees the model and no report shows the secret."""
    _save(site, "loop-if-initializer", "secret")
    argv = ["audit", str(site.model), "--device", "cpu"] + ([] if report == "text" else ["--report", report])
    result = runner.invoke(app, argv)
    assert result.exit_code == 1, result.output
    assert "no such file in the model's folder" in result.stdout + result.stderr
    assert not _leaks(result.stdout) and not _leaks(result.stderr)
    assert no_onnxruntime == []
