"""The input→output cone: the data nodes between the explained input and output, each validated
against the op registry (:data:`onnx_pathwise.rules.RULES`) before any numerics, every problem
reported at once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from ..errors import ModelError, UnsupportedModelError
from ..load import node_subgraphs, opset_version
from ..rules import NOT_PIECEWISE_LINEAR, RULES, supported_ops
from .attributes import checked_node
from .kinds import DATA, node_reads
from .ports import TERMINAL_OPS

#: op_type → role, for ops of the default domain that may sit on the input→output path
#: (derived from the rule registry, :data:`onnx_pathwise.rules.RULES`).
SUPPORTED_OPS: dict[str, str] = supported_ops()


def input_cone(
    nodes: Sequence[onnx.NodeProto], kind: Mapping[str, int], explained: str, input_name: str
) -> tuple[list[onnx.NodeProto], set[str]]:
    """The data nodes that the explained output reads, back to the input, in topological order,
    and the data tensors among them."""
    needed: set[str] = {explained}
    cone_nodes: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if not any(o in needed for o in node.output):
            continue
        cone_nodes.append(node)
        for read in node_reads(node):
            if kind.get(read) == DATA:
                needed.add(read)
    cone_nodes.reverse()
    if input_name not in needed and explained != input_name:
        raise ModelError(f"output {explained!r} does not depend on input {input_name!r}")
    return cone_nodes, needed


def validate_cone(
    model: onnx.ModelProto,
    cone_nodes: Sequence[onnx.NodeProto],
    kind: Mapping[str, int],
    other_inputs: set[str],
    opset: int,
) -> None:
    """Refuse, with every problem at once, a cone with a node the tool cannot explain: an op the
    registry lacks or whose ``check`` fails, control flow on computed values, a read of an
    unexplained graph input."""
    problems: list[str] = []
    for node in cone_nodes:
        domain = node.domain or ""
        v = opset_version(model, domain) if domain not in ("", "ai.onnx") else opset
        where = f"{node.name or '<unnamed>'} ({node.op_type}, {'opset ' if not domain or domain == 'ai.onnx' else domain + ' opset '}{v})"
        unfed = [i for i in node_reads(node) if i in other_inputs]
        if unfed:
            problems.append(f"{where}: reads graph input(s) {unfed} that are not explained")
        if node_subgraphs(node):
            computed = [i for i in node_reads(node) if kind.get(i) == DATA]
            why = f"it reads {computed}" if computed else "a subgraph draws random numbers"
            problems.append(f"{where}: control flow whose result depends on the input is not supported "
                            f"({why}; only control flow on constants is folded)")
            continue
        if domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
            reason = "not piecewise linear" if node.op_type in NOT_PIECEWISE_LINEAR else "not supported"
            if node.op_type in TERMINAL_OPS:
                reason = "only allowed after the last layer"
            problems.append(f"{where}: {reason}")
            continue
        check = RULES[node.op_type].check
        msg = check(checked_node(node, kind, opset)) if check else ""
        if msg:
            problems.append(f"{where}: {msg}")
    if problems:
        raise UnsupportedModelError(problems, list(SUPPORTED_OPS))
