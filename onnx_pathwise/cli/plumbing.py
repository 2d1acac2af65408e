"""The commands' shared plumbing: model and device, input batches, labels, guarded and atomic
outputs, sample chunks."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import plots, runtime
from ..data import InputSource, is_array_file, load_labels, open_inputs, used_as_is
from ..errors import (
    InputError,
    OutputError,
    PathwiseError,
)
from ..explainer import Explainer
from ..io import bytes_writer, existing_kind, json_writer, load_array, npz_writer, write_files
from ..render import describe
from ..sweep import concat_batches
from .options import (
    ColumnsOpt,
    CropOpt,
    Device,
    GlobOpt,
    LayoutOpt,
    MeanOpt,
    OnErrorOpt,
    PreprocessOpt,
    ResizeOpt,
    StdOpt,
)
from .shell import PROG, _notices

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
    """Read, validate and analyse the model (ModelError / UnsupportedModelError / DeviceError).
    At a terminal, a pathwise sweep that goes in class chunks (many classes, docs/design.md §4)
    shows its progress bar on stderr."""
    ex = Explainer(model, device=_resolve_device(device), input_name=input_name, output_name=output_name)
    ex.progress = sys.stderr.isatty()
    return ex


@dataclasses.dataclass(frozen=True)
class _DataOptions:
    """The input-handling options, as given (see :func:`_open_source`)."""

    glob: str | None = None
    preprocess: str | None = None  # None: imagenet, for images
    resize: str | None = None
    crop: str | None = None
    mean: str | None = None
    std: str | None = None
    layout: str | None = None
    on_error: str = "fail"
    columns: str | None = None
    batch_size: int | None = None


#: The default of a command's ``data`` (:func:`data_options` always passes one).
NO_DATA_OPTIONS = _DataOptions()

#: The options every command that reads inputs takes (``_DataOptions`` but ``batch_size``), in
#: ``--help`` order: name, Typer annotation, default.
_DATA_PARAMS: tuple[tuple[str, Any, Any], ...] = (
    ("glob", GlobOpt, None), ("preprocess", PreprocessOpt, None), ("resize", ResizeOpt, None),
    ("crop", CropOpt, None), ("mean", MeanOpt, None), ("std", StdOpt, None), ("layout", LayoutOpt, None),
    ("on_error", OnErrorOpt, "fail"), ("columns", ColumnsOpt, None),
)


def data_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """For a command with a parameter ``data: _DataOptions``: Typer sees the options of
    :data:`_DATA_PARAMS` in its place (at the end of the signature it reads), and the command
    gets them packed into ``data``. One home for the data options of explain, evaluate, audit
    and diff."""
    signature = inspect.signature(command, eval_str=True)
    params = [p for p in signature.parameters.values() if p.name != "data"]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
               for name, annotation, default in _DATA_PARAMS]

    @functools.wraps(command)
    def packed(*args: Any, **kwargs: Any) -> Any:
        data = _DataOptions(**{name: kwargs.pop(name) for name, _, _ in _DATA_PARAMS if name in kwargs})
        return command(*args, data=data, **kwargs)

    packed.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return packed


def _open_source(path: Path, model: Any, opts: _DataOptions | None = None) -> InputSource:
    """Open INPUT for the model (an Explainer or its input shape): arrays, images, folders,
    path lists, tables; the options are checked before anything is read."""
    from ..preprocess import preset

    opts = opts or _DataOptions()
    prep = preset(opts.preprocess or "imagenet", resize=opts.resize, crop=opts.crop, mean=opts.mean, std=opts.std,
                  layout=opts.layout) if _image_options_fit(path, opts) else None  # None: imagenet for images
    return open_inputs(path, model, preprocess=prep, glob=opts.glob, on_error=opts.on_error,
                       columns=opts.columns, batch_size=opts.batch_size)


_IMAGE_OPTIONS = ("preprocess", "resize", "crop", "mean", "std", "layout")


def _image_options_fit(path: Path, opts: _DataOptions) -> list[str]:
    """The image options given (as flags). Given for an array or a table they would be ignored
    (those are used as they are): refused, naming each, rather than explain other inputs than
    the user meant."""
    given = [f"--{name}" for name in _IMAGE_OPTIONS if getattr(opts, name) is not None]
    kind = used_as_is(path) if given else None
    if kind is not None:
        raise PathwiseError(f"{', '.join(given)} apply to images (a file, a folder, a list of paths); {path.name} is "
                            f"{kind}, used as it is: preprocess it before saving, or leave the option out")
    return given


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
        _image_options_fit(path, opts)
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


def _model_info(model: Path) -> dict[str, Any] | None:
    """:func:`describe` of a model, or None when it cannot be analysed (for audit's page)."""
    try:
        return describe(_open_explainer(model, Device.cpu), model)
    except PathwiseError:
        return None


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


