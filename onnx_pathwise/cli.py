"""The ``onnx-pathwise`` command line: a thin Typer shell over :class:`~onnx_pathwise.Explainer`.

Commands only parse options, call the library and print. The plumbing lives in one helper
each, for every command to share: :func:`_open_explainer` (model + device),
:func:`_load_input` (a checked input batch), :func:`_guard_output` / :func:`_guard_dir` (refuse
to clobber before any work is done), :func:`_write_npz` / :func:`_write_json` / :func:`_write_dir`
(atomic output) and :func:`_out` (every text printed, sanitised).

Options: one helper per kind of value, each checked while the command line is parsed (before
any model is loaded) against the range its help text states: :func:`count_option`,
:func:`number_option`, :func:`width_option`, :func:`size_option`, :func:`choice_option`. A bad
value is reported as ``--name VALUE: what is allowed``.

Errors: every :class:`~onnx_pathwise.errors.PathwiseError`, and every usage error of the command
line itself (unknown option, missing argument, a value of the wrong type), becomes one line on
stderr, ``onnx-pathwise: error: <message>``, and the error's ``exit_code`` (:data:`EXIT_CODES`,
also the table in README.md); ``--debug`` shows its traceback instead. Any other exception is a
bug and keeps its traceback. SIGINT, SIGTERM and SIGHUP end a command through the same cleanup
(no partial output, no temporary files) with exit code 128 + the signal number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import numpy as np
import typer
from typer.core import TyperGroup

from . import __version__, baselines, limits, plots, runtime
from .data import InputSource, is_array_file, load_labels, open_inputs
from .errors import (
    DeviceError,
    InputError,
    ModelError,
    OutputError,
    PathwiseError,
    UnsupportedModelError,
)
from .explainer import Explainer
from .graph import GateLayer, Segment
from .io import bytes_writer, existing_kind, json_writer, load_array, npz_writer, to_json, write_files
from .ir import GATE, ROUTING
from .metrics import finite_mean
from .pathwise import target_scores
from .sweep import concat_batches
from .text import clean, clean_block, number

PROG = "onnx-pathwise"
_DEBUG = "onnx_pathwise.debug"
_BUDGET_SET = "onnx_pathwise.budget"
#: Notices held back while a command runs; :class:`_Group` shows them once it has succeeded.
_notices: list[str] = []

#: Exit code → (short name, meaning). README.md's table mirrors this; a test keeps them in step.
EXIT_CODES: dict[int, tuple[str, str]] = {
    0: ("success", "the command did what it was asked"),
    1: ("check failed", "`inspect` found unsupported nodes (its report lists every one), `audit` "
                        "failed a check or `diff` crossed a threshold; also any unexpected error, i.e. "
                        "a bug, which prints a traceback"),
    PathwiseError.exit_code: ("usage", "a bad option or argument (unknown, missing, of the wrong type or "
                                       "outside its range), a request over the memory budget, or an output "
                                       "path that may not be written (exists without `--force`, is a "
                                       "directory, a link, a FIFO, ...)"),
    ModelError.exit_code: ("model", "the model file cannot be read or analysed"),
    UnsupportedModelError.exit_code: ("unsupported", "the input→output path holds unsupported "
                                                     "operations (the message lists them all)"),
    InputError.exit_code: ("input", "the input file or array is unusable: missing, corrupt, pickled, "
                                    "not numeric, wrong shape, NaN or infinite values"),
    DeviceError.exit_code: ("device", "the requested device is not available "
                                      "(`--device cuda` without a usable GPU)"),
    130: ("interrupted", "SIGINT (Ctrl-C); nothing is written, no temporary file is left"),
    143: ("terminated", "SIGTERM (SIGHUP: 129); nothing is written, no temporary file is left"),
}
assert OutputError.exit_code == PathwiseError.exit_code


def _click_class(name: str) -> type[Exception]:
    """The click exception class ``name`` of the click that Typer uses (its own copy in newer
    Typer releases, the ``click`` package in older ones)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


_ClickException = _click_class("ClickException")
_UsageError = _click_class("UsageError")
_NoArgsIsHelp: type[Exception] | None = getattr(sys.modules[_UsageError.__module__], "NoArgsIsHelpError", None)


