"""The command line's options: one builder per kind of value, each checked while the command
line is parsed against the range its help text states, and the options the commands share."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import baselines, limits
from ..errors import (
    PathwiseError,
)


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


def checked_option(name: str, help: str, check: Callable[[str], Any], *, metavar: str = "TEXT",
                   **kwargs: Any) -> Any:
    """A text option that ``check`` validates while the command line is parsed (it raises
    :class:`PathwiseError` naming the option); the value itself passes on unchanged."""
    def parse(value: Any) -> str:
        text = str(value)
        try:
            check(text)
        except PathwiseError as exc:
            problem = str(exc)
            if problem.startswith(name + " "):
                problem = problem.split(": ", 1)[-1]
            raise OptionError(name, value, problem) from None
        return text

    return typer.Option(name, parser=parse, metavar=metavar, help=help,
                        show_default=kwargs.pop("show_default", False), **kwargs)


def _one_of(name: str, choices: Sequence[str]) -> Callable[[str], None]:
    def check(text: str) -> None:
        if text not in choices:
            raise PathwiseError(f"{name} {text!r}: choose one of {', '.join(choices)}")
    return check


def _not_empty(name: str, what: str) -> Callable[[str], None]:
    def check(text: str) -> None:
        if not text.strip(" ,"):
            raise PathwiseError(f"{name} {text!r}: expected {what}")
    return check


def _preset_check(**which: Any) -> Callable[[str], Any]:
    """Validate one --preprocess/--resize/--crop/--mean/--std/--layout value as the preset does."""
    from ..preprocess import preset

    (key,) = which
    return lambda text: preset(text) if key == "name" else preset("none", **{key: text})


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
                     "A final Softmax, LogSoftmax or Sigmoid is peeled: scores are the logits.",
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
GlobOpt = Annotated[str | None, checked_option(
    "--glob", "For a folder of images: only files matching this pattern (e.g. '*.jpg', 'cats/**').",
    _not_empty("--glob", "a file name pattern"), metavar="PATTERN")]
PreprocessOpt = Annotated[str | None, checked_option(
    "--preprocess", "Image preprocessing preset: imagenet (the default), caffe, tf, unit or none. Image options "
    "apply to images only: with an array or a table they are refused.", _preset_check(name=True), metavar="NAME")]
ResizeOpt = Annotated[str | None, checked_option(
    "--resize", "Resize the shorter image side to this many pixels (at least 1) before the centre crop.",
    _preset_check(resize=True), metavar="N")]
CropOpt = Annotated[str | None, checked_option(
    "--crop", "Centre crop, e.g. 224 or 224x224 (default: the model's input size).", _preset_check(crop=True),
    metavar="HxW")]
MeanOpt = Annotated[str | None, checked_option(
    "--mean", "Per-channel mean subtracted after scaling, e.g. 0.5,0.5,0.5 (overrides the preset).",
    _preset_check(mean=True), metavar="X,X,X")]
StdOpt = Annotated[str | None, checked_option(
    "--std", "Per-channel std divided by after the mean, e.g. 0.5,0.5,0.5 (overrides the preset).",
    _preset_check(std=True), metavar="X,X,X")]
LayoutOpt = Annotated[str | None, checked_option(
    "--layout", "Image layout of the model input: nchw or nhwc (default: read from the model).",
    _preset_check(layout=True), metavar="nchw|nhwc")]
LabelsOpt = Annotated[Path | None, typer.Option(
    "--labels", help="Class names: one per line, or JSON (default: the model's metadata, if any).",
    show_default=False)]
OnErrorOpt = Annotated[str, checked_option(
    "--on-error", "A corrupt image or bad table row: fail (stop with its name) or skip (leave it out).",
    _one_of("--on-error", ("fail", "skip")), metavar="fail|skip", show_default=True)]
ColumnsOpt = Annotated[str | None, checked_option(
    "--columns", "Table columns to use, by name, in the model's feature order (e.g. age,income,...).",
    _not_empty("--columns", "comma-separated column names"), metavar="NAMES")]
BatchSizeOpt = Annotated[int | None, count_option(
    "--batch-size", help="Samples read and explained at a time (default: from the memory budget)")]
ShardSizeOpt = Annotated[int | None, count_option(
    "--shard-size", help="Samples per output shard explanation-NNNNN.npz (default: up to 1000)")]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Continue an interrupted run in OUT after its last complete shard.")]


class Engine(str, Enum):
    local = "local"
    ray = "ray"


EngineOpt = Annotated[Engine, typer.Option(
    "--engine", case_sensitive=False, help="Where the explaining runs: local, or ray (pip install 'onnx-pathwise\\[ray]').")]
RayAddressOpt = Annotated[str | None, typer.Option(
    "--ray-address", help="Ray cluster to join with --engine ray (default: start a local one).", show_default=False)]



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
    from ..pathwise import parse_classes

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


