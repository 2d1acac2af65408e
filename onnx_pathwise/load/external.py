"""External data: every reference checked (keys, a relative location inside the model's folder,
no link on the way, offset and length inside a regular file), then read by us, so that
onnxruntime never resolves a path."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import onnx
from onnx import TensorProto

from ..errors import ModelError
from ..io import file_kind, open_regular
from ..limits import check_fits, format_bytes
from .protos import all_tensors
from .resources import MAX_PROTOBUF_BYTES, stored_bytes, tensor_problem


def external_references(model: onnx.ModelProto, provided: Collection[str] = ()) -> list[str]:
    """Where the model still refers to external data (one line each; empty when none).
    ``provided``: names of main-graph initializers whose data the caller hands to onnxruntime
    from memory (:func:`onnx_pathwise.runtime.session`), which do not count."""
    tensors, _ = all_tensors(model)
    out = []
    for where, t in tensors:
        if t.name in provided and where == f"initializer {t.name!r}":
            continue
        if t.data_location == TensorProto.EXTERNAL:
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            out.append(f"{where} stores its data in external file {location!r}")
    return out


#: The keys an external-data entry may have (ONNX spec, ``TensorProto.external_data``).
EXTERNAL_DATA_KEYS = ("location", "offset", "length", "checksum")


@dataclass(frozen=True)
class _ExternalPart:
    """One checked external-data reference: which tensor, which file (and its identity), where."""

    where: str
    tensor: TensorProto
    target: Path
    identity: tuple[int, int]
    offset: int
    length: int
    checksum: str | None


def _external_int(fields: Mapping[str, str], key: str, where: str) -> int | None:
    text = fields.get(key)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise ModelError(f"{where}: external-data {key} {text!r} is not a non-negative integer")
    return int(text)


def _check_external(t: TensorProto, where: str, base: Path) -> _ExternalPart:
    """Validate one external-data reference without reading anything: known keys, each once;
    a relative location inside ``base`` with no ``..``, no symbolic link on the way and a
    regular, singly-linked file at the end; offset and length integers inside the file and
    matching the tensor's type and dims; a checksum that looks like a SHA-1 digest."""
    fields: dict[str, str] = {}
    for entry in t.external_data:
        if entry.key not in EXTERNAL_DATA_KEYS:
            raise ModelError(f"{where}: unknown external-data key {entry.key!r} "
                             f"(allowed: {', '.join(EXTERNAL_DATA_KEYS)})")
        if entry.key in fields:
            raise ModelError(f"{where}: external-data key {entry.key!r} is given twice")
        fields[entry.key] = entry.value
    location = fields.get("location", "")
    if not location:
        raise ModelError(f"{where}: is marked as external data but names no location")
    where = f"{where} stores its data in {location!r}"
    parts = location.split("/")
    if (
        "\x00" in location or "\\" in location or os.path.isabs(location) or location.startswith("/")
        or ".." in parts or not parts[-1] or parts[-1] == "."
    ):
        raise ModelError(f"{where}: external data must be a relative path inside the model's folder "
                         "(no '..', no absolute path, '/' as separator)")
    offset = _external_int(fields, "offset", where) or 0
    length = _external_int(fields, "length", where)
    checksum = fields.get("checksum")
    if checksum is not None and not re.fullmatch(r"[0-9a-fA-F]{40}", checksum):
        raise ModelError(f"{where}: external-data checksum {checksum!r} is not a SHA-1 digest")
    if t.data_type == TensorProto.STRING:
        raise ModelError(f"{where}: STRING tensors cannot be stored as external data")
    names = [p for p in parts if p not in ("", ".")]
    target = base
    for i, part in enumerate(names):
        target = target / part
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            raise ModelError(f"{where}: no such file in the model's folder") from None
        except OSError as exc:
            raise ModelError(f"{where}: cannot be read ({exc.strerror or type(exc).__name__})") from None
        if stat.S_ISLNK(st.st_mode):
            raise ModelError(f"{where}: external data may not be a symbolic link or lie in a linked folder")
        if i < len(names) - 1 and not stat.S_ISDIR(st.st_mode):
            raise ModelError(f"{where}: {'/'.join(names[: i + 1])!r} is not a folder")
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(f"{where}: is {file_kind(st.st_mode)}, not a regular file")
    if st.st_nlink > 1:
        raise ModelError(f"{where}: external data may not be a hard link")
    size = st.st_size
    if offset > size or (length is not None and offset + length > size):
        raise ModelError(f"{where}: offset {offset} and length {length} lie outside the file ({size} bytes)")
    if length is None:
        length = size - offset
    count = 1
    for d in t.dims:
        count *= max(int(d), 0)
    expected = stored_bytes(t.data_type, count)
    if length != expected:
        raise ModelError(f"{where}: {length} bytes, but shape {[int(d) for d in t.dims]} of "
                         f"{TensorProto.DataType.Name(t.data_type)} needs {expected}")
    return _ExternalPart(where, t, target, (st.st_dev, st.st_ino), offset, length, checksum)