class OptionError(typer.BadParameter, PathwiseError):
    """An option value outside what the option allows, reported as ``--name VALUE: problem``
    (a usage error of click's, so it is raised while the command line is parsed, and a
    :class:`PathwiseError`, exit code 2)."""

    def __init__(self, option: str, value: object, problem: str) -> None:
        super().__init__(problem)
        self.option, self.value, self.problem = option, value, problem

    def house_message(self) -> str:
        text = str(self.value)
        try:
            float(text)
            shown = text.strip()
        except ValueError:
            shown = repr(text)
        return f"{self.option} {shown}: {self.problem}"


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived while a command ran; raised (like KeyboardInterrupt for SIGINT)
    so that every ``finally`` and cleanup runs before the process exits with 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def _catch_signals() -> dict[int, Any]:
    """Turn SIGTERM and SIGHUP into :class:`Interrupted` while a command runs (their default
    action would kill Python without cleanup). Signals the caller ignores stay ignored."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is None or signal.getsignal(signum) is signal.SIG_IGN:
            continue
        previous[signum] = signal.signal(signum, _raise_interrupted)
    return previous


def _usage_error(exc: Exception) -> typer.Exit:
    """One house line for a usage error of the command line itself; the Exit to raise."""
    if isinstance(exc, OptionError):
        message = exc.house_message()
    else:
        message = exc.format_message()  # type: ignore[attr-defined]
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            message = f"{message.rstrip('.')} (see '{ctx.command_path} --help')"
    typer.echo(f"{PROG}: error: {clean(message)}", err=True)
    code = PathwiseError.exit_code if isinstance(exc, _UsageError) else exc.exit_code  # type: ignore[attr-defined]
    return typer.Exit(code)


def _out(text: str, err: bool = False) -> None:
    """Print ``text`` (stdout, or stderr with ``err``); model-derived text in it is sanitised."""
    typer.echo(clean_block(text), err=err)


class _Group(TyperGroup):
    """Turns a :class:`PathwiseError` raised by any command, a usage error and an interrupt into
    one line and its exit code.

    Notices held back while the command ran (the CPU fallback of ``--device auto``) are shown
    after it, unless it failed: a failed command prints its one error line and nothing else.
    """

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None,  # type: ignore[override]
                     **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _ClickException as exc:
            if _NoArgsIsHelp is not None and isinstance(exc, _NoArgsIsHelp):
                raise
            raise _usage_error(exc) from None

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        _notices.clear()
        previous = _catch_signals()
        try:
            return super().invoke(ctx)
        except _ClickException as exc:
            _notices.clear()
            if ctx.meta.get(_DEBUG) and isinstance(exc, OptionError):
                raise PathwiseError(exc.house_message()) from exc  # click would print its own box
            raise _usage_error(exc) from None
        except PathwiseError as exc:
            _notices.clear()
            if ctx.meta.get(_DEBUG):
                raise
            typer.echo(f"{PROG}: error: {clean(str(exc))}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _notices.clear()
            typer.echo(f"{PROG}: error: interrupted (SIGINT); no output written", err=True)
            raise typer.Exit(128 + signal.SIGINT) from None
        except Interrupted as exc:
            _notices.clear()
            name = signal.Signals(exc.signum).name
            typer.echo(f"{PROG}: error: terminated ({name}); no output written", err=True)
            raise typer.Exit(128 + exc.signum) from None
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if ctx.meta.pop(_BUDGET_SET, False):
                limits.set_memory_budget(None)
            for notice in _notices:
                _out(notice, err=True)
            _notices.clear()


app = typer.Typer(
    cls=_Group,
    name=PROG,
    help="Exact local affine models and pathwise explanations of piecewise-linear (ReLU) ONNX models.",
    epilog="Exit codes: " + ", ".join(f"{code} {short}" for code, (short, _) in EXIT_CODES.items())
    + " (details in README.md).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# --------------------------------------------------------------------------- option kinds

#: Largest count any option takes (a 32-bit signed integer).
MAX_COUNT = 2**31 - 1
#: Largest ``--steps`` of Integrated Gradients.
MAX_STEPS = 1_000_000
_WIDTH_FORMS = "a count like 10, a percentage like 5% or 'all'"


def _span(low: float | None, high: float | None) -> str:
    """The range [low, high] in words (None: unbounded)."""
    def show(v: float) -> str:
        return str(v) if isinstance(v, int) else f"{v:g}"

    if low is not None and high is not None and high != MAX_COUNT:
        return f"from {show(low)} to {show(high)}"
    if low is not None:
        return f"at least {show(low)}"
    return f"at most {show(high)}" if high is not None else "any finite number"


def _ranged(help: str, span: str) -> str:
    return f"{help.rstrip('.')} ({span})."


def count_option(name: str, help: str, *, low: int = 1, high: int = MAX_COUNT, **kwargs: Any) -> Any:
    """An integer option in [``low``, ``high``] (a count, an index, a batch size)."""
    def parse(value: Any) -> int:
        try:
            n = int(str(value).strip())
        except ValueError:
            raise OptionError(name, value, f"expected a whole number, {_span(low, high)}") from None
        if not low <= n <= high:
            raise OptionError(name, value, f"must be {_span(low, high)}")
        return n

    return typer.Option(name, parser=parse, metavar="N", help=_ranged(help, _span(low, high)),
                        show_default=kwargs.pop("show_default", False), **kwargs)


def number_option(name: str, help: str, *, low: float | None = None, high: float | None = None,
                  **kwargs: Any) -> Any:
    """A finite real option in [``low``, ``high``]; NaN and infinities are refused."""
    def parse(value: Any) -> float:
        try:
            x = float(str(value).strip())
        except ValueError:
            raise OptionError(name, value, f"expected a number, {_span(low, high)}") from None
        if not math.isfinite(x):
            raise OptionError(name, value, f"must be a finite number, {_span(low, high)}")
        if (low is not None and x < low) or (high is not None and x > high):
            raise OptionError(name, value, f"must be {_span(low, high)}")
        return x

    return typer.Option(name, parser=parse, metavar="X", help=_ranged(help, _span(low, high)),
                        show_default=kwargs.pop("show_default", False), **kwargs)


def parse_width(name: str, value: Any) -> int | str | None:
    """A width value: a count ≥ 1 (int), a percentage in (0, 100] (the string) or 'all' (None)."""
    if value is None:
        return None
    text = str(value).strip()
    if text.lower() == "all":
        return None
    if text.endswith("%"):
        try:
            p = float(text[:-1])
        except ValueError:
            raise OptionError(name, value, f"expected {_WIDTH_FORMS}") from None
        if not (math.isfinite(p) and 0 < p <= 100):
            raise OptionError(name, value, "the percentage must be in (0, 100]")
        return text
    try:
        n = int(text)
    except ValueError:
        raise OptionError(name, value, f"expected {_WIDTH_FORMS}") from None
    if not 1 <= n <= MAX_COUNT:
        raise OptionError(name, value, f"a count must be at least 1 (and at most {MAX_COUNT})")
    return n


def width_option(name: str, help: str, **kwargs: Any) -> Any:
    """A width: a count ≥ 1, a percentage in (0, 100] or 'all' (:func:`parse_width`)."""
    return typer.Option(name, parser=lambda v: parse_width(name, v), metavar="W", help=help,
                        show_default=False, **kwargs)


def size_option(name: str, help: str, **kwargs: Any) -> Any:
    """A memory size such as 4G, 512M or a number of bytes (at least 64 MiB)."""
    def parse(value: Any) -> int:
        try:
            return limits.parse_size(str(value))
        except PathwiseError:
            raise OptionError(name, value, f"expected a size such as 4G, 512M or 1000000 (bytes), at least "
                                           f"{limits.MIN_BUDGET // 2**20}M") from None

    return typer.Option(name, parser=parse, metavar="SIZE", help=help, show_default=False, **kwargs)


def choice_option(name: str, choices: Sequence[str], help: str, **kwargs: Any) -> Any:
    """One of ``choices`` (exact spelling)."""
    def parse(value: Any) -> str:
        text = str(value).strip()
        if text not in choices:
            raise OptionError(name, value, f"choose one of {', '.join(choices)}")
        return text

    return typer.Option(name, parser=parse, metavar="|".join(choices) if len(choices) <= 3 else "NAME",
                        help=f"{help} One of: {', '.join(choices)}.", **kwargs)


# --------------------------------------------------------------------------- shared options

ModelArg = Annotated[Path, typer.Argument(help="ONNX model file.", metavar="MODEL", show_default=False)]
InputArg = Annotated[Path, typer.Argument(
    help="Inputs: a .npy file, or a .npz holding one array (or one named 'x' or 'inputs'), with or without "
         "the batch axis; an image file, a folder of images (recursively), a text file listing image paths, "
         "or a CSV/Parquet table (one sample per row).", metavar="INPUT", show_default=False)]
InputNameOpt = Annotated[str | None, typer.Option(
    "--input-name", help="Model input to explain; default: the only float input.", show_default=False)]
OutputNameOpt = Annotated[str | None, typer.Option(
    "--output", help="Model output (or any tensor) to explain; default: the only float output. "
                     "A final Softmax/LogSoftmax/Sigmoid is peeled: scores are the logits.",
    show_default=False)]
DeviceOpt = Annotated[Device, typer.Option(
    "--device", case_sensitive=False,
    help="Where onnxruntime runs: auto (CUDA when usable, else CPU), cpu or cuda.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing output files (regular files only).")]


class PageFormat(str, Enum):
    html = "html"


PageOpt = Annotated[PageFormat | None, typer.Option(
    "--report", case_sensitive=False, help="Also write OUT/report.html: one self-contained page (figures "
    "embedded, no network) with the model, the preprocessing and a card per sample.", show_default=False)]

# Input handling (onnx_pathwise.data, onnx_pathwise.preprocess), shared by explain, evaluate, audit, diff.
GlobOpt = Annotated[str | None, typer.Option(
    "--glob", help="For a folder of images: only files matching this pattern (e.g. '*.jpg', 'cats/**').",
    show_default=False)]
PreprocessOpt = Annotated[str, typer.Option(
    "--preprocess", help="Image preprocessing preset: imagenet, caffe, tf, unit or none.")]
ResizeOpt = Annotated[str | None, typer.Option(
    "--resize", help="Resize the shorter image side to this many pixels before the centre crop.", show_default=False)]
CropOpt = Annotated[str | None, typer.Option(
    "--crop", help="Centre crop, e.g. 224 or 224x224 (default: the model's input size).", show_default=False)]
MeanOpt = Annotated[str | None, typer.Option(
    "--mean", help="Per-channel mean subtracted after scaling, e.g. 0.5,0.5,0.5 (overrides the preset).",
    show_default=False)]
StdOpt = Annotated[str | None, typer.Option(
    "--std", help="Per-channel std divided by after the mean, e.g. 0.5,0.5,0.5 (overrides the preset).",
    show_default=False)]
LayoutOpt = Annotated[str | None, typer.Option(
    "--layout", help="Image layout of the model input: nchw or nhwc (default: read from the model).",
    show_default=False)]
LabelsOpt = Annotated[Path | None, typer.Option(
    "--labels", help="Class names: one per line, or JSON (default: the model's metadata, if any).",
    show_default=False)]
OnErrorOpt = Annotated[str, typer.Option(
    "--on-error", help="A corrupt image or bad table row: fail (stop with its name) or skip (leave it out).")]
ColumnsOpt = Annotated[str | None, typer.Option(
    "--columns", help="Table columns to use, by name, in the model's feature order (e.g. age,income,...).",
    show_default=False)]
BatchSizeOpt = Annotated[int | None, typer.Option(
    "--batch-size", help="Samples read and explained at a time (default: from the memory budget).",
    show_default=False, min=1)]
ShardSizeOpt = Annotated[int | None, typer.Option(
    "--shard-size", help="Samples per output shard explanation-NNNNN.npz (default: up to 1000).",
    show_default=False, min=1)]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Continue an interrupted run in OUT after its last complete shard.")]


class Engine(str, Enum):
    local = "local"
    ray = "ray"


EngineOpt = Annotated[Engine, typer.Option(
    "--engine", case_sensitive=False, help="Where the explaining runs: local, or ray (pip install 'onnx-pathwise\\[ray]').")]
RayAddressOpt = Annotated[str | None, typer.Option(
    "--ray-address", help="Ray cluster to join with --engine ray (default: start a local one).", show_default=False)]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"{PROG} {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show the full traceback of errors too (normally one line).")] = False,
    memory_budget: Annotated[int | None, size_option(
        "--memory-budget", help="Most memory one request may plan to use, e.g. 4G or 512M (default: "
                                f"${limits.ENV_VAR}, else half the memory available).")] = None,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Exact local affine models and pathwise explanations of piecewise-linear (ReLU) ONNX models."""
    ctx.meta[_DEBUG] = debug
    if memory_budget is not None:
        limits.set_memory_budget(memory_budget)
        ctx.meta[_BUDGET_SET] = True
        return
    env = os.environ.get(limits.ENV_VAR)
    if env:
        try:
            limits.parse_size(env)
        except PathwiseError:
            raise PathwiseError(f"{limits.ENV_VAR}={env!r}: expected a size such as 4G, 512M or 1000000 "
                                f"(bytes), at least {limits.MIN_BUDGET // 2**20}M") from None


