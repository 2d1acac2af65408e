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

from ..render import _describe_text, describe
from .commands import audit, decompose, diff, evaluate, explain, inspect, unwrap
from .options import METHODS, OptionError
from .shell import EXIT_CODES, PROG, Interrupted, app, main

__all__ = ["EXIT_CODES", "METHODS", "PROG", "Interrupted", "OptionError", "app", "audit", "decompose", "describe",
           "diff", "evaluate", "explain", "inspect", "main", "unwrap", "_describe_text"]
