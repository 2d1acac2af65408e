"""Reading input arrays safely and writing outputs atomically.

Inputs are ``.npy`` or ``.npz`` files. A path that is not a regular file (a FIFO, device,
socket, or anything under ``/proc``, ``/sys`` or ``/dev``) is refused before it is opened,
and the opened descriptor is checked again (:func:`open_regular`), so no read ever blocks.
Nothing is ever unpickled: object, string and
structured dtypes are refused, and the ``.npy`` header is checked against the file's real
size (and :data:`MAX_INPUT_BYTES`) *before* any array is allocated, so a forged header
cannot make us allocate terabytes. Every problem is an :class:`~onnx_pathwise.errors.InputError`
naming the file and the cause.

Outputs go to a temporary file (``O_EXCL``) in the destination folder and are moved into place
only when complete, so a reader never sees a half-written file and a failure or an interrupt
leaves no output behind. Only regular files are ever replaced, and only when asked; every file
written gets ordinary permissions (0o666 minus the umask).

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
import re
import secrets
import signal
import stat
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.lib import format as npy_format

from .errors import InputError, OutputError, PathwiseError
from .text import json_escape

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

#: What a path that is not a regular file is, by ``stat.S_IFMT``.
_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symbolic link", stat.S_IFIFO: "a FIFO",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}
#: Signals held back while finished files are moved into place, so none is left half done.
_HELD_SIGNALS = {getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)}


def existing_kind(path: str | os.PathLike[str]) -> str | None:
    """None when nothing has the name ``path``, ``"a file"`` for a regular file, else what it is
    (``"a FIFO"``, ``"a symbolic link"``, ...). Links are not followed."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise OutputError(f"{path}: cannot check ({exc.strerror or exc})") from None
    if stat.S_ISREG(mode):
        return "a file"
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def check_destination(path: str | os.PathLike[str], *, overwrite: bool = True) -> bool:
    """Refuse to write ``path`` unless it is new, or a regular file and ``overwrite`` is set;
    returns whether it is new.

    A directory, symbolic link, FIFO, device or socket is never replaced (a link could point
    outside the folder, a FIFO or device belongs to someone). Its folder must exist.
    """
    path = Path(path)
    kind = existing_kind(path)
    if kind == "a directory":
        raise OutputError(f"{path}: is a directory; give a file name")
    if kind is not None and kind != "a file":
        raise OutputError(f"{path}: is {kind}; only a regular file is ever replaced")
    if kind is not None and not overwrite:
        raise OutputError(f"{path}: already exists; pass --force to overwrite it")
    parent = path.parent
    if not parent.exists():
        raise OutputError(f"{path}: folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{path}: {str(parent)!r} is not a folder")
    return kind is None


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (else set and reset)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode() -> int:
    """Ordinary permissions for every file written: 0o666 minus the umask. Nothing is carried
    over from a replaced file (no setuid, setgid or sticky bit, no stale permissions)."""
    return 0o666 & ~_umask()