# --------------------------------------------------------------------------- plumbing


def _resolve_device(device: Device | str) -> str:
    """The device that will run (DeviceError for ``cuda`` without a GPU). The runtime's CPU-fallback
    notice for ``auto`` is held back until the command has succeeded (see :class:`_Group`)."""
    device = device.value if isinstance(device, Device) else device
    held = io.StringIO()
    with contextlib.redirect_stderr(held):
        resolved = runtime.resolve_device(device)
    if held.getvalue().strip():
        _notices.append(held.getvalue().strip())
    return resolved


def _open_explainer(model: Path, device: Device | str = Device.auto, input_name: str | None = None,
                    output_name: str | None = None) -> Explainer:
    """Read, validate and analyse the model (ModelError / UnsupportedModelError / DeviceError)."""
    return Explainer(model, device=_resolve_device(device), input_name=input_name, output_name=output_name)


@dataclasses.dataclass(frozen=True)
class _DataOptions:
    """The input-handling options, as given (see :func:`_open_source`)."""

    glob: str | None = None
    preprocess: str = "imagenet"
    resize: str | None = None
    crop: str | None = None
    mean: str | None = None
    std: str | None = None
    layout: str | None = None
    on_error: str = "fail"
    columns: str | None = None
    batch_size: int | None = None


def _open_source(path: Path, model: Any, opts: _DataOptions | None = None) -> InputSource:
    """Open INPUT for the model (an Explainer or its input shape): arrays, images, folders,
    path lists, tables; the options are checked before anything is read."""
    from .preprocess import preset

    opts = opts or _DataOptions()
    prep = preset(opts.preprocess, resize=opts.resize, crop=opts.crop, mean=opts.mean, std=opts.std,
                  layout=opts.layout)
    return open_inputs(path, model, preprocess=prep, glob=opts.glob, on_error=opts.on_error,
                       columns=opts.columns, batch_size=opts.batch_size)


def _load_input(path: Path, explainer: Explainer, opts: _DataOptions | None = None,
                source: InputSource | None = None) -> np.ndarray:
    """Read INPUT safely and check it against the model: a batch (N, *input shape). A .npy/.npz
    file is read exactly as :func:`~onnx_pathwise.io.load_array` reads it; other sources are
    read whole (within the memory budget), bad items failing or skipped per ``--on-error``."""
    source = source or _open_source(path, explainer, opts)
    x = source.to_array()
    _note_skipped(source.skipped)
    return explainer.check_input(x, name=str(path))


def _read_inputs(path: Path, model: Path, opts: _DataOptions) -> np.ndarray:
    """--inputs of audit and diff: a .npy/.npz file as load_array reads it (the command checks
    its shape); any other source is read for the model's input shape."""
    if is_array_file(path):
        if opts.glob is not None or opts.columns is not None:
            raise PathwiseError("--glob and --columns do not apply to a .npy/.npz array")
        return load_array(path)
    return _load_input(path, _open_explainer(model, Device.cpu), opts)


def _note_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    """One notice per input left out with --on-error skip (shown once the command succeeded)."""
    for name, why in skipped:
        _notices.append(f"{PROG}: skipped {name}: {why.removeprefix(name + ': ')}")


def _labels(path: Path | None, explainer: Explainer) -> list[str] | None:
    """--labels, else the model's metadata labels; their count must match the classes."""
    labels = load_labels(path, explainer.proto)
    if labels is not None and len(labels) != explainer.num_classes:
        where = str(path) if path is not None else "the model's metadata labels"
        raise InputError(f"{where}: {len(labels)} label(s), but the model has {explainer.num_classes} classes")
    return labels


def _check_target(target: int | None, ex: Explainer) -> None:
    """``--target`` must name one of the model's classes (known once the model is read)."""
    if target is not None and not 0 <= target < ex.num_classes:
        raise PathwiseError(f"--target {target}: out of range for {ex.num_classes} scores "
                            f"(classes 0 to {ex.num_classes - 1})")


def _refuse_kind(path: Path, kind: str | None) -> None:
    if kind == "a directory":
        raise OutputError(f"{path}: is a directory; give a file name")
    if kind not in (None, "a file"):
        raise OutputError(f"{path}: is {kind}; --force replaces regular files only")


