"""The ``onnx-pathwise`` command line: a thin Typer shell over :class:`~onnx_pathwise.Explainer`.

Commands only parse options, call the library and print. The plumbing lives in one helper
each, for every command to share: :func:`_open_explainer` (model + device),
:func:`_load_input` (a checked input batch), :func:`_guard_output` (refuse to clobber before any
work is done) and :func:`_write_npz` / :func:`_write_json` (atomic output).

Errors: every :class:`~onnx_pathwise.errors.PathwiseError` becomes one line on stderr,
``onnx-pathwise: error: <message>``, and the error's ``exit_code`` (:data:`EXIT_CODES`, also the
table in README.md); ``--debug`` shows its traceback instead. Any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from typer.core import TyperGroup

from . import __version__, plots, runtime
from .data import InputSource, is_array_file, load_labels, open_inputs
from .errors import (
    DeviceError,
    InputError,
    ModelError,
    OutputError,
    PathwiseError,
    UnsupportedModelError,
)
from .explainer import Explainer, concat_batches
from .graph import GateLayer, Segment
from .io import load_array, save_npz, to_json, write_bytes, write_json
from .ir import GATE, ROUTING

PROG = "onnx-pathwise"
_DEBUG = "onnx_pathwise.debug"
#: Notices held back while a command runs; :class:`_Group` shows them once it has succeeded.
_notices: list[str] = []

#: Exit code → (short name, meaning). README.md's table mirrors this; a test keeps them in step.
EXIT_CODES: dict[int, tuple[str, str]] = {
    0: ("success", "the command did what it was asked"),
    1: ("check failed", "`inspect` found unsupported nodes (its report lists every one), `audit` "
                        "failed a check or `diff` crossed a threshold; also any unexpected error, i.e. "
                        "a bug, which prints a traceback"),
    PathwiseError.exit_code: ("usage", "a bad option or argument, or an output path that may not be "
                                       "written (exists without `--force`, is a directory, ...)"),
    ModelError.exit_code: ("model", "the model file cannot be read or analysed"),
    UnsupportedModelError.exit_code: ("unsupported", "the input→output path holds unsupported "
                                                     "operations (the message lists them all)"),
    InputError.exit_code: ("input", "the input file or array is unusable: missing, corrupt, pickled, "
                                    "not numeric, wrong shape, NaN or infinite values"),
    DeviceError.exit_code: ("device", "the requested device is not available "
                                      "(`--device cuda` without a usable GPU)"),
}
assert OutputError.exit_code == PathwiseError.exit_code


class _Group(TyperGroup):
    """Turns a :class:`PathwiseError` raised by any command into one line and its exit code.

    Notices held back while the command ran (the CPU fallback of ``--device auto``) are shown
    after it, unless it failed: a failed command prints its one error line and nothing else.
    """

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        _notices.clear()
        try:
            return super().invoke(ctx)
        except PathwiseError as exc:
            _notices.clear()
            if ctx.meta.get(_DEBUG):
                raise
            message = " ".join(str(exc).split("\n"))
            typer.echo(f"{PROG}: error: {message}", err=True)
            raise typer.Exit(exc.exit_code) from None
        finally:
            for notice in _notices:
                typer.echo(notice, err=True)
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
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]

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
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Exact local affine models and pathwise explanations of piecewise-linear (ReLU) ONNX models."""
    ctx.meta[_DEBUG] = debug


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


