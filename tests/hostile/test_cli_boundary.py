"""The command-line and output boundary under hostile conditions (issue 11, items 4–7 and 10).

Families: the out folder belongs to the user (names it does not own, files of the user's own,
FIFOs, links, directories and devices in the way, permissions); every numeric option is
checked against its documented range before the model is read; usage errors are one line;
text taken from a model is escaped wherever it is printed or written; undefined metrics are
``n/a`` / ``null``. Each refusal: the exit code, one ``onnx-pathwise: error:`` line naming the
culprit, no traceback, nothing written or replaced (listings, bytes and modes compared).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import PREFIX, ROOT, SAMPLES, run_module, runner
from onnx import TensorProto, helper, numpy_helper

from onnx_pathwise import Explainer, io, limits, text
from onnx_pathwise.cli import EXIT_CODES, app
from onnx_pathwise.errors import OutputError, PathwiseError, UnsupportedModelError

MLP, MLP_X = SAMPLES / "mlp.onnx", SAMPLES / "mlp_inputs.npy"
CNN, CNN_X = SAMPLES / "cnn.onnx", SAMPLES / "cnn_inputs.npy"
USAGE = PathwiseError.exit_code


def invoke(*args: object, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args], env=env)


def one_line(result, code: int, *fragments: str) -> str:  # type: ignore[no-untyped-def]
    """``result`` failed with ``code``: exactly one clean house line on stderr holding every
    fragment, nothing on stdout, no traceback, no exception other than the exit."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), result.stderr
    assert "Traceback" not in result.stderr and "╭" not in result.stderr and result.stdout == ""
    assert not text.UNSAFE.search(lines[0]), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[str, bytes | str | None, int]]:
    """Every entry below ``folder``: kind, content (file bytes, link target) and mode; links
    are not followed, FIFOs are not opened."""
    out: dict[str, tuple[str, bytes | str | None, int]] = {}
    for p in sorted(folder.rglob("*")):
        st = os.lstat(p)
        rel = p.relative_to(folder).as_posix()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(p), 0)
        elif stat.S_ISREG(st.st_mode):
            out[rel] = ("file", p.read_bytes(), stat.S_IMODE(st.st_mode))
        else:
            out[rel] = (stat.filemode(st.st_mode)[0], None, stat.S_IMODE(st.st_mode))
    return out


def real_run(*args: object, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m onnx_pathwise ...`` in a real process, with a timeout so a blocked write
    fails the test instead of hanging it."""
    return run_module(*args, cwd=cwd, timeout=timeout)


def real_one_line(done: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and done.stdout == "", done.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def umask() -> Iterator[int]:
    """Run with umask 022 (restored afterwards)."""
    old = os.umask(0o022)
    try:
        yield 0o022
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- the out folder


@pytest.mark.parametrize("command,name", [
    ("explain", "sample_3.png"),
    ("decompose", "sample_0.png"),
])
def test_a_users_png_in_the_way_needs_force(tmp_path: Path, command: str, name: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"the user's own picture")
    (out / "notes.txt").write_bytes(b"not ours")
    before = snapshot(tmp_path)
    result = invoke(command, CNN, CNN_X, "--out", out, "--device", "cpu")
    one_line(result, USAGE, name, "--force")
    assert snapshot(tmp_path) == before


def test_evaluate_refuses_an_existing_curves_png_before_reading_the_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "curves.png").write_bytes(b"mine")
    before = snapshot(tmp_path)
    one_line(invoke("evaluate", tmp_path / "no_model.onnx", CNN_X, "--out", out), USAGE, "curves.png", "--force")
    assert snapshot(tmp_path) == before


def test_evaluate_does_not_claim_a_sweep_it_will_not_draw(tmp_path: Path) -> None:
    """With one width there is no width_sweep.png: a file of that name is not in the way (the
    command then fails on the missing model, exit 3, not on the output)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "width_sweep.png").write_bytes(b"mine")
    result = invoke("evaluate", tmp_path / "no_model.onnx", CNN_X, "--out", out, "--width", "5%")
    one_line(result, 3, "no_model.onnx")
    assert (out / "width_sweep.png").read_bytes() == b"mine"


def _in_the_way(path: Path, kind: str, outside: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to(outside)
    elif kind == "dangling-symlink":
        path.symlink_to(outside.parent / "nothing_here")
    elif kind == "directory":
        path.mkdir()
        (path / "keep").write_bytes(b"keep")
    elif kind == "socket":
        import socket

        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(path))
        except OSError:  # path too long for a socket address
            pytest.skip("cannot bind a unix socket here")
        finally:
            sock.close()