def _guard_output(path: Path, force: bool) -> None:
    """Refuse, before any work, an output path that cannot or may not be written: one that
    exists without ``force``, or is anything but a regular file (directory, symbolic link,
    FIFO, device, socket) even with it. Missing folders on the way are allowed: the writers
    create them."""
    kind = existing_kind(path)
    _refuse_kind(path, kind)
    if kind is not None and not force:
        raise OutputError(f"{path}: already exists; pass --force to overwrite it")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{path}: {str(parent)!r} is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(f"{path}: folder {str(parent)!r} is not writable")
            break


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create folder {str(path.parent)!r} ({exc.strerror or exc})") from None


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray], force: bool = False) -> Path:
    """Write arrays atomically, creating missing folders; the file is named exactly ``path``."""
    _make_parent(path)
    return write_files(path.parent, {path.name: npz_writer(arrays)}, overwrite=force)[0]


def _write_json(path: Path, obj: Any, force: bool = False) -> Path:
    """Write strict JSON atomically, creating missing folders."""
    _make_parent(path)
    return write_files(path.parent, {path.name: json_writer(obj)}, overwrite=force)[0]


def _write_bytes(path: Path, data: bytes, force: bool = False) -> Path:
    _make_parent(path)
    return write_files(path.parent, {path.name: bytes_writer(data)}, overwrite=force)[0]


# --------------------------------------------------------------------------- inspect


def _gate_parameters(ex: Explainer) -> int:
    """Learned gate parameters (PRelu slopes); the other gates have none."""
    total = 0
    for node in ex.ir.nodes:
        if node.role == GATE and node.op_type == "PRelu":
            total += sum(ex.ir.constants[t].size for t, d in zip(node.inputs, node.data)
                         if t and not d and t in ex.ir.constants)
    return int(total)


def _gate_dict(g: GateLayer) -> dict[str, Any]:
    return {"index": g.index, "name": g.name, "op_type": g.op_type, "units": g.units,
            "shape": list(g.shape), "input": g.input, "output": g.output}


def _segment_dict(s: Segment, op_types: Mapping[str, str]) -> dict[str, Any]:
    return {"index": s.index, "nodes": list(s.nodes), "op_types": [op_types[n] for n in s.nodes],
            "inputs": list(s.inputs), "outputs": list(s.outputs), "parameters": s.parameters}


def describe(ex: Explainer, model: Path | str) -> dict[str, Any]:
    """What ``inspect`` reports about an analysable model, as plain JSON-ready data."""
    ir = ex.ir
    op_types = {n.name: n.op_type for n in ir.nodes}
    segments = [_segment_dict(s, op_types) for s in ex.segments]
    gate_params = _gate_parameters(ex)
    return {
        "model": str(model),
        "analysable": True,
        "producer": ir.info.get("producer", ""),
        "opset": ir.opset,
        "input": {"name": ir.input_name, "shape": ["N", *ir.input_shape], "dtype": str(ir.input_dtype),
                  "batch_fixed_in_file": ir.batch_fixed,
                  **({"batch_in_file": ir.fixed_batch} if ir.batch_fixed else {})},
        "output": {"name": ir.source_output or ir.output_name, "explained": ir.output_name,
                   "peeled": list(ir.peeled), "classes": ir.num_classes},
        "gate_layers": [_gate_dict(g) for g in ex.gate_layers],
        "routing": [{"name": n.name, "op_type": n.op_type} for n in ir.nodes if n.role == ROUTING],
        "segments": segments,
        "parameters": sum(s["parameters"] for s in segments) + gate_params,
    }


