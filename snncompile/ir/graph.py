"""Nodes and graphs of the SNN IR.

A :class:`Graph` is an ordered collection of :class:`Node` records kept in topological order
(every node comes after the nodes it reads). A node names the values it reads in ``inputs``;
use-def information is :meth:`Graph.users`. Nodes that call a torch function, method or module
keep the original call's argument structure in ``attrs['args']`` / ``attrs['kwargs']`` with
:class:`Ref` placeholders pointing into ``inputs``, so rewiring an input never touches the
template.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import nn

from snncompile.ir.ops import Layout, Op

if TYPE_CHECKING:
    from snncompile.passes.options import CompileOptions


class Ref(NamedTuple):
    """A placeholder in an argument template: the ``index``-th entry of ``node.inputs``."""

    index: int


def fill_refs(template: Any, values: Callable[[int], Any]) -> Any:
    """``template`` with every :class:`Ref` ``r`` replaced by ``values(r.index)`` (tuples, lists
    and dicts are rebuilt; anything else is kept)."""
    if isinstance(template, Ref):
        return values(template.index)
    if isinstance(template, tuple):
        return tuple(fill_refs(t, values) for t in template)
    if isinstance(template, list):
        return [fill_refs(t, values) for t in template]
    if isinstance(template, dict):
        return {k: fill_refs(v, values) for k, v in template.items()}
    return template


@dataclasses.dataclass(slots=True, eq=False)
class Node:
    """One operation of the IR and the value it produces.

    Attributes:
        name: Unique name in the graph (also the name of the value it produces).
        op: What the node computes (an :class:`~snncompile.ir.ops.Op`).
        inputs: Names of the nodes whose values this node reads, in template order.
        attrs: Small static attributes (hyper-parameters, argument templates, neuron spec).
        layout: Time layout of the produced value (and of the tensors the node reads).
        module: The ``nn.Module`` the node runs, when it runs one.
        target: The torch function (callable) or tensor method name (str) the node calls.
        shape: Shape of the produced tensor for the example input, or ``None``.
        dtype: dtype name of the produced tensor for the example input, or ``None``.
        meta: Scratch information for passes (never printed, never compared).
    """

    name: str
    op: Op
    inputs: tuple[str, ...] = ()
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    layout: Layout = Layout.STEP
    module: nn.Module | None = None
    target: Callable[..., Any] | str | None = None
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_tensor(self) -> bool:
        """Whether the node produced a tensor for the example input."""
        return self.shape is not None

    def __repr__(self) -> str:
        ins = ", ".join(f"%{i}" for i in self.inputs)
        return f"<Node %{self.name} = {self.op.name}({ins}) {self.layout.value}>"


class Graph:
    """An SNN IR graph: nodes in topological order, ``options`` and graph-level ``meta``.

    ``options`` is the :class:`~snncompile.passes.options.CompileOptions` record the graph is
    compiled with (mode, backend, chunking; ``None`` for a graph built by hand: passes read
    :func:`~snncompile.passes.options.options_of`, which gives the defaults then). ``meta`` holds
    facts about the program: ``'step_mode'`` of the source model (``'s'``/``'m'``), the example
    sizes ``'T'`` and ``'N'``, frontend notes, and what passes record.
    """

    #: The compile options (a class-level default, so graphs pickled without it load too).
    options: CompileOptions | None = None

    def __init__(self, meta: dict[str, Any] | None = None) -> None:
        self._nodes: dict[str, Node] = {}
        self.meta: dict[str, Any] = dict(meta or {})

    # -- access -----------------------------------------------------------------------------------
    @property
    def nodes(self) -> list[Node]:
        """All nodes, in (topological) order."""
        return list(self._nodes.values())

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._nodes.values()))

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._nodes

    def __getitem__(self, name: str) -> Node:
        try:
            return self._nodes[name]
        except KeyError:
            raise KeyError(f"the graph has no node %{name}") from None

    @property
    def input_nodes(self) -> list[Node]:
        """The ``INPUT`` nodes in order."""
        return [n for n in self._nodes.values() if n.op is Op.INPUT]

    @property
    def output_node(self) -> Node:
        """The single ``OUTPUT`` node."""
        outs = [n for n in self._nodes.values() if n.op is Op.OUTPUT]
        if len(outs) != 1:
            raise ValueError(f"expected exactly one OUTPUT node, found {len(outs)}")
        return outs[0]

    def find(self, *ops: Op) -> list[Node]:
        """Nodes whose op is one of ``ops``, in order."""
        wanted = set(ops)
        return [n for n in self._nodes.values() if n.op in wanted]

    def index(self, name: str) -> int:
        """Position of node ``name`` in the order."""
        for i, key in enumerate(self._nodes):
            if key == name:
                return i
        raise KeyError(f"the graph has no node %{name}")

    # -- use-def ----------------------------------------------------------------------------------
    def users(self, name: str) -> list[Node]:
        """Nodes that read the value of node ``name`` (each listed once, in order)."""
        return [n for n in self._nodes.values() if name in n.inputs]

    def users_map(self) -> dict[str, list[Node]]:
        """``{name: users}`` for every node, computed in one sweep."""
        out: dict[str, list[Node]] = {name: [] for name in self._nodes}
        for node in self._nodes.values():
            for inp in dict.fromkeys(node.inputs):
                if inp in out:
                    out[inp].append(node)
        return out

    # -- mutation ---------------------------------------------------------------------------------
    def fresh_name(self, base: str) -> str:
        """A node name starting with ``base`` that is not used yet."""
        base = "".join(c if (c.isalnum() or c == "_") else "_" for c in base) or "v"
        if base not in self._nodes:
            return base
        i = 1
        while f"{base}_{i}" in self._nodes:
            i += 1
        return f"{base}_{i}"

    def add(self, node: Node, *, before: str | None = None, after: str | None = None) -> Node:
        """Insert ``node`` at the end, or just ``before`` / ``after`` the named node."""
        if node.name in self._nodes:
            raise ValueError(f"a node named %{node.name} already exists")
        if before is None and after is None:
            self._nodes[node.name] = node
            return node
        anchor = before if before is not None else after
        if anchor not in self._nodes:
            raise KeyError(f"cannot insert %{node.name}: the graph has no node %{anchor}")
        items: dict[str, Node] = {}
        for key, value in self._nodes.items():
            if key == before:
                items[node.name] = node
            items[key] = value
            if key == after:
                items[node.name] = node
        self._nodes = items
        return node

    def remove(self, name: str) -> Node:
        """Remove node ``name``; it must have no users."""
        users = self.users(name)
        if users:
            names = ", ".join(f"%{u.name}" for u in users)
            raise ValueError(f"cannot remove %{name}: it is still used by {names}")
        return self._nodes.pop(name)

    def replace_all_uses(self, old: str, new: str, *, exclude: Iterable[str] = ()) -> int:
        """Make every reader of ``old`` (except nodes in ``exclude``) read ``new``; return count."""
        skip = set(exclude)
        count = 0
        for node in self._nodes.values():
            if node.name in skip or old not in node.inputs:
                continue
            node.inputs = tuple(new if i == old else i for i in node.inputs)
            count += 1
        return count

    def toposort(self) -> None:
        """Reorder the nodes topologically, keeping the current order where it is already valid."""
        placed: dict[str, Node] = {}
        visiting: set[str] = set()

        def visit(node: Node) -> None:
            if node.name in placed:
                return
            if node.name in visiting:
                raise ValueError(f"the graph has a cycle through %{node.name}")
            visiting.add(node.name)
            for inp in node.inputs:
                if inp in self._nodes:
                    visit(self._nodes[inp])
            visiting.discard(node.name)
            placed[node.name] = node

        for node in list(self._nodes.values()):
            visit(node)
        # Keep OUTPUT last.
        outs = [k for k, v in placed.items() if v.op is Op.OUTPUT]
        for k in outs:
            placed[k] = placed.pop(k)
        self._nodes = placed

    def copy(self) -> Graph:
        """A structural copy: new node records and attr dicts, same modules and targets."""
        g = Graph(self.meta)
        g.options = self.options  # immutable: shared
        for node in self._nodes.values():
            g._nodes[node.name] = dataclasses.replace(
                node, attrs=dict(node.attrs), meta=dict(node.meta)
            )
        return g

    # -- views ------------------------------------------------------------------------------------
    def __str__(self) -> str:
        from snncompile.ir.printer import format_graph

        return format_graph(self)

    def __repr__(self) -> str:
        return f"<snncompile.ir.Graph with {len(self)} nodes>"

    def to_networkx(self) -> Any:
        """The graph as a ``networkx.DiGraph`` (nodes keyed by name, with op/layout/shape attrs)."""
        from snncompile.ir.views import to_networkx

        return to_networkx(self)

    def to_dot(self) -> str:
        """The graph as Graphviz dot text."""
        from snncompile.ir.views import to_dot

        return to_dot(self)

    def draw(self, path: str) -> str:
        """Draw the graph to ``path`` (``.png``/``.svg``/``.pdf``) and return the path."""
        from snncompile.ir.views import draw

        return draw(self, path)
