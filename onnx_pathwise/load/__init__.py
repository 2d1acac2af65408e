"""The loader: an ONNX file (or a ModelProto from memory) in, a checked ModelProto out.

The only part of the package that reads a model from the file system (docs/design.md §8).
Each step refuses with a :class:`~onnx_pathwise.errors.ModelError` that names the file and
the cause:

- :func:`read_model` (:mod:`.read`) — a regular file only; parse it; every name valid UTF-8
  (:func:`check_names`); every stored tensor, wherever it lives, of a known type with the data
  its type and dims say, and local functions that inline to a bounded size
  (:func:`check_resources`, :mod:`.resources`); external data checked everywhere and read by us
  from inside the model's folder only, so onnxruntime never resolves a path (:mod:`.external`).
  :func:`read_source` takes a ModelProto from memory too.
- :func:`upgrade_old_opset` (:mod:`.opset`) — opsets older than onnxruntime runs (< 7) are
  upgraded, legacy ``broadcast``/``axis`` attributes rewritten by the operator spec.

What the model computes is :mod:`onnx_pathwise.analysis`'s business.
"""

from __future__ import annotations

from .external import EXTERNAL_DATA_KEYS, external_references, load_external_data
from .opset import LEGACY_BROADCAST_OPSET, MIN_RUNTIME_OPSET, rewrite_legacy_broadcast, upgrade_old_opset
from .protos import all_tensors, node_subgraphs, opset_version
from .read import check_names, read_model, read_source
from .resources import (
    MAX_CONSTANT_BYTES,
    MAX_INLINED_NODES,
    MAX_NESTING,
    MAX_PROTOBUF_BYTES,
    check_inferred_sizes,
    check_resources,
    stored_bytes,
    tensor_problem,
)

__all__ = [
    "EXTERNAL_DATA_KEYS",
    "LEGACY_BROADCAST_OPSET",
    "MAX_CONSTANT_BYTES",
    "MAX_INLINED_NODES",
    "MAX_NESTING",
    "MAX_PROTOBUF_BYTES",
    "MIN_RUNTIME_OPSET",
    "all_tensors",
    "check_inferred_sizes",
    "check_names",
    "check_resources",
    "external_references",
    "load_external_data",
    "node_subgraphs",
    "opset_version",
    "read_model",
    "read_source",
    "rewrite_legacy_broadcast",
    "stored_bytes",
    "tensor_problem",
    "upgrade_old_opset",
]