def _stage(path: Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write through ``write(file)`` to a new temporary file (``O_EXCL``) in ``path``'s folder."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), _new_file_mode())
            os.fsync(f.fileno())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise
    return Path(tmp)


def _place(tmp: Path, path: Path, overwrite: bool) -> bool:
    """Move a staged file to ``path``, checking the destination right before (lstat). Without
    ``overwrite`` a hard link claims the name, which fails if anything took it meanwhile.
    Returns whether ``path`` was new."""
    new = check_destination(path, overwrite=overwrite)
    if not overwrite:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise OutputError(f"{path}: already exists; pass --force to overwrite it") from None
        except OSError:  # no hard links on this file system: the lstat check above has to do
            pass
        else:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return True
    os.replace(tmp, path)
    return new


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold back SIGINT/SIGTERM/SIGHUP (delivered on exit) where the platform allows it."""
    held = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if held:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        yield
    finally:
        if held:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def write_files(folder: str | os.PathLike[str], writers: Mapping[str, Callable[[IO[bytes]], object]], *,
                overwrite: bool = False) -> list[Path]:
    """Write several files into ``folder`` all or nothing.

    Each ``writers[name](file)`` fills a temporary file in ``folder``; only when all are written
    are they moved to their names (every destination checked first, see
    :func:`check_destination`), with interrupts held back meanwhile. A failure or an interrupt
    removes every temporary file and every file this call had already created.
    """
    folder = Path(folder)
    paths = {name: folder / name for name in writers}
    for path in paths.values():
        check_destination(path, overwrite=overwrite)
    staged: dict[Path, Path] = {}
    created: list[Path] = []
    try:
        for name, write in writers.items():
            staged[paths[name]] = _stage(paths[name], write)
        with _signals_held():
            for path in staged:
                check_destination(path, overwrite=overwrite)
            for path, tmp in staged.items():
                if _place(tmp, path, overwrite):
                    created.append(path)
    except BaseException as exc:
        for tmp in staged.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for path in created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if isinstance(exc, OSError):
            raise OutputError(f"{folder}: cannot write ({exc.strerror or exc})") from None
        raise
    return list(paths.values())


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object], *,
                  overwrite: bool = True) -> Path:
    """Write through ``write(file)`` to a temporary file next to ``path``, then rename it."""
    path = Path(path)
    return write_files(path.parent, {path.name: write}, overwrite=overwrite)[0]


def npz_writer(arrays: Mapping[str, np.ndarray], *, compress: bool = False) -> Callable[[IO[bytes]], None]:
    """A writer (for :func:`write_files`) of ``arrays`` as an ``.npz`` archive; object arrays
    are refused at once."""
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

    return write


def json_writer(obj: Any) -> Callable[[IO[bytes]], object]:
    """A writer (for :func:`write_files`) of ``obj`` as strict JSON (see :func:`to_json`)."""
    data = (to_json(obj) + "\n").encode("utf-8")
    return lambda f: f.write(data)


def bytes_writer(data: bytes) -> Callable[[IO[bytes]], object]:
    """A writer (for :func:`write_files`) of ``data`` as it is."""
    return lambda f: f.write(data)


def save_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], *,
             compress: bool = False, overwrite: bool = True) -> Path:
    """Write ``arrays`` as an ``.npz`` archive (readable by :func:`numpy.load`), atomically.

    The file gets exactly the name given (no ``.npz`` is appended). Object arrays are refused.
    An existing regular file is replaced only with ``overwrite``; anything else never is.
    """
    return write_atomic(path, npz_writer(arrays, compress=compress), overwrite=overwrite)


#: Numeric arrays at least this long are encoded in one call of json's C encoder and placed
#: into the indented text as they are: the indented encoder is pure Python, and a pathwise
#: explanation of a 224² ResNet lists millions of kept unit indices (16 s → well under 1 s).
_COMPACT_MIN = 64


class _Compact:
    """A numeric array already encoded as compact JSON text."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _compact(arr: np.ndarray) -> _Compact | None:
    if arr.dtype.kind in "iu":  # Python's repr of a list of ints is its JSON text, and faster to make
        return _Compact(repr(arr.tolist()))
    if arr.dtype.kind == "b":
        return _Compact(json.dumps(arr.tolist()))
    if arr.dtype.kind == "f" and bool(np.isfinite(arr).all()):
        return _Compact(json.dumps(arr.tolist(), allow_nan=False))
    return None


def jsonable(obj: Any) -> Any:
    """Plain JSON data; NaN and infinities (undefined or unbounded metrics) become None."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        if obj.size >= _COMPACT_MIN:
            compact = _compact(obj)
            if compact is not None:
                return compact
        return jsonable(obj.tolist())
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


def to_json_line(obj: Any) -> str:
    """``obj`` as one line of strict JSON, with the same escapes as :func:`to_json` (a row of a
    streamed index)."""
    return json_escape(json.dumps(jsonable(obj), allow_nan=False, ensure_ascii=False, default=_expand))


def _expand(o: Any) -> Any:
    """A :class:`_Compact` array back as a list (one-line JSON needs no placement trick)."""
    if isinstance(o, _Compact):
        return json.loads(o.text)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def to_json(obj: Any) -> str:
    """Strict JSON text (indent 2): numpy scalars and arrays become numbers and lists,
    paths and dtypes strings; non-finite floats (not representable in JSON) become ``null``.
    Control, bidi and other unsafe characters in strings are ``\\u`` escapes
    (:func:`onnx_pathwise.text.json_escape`), so the text is safe to print or publish.
    Long numeric arrays are written on one line each."""
    compact: list[str] = []
    token = f"@@compact-{secrets.token_hex(8)}-"

    def placeholder(o: Any) -> str:
        if isinstance(o, _Compact):
            compact.append(o.text)
            return f"{token}{len(compact) - 1}@@"
        raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")

    text = json.dumps(jsonable(obj), indent=2, allow_nan=False, ensure_ascii=False, default=placeholder)
    if compact:
        text = re.sub(f'"{re.escape(token)}([0-9]+)@@"', lambda m: compact[int(m.group(1))], text)
    return json_escape(text)


def write_json(path: str | os.PathLike[str], obj: Any, *, overwrite: bool = True) -> Path:
    """Write ``obj`` as strict JSON (see :func:`to_json`), atomically."""
    return write_atomic(path, json_writer(obj), overwrite=overwrite)


def write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return write_atomic(path, bytes_writer(data), overwrite=overwrite)
