"""Time-layout simplification: cancel ``SPLIT_TIME``/``MERGE_TIME`` round trips.

``merge(split(x)) = x`` for a ``flat`` value ``x`` and ``split(merge(s)) = s`` for a ``seq``
value ``s`` (both are views with the same ``T``), so readers of the outer node read the inner
node's input directly; time-layout nodes left without readers are removed, and repeated
``MERGE_TIME``/``SPLIT_TIME`` of the same value are merged into one. After this pass consecutive
stateless ops form one ``flat`` chain (conv -> BN -> pool ... run over ``[T*N, *]`` without
reshapes in between), which is what exposes conv->BN to folding in multi-step models.
"""

from __future__ import annotations

from snncompile.ir.graph import Graph
from snncompile.ir.ops import Op
from snncompile.passes.base import PassResult


def simplify_time_layout(graph: Graph) -> PassResult:
    """Cancel split/merge round trips and drop unused time-layout nodes; see the module doc."""
    cancelled = removed = deduped = 0
    inverse = {Op.MERGE_TIME: Op.SPLIT_TIME, Op.SPLIT_TIME: Op.MERGE_TIME}
    for node in graph:
        if node.op not in inverse:
            continue
        src = graph[node.inputs[0]]
        if src.op is inverse[node.op]:
            cancelled += graph.replace_all_uses(node.name, src.inputs[0])
    seen: dict[tuple[Op, str], str] = {}
    for node in graph:
        if node.op not in inverse:
            continue
        key = (node.op, node.inputs[0])
        if key in seen:
            deduped += graph.replace_all_uses(node.name, seen[key])
        else:
            seen[key] = node.name
    changed = True
    while changed:
        changed = False
        users = graph.users_map()
        for node in graph:
            if node.op in inverse and not users[node.name]:
                graph.remove(node.name)
                removed += 1
                changed = True
    modified = bool(cancelled or removed or deduped)
    notes = [f"cancelled {cancelled} round trip(s), removed {removed} node(s)"] if modified else []
    return PassResult(graph, modified, notes)
