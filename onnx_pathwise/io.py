"""Reading input arrays safely and writing outputs atomically.

Inputs are ``.npy`` or ``.npz`` files. A path that is not a regular file (a FIFO, device,
socket, or anything under ``/proc``, ``/sys`` or ``/dev``) is refused before it is opened,
and the opened descriptor is checked again (:func:`open_regular`), so no read ever blocks.
Nothing is ever unpickled: object, string and
structured dtypes are refused, and the ``.npy`` header is checked against the file's real
size (and :data:`MAX_INPUT_BYTES`) *before* any array is allocated, so a forged header
cannot make us allocate terabytes. Every problem is an :class:`~onnx_pathwise.errors.InputError`
naming the file and the cause.

Outputs go to a temporary file in the destination folder and are moved into place with
:func:`os.replace`, so a reader never sees a half-written file and a failure leaves no
output behind.

>>> import tempfile, numpy as np
>>> from pathlib import Path
>>> folder = Path(tempfile.mkdtemp())
>>> _ = save_npz(folder / "out.npz", {"x": np.arange(3.0)})
>>> load_array(folder / "out.npz")
array([0., 1., 2.])
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.lib import format as npy_format

from .errors import InputError, OutputError, PathwiseError

#: Largest array (in bytes) :func:`load_array` agrees to allocate.
MAX_INPUT_BYTES = 2 * 2**30
#: Keys looked up, in order, in an ``.npz`` file that holds several arrays.
NPZ_KEYS = ("x", "inputs")
#: dtype kinds accepted from files: bool, signed/unsigned integers, floats.
_NUMERIC_KINDS = "biuf"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_READ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError,
                RuntimeError, SyntaxError)


# --------------------------------------------------------------------------- reading


def load_array(path: str | os.PathLike[str], *, max_bytes: int = MAX_INPUT_BYTES) -> np.ndarray:
    """Read one numeric array from a ``.npy`` or ``.npz`` file, without unpickling anything.

    An ``.npz`` file must hold one array, or several with one named ``x`` or ``inputs``.
    The format is recognised from the file's first bytes, not its name.
    """
    path = Path(path)
    f, size = open_regular(path, InputError, "a .npy or .npz file")
    try:
        with f:
            if size == 0:
                raise InputError(f"{path}: empty file, not a .npy or .npz file")
            head = f.read(6)
            f.seek(0)
            if head == _NPY_MAGIC:
                return _read_npy(f, size, max_bytes)
            if head[:4] in _ZIP_MAGIC:
                return _read_npz(f, max_bytes)
    except InputError as exc:
        if not str(exc).startswith(str(path)):
            exc.args = (f"{path}: {exc.args[0]}",) + exc.args[1:]
        raise
    except _READ_ERRORS as exc:
        raise InputError(f"{path}: corrupt or truncated .npy/.npz file ({_cause(exc)})") from None
    raise InputError(f"{path}: not a .npy or .npz file (unrecognised header)")


#: Folders whose entries are not ordinary files even when they say so (kernel interfaces,
#: devices): nothing under them is read.
SPECIAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


def file_kind(mode: int) -> str:
    """What a ``st_mode`` describes, for messages (``"a FIFO"``, ``"a character device"``, ...)."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], error: type[PathwiseError], what: str, *,
                 follow_symlinks: bool = True) -> tuple[IO[bytes], int]:
    """Open ``path`` for reading if, and only if, it is a regular file; return it and its size.

    The path is checked with ``stat`` before it is opened (a FIFO, device, socket or anything
    under :data:`SPECIAL_ROOTS` is refused with ``error``, never opened), then opened with
    ``O_NONBLOCK`` and checked again on the descriptor: it must still be the same regular file.
    Callers read at most the returned size. ``what`` names the expected content in messages.
    """
    path = Path(path)
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise error(f"{path}: cannot be read ({_cause(exc)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: is a directory, not {what}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: is {file_kind(st.st_mode)}, not a regular file; only regular files are read")
    real = Path(os.path.realpath(path))
    for root in SPECIAL_ROOTS:
        if real == root or root in real.parents:
            raise error(f"{path}: lies under {root}, whose entries are not regular files; copy it first")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise error(f"{path}: cannot be read ({_cause(exc)})") from None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            raise error(f"{path}: changed while it was being opened; not read")
        return os.fdopen(fd, "rb"), opened.st_size
    except BaseException:
        os.close(fd)
        raise


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _read_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = npy_format.read_array_header_2_0(f)
    else:
        raise InputError(f".npy format version {version[0]}.{version[1]} is not supported (only 1.0 and 2.0)")
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise InputError(f"dtype {dtype} holds Python objects; pickled data is never loaded")
    if dtype.names is not None or dtype.subdtype is not None:
        raise InputError(f"structured dtype {dtype} is not supported; save a plain numeric array")
    if dtype.kind not in _NUMERIC_KINDS:
        raise InputError(f"dtype {dtype} is not numeric (bool, int or float)")
    if any(d < 0 for d in shape):
        raise InputError(f"header claims a negative dimension {shape}")
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _read_body(f: IO[bytes], available: int, max_bytes: int) -> np.ndarray:
    """Read one ``.npy`` stream whose data part should hold ``available`` bytes."""
    start = f.tell()
    shape, fortran, dtype = _read_header(f)
    available -= f.tell() - start
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes > max_bytes:
        raise InputError(f"array of shape {shape} ({dtype}) would need {nbytes} bytes, "
                         f"more than the limit of {max_bytes}")
    if nbytes > available:
        raise InputError(f"truncated: the header promises {nbytes} bytes of {dtype} data "
                         f"for shape {shape}, the file holds {max(available, 0)}")
    if nbytes < available:
        raise InputError(f"{available - nbytes} unexpected bytes after the array data")
    flat = np.empty(count, dtype)
    buffer = flat.view(np.uint8).data
    got = 0
    while got < nbytes:
        n = f.readinto(buffer[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    if got != nbytes:
        raise InputError(f"truncated: expected {nbytes} bytes of data, read {got}")
    return flat.reshape(shape, order="F" if fortran else "C")


def _read_npy(f: IO[bytes], size: int, max_bytes: int) -> np.ndarray:
    return _read_body(f, size, max_bytes)


def _read_npz(f: IO[bytes], max_bytes: int) -> np.ndarray:
    with zipfile.ZipFile(f) as zf:
        members = {info.filename.removesuffix(".npy"): info for info in zf.infolist()
                   if not info.is_dir()}
        if not members:
            raise InputError("the .npz archive holds no arrays")
        if len(members) == 1:
            key = next(iter(members))
        else:
            key = next((k for k in NPZ_KEYS if k in members), "")
            if not key:
                raise InputError(f"the .npz archive holds {len(members)} arrays {sorted(members)}; "
                                 f"name the input {' or '.join(map(repr, NPZ_KEYS))}")
        info = members[key]
        with zf.open(info) as member:
            try:
                return _read_body(member, info.file_size, max_bytes)
            except InputError as exc:
                exc.args = (f"array {key!r}: {exc.args[0]}",) + exc.args[1:]
                raise


# --------------------------------------------------------------------------- writing


def _check_destination(path: Path) -> None:
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; give a file name")
    parent = path.parent
    if not parent.exists():
        raise OutputError(f"{path}: folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{path}: {str(parent)!r} is not a folder")


def _new_file_mode(path: Path) -> int:
    """Keep an overwritten file's permissions; new files get 0o666 minus the umask."""
    with contextlib.suppress(OSError):
        return path.stat().st_mode & 0o7777
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Write through ``write(file)`` to a temporary file next to ``path``, then rename it."""
    path = Path(path)
    _check_destination(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise
    return path


def save_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], *,
             compress: bool = False) -> Path:
    """Write ``arrays`` as an ``.npz`` archive (readable by :func:`numpy.load`), atomically.

    The file gets exactly the name given (no ``.npz`` is appended). Object arrays are refused.
    """
    arrays = {k: np.asanyarray(v) for k, v in arrays.items()}
    for key, value in arrays.items():
        if value.dtype.hasobject:
            raise ValueError(f"array {key!r} has dtype object; refusing to pickle it")
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED

    def write(f: IO[bytes]) -> None:
        with zipfile.ZipFile(f, "w", compression=mode, allowZip64=True) as zf:
            for key, value in arrays.items():
                with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                    npy_format.write_array(member, value, allow_pickle=False)

    return _atomic_write(path, write)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.dtype):
        return str(obj)
    return obj


def to_json(obj: Any) -> str:
    """Strict JSON text (indent 2): numpy scalars and arrays become numbers and lists,
    paths and dtypes strings; non-finite floats (not representable in JSON) become ``null``."""
    return json.dumps(_jsonable(obj), indent=2, allow_nan=False, ensure_ascii=False)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as strict JSON (see :func:`to_json`), atomically."""
    data = (to_json(obj) + "\n").encode("utf-8")
    return _atomic_write(path, lambda f: f.write(data))


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return _atomic_write(path, lambda f: f.write(data))