def _refused(kind: str, cwd: Path, code: int, args: list[object], *fragments: str) -> None:
    """Run the command and check its one-line refusal; with a FIFO in the way in a real process
    under a timeout, so that a write blocking on the FIFO fails the test instead of hanging it."""
    if kind == "fifo":
        real_one_line(real_run(*args, cwd=cwd, timeout=180), code, *fragments)
    else:
        one_line(invoke(*args), code, *fragments)


KINDS = ["fifo", "symlink", "dangling-symlink", "directory", "socket"]
WHAT = {"fifo": "a FIFO", "symlink": "a symbolic link", "dangling-symlink": "a symbolic link",
        "directory": "a directory", "socket": "a socket"}


@pytest.mark.parametrize("kind", KINDS)
def test_force_never_replaces_anything_but_a_regular_file_in_a_folder(tmp_path: Path, kind: str) -> None:
    """explain --force with a FIFO, link, directory or socket under explanation.json: refused
    before any work, the thing and what a link points to untouched, nothing written, no hang."""
    work = tmp_path / "work"
    work.mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"secret")
    out = work / "out"
    out.mkdir()
    _in_the_way(out / "explanation.json", kind, outside)
    before = snapshot(tmp_path)
    _refused(kind, work, USAGE, ["explain", MLP, MLP_X, "--out", out, "--device", "cpu", "--force"],
             "explanation.json", WHAT[kind])
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", KINDS)
def test_force_never_replaces_anything_but_a_regular_file(tmp_path: Path, kind: str) -> None:
    """The same for a single-file output (unwrap --out, audit --out, diff --json)."""
    work = tmp_path / "work"
    work.mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"secret")
    target = work / "u.npz"
    _in_the_way(target, kind, outside)
    before = snapshot(tmp_path)
    _refused(kind, work, USAGE, ["unwrap", MLP, MLP_X, "--out", target, "--device", "cpu", "--force"],
             "u.npz", WHAT[kind])
    assert snapshot(tmp_path) == before


def test_character_device_is_never_replaced(tmp_path: Path) -> None:
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null")
    result = invoke("diff", MLP, MLP, "--inputs", MLP_X, "--json", "/dev/null", "--force", "--device", "cpu")
    one_line(result, USAGE, "/dev/null", "a character device")


@pytest.mark.parametrize("old_mode", [0o4755, 0o2770, 0o1777, 0o600])
def test_replaced_file_gets_ordinary_permissions(tmp_path: Path, umask: int, old_mode: int) -> None:
    """--force replaces a setuid/setgid/sticky (or private) file with a 0o666 & ~umask one."""
    out = tmp_path / "u.npz"
    out.write_bytes(b"old")
    os.chmod(out, old_mode)
    result = invoke("unwrap", SAMPLES / "tiny_mlp.onnx", SAMPLES / "tiny_mlp_inputs.npy", "--out", out,
                    "--device", "cpu", "--force")
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.npz"]


def test_umask_is_respected(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        io.write_bytes(tmp_path / "a.bin", b"x")
        io.save_npz(tmp_path / "b.npz", {"a": np.ones(2)})
    finally:
        os.umask(old)
    for name in ("a.bin", "b.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600


def test_write_time_check_catches_a_fifo_that_appears_meanwhile(tmp_path: Path) -> None:
    """Between the early check and the rename a FIFO takes one of the names: the write is
    refused at placement, nothing is placed (all or nothing), no temporary file is left."""
    def sneaky(f) -> None:  # type: ignore[no-untyped-def]
        f.write(b"second")
        os.mkfifo(tmp_path / "b.json")

    with pytest.raises(OutputError, match="a FIFO"):
        io.write_files(tmp_path, {"a.bin": io.bytes_writer(b"first"), "b.json": sneaky}, overwrite=True)
    assert snapshot(tmp_path) == {"b.json": ("p", None, stat.S_IMODE(os.lstat(tmp_path / "b.json").st_mode))}


def test_write_time_check_catches_a_file_that_appears_meanwhile(tmp_path: Path) -> None:
    """Without overwrite a name taken after the early check is never replaced."""
    def sneaky(f) -> None:  # type: ignore[no-untyped-def]
        f.write(b"ours")
        (tmp_path / "a.bin").write_bytes(b"theirs")

    with pytest.raises(OutputError, match="already exists"):
        io.write_files(tmp_path, {"a.bin": sneaky}, overwrite=False)
    assert snapshot(tmp_path) == {"a.bin": ("file", b"theirs", stat.S_IMODE((tmp_path / "a.bin").stat().st_mode))}


def test_interrupt_while_staging_leaves_nothing(tmp_path: Path) -> None:
    def interrupted(f) -> None:  # type: ignore[no-untyped-def]
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.write_files(tmp_path, {"a.bin": io.bytes_writer(b"whole"), "b.bin": interrupted})
    assert list(tmp_path.iterdir()) == []


def test_temporary_names_stay_short(tmp_path: Path) -> None:
    name = "n" * 250
    io.write_bytes(tmp_path / name, b"x")
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs/path", ".hidden", "-rf", "a\\b", "x" * 300,
                                  "\x1b[31mred\n\u202eevil\x07", "..", ".", "", "node:0|*?<>\"'",
                                  "\udcff", "名前"])
