"""Well-formedness checks for IR graphs (:func:`verify`).

The checks, each failing with an :class:`IRVerificationError` that names the node:

* every input names a node defined earlier (topological order, no dangling references);
* exactly one ``OUTPUT`` node, last; ``INPUT``/``CONSTANT`` nodes read nothing;
* argument templates only reference existing inputs;
* module-running ops carry a module (``NEURON`` always does);
* layouts: a graph is either in step form (``step`` values, before lowering) or in sequence form
  (``seq``/``flat`` values) -- never both; ``MERGE_TIME`` reads ``seq`` and gives ``flat``;
  ``SPLIT_TIME`` reads ``flat`` and gives ``seq``; neurons never run on ``flat`` values; every
  other node reads values of its own layout (or layout-free constants);
* shapes of time reshapes agree with their input (when shapes are known).
"""

from __future__ import annotations

from typing import Any

from snncompile.ir.graph import Graph, Node, Ref
from snncompile.ir.ops import Layout, Op, OpGroup

_MODULE_OPS = frozenset({Op.NEURON, Op.FUSED_NEURON, Op.OPAQUE_MODULE})


class IRVerificationError(ValueError):
    """Raised by :func:`verify` for a malformed graph; ``node`` is the offending node's name."""

    def __init__(self, node: str | None, message: str) -> None:
        self.node = node
        where = f"node %{node}: " if node is not None else ""
        super().__init__(f"IR verification failed at {where}{message}")


def _refs(value: Any) -> list[int]:
    if isinstance(value, Ref):
        return [value.index]
    if isinstance(value, (tuple, list)):
        return [i for v in value for i in _refs(v)]
    if isinstance(value, dict):
        return [i for v in value.values() for i in _refs(v)]
    return []


def verify(graph: Graph) -> None:
    """Check that ``graph`` is well formed; raise :class:`IRVerificationError` otherwise."""
    seen: dict[str, Node] = {}
    nodes = graph.nodes
    outputs = [n for n in nodes if n.op is Op.OUTPUT]
    if len(outputs) != 1:
        raise IRVerificationError(None, f"expected exactly one OUTPUT node, found {len(outputs)}")
    if nodes[-1].op is not Op.OUTPUT:
        raise IRVerificationError(nodes[-1].name, "the OUTPUT node must be the last node")
    if not any(n.op is Op.INPUT for n in nodes):
        raise IRVerificationError(None, "the graph has no INPUT node")
    layouts = {n.layout for n in nodes if n.op.group is not OpGroup.IO or n.op is Op.INPUT}
    if Layout.STEP in layouts and (Layout.SEQ in layouts or Layout.FLAT in layouts):
        bad = next(n for n in nodes if n.layout in (Layout.SEQ, Layout.FLAT))
        raise IRVerificationError(
            bad.name,
            f"{bad.layout.value} value in a graph that still has step values; a graph is either "
            "in step form (before lowering) or in sequence form (after)",
        )
    for node in nodes:
        for inp in node.inputs:
            if inp not in seen:
                what = "is not defined" if inp not in graph else "is defined after its reader"
                raise IRVerificationError(node.name, f"input %{inp} {what}")
        if node.op in (Op.INPUT, Op.CONSTANT) and node.inputs:
            raise IRVerificationError(node.name, f"{node.op.name} must not read other values")
        for key in ("args", "kwargs"):
            for i in _refs(node.attrs.get(key, ())):
                if i >= len(node.inputs):
                    raise IRVerificationError(
                        node.name,
                        f"argument template references input #{i} but the node has "
                        f"{len(node.inputs)} inputs",
                    )
        if node.op in _MODULE_OPS and node.module is None:
            raise IRVerificationError(node.name, f"{node.op.name} needs a module")
        _check_layout(node, [seen[i] for i in node.inputs])
        seen[node.name] = node


def _check_layout(node: Node, inputs: list[Node]) -> None:
    if node.op is Op.OUTPUT or node.op is Op.INPUT:
        return
    if node.op is Op.CONSTANT:
        if node.layout is not Layout.NONE:
            raise IRVerificationError(node.name, "CONSTANT must have layout none")
        return
    timed = [i for i in inputs if i.layout is not Layout.NONE]
    if node.op in (Op.MERGE_TIME, Op.SPLIT_TIME):
        want_in, want_out = (
            (Layout.SEQ, Layout.FLAT) if node.op is Op.MERGE_TIME else (Layout.FLAT, Layout.SEQ)
        )
        if len(inputs) != 1 or inputs[0].layout is not want_in or node.layout is not want_out:
            got = [i.layout.value for i in inputs]
            raise IRVerificationError(
                node.name,
                f"{node.op.name} must read one {want_in.value} value and produce "
                f"{want_out.value}; reads {got}, produces {node.layout.value}",
            )
        src = inputs[0]
        if src.shape is not None and node.shape is not None:
            if node.op is Op.MERGE_TIME:
                ok = len(src.shape) >= 2 and node.shape == (
                    src.shape[0] * src.shape[1],
                    *src.shape[2:],
                )
            else:
                ok = len(node.shape) >= 2 and src.shape == (
                    node.shape[0] * node.shape[1],
                    *node.shape[2:],
                )
            if not ok:
                raise IRVerificationError(
                    node.name, f"shape {node.shape} does not match its input's {src.shape}"
                )
        return
    if node.op.group is OpGroup.NEURON and node.layout not in (Layout.STEP, Layout.SEQ):
        raise IRVerificationError(
            node.name, f"a neuron must run on step or seq values, not {node.layout.value}"
        )
    for inp in timed:
        if inp.layout is not node.layout:
            raise IRVerificationError(
                node.name,
                f"reads %{inp.name} with layout {inp.layout.value} but runs in layout "
                f"{node.layout.value}; insert a MERGE_TIME/SPLIT_TIME between them",
            )