def _model_info(model: Path) -> dict[str, Any] | None:
    """:func:`describe` of a model, or None when it cannot be analysed (for audit's page)."""
    try:
        return describe(_open_explainer(model, Device.cpu), model)
    except PathwiseError:
        return None


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    cells = [list(map(str, headers))] + [[clean(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def _dims(shape: Sequence[Any]) -> str:
    return "×".join(map(str, shape)) if shape else "scalar"


def _ops_summary(ops: Sequence[str], limit: int = 5) -> str:
    text = " → ".join(ops[:limit])
    return text + f" → … ({len(ops)} nodes)" if len(ops) > limit else text


def _describe_text(info: Mapping[str, Any]) -> str:
    inp, out = info["input"], info["output"]
    producer = f"made by {info['producer']}, " if info["producer"] else ""
    lines = [f"{clean(info['model'])}  ({clean(producer)}opset {info['opset']})", ""]
    batch = "N is the batch axis"
    if inp["batch_fixed_in_file"]:
        fixed = inp.get("batch_in_file") or 1
        batch = f"fixed at {fixed} in the file; any N works" + (f", run in groups of {fixed}" if fixed > 1 else "")
    lines.append(f"Input     {inp['name']!r}: {inp['dtype']}, shape ({', '.join(map(str, inp['shape']))})"
                 f"  [{batch}]")
    if out["peeled"]:
        peeled = " then ".join(reversed(out["peeled"]))
        lines.append(f"Output    {out['name']!r}; explained scores: {out['explained']!r}, "
                     f"before the final {peeled} (explanations target these logits)")
    else:
        lines.append(f"Output    {out['name']!r}; explained scores: {out['explained']!r}")
    lines.append(f"Classes   {out['classes']} scores per sample")
    lines.append("")
    gates = info["gate_layers"]
    lines.append(f"Gate layers: {len(gates)} (the hidden layers; a unit is one element of a gate's output)")
    if gates:
        lines += _table(["#", "node", "op", "units", "shape"],
                        [[g["index"], g["name"], g["op_type"], g["units"], _dims(g["shape"])] for g in gates])
    else:
        lines.append("  none: the model is affine, every explanation is exact input×gradient")
    lines.append("")
    routing = info["routing"]
    lines.append(f"Routing nodes: {len(routing)} (max-pool choices, frozen at each input, never selected)")
    lines += [f"  {clean(r['name'])} ({clean(r['op_type'])})" for r in routing] or ["  none"]
    lines.append("")
    segs = info["segments"]
    lines.append(f"Segments: {len(segs)} (the affine pieces between gates, after folding constants and BatchNorm)")
    lines += _table(["#", "ops", "inputs", "outputs", "parameters"],
                    [[s["index"], _ops_summary(s["op_types"]), ", ".join(s["inputs"]),
                      ", ".join(s["outputs"]), f"{s['parameters']:,}"] for s in segs])
    lines.append("")
    lines.append(f"Parameters  {info['parameters']:,} on the explained path")
    return "\n".join(lines)


def _unsupported_text(model: Path, exc: UnsupportedModelError) -> str:
    lines = [f"{clean(model)}: not analysable: {len(exc.problems)} node(s) on the input→output path "
             "are not supported:"]
    lines += [f"  - {clean(p)}" for p in exc.problems]
    lines.append("Supported ops: " + ", ".join(sorted(exc.supported)) + ".")
    lines.append("A final Softmax, LogSoftmax or Sigmoid is allowed (peeled).")
    return "\n".join(lines)


@app.command()
def inspect(
    model: ModelArg,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON object instead of text.")] = False,
    input_name: InputNameOpt = None,
    output: OutputNameOpt = None,
) -> None:
    """Show what the tool sees in MODEL: input, explained output, gate layers, segments.

    When the model cannot be analysed, lists every unsupported node and exits with 1.
    """
    try:
        ex = _open_explainer(model, Device.cpu, input_name, output)
    except UnsupportedModelError as exc:
        if json_out:
            _out(to_json({"model": str(model), "analysable": False, "problems": exc.problems,
                          "supported": sorted(exc.supported)}))
        else:
            _out(_unsupported_text(model, exc))
        raise typer.Exit(1) from None
    info = describe(ex, model)
    _out(to_json(info) if json_out else _describe_text(info))


# --------------------------------------------------------------------------- unwrap


@app.command()
def unwrap(
    model: ModelArg,
    input: InputArg,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Where to write the .npz (missing folders are created).", show_default=False)],
    device: DeviceOpt = Device.auto,
    input_name: InputNameOpt = None,
    output: OutputNameOpt = None,
    force: ForceOpt = False,
) -> None:
    """Write each sample's local affine model f(x') = W x' + b, exact on its activation region.

    The .npz holds weight (N, K, *input shape), bias (N, K), output (N, K),
    the model's scores, and delta (N), max |W x + b - output|: float32 round-off.
    """
    _guard_output(out, force)
    ex = _open_explainer(model, device, input_name, output)
    x = _load_input(input, ex)
    res = ex.unwrap(x)
    _write_npz(out, {"weight": res.weight, "bias": res.bias, "output": res.output, "delta": res.delta}, force)
    n, k = res.output.shape
    _out(f"wrote {out}: {n} sample(s) × {k} scores of {ex.ir.output_name!r}, weight "
               f"{tuple(res.weight.shape)}, max completeness delta {float(res.delta.max()):.2g}")


# --------------------------------------------------------------------------- batches, folders


#: Samples per chunk of a long batch (progress is reported per chunk).
CHUNK = 16


def _chunked(fn: Callable[[np.ndarray], Any], x: np.ndarray, what: str) -> Any:
    """Run ``fn`` over chunks of the batch and merge the results; a progress bar on stderr
    appears when the whole batch looks like taking more than a second."""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    n = x.shape[0]
    starts = list(range(0, n, CHUNK))
    t0 = time.perf_counter()
    results = [fn(x[: CHUNK])]
    if len(starts) > 1:
        estimate = (time.perf_counter() - t0) * len(starts)
        progress = Progress(TextColumn(f"{what}"), BarColumn(), TextColumn("{task.completed}/{task.total} samples"),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                            disable=estimate < 1.0)
        with progress:
            task = progress.add_task(what, total=n, completed=min(CHUNK, n))
            for s in starts[1:]:
                results.append(fn(x[s : s + CHUNK]))
                progress.advance(task, min(CHUNK, n - s))
    return concat_batches(results)


def _guard_dir(out: Path, names: Iterable[str], force: bool) -> None:
    """Refuse, before any work, an output folder that is not a folder, or that holds a file
    with one of the names the command writes (without ``force``), or anything but a regular
    file under one of those names (even with ``force``)."""
    kind = existing_kind(out)
    if kind not in (None, "a directory") and not (kind == "a symbolic link" and out.is_dir()):
        raise OutputError(f"{out}: exists and is not a folder")
    if out.is_dir():
        clash = []
        for name in names:
            found = existing_kind(out / name)
            _refuse_kind(out / name, found)
            if found is not None:
                clash.append(name)
        if clash and not force:
            raise OutputError(f"{out}: already holds {', '.join(clash)}; pass --force to overwrite")
    _guard_output(out / "probe.tmp", True)


def _write_dir(out: Path, npz: Mapping[str, Mapping[str, np.ndarray]], json_files: Mapping[str, Any],
               pngs: Mapping[str, bytes], force: bool) -> list[str]:
    """Write every file into ``out`` all or nothing (:func:`onnx_pathwise.io.write_files`): a
    failure or an interrupt leaves no partial output behind, not even a folder it created."""
    created = existing_kind(out) is None
    _make_parent(out / "x")
    writers: dict[str, Callable[[Any], object]] = {}
    writers.update({name: npz_writer(arrays) for name, arrays in npz.items()})
    writers.update({name: json_writer(obj) for name, obj in json_files.items()})
    writers.update({name: bytes_writer(data) for name, data in pngs.items()})
    try:
        write_files(out, writers, overwrite=force)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    return sorted(writers)


def _png_names(png: bool, ex: Explainer, n: int) -> list[str]:
    """The per-sample PNG names a command writes for image inputs."""
    return [f"sample_{i}.png" for i in range(n)] if png and plots.is_image(ex.input_shape) else []


def _path_json(path: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"node": p.node, "kept": p.kept, "count": p.count, "units": p.units} for p in path]


WidthOpt = Annotated[str | None, width_option(
    "--width", help="Units kept per path layer: a count (10), a percentage of the layer (5%) or "
                    "'all'. Default: every unit that favours the target.")]
DepthOpt = Annotated[int | None, count_option(
    "--depth", help="How many of the last gate layers are path-constrained (default all; 0 = input×gradient; "
                    "more than there are = all)", low=0)]
InputWidthOpt = Annotated[str | None, width_option(
    "--input-width", help="Also keep only this many input elements: a count (10), a percentage (5%) or 'all'.")]
TargetOpt = Annotated[int | None, count_option(
    "--target", help="Class to explain (default: each sample's predicted class); below the number of classes",
    low=0)]
ClassesOpt = Annotated[int | None, typer.Option(
    "--classes", parser=lambda v: _classes(v), metavar="N|all",
    help="Pathwise: the classes competing in each unit's score, 'all' (exact, the default) or N "
         "(each sample's top N predicted classes plus the target).", show_default=False)]
OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (created if missing).", show_default=False)]


def _classes(value: Any) -> int | None:
    """A --classes value: 'all' (None) or a count of at least 2."""
    from .pathwise import parse_classes

    try:
        return parse_classes(value)
    except PathwiseError as exc:
        raise OptionError("--classes", value, "expected 'all' or a number of classes of at least 2") from exc


#: The attribution methods, from their registry (onnx_pathwise.baselines.METHODS).
METHODS = tuple(baselines.METHODS)


def _method_options(method: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The CLI's method options (--steps, --exact) that ``method`` takes, in their order."""
    takes = baselines.METHODS[method].options
    return {k: v for k, v in given.items() if k in takes}


# --------------------------------------------------------------------------- explain


@app.command()
def explain(
    model: ModelArg,
    input: InputArg,
    out: OutDirOpt,
    method: Annotated[str, choice_option("--method", METHODS, help="Attribution method.")] = "pathwise",
    target: TargetOpt = None,
    width: WidthOpt = None,
    depth: DepthOpt = None,
    input_width: InputWidthOpt = None,
    steps: Annotated[int, count_option("--steps", help="Integrated Gradients: interpolation steps", high=MAX_STEPS,
                                       show_default=True)] = 32,
    classes: ClassesOpt = None,
    exact: Annotated[bool, typer.Option("--exact", help="Integrated Gradients: integrate exactly over linear pieces.")] = False,
    device: DeviceOpt = Device.auto,
    input_name: InputNameOpt = None,
    output: OutputNameOpt = None,
    png: Annotated[bool, typer.Option("--png/--no-png", help="For image inputs, one PNG per sample.")] = True,
    report_format: PageOpt = None,
    force: ForceOpt = False,
    glob: GlobOpt = None,
    preprocess: PreprocessOpt = "imagenet",
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    layout: LayoutOpt = None,
    labels: LabelsOpt = None,
    on_error: OnErrorOpt = "fail",
    columns: ColumnsOpt = None,
    batch_size: BatchSizeOpt = None,
    shard_size: ShardSizeOpt = None,
    resume: ResumeOpt = False,
    engine: EngineOpt = Engine.local,
    ray_address: RayAddressOpt = None,
) -> None:
    """Explain each sample: pathwise (the default) or a baseline method.

    A .npy/.npz INPUT: writes OUT/explanation.npz (attribution, output, target; pathwise also
    weight, bias, masked_score), OUT/explanation.json (per sample: target, score and, for
    pathwise, faithfulness and the path) and, for image inputs, OUT/sample_<i>.png.
    Images, folders, path lists and tables (or --batch-size, --shard-size, --resume, --engine
    ray) stream in batches to shards OUT/explanation-NNNNN.npz and OUT/index.json.
    """
    w, iw, ncls = width, input_width, classes
    if not baselines.METHODS[method].path and (w is not None or depth is not None or iw is not None or ncls is not None):
        raise PathwiseError("--width, --depth, --input-width and --classes apply to --method pathwise only")
    data = _DataOptions(glob, preprocess, resize, crop, mean, std, layout, on_error, columns, batch_size)
    streaming = (not is_array_file(input) or resume or batch_size is not None or shard_size is not None
                 or engine is not Engine.local)
    if not streaming and ray_address is not None:
        raise PathwiseError("--ray-address needs --engine ray")
    if streaming:
        _explain_stream(model, input, out, method, target, w, depth, iw, ncls, steps, exact, device, input_name,
                        output, png, force, data, labels, shard_size, resume, engine, ray_address, report_format)
        return
    names = ["explanation.npz", "explanation.json"] + (["report.html"] if report_format else [])
    _guard_dir(out, names, force)
    ex = _open_explainer(model, device, input_name, output)
    _check_target(target, ex)
    x = _load_input(input, ex, data)
    _guard_dir(out, names + _png_names(png, ex, x.shape[0]), force)
    class_names = _labels(labels, ex)
    if baselines.METHODS[method].path:
        res = _chunked(lambda b: ex.explain(b, target=target, width=w, depth=depth, input_width=iw, classes=ncls),
                       x, "explaining")
        arrays = {"attribution": res.attribution, "weight": res.weight, "bias": res.bias, "output": res.output,
                  "target": res.target, "masked_score": res.masked_score}
        samples = [{"target": int(res.target[i]), "score": float(res.score[i]),
                    "masked_score": float(res.masked_score[i]), "faithfulness": float(res.faithfulness[i]),
                    "sparsity": float(res.sparsity[i]), "path": _path_json(res.path[i])} for i in range(len(res.target))]
        options = {"width": w, "depth": depth, "input_width": iw, "classes": ncls if ncls is not None else "all"}
    else:
        opts: dict[str, Any] = _method_options(method, {"steps": steps, "exact": exact})
        res = _chunked(lambda b: ex.attribute(b, method=method, target=target, **opts), x, "explaining")
        arrays = {"attribution": res.attribution, "output": res.output, "target": res.target}
        idx = np.arange(len(res.target))
        scores = target_scores(res.output, res.target)
        samples = [{"target": int(res.target[i]), "score": float(scores[i])} for i in idx]
        options = opts
    if class_names is not None:
        for i, s in enumerate(samples):
            s["label"] = class_names[int(res.target[i])]
    report = {"model": str(model), "method": method, "options": options, "explained_output": ex.ir.output_name,
              "samples": samples}
    if class_names is not None:
        report["labels"] = class_names
    pngs = {}
    if png and plots.is_image(ex.input_shape):
        for i in range(x.shape[0]):
            title = plots.title(method, int(res.target[i]), float(target_scores(res.output[i:i + 1], res.target[i:i + 1])[0]),
                                class_names)
            pngs[f"sample_{i}.png"] = plots.sample_figure(x[i], res.attribution[i], title) or b""
    if report_format is not None:
        from .report import explain_page

        pngs["report.html"] = explain_page(
            model_info=describe(ex, model), method=method, options=options, x=x, attribution=res.attribution,
            output=res.output, target=res.target, samples=samples, bias=getattr(res, "bias", None),
            masked_score=getattr(res, "masked_score", None), inputs=str(input), labels=class_names).encode()
    written = _write_dir(out, {"explanation.npz": arrays}, {"explanation.json": report}, pngs, force)
    extra = f", faithfulness {number(finite_mean(res.faithfulness), '.3f')} (mean)" if baselines.METHODS[method].path else ""
    _out(f"wrote {len(written)} file(s) to {out}: {x.shape[0]} sample(s), method {method}{extra}")


def _explain_stream(model: Path, input: Path, out: Path, method: str, target: int | None, w: Any, depth: int | None,
                    iw: Any, ncls: int | None, steps: int, exact: bool, device: Device, input_name: str | None,
                    output: str | None, png: bool, force: bool, opts: _DataOptions, labels: Path | None,
                    shard_size: int | None, resume: bool, engine: Engine, ray_address: str | None,
                    report_format: Any = None) -> None:
    """explain over a dataset in bounded memory: batches in, shards out (onnx_pathwise.stream).
    Figures are overlays on each sample's original image; ``--report html`` pages the first
    :data:`onnx_pathwise.report.html.MAX_CARDS` samples."""
    from . import stream

    if resume and force:
        raise PathwiseError("--resume and --force contradict each other: --resume keeps OUT's finished shards")
    if engine is Engine.local and ray_address is not None:
        raise PathwiseError("--ray-address needs --engine ray")
    names = ["explanation.npz", "explanation.json", stream.INDEX, stream.SHARD.format(0), stream.RUN]
    names += ["report.html"] if report_format else []
    _guard_dir(out, [] if resume else names, force)
    ex = _open_explainer(model, device, input_name, output)
    _check_target(target, ex)
    source = _open_source(input, ex, opts)
    class_names = _labels(labels, ex)
    if baselines.METHODS[method].path:
        options: dict[str, Any] = {"width": w, "depth": depth, "input_width": iw}
        if ncls is not None:
            options["classes"] = ncls
    else:
        options = _method_options(method, {"steps": steps, "exact": exact})
    from .report.html import MAX_CARDS

    pages: list[tuple[Any, dict[str, Any], dict[str, np.ndarray]]] = []  # the report's first samples
    draw = png and plots.is_image(ex.input_shape)
    render = None
    if draw or report_format:
        def render(sample: Any, row: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, bytes]:
            if report_format and len(pages) < MAX_CARDS:
                pages.append((sample, dict(row), dict(arrays)))
            if not draw:
                return {}
            title = plots.title(method, int(row["target"]), float(row["score"]), class_names)
            fig = plots.sample_figure(sample.array, arrays["attribution"], title, sample.original, sample.features)
            return {f"sample_{row['sample']}.png": fig} if fig else {}
    kw: dict[str, Any] = {"model": model, "method": method, "target": target, "options": options,
                          "shard_size": shard_size, "resume": resume, "labels": class_names, "render": render,
                          "overwrite_figures": force or resume, "batch_size_given": opts.batch_size is not None}
    if engine is Engine.ray:
        from .ray_engine import run as run_ray

        result = run_ray(ex, source, out, address=ray_address, device=ex.device, input_name=input_name,
                         output_name=output, **kw)
    else:
        result = stream.run(ex, source, out, **kw)
    if report_format and pages:
        _stream_report(out, model, ex, method, options, source, class_names, pages, force or resume)
    _note_skipped(result.skipped)
    extra = f", faithfulness {result.mean_faithfulness:.3f} (mean)" if result.mean_faithfulness is not None else ""
    again = f", resumed after {result.resumed_at}" if result.resumed_at else ""
    skipped = f", {len(result.skipped)} skipped" if result.skipped else ""
    _out(f"wrote {result.count} sample(s) in {result.shards} shard(s) and {stream.INDEX} to {out}{again}"
         f"{skipped}: method {method}{extra}")


def _stream_report(out: Path, model: Path, ex: Explainer, method: str, options: Mapping[str, Any],
                   source: InputSource, class_names: Sequence[str] | None,
                   pages: Sequence[tuple[Any, dict[str, Any], dict[str, np.ndarray]]], overwrite: bool) -> None:
    """OUT/report.html of a streaming explain, from the samples its figures hook kept."""
    from . import stream
    from .report import explain_page

    layers = stream.path_layers(ex, options) if baselines.METHODS[method].path else []
    samples = []
    for _, row, arrays in pages:
        info: dict[str, Any] = {"target": row["target"], "score": row["score"], "faithfulness": row.get("faithfulness")}
        if "path_count" in arrays:
            info["path"] = [{"node": layer["name"], "count": int(c), "units": layer["units"]}
                            for layer, c in zip(layers, arrays["path_count"])]
        samples.append(info)

    def stacked(key: str) -> np.ndarray | None:
        return np.stack([a[key] for _, _, a in pages]) if all(key in a for _, _, a in pages) else None

    attribution, output = stacked("attribution"), stacked("output")
    assert attribution is not None and output is not None  # every method writes both
    page = explain_page(
        model_info=describe(ex, model), method=method, options=options,
        x=np.stack([s.array for s, _, _ in pages]), attribution=attribution, output=output,
        target=np.array([r["target"] for _, r, _ in pages]), samples=samples, bias=stacked("bias"),
        masked_score=stacked("masked_score"), sources=[s.source for s, _, _ in pages],
        originals=[s.original for s, _, _ in pages], labels=class_names, features=pages[0][0].features,
        preprocessing=source.preprocessing.to_json() if source.preprocessing is not None else None,
        inputs=str(source.path))
    _write_bytes(out / "report.html", page.encode(), overwrite)


# --------------------------------------------------------------------------- decompose


@app.command()
def decompose(
    model: ModelArg,
    input: InputArg,
    out: OutDirOpt,
    layer: Annotated[str | None, typer.Option("--layer", help="Gate layer (node name); default the last.",
                                              show_default=False)] = None,
    top: Annotated[int, count_option("--top", help="How many parts to keep (more than the layer has: all)",
                                     show_default=True)] = 8,
    group: Annotated[str, choice_option("--group", ("unit", "channel"), help="What a part runs through.")] = "unit",
    target: TargetOpt = None,
    width: WidthOpt = None,
    depth: DepthOpt = None,
    classes: ClassesOpt = None,
    device: DeviceOpt = Device.auto,
    input_name: InputNameOpt = None,
    output: OutputNameOpt = None,
    png: Annotated[bool, typer.Option("--png/--no-png", help="For image inputs, one PNG grid per sample.")] = True,
    force: ForceOpt = False,
) -> None:
    """Split each pathwise attribution into its parts through single units (or channels) of a
    gate layer, ranked by their contribution to the score; parts + rest + bypass = attribution.

    Writes OUT/decomposition.npz, OUT/decomposition.json and, for image inputs, a PNG grid per sample.
    """
    w, ncls = width, classes
    names = ["decomposition.npz", "decomposition.json"]
    _guard_dir(out, names, force)
    ex = _open_explainer(model, device, input_name, output)
    _check_target(target, ex)
    x = _load_input(input, ex)
    _guard_dir(out, names + _png_names(png, ex, x.shape[0]), force)
    d = _chunked(lambda b: ex.decompose(b, layer=layer, top=top, group=group, target=target, width=w, depth=depth,
                                        classes=ncls), x, "decomposing")
    arrays = {"attribution": d.attribution, "parts": d.parts, "part_index": d.part_index,
              "part_score": d.part_score, "rest": d.rest, "bypass": d.bypass, "target": d.target,
              "output": d.output}
    samples = [{"target": int(d.target[i]),
                "parts": [{group: int(d.part_index[i, j]), "score": float(d.part_score[i, j]),
                           "active": bool(d.part_active[i, j])} for j in range(d.parts.shape[1])],
                "delta": float(d.delta[i])} for i in range(len(d.target))]
    report = {"model": str(model), "layer": d.layer, "group": group, "crosses_all_paths": d.crosses_all,
              "classes": ncls if ncls is not None else "all", "samples": samples}
    pngs = {}
    if png and plots.is_image(ex.input_shape):
        for i in range(x.shape[0]):
            labels = [f"{group} {int(d.part_index[i, j])}: {d.part_score[i, j]:.3g}" for j in range(d.parts.shape[1])]
            pngs[f"sample_{i}.png"] = plots.parts_grid(x[i], d.attribution[i], d.parts[i], labels)
    written = _write_dir(out, {"decomposition.npz": arrays}, {"decomposition.json": report}, pngs, force)
    _out(f"wrote {len(written)} file(s) to {out}: {x.shape[0]} sample(s), layer {d.layer!r}, "
               f"max |parts + rest + bypass - attribution| {float(d.delta.max()):.2g}")


# --------------------------------------------------------------------------- evaluate


@app.command()
def evaluate(
    model: ModelArg,
    inputs: InputArg,
    out: OutDirOpt,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods, from: " + ", ".join(METHODS)
                                         + ".")] = ",".join(m.name for m in baselines.METHODS.values() if m.evaluate),
    width: Annotated[list[str] | None, width_option(
        "--width", help="Pathwise width(s); repeat for a sweep (e.g. --width 5% --width 20%).")] = None,
    depth: Annotated[list[int] | None, count_option("--depth", help="Pathwise depth(s); repeat for several",
                                                     low=0)] = None,
    step: Annotated[int | None, count_option("--step", help="Pixels per insertion/deletion step "
                                             "(default: one image row)")] = None,
    target: TargetOpt = None,
    classes: ClassesOpt = None,
    device: DeviceOpt = Device.auto,
    input_name: InputNameOpt = None,
    output: OutputNameOpt = None,
    report_format: PageOpt = None,
    force: ForceOpt = False,
    glob: GlobOpt = None,
    preprocess: PreprocessOpt = "imagenet",
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    layout: LayoutOpt = None,
    labels: LabelsOpt = None,
    on_error: OnErrorOpt = "fail",
    columns: ColumnsOpt = None,
) -> None:
    """Rank explanation methods on MODEL with insertion/deletion AUC and more.

    Prints a table (mean ± std over samples) and writes OUT/evaluation.json (per method, per
    sample and mean values of every metric), OUT/curves.png and, with several widths,
    OUT/width_sweep.png.
    """
    from .metrics import evaluate as run_evaluation

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in METHODS]
    if bad or not chosen:
        raise PathwiseError(f"--methods: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(METHODS)}")
    widths: list[int | str | None] | None = list(width) if width else None
    names = ["evaluation.json", "curves.png"] + (["width_sweep.png"] if widths and len(widths) > 1 else []) + (
        ["report.html"] if report_format else [])
    ncls = classes
    _guard_dir(out, names, force)
    ex = _open_explainer(model, device, input_name, output)
    _check_target(target, ex)
    source = _open_source(inputs, ex, _DataOptions(glob, preprocess, resize, crop, mean, std, layout, on_error, columns))
    x = _load_input(inputs, ex, source=source)
    class_names = _labels(labels, ex)
    attributions: dict[str, np.ndarray] | None = {} if report_format else None
    result = run_evaluation(ex, x, chosen, widths=widths, depths=list(depth) if depth else None, step=step,
                            target=target, attributions=attributions, classes=ncls)
    result["model"] = str(model)
    result["input"] = source.describe()
    if class_names is not None:
        result["labels"] = class_names
    metric_names = ["insertion_auc", "deletion_auc", "faithfulness", "sparsity", "completeness_delta"]
    rows = []
    for label, info in result["methods"].items():
        cells = [label]
        for m in metric_names:
            v = info["metrics"].get(m)
            cells.append(f"{number(v['mean'], '.4f')} ± {number(v['std'], '.4f')}" if v else "")
        rows.append(cells)
    _out("\n".join(_table(["method"] + metric_names, rows, indent="")))
    for k, v in result["samples"].items():
        _out(f"{k}: {number(v['mean'])} ± {number(v['std'])}" if v["mean"] is not None else f"{k}: n/a")
    pngs = {"curves.png": plots.curves(result["methods"])}
    if widths and len(widths) > 1:
        pngs["width_sweep.png"] = plots.width_sweep(result["methods"])
    if attributions is not None:
        from .report import evaluate_page

        pngs["report.html"] = evaluate_page(
            model_info=describe(ex, model), evaluation=result, x=x, attributions=attributions,
            output=ex.record(x).scores, figures=dict(pngs), inputs=str(inputs)).encode()
    written = _write_dir(out, {}, {"evaluation.json": result}, pngs, force)
    _out(f"wrote {len(written)} file(s) to {out}")