def test_file_names_from_the_model_are_safe(name: str) -> None:
    safe = text.file_name(name)
    assert 0 < len(safe) <= text.MAX_FILE_NAME
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", safe), safe
    assert safe not in (".", "..")


def test_long_names_stay_distinct_and_kept_names_unchanged() -> None:
    a, b = "layer" * 40 + "a", "layer" * 40 + "b"
    assert text.file_name(a) != text.file_name(b)
    assert text.file_name("a/b") != text.file_name("a_b") == "a_b"
    assert text.file_name("sample_0.png") == "sample_0.png"


# --------------------------------------------------------------------------- options


OPTION_CASES = {
    "steps-0": ("explain {m} {x} --out {o} --method integrated_gradients --steps 0", ("--steps 0", "from 1 to")),
    "steps-1e9": ("explain {m} {x} --out {o} --method integrated_gradients --steps 1000000000",
                  ("--steps 1000000000", "1000000")),
    "steps-abc": ("explain {m} {x} --out {o} --steps abc", ("--steps 'abc'", "whole number")),
    "width-empty": ("explain {m} {x} --out {o} --width=", ("--width ''", "expected a count")),
    "width-0": ("explain {m} {x} --out {o} --width 0", ("--width 0", "at least 1")),
    "width-negative": ("explain {m} {x} --out {o} --width -3", ("--width -3", "at least 1")),
    "width-150%": ("decompose {m} {x} --out {o} --width 150%", ("--width '150%'", "(0, 100]")),
    "width-nan%": ("decompose {m} {x} --out {o} --width nan%", ("--width 'nan%'", "(0, 100]")),
    "input-width-0": ("explain {m} {x} --out {o} --input-width 0", ("--input-width 0", "at least 1")),
    "input-width-abc": ("explain {m} {x} --out {o} --input-width abc", ("--input-width 'abc'",)),
    "input-width-200%": ("explain {m} {x} --out {o} --input-width 200%", ("--input-width '200%'",)),
    "evaluate-width": ("evaluate {m} {x} --out {o} --width 5 --width 0", ("--width 0",)),
    "top-0": ("decompose {m} {x} --out {o} --top 0", ("--top 0", "at least 1")),
    "depth-negative": ("explain {m} {x} --out {o} --depth -1", ("--depth -1", "at least 0")),
    "depth-abc": ("explain {m} {x} --out {o} --depth abc", ("--depth 'abc'",)),
    "evaluate-depth": ("evaluate {m} {x} --out {o} --depth 1 --depth -2", ("--depth -2",)),
    "target-negative": ("explain {m} {x} --out {o} --target -1", ("--target -1", "at least 0")),
    "target-float": ("explain {m} {x} --out {o} --target 1.5", ("--target 1.5",)),
    "step-0": ("evaluate {m} {x} --out {o} --step 0", ("--step 0", "at least 1")),
    "max-delta-nan": ("audit {m} --max-delta nan", ("--max-delta nan", "finite")),
    "max-delta-inf": ("audit {m} --max-delta inf", ("--max-delta inf", "finite")),
    "max-delta-negative": ("audit {m} --max-delta -1", ("--max-delta -1", "at least 0")),
    "fail-below-nan": ("diff {m} {m} --inputs {x} --fail-below nan", ("--fail-below nan", "finite")),
    "fail-below-2": ("diff {m} {m} --inputs {x} --fail-below 2", ("--fail-below 2", "from -1 to 1")),
    "min-overlap-inf": ("diff {m} {m} --inputs {x} --min-overlap -inf", ("--min-overlap -inf", "finite")),
    "min-overlap-1.5": ("diff {m} {m} --inputs {x} --min-overlap 1.5", ("--min-overlap 1.5", "from 0 to 1")),
    "max-changes-negative": ("diff {m} {m} --inputs {x} --max-changes -1", ("--max-changes -1", "at least 0")),
    "method": ("explain {m} {x} --out {o} --method lime", ("--method 'lime'", "pathwise")),
    "group": ("decompose {m} {x} --out {o} --group pixel", ("--group 'pixel'", "unit, channel")),
    "memory-budget-small": ("--memory-budget 1K inspect {m}", ("--memory-budget '1K'", "64M")),
    "memory-budget-abc": ("--memory-budget lots inspect {m}", ("--memory-budget 'lots'",)),
    # click's own usage errors, in the house format
    "unknown-option": ("explain {m} {x} --out {o} --bogus", ("--bogus",)),
    "unknown-root-option": ("--bogus inspect {m}", ("--bogus",)),
    "unknown-command": ("explian {m}", ("explian",)),
    "missing-argument": ("explain {m} --out {o}", ("INPUT",)),
    "missing-option": ("explain {m} {x}", ("--out",)),
    "bad-device": ("explain {m} {x} --out {o} --device gpu", ("--device", "gpu")),
    "bad-report": ("audit {m} --report xml", ("--report", "xml")),
    "option-without-value": ("explain {m} {x} --out {o} --depth", ("--depth",)),
}