def _guard_output(path: Path, force: bool) -> None:
    """Refuse, before any work, an output path that cannot or may not be written.

    Missing folders on the way are allowed: the writers create them.
    """
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; give a file name")
    if (path.exists() or path.is_symlink()) and not force:
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


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write arrays atomically, creating missing folders; the file is named exactly ``path``."""
    _make_parent(path)
    return save_npz(path, arrays)


def _write_json(path: Path, obj: Any) -> Path:
    """Write strict JSON atomically, creating missing folders."""
    _make_parent(path)
    return write_json(path, obj)


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
                  "batch_fixed_in_file": ir.batch_fixed},
        "output": {"name": ir.source_output or ir.output_name, "explained": ir.output_name,
                   "peeled": list(ir.peeled), "classes": ir.num_classes},
        "gate_layers": [_gate_dict(g) for g in ex.gate_layers],
        "routing": [{"name": n.name, "op_type": n.op_type} for n in ir.nodes if n.role == ROUTING],
        "segments": segments,
        "parameters": sum(s["parameters"] for s in segments) + gate_params,
    }


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
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
    lines = [f"{info['model']}  ({producer}opset {info['opset']})", ""]
    batch = "fixed at 1 in the file; any N works" if inp["batch_fixed_in_file"] else "N is the batch axis"
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
    lines += [f"  {r['name']} ({r['op_type']})" for r in routing] or ["  none"]
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
    lines = [f"{model}: not analysable: {len(exc.problems)} node(s) on the input→output path "
             "are not supported:"]
    lines += [f"  - {p}" for p in exc.problems]
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
            typer.echo(to_json({"model": str(model), "analysable": False, "problems": exc.problems,
                                "supported": sorted(exc.supported)}))
        else:
            typer.echo(_unsupported_text(model, exc))
        raise typer.Exit(1) from None
    info = describe(ex, model)
    typer.echo(to_json(info) if json_out else _describe_text(info))


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
    _write_npz(out, {"weight": res.weight, "bias": res.bias, "output": res.output, "delta": res.delta})
    n, k = res.output.shape
    typer.echo(f"wrote {out}: {n} sample(s) × {k} scores of {ex.ir.output_name!r}, weight "
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


def _guard_dir(out: Path, names: Sequence[str], force: bool) -> None:
    """Refuse, before any work, an output folder that is a file or already holds our outputs."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.is_dir() and not force:
        clash = [n for n in names if (out / n).exists()]
        if clash:
            raise OutputError(f"{out}: already holds {', '.join(clash)}; pass --force to overwrite")
    _guard_output(out / "probe.tmp", True)


def _write_dir(out: Path, npz: Mapping[str, Mapping[str, np.ndarray]], json_files: Mapping[str, Any],
               pngs: Mapping[str, bytes]) -> list[str]:
    """Write every file into a fresh temporary folder beside ``out``, then move them in: a
    failure leaves no partial output behind."""
    import shutil
    import tempfile

    _make_parent(out / "x")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, arrays in npz.items():
            save_npz(tmp / name, arrays)
        for name, obj in json_files.items():
            write_json(tmp / name, obj)
        for name, data in pngs.items():
            (tmp / name).write_bytes(data)
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return names


def _path_json(path: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"node": p.node, "kept": p.kept.tolist(), "count": p.count, "units": p.units} for p in path]


WidthOpt = Annotated[str | None, typer.Option(
    "--width", help="Units kept per path layer: a count (10), a percentage of the layer (5%) or "
                    "'all'. Default: every unit that favours the target.", show_default=False)]
DepthOpt = Annotated[int | None, typer.Option(
    "--depth", help="How many of the last gate layers are path-constrained (default all; 0 = input×gradient).",
    show_default=False, min=0)]
InputWidthOpt = Annotated[str | None, typer.Option(
    "--input-width", help="Also keep only this many input elements (count or percentage).", show_default=False)]
TargetOpt = Annotated[int | None, typer.Option(
    "--target", help="Class to explain (default: each sample's predicted class).", show_default=False)]
OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (created if missing).", show_default=False)]


def _width(value: str | None) -> int | str | None:
    """A --width/--input-width value, checked before any work (count, percentage or 'all')."""
    from .pathwise import parse_width

    if value is None or value.strip().lower() == "all":
        return None
    spec: int | str = value if value.strip().endswith("%") else _int_option("--width", value)
    parse_width(spec, 1_000_000)  # raises on 0, negatives and percentages outside (0, 100]
    return spec


