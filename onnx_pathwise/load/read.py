"""Reading a model: a regular file only, parsed, its names valid UTF-8, its resources checked and
its external data loaded; or a ModelProto from memory, checked the same way."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from ..errors import ModelError
from ..io import open_regular
from .external import external_references, load_external_data
from .resources import MAX_PROTOBUF_BYTES, check_resources, raw_data_sizes


def read_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse an ONNX file and load its external data, refusing what a hostile file could do.

    The file must be a regular file (:func:`~onnx_pathwise.io.open_regular`: never a FIFO,
    device or anything under ``/proc``); every name must be valid UTF-8 (:func:`check_names`);
    sizes and stored data must agree (:func:`check_resources`); external data is checked
    everywhere it can live and read by us from inside the model's folder only
    (:func:`load_external_data`), so the ModelProto returned holds no external reference.
    """
    path = Path(path)
    f, size = open_regular(path, ModelError, "an ONNX file")
    with f:
        if size >= MAX_PROTOBUF_BYTES:
            raise ModelError(f"{path}: {size} bytes, more than a protobuf file can hold "
                             "(2 GiB); large weights belong in external data")
        data = f.read(size)
    if not data:
        raise ModelError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(f"{path}: not a valid ONNX protobuf ({type(exc).__name__})") from None
    raw_sizes = raw_data_sizes(data)
    del data
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{path}: not an ONNX model (no graph)")
    try:
        check_names(model)
        check_resources(model, raw_sizes)
        load_external_data(model, path)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    return model


def read_source(source: str | os.PathLike[str] | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """The checked model and the label its messages start with: a file is read by
    :func:`read_model`; a ModelProto from memory gets the same name and resource checks and
    must hold no external reference (it has no folder to resolve one against)."""
    if isinstance(source, onnx.ModelProto):
        model, label = source, "model"
        try:
            check_names(model)
            check_resources(model)
            external = external_references(model)
            if external:
                raise ModelError(f"{external[0]}; a ModelProto in memory has no folder to resolve "
                                 "external data against: pass the model's file path instead, so "
                                 "that its external data is checked and loaded from its folder")
        except ModelError as exc:
            raise ModelError(f"{label}: {exc}") from None
    else:
        model, label = read_model(source), str(source)
    return model, label


def check_names(model: onnx.ModelProto) -> None:
    """Refuse a model with a text field (a node, value, initializer, attribute or function
    name, a domain, a doc string, an external-data entry, ...) that is not valid UTF-8.

    protobuf parses such a field without complaint and hands it out as ``bytes`` instead of
    ``str``, which compares unequal to every name and breaks any code that formats it; the
    message names the field by its path in the model and shows the bytes escaped.
    """
    stack: list[tuple[Any, str]] = [(model, "model")]
    while stack:
        message, where = stack.pop()
        if isinstance(message, TensorProto):
            # only its text fields: listing all fields would copy raw_data, however large
            fields = [(message.DESCRIPTOR.fields_by_name[n], getattr(message, n)) for n in ("name", "doc_string")]
            fields += [(message.DESCRIPTOR.fields_by_name[n], getattr(message, n))
                       for n in ("external_data", "metadata_props") if n in message.DESCRIPTOR.fields_by_name]
        else:
            fields = message.ListFields()
        for field, value in fields:
            if field.type == field.TYPE_MESSAGE:
                if field.is_repeated:
                    stack += [(v, f"{where}.{field.name}[{i}]") for i, v in enumerate(value)]
                else:
                    stack.append((value, f"{where}.{field.name}"))
            elif field.type == field.TYPE_STRING:
                for i, text in enumerate(value if field.is_repeated else [value]):
                    if not isinstance(text, str):
                        index = f"[{i}]" if field.is_repeated else ""
                        raise ModelError(f"{where}.{field.name}{index} is not valid UTF-8 "
                                         f"({bytes(text)!r}); the file is corrupt")
            elif field.name in ("s", "strings") and isinstance(message, onnx.AttributeProto):
                # bytes in protobuf, "UTF-8 string" in onnx.proto: an attribute's string value
                for i, raw in enumerate(value if field.is_repeated else [value]):
                    try:
                        raw.decode()
                    except UnicodeDecodeError:
                        index = f"[{i}]" if field.is_repeated else ""
                        raise ModelError(f"{where}.{field.name}{index} is not valid UTF-8 "
                                         f"({bytes(raw)!r}); the file is corrupt") from None