def load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Check every external-data reference of the model (:func:`_check_external`), then read
    the bytes ourselves into the tensors, so the model holds no external reference when
    onnxruntime sees it and onnxruntime never resolves a path. Nothing is read before every
    reference has passed; the total must fit a protobuf and the memory budget."""
    base = Path(os.path.realpath(path)).parent
    tensors, _ = all_tensors(model)
    parts: list[_ExternalPart] = []
    for where, t in tensors:
        if t.data_location == TensorProto.EXTERNAL:
            parts.append(_check_external(t, where, base))
        elif len(t.external_data):
            del t.external_data[:]  # inert without data_location EXTERNAL; dropped all the same
    if not parts:
        return
    total = sum(p.length for p in parts)
    if total + model.ByteSize() >= MAX_PROTOBUF_BYTES:
        raise ModelError(f"its external data totals {format_bytes(total)}; with the graph that is more "
                         "than one protobuf message can hold (2 GiB), which onnxruntime needs here")
    check_fits(total, f"loading the external data of {path} ({len(parts)} tensors)")
    opened: dict[Path, tuple[IO[bytes], int]] = {}
    try:
        for part in parts:
            if part.target not in opened:
                f, size = open_regular(part.target, ModelError, "external data", follow_symlinks=False)
                opened[part.target] = (f, size)
                st = os.fstat(f.fileno())
                if (st.st_dev, st.st_ino) != part.identity:
                    raise ModelError(f"{part.where}: the file changed while it was being checked")
            f, size = opened[part.target]
            if part.offset + part.length > size:
                raise ModelError(f"{part.where}: the file shrank while it was being read")
            chunks, got = [], 0
            while got < part.length:
                chunk = os.pread(f.fileno(), part.length - got, part.offset + got)
                if not chunk:
                    raise ModelError(f"{part.where}: the file shrank while it was being read")
                chunks.append(chunk)
                got += len(chunk)
            data = b"".join(chunks)
            if part.checksum is not None and not _checksum_matches(part, data, f):
                raise ModelError(f"{part.where}: SHA-1 checksum {part.checksum!r} matches neither "
                                 "the tensor's bytes nor the file")
            part.tensor.raw_data = data
            part.tensor.data_location = TensorProto.DEFAULT
            del part.tensor.external_data[:]
            problem = tensor_problem(part.tensor, len(data))
            if problem:
                raise ModelError(f"{part.where}: the tensor {problem}")
    finally:
        for f, _ in opened.values():
            f.close()


#: Largest external-data file whose whole-file checksum is computed.
_MAX_HASHED_FILE = 8 * 2**30


def _checksum_matches(part: _ExternalPart, data: bytes, f: IO[bytes]) -> bool:
    """The spec leaves open whether ``checksum`` covers the tensor's bytes or the whole file:
    either is accepted."""
    want = part.checksum.lower() if part.checksum else ""
    if hashlib.sha1(data).hexdigest() == want:
        return True
    if os.fstat(f.fileno()).st_size > _MAX_HASHED_FILE:
        return False
    digest = hashlib.sha1()
    offset = 0
    while chunk := os.pread(f.fileno(), 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest() == want

