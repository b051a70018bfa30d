"""Dead op removal (inference only): drop ops that compute the identity.

In evaluation, ``Dropout`` (``nn.Dropout*``, snncompile/SpikingJelly ``layer.Dropout*`` whose
module is not training, ``F.dropout(..., training=False)``) and ``nn.Identity`` return their input:
``y = x``. Each such node is removed and its readers read ``x`` instead. Dropout in training mode
is never removed (it is random, not dead).
"""

from __future__ import annotations

from snncompile.ir.graph import Graph, Node, Ref
from snncompile.ir.ops import Op
from snncompile.passes.base import PassResult


def _is_dead(node: Node) -> bool:
    if node.op is Op.IDENTITY:
        return True
    if node.op is not Op.DROPOUT:
        return False
    if node.module is not None:
        return not node.module.training
    kwargs = node.attrs.get("kwargs") or {}
    args = node.attrs.get("args") or ()
    training = kwargs.get("training", args[2] if len(args) > 2 else True)
    return training is False


def _data_input(node: Node) -> str | None:
    args = node.attrs.get("args")
    first = args[0] if args else Ref(0)
    if isinstance(first, Ref) and first.index < len(node.inputs):
        return node.inputs[first.index]
    return None


def remove_dead_ops(graph: Graph) -> PassResult:
    """Remove eval-mode Dropout and Identity nodes; see the module doc."""
    removed: list[str] = []
    for node in graph:
        if not _is_dead(node):
            continue
        src = _data_input(node)
        if src is None or graph[src].layout is not node.layout:
            continue
        graph.replace_all_uses(node.name, src)
        graph.remove(node.name)
        removed.append(node.name)
    notes = [f"removed {', '.join('%' + r for r in removed)}"] if removed else []
    return PassResult(graph, bool(removed), notes)