def _int_option(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise PathwiseError(f"{name} {value!r}: expected a count like 10 or a percentage like 5%") from None


METHODS = ("pathwise", "gradient", "input_x_gradient", "integrated_gradients", "guided_backprop", "unwrap")


# --------------------------------------------------------------------------- explain


@app.command()
def explain(
    model: ModelArg,
    input: InputArg,
    out: OutDirOpt,
    method: Annotated[str, typer.Option("--method", help=f"One of: {', '.join(METHODS)}.")] = "pathwise",
    target: TargetOpt = None,
    width: WidthOpt = None,
    depth: DepthOpt = None,
    input_width: InputWidthOpt = None,
    steps: Annotated[int, typer.Option("--steps", help="Integrated Gradients: interpolation steps.", min=1)] = 32,
    exact: Annotated[bool, typer.Option("--exact", help="Integrated Gradients: integrate exactly over linear pieces.")] = False,
    device: DeviceOpt = Device.auto,
    input_name: InputNameOpt = None,
    output: OutputNameOpt = None,
    png: Annotated[bool, typer.Option("--png/--no-png", help="For image inputs, one PNG per sample.")] = True,
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
    if method not in METHODS:
        raise PathwiseError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    w, iw = _width(width), _width(input_width)
    if method != "pathwise" and (w is not None or depth is not None or iw is not None):
        raise PathwiseError("--width, --depth and --input-width apply to --method pathwise only")
    data = _DataOptions(glob, preprocess, resize, crop, mean, std, layout, on_error, columns, batch_size)
    streaming = (not is_array_file(input) or resume or batch_size is not None or shard_size is not None
                 or engine is not Engine.local)
    if not streaming and ray_address is not None:
        raise PathwiseError("--ray-address needs --engine ray")
    if streaming:
        _explain_stream(model, input, out, method, target, w, depth, iw, steps, exact, device, input_name, output,
                        png, force, data, labels, shard_size, resume, engine, ray_address)
        return
    names = ["explanation.npz", "explanation.json"]
    _guard_dir(out, names, force)
    ex = _open_explainer(model, device, input_name, output)
    x = _load_input(input, ex, data)
    class_names = _labels(labels, ex)
    if method == "pathwise":
        res = _chunked(lambda b: ex.explain(b, target=target, width=w, depth=depth, input_width=iw), x, "explaining")
        arrays = {"attribution": res.attribution, "weight": res.weight, "bias": res.bias, "output": res.output,
                  "target": res.target, "masked_score": res.masked_score}
        samples = [{"target": int(res.target[i]), "score": float(res.score[i]),
                    "masked_score": float(res.masked_score[i]), "faithfulness": float(res.faithfulness[i]),
                    "sparsity": float(res.sparsity[i]), "path": _path_json(res.path[i])} for i in range(len(res.target))]
        options = {"width": w, "depth": depth, "input_width": iw}
    else:
        opts: dict[str, Any] = {"steps": steps, "exact": exact} if method == "integrated_gradients" else {}
        res = _chunked(lambda b: ex.attribute(b, method=method, target=target, **opts), x, "explaining")
        arrays = {"attribution": res.attribution, "output": res.output, "target": res.target}
        idx = np.arange(len(res.target))
        samples = [{"target": int(res.target[i]), "score": float(res.output[i, res.target[i]])} for i in idx]
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
            what = class_names[int(res.target[i])] if class_names else f"class {int(res.target[i])}"
            pngs[f"sample_{i}.png"] = plots.input_and_heatmap(x[i], res.attribution[i], f"{method}, {what}")
    written = _write_dir(out, {"explanation.npz": arrays}, {"explanation.json": report}, pngs)
    extra = f", faithfulness {np.nanmean(res.faithfulness):.3f} (mean)" if method == "pathwise" else ""
    typer.echo(f"wrote {len(written)} file(s) to {out}: {x.shape[0]} sample(s), method {method}{extra}")


def _explain_stream(model: Path, input: Path, out: Path, method: str, target: int | None, w: Any, depth: int | None,
                    iw: Any, steps: int, exact: bool, device: Device, input_name: str | None, output: str | None,
                    png: bool, force: bool, opts: _DataOptions, labels: Path | None, shard_size: int | None,
                    resume: bool, engine: Engine, ray_address: str | None) -> None:
    """explain over a dataset in bounded memory: batches in, shards out (onnx_pathwise.stream)."""
    from . import stream

    if resume and force:
        raise PathwiseError("--resume and --force contradict each other: --resume keeps OUT's finished shards")
    if engine is Engine.local and ray_address is not None:
        raise PathwiseError("--ray-address needs --engine ray")
    names = ["explanation.npz", "explanation.json", stream.INDEX, stream.SHARD.format(0), stream.RUN]
    _guard_dir(out, [] if resume else names, force)
    ex = _open_explainer(model, device, input_name, output)
    source = _open_source(input, ex, opts)
    class_names = _labels(labels, ex)
    if method == "pathwise":
        options: dict[str, Any] = {"width": w, "depth": depth, "input_width": iw}
    else:
        options = {"steps": steps, "exact": exact} if method == "integrated_gradients" else {}
    render = None
    if png and plots.is_image(ex.input_shape):
        def render(sample: Any, row: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, bytes]:
            what = row.get("label") or f"class {row['target']}"
            return {f"sample_{row['sample']}.png": plots.input_and_heatmap(sample.array, arrays["attribution"],
                                                                          f"{method}, {what}")}
    kw: dict[str, Any] = {"model": model, "method": method, "target": target, "options": options,
                          "shard_size": shard_size, "resume": resume, "labels": class_names, "render": render,
                          "batch_size_given": opts.batch_size is not None}
    if engine is Engine.ray:
        from .ray_engine import run as run_ray

        result = run_ray(ex, source, out, address=ray_address, device=ex.device, input_name=input_name,
                         output_name=output, **kw)
    else:
        result = stream.run(ex, source, out, **kw)
    _note_skipped(result.skipped)
    extra = f", faithfulness {result.mean_faithfulness:.3f} (mean)" if result.mean_faithfulness is not None else ""
    again = f", resumed after {result.resumed_at}" if result.resumed_at else ""
    skipped = f", {len(result.skipped)} skipped" if result.skipped else ""
    typer.echo(f"wrote {result.count} sample(s) in {result.shards} shard(s) and {stream.INDEX} to {out}{again}"
               f"{skipped}: method {method}{extra}")


# --------------------------------------------------------------------------- decompose


@app.command()
def decompose(
    model: ModelArg,
    input: InputArg,
    out: OutDirOpt,
    layer: Annotated[str | None, typer.Option("--layer", help="Gate layer (node name); default the last.",
                                              show_default=False)] = None,
    top: Annotated[int, typer.Option("--top", help="How many parts to keep.", min=1)] = 8,
    group: Annotated[str, typer.Option("--group", help="unit or channel.")] = "unit",
    target: TargetOpt = None,
    width: WidthOpt = None,
    depth: DepthOpt = None,
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
    w = _width(width)
    names = ["decomposition.npz", "decomposition.json"]
    _guard_dir(out, names, force)
    ex = _open_explainer(model, device, input_name, output)
    x = _load_input(input, ex)
    d = _chunked(lambda b: ex.decompose(b, layer=layer, top=top, group=group, target=target, width=w, depth=depth),
                 x, "decomposing")
    arrays = {"attribution": d.attribution, "parts": d.parts, "part_index": d.part_index,
              "part_score": d.part_score, "rest": d.rest, "bypass": d.bypass, "target": d.target,
              "output": d.output}
    samples = [{"target": int(d.target[i]),
                "parts": [{group: int(d.part_index[i, j]), "score": float(d.part_score[i, j]),
                           "active": bool(d.part_active[i, j])} for j in range(d.parts.shape[1])],
                "delta": float(d.delta[i])} for i in range(len(d.target))]
    report = {"model": str(model), "layer": d.layer, "group": group, "crosses_all_paths": d.crosses_all,
              "samples": samples}
    pngs = {}
    if png and plots.is_image(ex.input_shape):
        for i in range(x.shape[0]):
            labels = [f"{group} {int(d.part_index[i, j])}: {d.part_score[i, j]:.3g}" for j in range(d.parts.shape[1])]
            pngs[f"sample_{i}.png"] = plots.parts_grid(x[i], d.attribution[i], d.parts[i], labels)
    written = _write_dir(out, {"decomposition.npz": arrays}, {"decomposition.json": report}, pngs)
    typer.echo(f"wrote {len(written)} file(s) to {out}: {x.shape[0]} sample(s), layer {d.layer!r}, "
               f"max |parts + rest + bypass - attribution| {float(d.delta.max()):.2g}")


# --------------------------------------------------------------------------- evaluate


@app.command()
def evaluate(
    model: ModelArg,
    inputs: InputArg,
    out: OutDirOpt,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods.")] = (
        "pathwise,gradient,input_x_gradient,integrated_gradients,guided_backprop"),
    width: Annotated[list[str] | None, typer.Option(
        "--width", help="Pathwise width(s); repeat for a sweep (e.g. --width 5% --width 20%).",
        show_default=False)] = None,
    depth: Annotated[list[int] | None, typer.Option("--depth", help="Pathwise depth(s); repeat for several.",
                                                     show_default=False)] = None,
    step: Annotated[int | None, typer.Option("--step", help="Pixels per insertion/deletion step "
                                             "(default: one image row).", show_default=False, min=1)] = None,
    target: TargetOpt = None,
    device: DeviceOpt = Device.auto,
    input_name: InputNameOpt = None,
    output: OutputNameOpt = None,
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
    widths = [_width(v) for v in width] if width else None
    names = ["evaluation.json", "curves.png", "width_sweep.png"]
    _guard_dir(out, names, force)
    ex = _open_explainer(model, device, input_name, output)
    source = _open_source(inputs, ex, _DataOptions(glob, preprocess, resize, crop, mean, std, layout, on_error, columns))
    x = _load_input(inputs, ex, source=source)
    class_names = _labels(labels, ex)
    result = run_evaluation(ex, x, chosen, widths=widths, depths=list(depth) if depth else None, step=step,
                            target=target)
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
            cells.append(f"{v['mean']:.4f} ± {v['std']:.4f}" if v and v["mean"] is not None else "")
        rows.append(cells)
    typer.echo("\n".join(_table(["method"] + metric_names, rows, indent="")))
    for k, v in result["samples"].items():
        typer.echo(f"{k}: {v['mean']:.4g} ± {v['std']:.4g}" if v["mean"] is not None else f"{k}: n/a")
    pngs = {"curves.png": plots.curves(result["methods"])}
    if widths and len(widths) > 1:
        pngs["width_sweep.png"] = plots.width_sweep(result["methods"])
    written = _write_dir(out, {}, {"evaluation.json": result}, pngs)
    typer.echo(f"wrote {len(written)} file(s) to {out}")


# --------------------------------------------------------------------------- audit, diff


class ReportFormat(str, Enum):
    json = "json"
    junit = "junit"


@app.command()
def audit(
    model: ModelArg,
    inputs: Annotated[Path | None, typer.Option(
        "--inputs", help="Inputs to check on (as INPUT of explain: .npy/.npz, images, a folder, a list, a table); "
                         "default: 4 generated standard-normal inputs.",
        show_default=False)] = None,
    max_delta: Annotated[float, typer.Option(
        "--max-delta", help="Largest completeness delta allowed, relative to the score scale (at least 1).")] = 1e-4,
    width: WidthOpt = None,
    report: Annotated[ReportFormat | None, typer.Option(
        "--report", help="Also write a machine report: json or junit (XML that CI systems display).",
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
            raise PathwiseError("--out needs --report json or --report junit")
    w = _width(width)
    x = None
    if inputs is not None:
        x = _read_inputs(inputs, model, _DataOptions(glob, preprocess, resize, crop, mean, std, layout, on_error,
                                                     columns))
    result = run_audit(model, inputs=x, max_delta=max_delta, device=_resolve_device(device), width=w,
                       inputs_name=str(inputs))
    text = result.to_text()
    machine = None
    if report is ReportFormat.json:
        machine = to_json(result.to_json())
    elif report is ReportFormat.junit:
        machine = result.to_junit()
    if machine is not None and out is not None:
        _make_parent(out)
        write_bytes(out, machine.encode())
        typer.echo(text)
    elif machine is not None:
        typer.echo(machine)
        typer.echo(text, err=True)
    else:
        typer.echo(text)
    raise typer.Exit(0 if result.passed else 1)


@app.command()
def diff(
    old: Annotated[Path, typer.Argument(help="The released model.", metavar="OLD", show_default=False)],
    new: Annotated[Path, typer.Argument(help="The candidate model.", metavar="NEW", show_default=False)],
    inputs: Annotated[Path, typer.Option("--inputs", help="Inputs to compare on (as INPUT of explain: .npy/.npz, "
                                         "images, a folder, a list, a table).", show_default=False)],
    fail_below: Annotated[float | None, typer.Option(
        "--fail-below", help="Fail when the mean attribution correlation is below this.", show_default=False)] = None,
    min_overlap: Annotated[float | None, typer.Option(
        "--min-overlap", help="Fail when the mean path overlap (Jaccard) is below this.", show_default=False)] = None,
    max_changes: Annotated[int | None, typer.Option(
        "--max-changes", help="Fail when more predictions than this change.", show_default=False)] = None,
    width: WidthOpt = None,
    depth: DepthOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the full report as JSON here.",
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
    w = _width(width)
    x = _read_inputs(inputs, old, _DataOptions(glob, preprocess, resize, crop, mean, std, layout, on_error, columns))
    result = run_diff(old, new, x, width=w, depth=depth, device=_resolve_device(device),
                      min_correlation=fail_below, min_jaccard=min_overlap, max_prediction_changes=max_changes,
                      inputs_name=str(inputs))
    if json_out is not None:
        _write_json(json_out, result.to_json())
    typer.echo(result.to_text())
    raise typer.Exit(0 if result.passed else 1)


def main() -> None:
    """Entry point for ``python -m onnx_pathwise``."""
    app(prog_name=PROG)