# --------------------------------------------------------------------------- audit, diff


class ReportFormat(str, Enum):
    json = "json"
    junit = "junit"
    html = "html"


@app.command()
def audit(
    model: ModelArg,
    inputs: Annotated[Path | None, typer.Option(
        "--inputs", help="Inputs to check on (as INPUT of explain: .npy/.npz, images, a folder, a list, a table); "
                         "default: 4 generated standard-normal inputs.",
        show_default=False)] = None,
    max_delta: Annotated[float, number_option(
        "--max-delta", help="Largest completeness delta allowed, relative to the score scale (at least 1)",
        low=0.0, show_default=True)] = 1e-4,
    width: WidthOpt = None,
    report: Annotated[ReportFormat | None, typer.Option(
        "--report", help="Also write a report: json, junit (XML that CI systems display) or html (a page).",
        show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the report (default: stdout).",
                                             show_default=False)] = None,
    device: DeviceOpt = Device.auto,
    force: ForceOpt = False,
    glob: GlobOpt = None,
    preprocess: PreprocessOpt = "imagenet",
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    layout: LayoutOpt = None,
    on_error: OnErrorOpt = "fail",
    columns: ColumnsOpt = None,
) -> None:
    """Check that MODEL is analysable and its explanations are exact and stable: for CI gates.

    Checks: analysable (op inventory, every blocker), onnxruntime loads it, completeness delta,
    batch equals per-sample, two runs identical, CPU vs CUDA (when a GPU is present), and that
    randomising the last layer's weights changes the explanations. Exit 0 when every check
    passes (or is skipped), 1 otherwise.
    """
    from .audit import audit as run_audit

    if out is not None:
        _guard_output(out, force)
        if report is None:
            raise PathwiseError("--out needs --report json, junit or html")
    x = None
    if inputs is not None:
        x = _read_inputs(inputs, model, _DataOptions(glob, preprocess, resize, crop, mean, std, layout, on_error,
                                                     columns))
    result = run_audit(model, inputs=x, max_delta=max_delta, device=_resolve_device(device), width=width,
                       inputs_name=str(inputs))
    text = result.to_text()
    machine = None
    if report is ReportFormat.json:
        machine = to_json(result.to_json())
    elif report is ReportFormat.junit:
        machine = result.to_junit()
    elif report is ReportFormat.html:
        from .report import audit_page

        machine = audit_page(report=result, model_info=_model_info(model), inputs=str(inputs) if inputs else None)
    if machine is not None and out is not None:
        _write_bytes(out, machine.encode(), force)
        _out(text)
    elif machine is not None:
        _out(machine)
        _out(text, err=True)
    else:
        _out(text)
    raise typer.Exit(0 if result.passed else 1)


