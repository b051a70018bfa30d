"""snncompile.ir: the SNN intermediate representation.

A small typed dataflow graph between torch.fx capture and the backends:

* :class:`Op` (with :class:`OpGroup`) says what a node computes, :class:`Layout` the time layout
  of the value it produces (``step`` ``[N,*]``, ``seq`` ``[T,N,*]``, ``flat`` ``[T*N,*]``);
* :class:`Node` records and a :class:`Graph` with use-def information (:meth:`Graph.users`);
* :func:`verify` checks well-formedness and raises :class:`IRVerificationError` naming the node;
* ``print(graph)`` gives a stable text form; ``graph.to_networkx()``, ``graph.to_dot()`` and
  ``graph.draw(path)`` are views for people.

See ``docs/ir.md``.
"""

from snncompile.ir.graph import Graph, Node, Ref
from snncompile.ir.ops import FOLDABLE_INTO_BN, POINTWISE_SYNAPSE, Layout, Op, OpGroup
from snncompile.ir.printer import format_graph, format_node, target_name
from snncompile.ir.verify import IRVerificationError, verify
from snncompile.ir.views import draw, to_dot, to_networkx

__all__ = [
    "FOLDABLE_INTO_BN",
    "POINTWISE_SYNAPSE",
    "Graph",
    "IRVerificationError",
    "Layout",
    "Node",
    "Op",
    "OpGroup",
    "Ref",
    "draw",
    "format_graph",
    "format_node",
    "target_name",
    "to_dot",
    "to_networkx",
    "verify",
]
