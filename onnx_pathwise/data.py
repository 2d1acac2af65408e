"""Inputs the user already has: arrays, image files, folders, path lists and tables.

The data model, shared by the command line, the streaming runner and the report:

- :class:`Sample` (frozen): one model input, ``source`` (the path, or ``"file.npy[3]"`` /
  ``"table.csv[3]"`` for a row), ``array`` (float32, the model's layout, no batch axis),
  ``original`` (an image as loaded, after orientation, resize and crop but before any
  arithmetic: H×W×3 uint8 RGB, lined up pixel for pixel with ``array``; ``None`` for tabular
  and array inputs), ``features`` (column names for table rows, else ``None``) and ``index``
  (the position of the item in the source's listing, for ``--resume``).
- :class:`~onnx_pathwise.preprocess.Preprocessing` (frozen): preset name + resize/crop/
  mean/std/layout/channel order; ``.to_json()`` is recorded in every output.
- :func:`open_inputs` (path, explainer or input shape, ...) → :class:`InputSource`:
  ``len()``, ``.preprocessing``, ``.kind`` and ``.batches()``, an iterator of lists of
  samples that streams: never the whole dataset in memory (an ``.npy``/``.npz`` file is the
  exception: it is one array and is read whole, exactly as before).
- :func:`load_labels` (file or ``None``, model metadata) → class names or ``None``.

Sources, recognised in this order:

- ``.npy``/``.npz`` (by content, :func:`~onnx_pathwise.io.load_array`);
- a folder: every image file below it, recursively, sorted by relative path, filtered by
  ``glob`` (matched against the relative path, e.g. ``"*.jpg"`` or ``"cats/**"``);
- an image file (PNG, JPEG, BMP, GIF, TIFF, WebP: anything Pillow decodes);
- ``.csv``/``.tsv``/``.parquet``: one sample per row; the columns are the model's features,
  chosen by name (``columns``, else the model's ``feature_names`` metadata, else all columns
  when there are exactly as many as the model takes);
- a text file listing paths, one per line (relative to the list file; ``#`` comments).

A bad item (a corrupt image, a non-number in a table) is an
:class:`~onnx_pathwise.errors.InputError` naming it with ``on_error="fail"`` (the default);
with ``on_error="skip"`` it is left out and recorded in :attr:`InputSource.skipped`.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import InputError, PathwiseError
from .io import load_array, open_regular
from .preprocess import Preprocessing, preset

__all__ = ["IMAGE_SUFFIXES", "InputSource", "Preprocessing", "Sample", "is_array_file", "load_labels", "open_inputs"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
ARRAY_SUFFIXES = (".npy", ".npz")
ON_ERROR = ("fail", "skip")
#: Metadata keys (ONNX ``metadata_props``) read for class names and feature names.
LABEL_KEYS = ("labels", "class_labels", "classes", "class_names")
FEATURE_KEYS = ("feature_names", "features", "columns")


@dataclass(frozen=True)
class Sample:
    """One model input and where it came from (see the module docstring)."""

    source: str
    array: np.ndarray
    original: np.ndarray | None = None
    features: list[str] | None = None
    index: int = 0


def _shape_and_metadata(model: Any) -> tuple[tuple[int, ...], dict[str, str], Any]:
    """(input shape, metadata, explainer or None) from an Explainer or a bare input shape."""
    if hasattr(model, "input_shape"):
        proto = getattr(model, "proto", None)
        meta = {p.key: p.value for p in proto.metadata_props} if proto is not None else {}
        return tuple(model.input_shape), meta, model
    return tuple(int(d) for d in model), {}, None


def _check_array(x: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    """The same checks as :meth:`Explainer.check_input` for a bare input shape."""
    if x.dtype.kind not in "fiu" or x.dtype == np.bool_:
        raise InputError(f"{name}: dtype {x.dtype} is not numeric")
    if tuple(x.shape) == shape:
        x = x[None]
    elif tuple(x.shape[1:]) != shape:
        raise InputError(f"{name}: shape {tuple(x.shape)} does not fit the model input: expected {shape} "
                         f"or (N, {', '.join(map(str, shape))})")
    if x.shape[0] == 0:
        raise InputError(f"{name}: empty batch")
    if not np.all(np.isfinite(x)):
        raise InputError(f"{name}: {int(np.size(x) - np.count_nonzero(np.isfinite(x)))} value(s) are NaN or infinite")
    return np.ascontiguousarray(x, dtype=np.float32)


def default_batch_size(input_shape: Sequence[int], classes: int = 1, largest: int | None = None) -> int:
    """Samples per batch from the memory budget: an eighth of it for one batch's sweep (all
    ``classes`` score rows × the ``largest`` tensor per sample, float32) and its outputs; 1 to 256."""
    from .limits import memory_budget

    size = max(1, math.prod(int(d) for d in input_shape))
    per_sample = 4 * (max(1, classes) * max(size, largest or size) + 4 * size)
    return int(min(256, max(1, memory_budget() // 8 // per_sample)))


def open_inputs(
    path: str | os.PathLike[str],
    explainer_or_input_shape: Any,
    *,
    preprocess: Preprocessing | str | None = None,
    glob: str | None = None,
    on_error: str = "fail",
    columns: Sequence[str] | str | None = None,
    batch_size: int | None = None,
) -> InputSource:
    """Open ``path`` as a stream of samples for the model (an :class:`Explainer` or its
    per-sample input shape). Only the listing is done here (a folder's file names, a table's
    row count); images and rows are read batch by batch in :meth:`InputSource.batches`."""
    path = Path(path)
    if on_error not in ON_ERROR:
        raise PathwiseError(f"--on-error {on_error!r}: choose fail or skip")
    if batch_size is not None and batch_size < 1:
        raise PathwiseError(f"--batch-size {batch_size}: must be at least 1")
    shape, meta, explainer = _shape_and_metadata(explainer_or_input_shape)
    prep = preset(preprocess) if isinstance(preprocess, str) else preprocess
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",") if c.strip()]
    if batch_size is None:
        classes = getattr(explainer, "num_classes", 1) if explainer is not None else 1
        sweep = getattr(explainer, "sweep", None)
        largest = sweep.largest_tensor if sweep is not None else None
        batch_size = default_batch_size(shape, classes, largest)
    common: dict[str, Any] = {"shape": shape, "batch_size": batch_size, "on_error": on_error}
    suffix = path.suffix.lower()
    kind = used_as_is(path) if prep is not None else None  # may read the file's first bytes: once
    if kind is not None:
        raise PathwiseError(f"preprocessing applies to images; {path.name} is {kind}, used as it is: "
                            "preprocess it before saving, or pass preprocess=None")
    if suffix in ARRAY_SUFFIXES:  # exactly as before: load_array's checks and messages
        if glob is not None or columns is not None:
            raise PathwiseError("--glob and --columns do not apply to a .npy/.npz array")
        x = load_array(path)
        x = explainer.check_input(x, name=str(path)) if explainer is not None else _check_array(x, shape, str(path))
        return ArraySource(path, x, **common)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if not path.is_dir():
        _open_input(path).close()  # a FIFO, device, socket or /proc entry is refused before anything
    if path.is_dir():
        if columns is not None:
            raise PathwiseError(f"--columns applies to CSV/Parquet tables; {path} is a folder of images")
        files = _folder_images(path, glob)
        if not files:
            raise InputError(f"{path}: no image files{f' matching --glob {glob!r}' if glob else ''} "
                             f"(looked for {', '.join(IMAGE_SUFFIXES)})")
        return ImageSource(path, path, files, _image_pipeline(prep, shape), **common)
    if glob is not None:
        raise PathwiseError("--glob applies to a folder of images only")
    head = _head(path)
    if head.startswith(b"\x93NUMPY") or head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        x = load_array(path)
        x = explainer.check_input(x, name=str(path)) if explainer is not None else _check_array(x, shape, str(path))
        return ArraySource(path, x, **common)
    if suffix in TABLE_SUFFIXES or head.startswith(b"PAR1"):
        names = _feature_names(columns, meta, shape)
        return TableSource(path, names, **common)
    if suffix in IMAGE_SUFFIXES or _looks_like_image(head):
        return ImageSource(path, path.parent, [path.name], _image_pipeline(prep, shape), **common)
    if columns is not None:
        raise PathwiseError(f"--columns applies to CSV/Parquet tables; {path} is not one")
    return ImageSource(path, path.parent, _list_file(path), _image_pipeline(prep, shape), **common)


def used_as_is(path: str | os.PathLike[str]) -> str | None:
    """"an array" or "a table" for inputs read as numbers, used as they are (image preprocessing
    does not apply to them), else None."""
    return "an array" if is_array_file(path) else "a table" if Path(path).suffix.lower() in TABLE_SUFFIXES else None


def is_array_file(path: str | os.PathLike[str]) -> bool:
    """A ``.npy``/``.npz`` name, or a file that starts like one."""
    path = Path(path)
    if path.suffix.lower() in ARRAY_SUFFIXES:
        return True
    if not path.is_file():
        return False
    head = _head(path)
    return head.startswith(b"\x93NUMPY") or head[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def _head(path: Path) -> bytes:
    with _open_input(path) as f:
        try:
            return f.read(16)
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None


#: Largest list or labels file read (they are read whole).
MAX_TEXT_BYTES = 64 * 2**20


def _read_text(path: Path, encoding: str) -> str:
    """A small text file (a list of paths, class labels), read only if it is a regular file."""
    f, size = open_regular(path, InputError, "a text file")
    with f:
        if size > MAX_TEXT_BYTES:
            raise InputError(f"{path}: {size} bytes, more than a list or labels file may hold ({MAX_TEXT_BYTES})")
        return f.read(size).decode(encoding)


def _open_input(path: Path, text: bool = False) -> IO[Any]:
    """An input file opened for reading only if it is a regular file (never a FIFO, device,
    socket or /proc entry: :func:`onnx_pathwise.io.open_regular`), in binary or text mode."""
    f, _ = open_regular(path, InputError, "an input file")
    if text:
        return io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
    return f


def _looks_like_image(head: bytes) -> bool:
    return head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"BM", b"GIF8", b"II*\x00", b"MM\x00*")) or (
        head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _image_pipeline(prep: Preprocessing | None, shape: tuple[int, ...]) -> Preprocessing:
    return (prep or preset("imagenet")).resolve(shape)


def _folder_images(root: Path, glob: str | None) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            if glob is None or fnmatch.fnmatch(rel, glob) or fnmatch.fnmatch(name, glob):
                found.append(rel)
    return sorted(found)


def _list_file(path: Path) -> list[str]:
    """Paths listed one per line (relative to the list file's folder); blank lines and
    ``#`` comments are ignored."""
    try:
        text = _read_text(path, "utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a .npy/.npz array, an image, a table or a UTF-8 list of paths") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    entries = [line.strip() for line in text.splitlines()]
    entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise InputError(f"{path}: lists no paths (expected one image path per line)")
    return entries


def _feature_names(columns: Sequence[str] | None, meta: Mapping[str, str], shape: tuple[int, ...]) -> list[str] | None:
    if len(shape) != 1:
        raise InputError(f"model input {shape} is not a feature vector; a CSV/Parquet table gives one row per sample")
    names = list(columns) if columns is not None else None
    if names is None:
        for key in FEATURE_KEYS:
            if key in meta:
                names = _names_from_text(meta[key])
                break
    if names is not None and len(names) != shape[0]:
        raise PathwiseError(f"{len(names)} column(s) chosen ({', '.join(names)}), but the model takes {shape[0]} features")
    if names is not None and len(set(names)) != len(names):
        raise PathwiseError(f"columns chosen twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    return names


def _names_from_text(text: str) -> list[str]:
    text = text.strip()
    if text.startswith(("[", "{")):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, list):
            return [str(v) for v in value]
        if isinstance(value, dict):
            return _names_from_mapping(value)
    sep = "\n" if "\n" in text else ","
    return [t.strip() for t in text.split(sep) if t.strip()]


def _names_from_mapping(value: Mapping[Any, Any]) -> list[str]:
    """{"0": "cat", "1": "dog"} (index → name) or {"cat": 0, "dog": 1} (name → index)."""
    try:
        pairs = sorted((int(k), str(v)) for k, v in value.items())
    except (TypeError, ValueError):
        try:
            pairs = sorted((int(v), str(k)) for k, v in value.items())
        except (TypeError, ValueError):
            raise InputError("label mapping must map class indices to names") from None
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise InputError("label mapping must cover the class indices 0, 1, 2, ... without gaps")
    return [name for _, name in pairs]


class InputSource:
    """A stream of :class:`Sample` batches; ``len()`` is the number of items listed (with
    ``on_error="skip"`` the samples produced may be fewer)."""

    kind = "array"

    def __init__(self, path: Path, *, shape: tuple[int, ...], batch_size: int, on_error: str) -> None:
        self.path = path
        self.input_shape = shape
        self.batch_size = batch_size
        self.on_error = on_error
        #: (source, message) of every item left out with ``on_error="skip"``, in order.
        self.skipped: list[tuple[str, str]] = []
        self.preprocessing: Preprocessing | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def _items(self, start: int) -> Iterator[Sample | tuple[str, str]]:
        """Samples from position ``start`` on, or (source, message) for a bad item."""
        raise NotImplementedError

    def batches(self, start: int = 0) -> Iterator[list[Sample]]:
        """Lists of ``batch_size`` samples (the last may be shorter) from listing position
        ``start`` on. Bad items raise (``on_error="fail"``) or are skipped: a batch is always
        made of good samples, so batches do not depend on where the bad ones are."""
        batch: list[Sample] = []
        for item in self._items(start):
            if isinstance(item, tuple):
                if self.on_error == "fail":
                    raise InputError(item[1] + " (pass --on-error skip to leave bad inputs out)")
                self.skipped.append(item)
                continue
            batch.append(item)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def to_array(self) -> np.ndarray:
        """Every sample as one batch (N, *input shape), for commands that need them all at
        once; refused when larger than the memory budget."""
        from .limits import check_fits

        check_fits(len(self) * math.prod(self.input_shape) * 4 * 2, f"{len(self)} input(s) from {self.path}")
        arrays = [s.array for batch in self.batches() for s in batch]
        if not arrays:
            raise InputError(f"{self.path}: no usable inputs (every one was skipped)")
        return np.stack(arrays)

    def describe(self) -> dict[str, Any]:
        """What was read, for the outputs."""
        return {"path": str(self.path), "kind": self.kind, "items": len(self),
                "preprocessing": self.preprocessing.to_json() if self.preprocessing else None}


class ArraySource(InputSource):
    """An ``.npy``/``.npz`` array, already checked against the model: read whole, as before."""

    kind = "array"

    def __init__(self, path: Path, x: np.ndarray, **kw: Any) -> None:
        super().__init__(path, **kw)
        self.x = x

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def _items(self, start: int) -> Iterator[Sample | tuple[str, str]]:
        for i in range(start, self.x.shape[0]):
            yield Sample(f"{self.path}[{i}]", self.x[i], None, None, i)

    def to_array(self) -> np.ndarray:
        return self.x


class ImageSource(InputSource):
    """Image files (a folder's, a list file's or one), decoded one at a time."""

    kind = "image"

    def __init__(self, path: Path, root: Path, files: list[str], prep: Preprocessing, **kw: Any) -> None:
        super().__init__(path, **kw)
        self.root = root
        self.files = files
        self.preprocessing = prep

    def __len__(self) -> int:
        return len(self.files)

    def _items(self, start: int) -> Iterator[Sample | tuple[str, str]]:
        assert self.preprocessing is not None
        for i in range(start, len(self.files)):
            path = Path(self.files[i])
            path = path if path.is_absolute() else self.root / path
            try:
                array, original = self.preprocessing.load(path)
            except InputError as exc:
                yield (str(path), str(exc))
                continue
            yield Sample(str(path), array, original, None, i)


class TableSource(InputSource):
    """CSV/TSV (read row by row) or Parquet (read by record batch; needs pyarrow)."""

    kind = "table"

    def __init__(self, path: Path, names: list[str] | None, **kw: Any) -> None:
        super().__init__(path, **kw)
        self.parquet = path.suffix.lower() in (".parquet", ".pq") or _head(path).startswith(b"PAR1")
        header, self.rows = self._header_and_count()
        if names is None:
            if len(header) != self.input_shape[0]:
                raise InputError(f"{path}: {len(header)} column(s) but the model takes {self.input_shape[0]} "
                                 "features; choose them by name with --columns a,b,c (in the model's feature order)")
            names = list(header)
        missing = [n for n in names if n not in header]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; it has "
                             f"{', '.join(map(repr, header))}")
        self.features = names
        self.positions = [header.index(n) for n in names]

    def _delimiter(self) -> str:
        return "\t" if self.path.suffix.lower() == ".tsv" else ","

    def _header_and_count(self) -> tuple[list[str], int]:
        if self.parquet:
            pq = _pyarrow_parquet(self.path)
            try:
                with _open_input(self.path) as f:
                    meta = pq.ParquetFile(f)
                    names, rows = list(meta.schema_arrow.names), int(meta.metadata.num_rows)
            except PathwiseError:
                raise
            except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError
                raise InputError(f"{self.path}: not a readable Parquet file ({exc})") from None
            return names, rows
        try:
            with _open_input(self.path, text=True) as f:
                reader = csv.reader(f, delimiter=self._delimiter())
                header = next(reader, None)
                if header is None:
                    raise InputError(f"{self.path}: empty table (no header row)")
                rows = sum(1 for row in reader if row)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"{self.path}: not a readable CSV file ({exc})") from None
        if rows == 0:
            raise InputError(f"{self.path}: no data rows")
        return [h.strip() for h in header], rows

    def __len__(self) -> int:
        return self.rows

    def _rows(self, start: int) -> Iterator[tuple[int, list[Any]]]:
        if self.parquet:
            pq = _pyarrow_parquet(self.path)
            i = 0
            with _open_input(self.path) as f:
                for rb in pq.ParquetFile(f).iter_batches(batch_size=max(64, self.batch_size), columns=self.features):
                    cols = [rb.column(n).to_pylist() for n in self.features]
                    for values in zip(*cols):
                        if i >= start:
                            yield i, list(values)
                        i += 1
            return
        with _open_input(self.path, text=True) as f:
            reader = csv.reader(f, delimiter=self._delimiter())
            next(reader)
            i = 0
            for row in reader:
                if not row:
                    continue
                if i >= start:
                    yield i, [row[p] if p < len(row) else "" for p in self.positions]
                i += 1

    def _items(self, start: int) -> Iterator[Sample | tuple[str, str]]:
        for i, values in self._rows(start):
            name = f"{self.path}[{i}]"
            try:
                x = np.array([_number(v) for v in values], dtype=np.float32)
            except ValueError:
                bad = next(n for n, v in zip(self.features, values) if not _is_number(v))
                value = values[self.features.index(bad)]
                yield (name, f"{name}: column {bad!r}: {value!r} is not a number")
                continue
            if not np.all(np.isfinite(x)):
                bad = self.features[int(np.flatnonzero(~np.isfinite(x))[0])]
                yield (name, f"{name}: column {bad!r} is missing, NaN or infinite")
                continue
            yield Sample(name, x, None, self.features, i)