@pytest.mark.parametrize("argv,fragments", list(OPTION_CASES.values()), ids=list(OPTION_CASES))
def test_bad_options_are_refused_before_the_model_is_read(tmp_path: Path, argv: str, fragments: tuple[str, ...]) -> None:
    """The model path does not exist: a refusal that names the option (exit 2, not the
    model's exit 3) shows the option was checked first."""
    args = [a.format(m=tmp_path / "missing.onnx", x=MLP_X, o=tmp_path / "out") for a in argv.split()]
    before = snapshot(tmp_path)
    start = time.perf_counter()
    one_line(runner.invoke(app, args), USAGE, *fragments)
    assert time.perf_counter() - start < 5
    assert snapshot(tmp_path) == before


def test_bad_memory_budget_in_the_environment(tmp_path: Path) -> None:
    result = invoke("inspect", MLP, env={limits.ENV_VAR: "plenty"})
    one_line(result, USAGE, limits.ENV_VAR, "'plenty'")


def test_target_beyond_the_classes(tmp_path: Path) -> None:
    one_line(invoke("explain", MLP, MLP_X, "--out", tmp_path / "out", "--device", "cpu", "--target", "3"),
             USAGE, "--target 3", "out of range for 3 scores")
    assert list(tmp_path.iterdir()) == []


def test_input_width_names_itself_in_help() -> None:
    result = invoke("explain", "--help")
    assert result.exit_code == 0
    assert "--input-width" in result.stdout


def test_steps_over_the_memory_budget_are_refused_with_the_estimate(tmp_path: Path) -> None:
    start = time.perf_counter()
    result = invoke("--memory-budget", "64M", "explain", MLP, MLP_X, "--out", tmp_path / "out", "--device", "cpu",
                    "--method", "integrated_gradients", "--steps", "1000000")
    one_line(result, USAGE, "Integrated Gradients", "1000000 steps", "would need about", "MiB", "64.0 MiB")
    assert time.perf_counter() - start < 30
    assert list(tmp_path.iterdir()) == []
    assert limits._override is None  # the CLI's budget does not outlive the command


def test_integrated_gradients_api_checks_the_budget_first() -> None:
    ex = Explainer(MLP, device="cpu")
    start = time.perf_counter()
    with pytest.raises(limits.BudgetError, match="would need about"):
        ex.attribute(np.load(MLP_X), "integrated_gradients", steps=10**9)
    assert time.perf_counter() - start < 5


def test_memory_budget_option_is_used(tmp_path: Path) -> None:
    """A generous budget lets the same request through (tiny model, few steps)."""
    result = invoke("--memory-budget", "1G", "explain", SAMPLES / "tiny_mlp.onnx", SAMPLES / "tiny_mlp_inputs.npy",
                    "--out", tmp_path / "out", "--device", "cpu", "--method", "integrated_gradients", "--steps", "8")
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- text from the model

