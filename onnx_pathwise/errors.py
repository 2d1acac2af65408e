"""Errors that describe a problem with the user's model, input or request.

The CLI turns every :class:`PathwiseError` into one line on stderr and a non-zero exit
code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PathwiseError(Exception):
    """Base class: a problem the user can fix (bad model, bad input, bad option)."""

    exit_code = 2


class ModelError(PathwiseError):
    """The model file cannot be read, or is not a model this tool can analyse."""

    exit_code = 3


class UnsupportedModelError(ModelError):
    """The input→output path holds operations that are not piecewise linear or not supported.

    ``problems`` lists every offending node at once, each as one readable line.
    """

    exit_code = 4

    def __init__(self, problems: list[str], supported: list[str]) -> None:
        self.problems = list(problems)
        self.supported = list(supported)
        lines = "; ".join(self.problems)
        super().__init__(
            f"{len(self.problems)} unsupported node(s) on the input→output path: {lines}. "
            f"Supported ops: {', '.join(sorted(self.supported))}"
        )


class InputError(PathwiseError):
    """An input array does not fit the model (shape, dtype, non-finite values, bad file)."""

    exit_code = 5


class OutputError(PathwiseError):
    """An output path cannot be written: its folder is missing, it is a directory, or it
    exists and overwriting was not asked for. Same exit code as any bad option."""

    exit_code = 2


class DeviceError(PathwiseError):
    """The requested execution device is not available."""

    exit_code = 6