def _number(value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, str):
        value = value.strip()
        if value == "":
            return math.nan
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    return float(value)


def _is_number(value: Any) -> bool:
    try:
        _number(value)
    except (TypeError, ValueError):
        return False
    return True


def _pyarrow_parquet(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow); or save the table as CSV") from None
    return pq


def load_labels(path: str | os.PathLike[str] | None, model_proto_metadata: Any = None) -> list[str] | None:
    """Class names: from ``path`` (one per line, or JSON: a list, or a mapping index → name or
    name → index) when given, else from the model's metadata (``labels``, ``class_labels``,
    ``classes`` or ``class_names``: JSON, one per line or comma-separated), else ``None``.

    ``model_proto_metadata`` is an ``onnx.ModelProto``, an :class:`Explainer` or a mapping.
    """
    if path is not None:
        path = Path(path)
        try:
            if not path.exists():
                raise InputError(f"{path}: no such labels file")
            text = _read_text(path, "utf-8-sig")
        except InputError:
            raise
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read labels ({exc})") from None
        stripped = text.strip()
        if stripped.startswith(("[", "{")):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: not valid JSON ({exc})") from None
            try:
                labels = [str(v) for v in value] if isinstance(value, list) else _names_from_mapping(value)
            except InputError as exc:
                raise InputError(f"{path}: {exc}") from None
        else:
            labels = [line.strip() for line in stripped.splitlines()]
        if not labels:
            raise InputError(f"{path}: no labels")
        return labels
    meta = model_proto_metadata
    if meta is None:
        return None
    if hasattr(meta, "proto"):
        meta = meta.proto
    if hasattr(meta, "metadata_props"):
        meta = {p.key: p.value for p in meta.metadata_props}
    for key in LABEL_KEYS:
        if key in meta and str(meta[key]).strip():
            return _names_from_text(str(meta[key]))
    return None
