"""The command line's shell: the Typer ``app``, its root options, and every error mapped to one
line and an exit code (:data:`EXIT_CODES`); see :mod:`onnx_pathwise.cli`."""

from __future__ import annotations

import inspect
import os
import signal
import sys
import threading
from types import FrameType
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from .. import __version__, limits
from ..errors import (
    DeviceError,
    InputError,
    ModelError,
    OutputError,
    PathwiseError,
    UnsupportedModelError,
)
from ..text import clean, clean_block
from .options import OptionError, size_option

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


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived while a command ran; raised (like KeyboardInterrupt for SIGINT)
    so that every ``finally`` and cleanup runs before the process exits with 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


#: Signals received while the current command ran. An interrupt raised inside a library's
#: callback (numba's compiler calls back through ctypes) can surface as that library's own error,
#: or be swallowed there: a command that fails after a signal reports the signal, not a traceback.
_received: list[int] = []
#: Signals sent again after a callback swallowed them; cancelled when the command ends.
_redeliveries: list[threading.Timer] = []


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signum)


def _quiet_unraisable(unraisable: Any) -> None:
    """An interrupt raised inside a callback (numba's compiler calls back through ctypes) is
    swallowed there, and the command would run on: deliver the signal again, so that its handler
    raises once control is back in ordinary code, and drop the "Exception ignored" report.
    Anything else goes to Python's own hook."""
    exc = unraisable.exc_value
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        # not from here: the handler would run at once, inside the callback again
        again = threading.Timer(0.01, os.kill, (os.getpid(), getattr(exc, "signum", signal.SIGINT)))
        again.daemon = True
        _redeliveries.append(again)
        again.start()
        return
    sys.__unraisablehook__(unraisable)


def _catch_signals() -> dict[int, Any]:
    """Turn SIGTERM and SIGHUP into :class:`Interrupted` (and SIGINT into KeyboardInterrupt, as
    Python does, noting it) while a command runs: their default action would kill Python without
    cleanup. Signals the caller ignores stay ignored."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[int, Any] = {}
    for name in ("SIGTERM", "SIGHUP", "SIGINT"):
        signum = getattr(signal, name, None)
        if signum is None or signal.getsignal(signum) in (signal.SIG_IGN, None):
            continue
        if name == "SIGINT" and signal.getsignal(signum) is not signal.default_int_handler:
            continue  # a caller's own SIGINT handler stays
        previous[signum] = signal.signal(signum, _raise_interrupted)
    return previous


def _interrupted_exit(signum: int) -> typer.Exit:
    """The one line and the exit code (128 + signal) of a command stopped by a signal."""
    name = signal.Signals(signum).name
    what = "interrupted" if signum == signal.SIGINT else "terminated"
    typer.echo(f"{PROG}: error: {what} ({name}); no output written", err=True)
    return typer.Exit(128 + signum)


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


def _reflow(text: str | None) -> str | None:
    """``text`` with the lines of each paragraph joined: typer prints a docstring's single line
    breaks as they are, and the terminal then wraps those lines again, mid-sentence."""
    if not text:
        return text
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split("\n"))
                       for p in inspect.cleandoc(text).split("\n\n"))


class _Group(TyperGroup):
    """Turns a :class:`PathwiseError` raised by any command, a usage error and an interrupt into
    one line and its exit code.

    Notices held back while the command ran (the CPU fallback of ``--device auto``) are shown
    after it, unless it failed: a failed command prints its one error line and nothing else.
    Every command's help is reflowed (:func:`_reflow`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            command.help = _reflow(command.help)

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
        hook, sys.unraisablehook = sys.unraisablehook, _quiet_unraisable
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
            raise _interrupted_exit(signal.SIGINT) from None
        except Interrupted as exc:
            _notices.clear()
            raise _interrupted_exit(exc.signum) from None
        except Exception as exc:
            if not _received or isinstance(exc, typer.Exit):
                raise  # a bug (its traceback), or the command's own exit
            _notices.clear()  # a library broken by the interrupt inside a callback
            raise _interrupted_exit(_received[0]) from None
        finally:
            for timer in _redeliveries:
                timer.cancel()
            _redeliveries.clear()
            sys.unraisablehook = hook
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



def main() -> None:
    """The command line, as a function that returns (or raises SystemExit): for callers that go
    on afterwards, such as tests."""
    app(prog_name=PROG)


def run() -> None:
    """Entry point of ``onnx-pathwise`` and ``python -m onnx_pathwise``: the command line, then a
    fast exit. Tearing the interpreter down (onnxruntime sessions and their thread pools, module
    dictionaries, large arrays) took 0.25–0.35 s of a 2 s run (benchmarks/README.md); every
    output file is written and closed by then, so once stdout and stderr are flushed the process
    ends with ``os._exit``. Where Ray ran, or coverage measures the process, the normal exit
    stays: their exit hooks stop the local cluster Ray started, or write the coverage data."""
    code: Any = 0
    try:
        main()
    except SystemExit as stop:
        code = stop.code
    if code is None:
        code = 0
    if "ray" in sys.modules or "coverage" in sys.modules or not isinstance(code, int):
        raise SystemExit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: let Python report it the usual way
        raise SystemExit(code) from None
    os._exit(code)