@app.command()
def diff(
    old: Annotated[Path, typer.Argument(help="The released model.", metavar="OLD", show_default=False)],
    new: Annotated[Path, typer.Argument(help="The candidate model.", metavar="NEW", show_default=False)],
    inputs: Annotated[Path, typer.Option("--inputs", help="Inputs to compare on (as INPUT of explain: .npy/.npz, "
                                         "images, a folder, a list, a table).", show_default=False)],
    fail_below: Annotated[float | None, number_option(
        "--fail-below", help="Fail when the mean attribution correlation is below this", low=-1.0, high=1.0)] = None,
    min_overlap: Annotated[float | None, number_option(
        "--min-overlap", help="Fail when the mean path overlap (Jaccard) is below this", low=0.0, high=1.0)] = None,
    max_changes: Annotated[int | None, count_option(
        "--max-changes", help="Fail when more predictions than this change", low=0)] = None,
    width: WidthOpt = None,
    depth: DepthOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the full report as JSON here.",
                                                  show_default=False)] = None,
    report_format: Annotated[PageFormat | None, typer.Option(
        "--report", case_sensitive=False, help="Also write an HTML page of the changes to --out.",
        show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where --report writes its page.",
                                             show_default=False)] = None,
    device: DeviceOpt = Device.auto,
    force: ForceOpt = False,
    glob: GlobOpt = None,
    preprocess: PreprocessOpt = "imagenet",
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    layout: LayoutOpt = None,
    on_error: OnErrorOpt = "fail",
    columns: ColumnsOpt = None,
) -> None:
    """Compare the explanations of two versions of a model on the same inputs.

    Per sample: prediction change, per-layer path overlap (Jaccard of kept units where gate layers
    match by name and shape) and attribution correlation; exit 1 when a threshold is crossed.
    """
    from .audit import diff as run_diff

    if json_out is not None:
        _guard_output(json_out, force)
    if (report_format is None) != (out is None):
        raise PathwiseError("--report html and --out FILE go together")
    if out is not None:
        _guard_output(out, force)
    x = _read_inputs(inputs, old, _DataOptions(glob, preprocess, resize, crop, mean, std, layout, on_error, columns))
    result = run_diff(old, new, x, width=width, depth=depth, device=_resolve_device(device),
                      min_correlation=fail_below, min_jaccard=min_overlap, max_prediction_changes=max_changes,
                      inputs_name=str(inputs))
    if json_out is not None:
        _write_json(json_out, result.to_json(), force)
    if out is not None:
        from .report import diff_page

        _write_bytes(out, diff_page(report=result, inputs=str(inputs)).encode(), force)
    _out(result.to_text())
    raise typer.Exit(0 if result.passed else 1)


def main() -> None:
    """Entry point for ``python -m onnx_pathwise``."""
    app(prog_name=PROG)