EVIL = "\x1b[31mred\x07\u202eevil\nline\tx\x7f\x9b"


def _hostile_model(path: Path, *, blocked: bool = False) -> Path:
    """x (N, 3) → Gemm → Relu → Gemm → logits (2 classes), every name hostile; ``blocked``
    puts a Tanh (unsupported) with a hostile name on the path."""
    w1 = numpy_helper.from_array(np.array([[1, 0, 1], [0, 1, -1], [1, 1, 0], [-1, 0, 1]], np.float32), f"w1{EVIL}")
    b1 = numpy_helper.from_array(np.full(4, 0.1, np.float32), f"b1{EVIL}")
    w2 = numpy_helper.from_array(np.array([[1, -1, 0.5, 0], [0, 1, 1, -1]], np.float32), f"w2{EVIL}")
    b2 = numpy_helper.from_array(np.zeros(2, np.float32), f"b2{EVIL}")
    gate = "Tanh" if blocked else "Relu"
    nodes = [helper.make_node("Gemm", ["x", w1.name, b1.name], [f"h{EVIL}"], transB=1, name=f"fc1{EVIL}"),
             helper.make_node(gate, [f"h{EVIL}"], [f"r{EVIL}"], name=f"gate{EVIL}"),
             helper.make_node("Gemm", [f"r{EVIL}", w2.name, b2.name], [f"logits{EVIL}"], transB=1,
                              name=f"fc2{EVIL}")]
    graph = helper.make_graph(nodes, f"g{EVIL}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info(f"logits{EVIL}", TensorProto.FLOAT, ["N", 2])],
                              initializer=[w1, b1, w2, b2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name=f"p{EVIL}",
                              doc_string=EVIL)
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    np.save(folder / "x.npy", np.array([[1, 2, 3], [0.5, -1, 2]], np.float32))
    return {"ok": _hostile_model(folder / "ok.onnx"), "blocked": _hostile_model(folder / "blocked.onnx", blocked=True),
            "x": folder / "x.npy"}


def assert_block_clean(output: str) -> None:
    """Printed text: nothing unsafe but the newlines between lines."""
    found = text.UNSAFE.search(output.replace("\n", ""))
    assert not found, repr(found)


def test_inspect_text_escapes_model_names(hostile: dict[str, Path]) -> None:
    result = invoke("inspect", hostile["ok"])
    assert result.exit_code == 0, result.output
    assert_block_clean(result.stdout)
    assert "gate\\x1b[31mred\\x07\\u202eevil\\nline\\tx\\x7f\\x9b" in result.stdout


def test_inspect_json_escapes_and_reads_back(hostile: dict[str, Path]) -> None:
    result = invoke("inspect", hostile["ok"], "--json")
    assert result.exit_code == 0, result.output
    assert not text.UNSAFE.search(result.stdout.replace("\n", ""))
    info = json.loads(result.stdout)
    assert info["gate_layers"][0]["name"] == f"gate{EVIL}"  # lossless: JSON escapes, not mangling


def test_unsupported_model_lists_escaped_names(hostile: dict[str, Path], tmp_path: Path) -> None:
    result = invoke("inspect", hostile["blocked"])
    assert result.exit_code == 1
    assert_block_clean(result.stdout)
    assert "\\x1b[31m" in result.stdout
    line = one_line(invoke("unwrap", hostile["blocked"], hostile["x"], "--out", tmp_path / "u.npz", "--device", "cpu"),
                    UnsupportedModelError.exit_code, "gate\\x1b[31mred")
    assert "\\u202e" in line


def test_summary_line_escapes_the_output_name(hostile: dict[str, Path], tmp_path: Path) -> None:
    result = invoke("unwrap", hostile["ok"], hostile["x"], "--out", tmp_path / "u.npz", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert_block_clean(result.stdout + result.stderr)
    assert len(result.stdout.strip().splitlines()) == 1


def test_explain_json_is_escaped(hostile: dict[str, Path], tmp_path: Path) -> None:
    result = invoke("explain", hostile["ok"], hostile["x"], "--out", tmp_path / "e", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert_block_clean(result.stdout)
    raw = (tmp_path / "e" / "explanation.json").read_text(encoding="utf-8")
    assert not text.UNSAFE.search(raw.replace("\n", ""))
    assert json.loads(raw)["explained_output"] == f"logits{EVIL}"


@pytest.mark.parametrize("report", ["junit", "json"])
def test_audit_reports_escape_model_text(hostile: dict[str, Path], tmp_path: Path, report: str) -> None:
    out = tmp_path / f"audit.{report}"
    result = invoke("audit", hostile["blocked"], "--report", report, "--out", out, "--device", "cpu")
    assert result.exit_code == 1, result.output
    assert_block_clean(result.stdout)
    raw = out.read_text(encoding="utf-8")
    assert not text.UNSAFE.search(raw.replace("\n", ""))
    if report == "junit":
        root = ET.fromstring(raw.encode())  # well-formed XML: no raw control characters
        messages = [f.get("message") for f in root.iter("failure")]
        assert any("gate\\x1b[31mred" in (m or "") for m in messages)
    else:
        checks = json.loads(raw)["checks"]
        assert any(f"gate{EVIL}" in c["detail"] for c in checks)


def test_error_line_escapes_text_quoting_the_model(hostile: dict[str, Path], tmp_path: Path) -> None:
    """An error that quotes model text and the user's own argument stays one clean line."""
    one_line(invoke("decompose", hostile["ok"], hostile["x"], "--out", tmp_path / "d", "--device", "cpu",
                    "--layer", "no\nsuch\x1b[0m"), USAGE, "no\\nsuch\\x1b[0m")


def test_sanitiser_covers_the_documented_set() -> None:
    bad = [chr(c) for c in [*range(0x20), 0x7f, *range(0x80, 0xa0), 0x202a, 0x202b, 0x202c, 0x202d, 0x202e,
                            0x2066, 0x2067, 0x2068, 0x2069, 0x200e, 0x200f, 0x061c, 0x2028, 0x2029, 0xdc80]]
    for c in bad:
        assert not text.UNSAFE.search(text.clean(f"a{c}b")), hex(ord(c))
        assert not text.UNSAFE.search(io.to_json({"k": c}).replace("\n", "")), hex(ord(c))
        assert json.loads(io.to_json({"k": c})) == {"k": c}
    assert text.clean("plain ascii, ümlaut, 名前 → ok") == "plain ascii, ümlaut, 名前 → ok"
    assert text.clean(text.clean(EVIL)) == text.clean(EVIL)


# --------------------------------------------------------------------------- undefined metrics


def _constant_model(path: Path) -> Path:
    """An affine model (no gate) whose attributions of the all-ones input are constant maps."""
    w = numpy_helper.from_array(np.ones((2, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc")], "flat",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def test_diff_of_constant_maps_is_n_a_and_null(tmp_path: Path) -> None:
    model = _constant_model(tmp_path / "flat.onnx")
    np.save(tmp_path / "ones.npy", np.ones((3, 4), np.float32))
    report = tmp_path / "d.json"
    result = invoke("diff", model, model, "--inputs", tmp_path / "ones.npy", "--json", report, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "nan" not in result.stdout.lower()
    assert "attribution corr.     n/a" in result.stdout and "path overlap          n/a" in result.stdout
    raw = report.read_text()
    assert "NaN" not in raw and "Infinity" not in raw
    data = json.loads(raw)
    assert data["mean_correlation"] is None and data["mean_jaccard"] is None
    assert all(s["correlation"] is None for s in data["samples"])
    failed = invoke("diff", model, model, "--inputs", tmp_path / "ones.npy", "--fail-below", "0.5", "--device", "cpu")
    assert failed.exit_code == 1 and "n/a" in failed.stdout and "nan" not in failed.stdout.lower()


def test_summaries_of_no_finite_values_are_none() -> None:
    from onnx_pathwise import metrics

    empty = metrics._summary([float("nan"), float("inf")])
    assert empty["mean"] is None and empty["std"] is None
    assert json.loads(io.to_json(empty)) == {"values": [None, None], "mean": None, "std": None}
    one = metrics._summary([2.0])
    assert one["mean"] == 2.0 and one["std"] == 0.0
    assert text.number(empty["mean"]) == "n/a" and text.number(float("nan")) == "n/a"


def test_json_writer_never_writes_nan(tmp_path: Path) -> None:
    io.write_json(tmp_path / "r.json", {"a": [np.float32("nan"), -np.inf], "b": np.array([np.nan])})
    raw = (tmp_path / "r.json").read_text()
    assert json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}")) == {
        "a": [None, None], "b": [None]}


# --------------------------------------------------------------------------- the table stays honest


def test_every_documented_exit_code_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for code in EXIT_CODES:
        assert f"| {code} |" in readme
