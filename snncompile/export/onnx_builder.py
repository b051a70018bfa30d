"""A small ONNX graph builder shared by the exporter and the expression renderer.

One :class:`Initializers` registry holds every weight and constant of a model (the main graph's
initializers; ONNX subgraphs such as a ``Scan`` body read them from the outer scope) and one
:class:`NameSource` hands out value names unique across the main graph and its subgraphs (ONNX
requires single assignment across scopes). A :class:`GraphBuilder` collects the nodes of one
graph.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper


class OnnxExportError(ValueError):
    """The model cannot be exported; the message names the IR node/op and what to do."""


class NameSource:
    """Unique value/node names (shared by a graph and its subgraphs)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def fresh(self, base: str) -> str:
        """A name starting with ``base`` that was not handed out before."""
        base = re.sub(r"[^A-Za-z0-9_.:]", "_", base) or "v"
        if base not in self.used:
            self.used.add(base)
            return base
        i = 1
        while f"{base}_{i}" in self.used:
            i += 1
        name = f"{base}_{i}"
        self.used.add(name)
        return name

    def reserve(self, name: str) -> str:
        """Claim an exact public name (graph inputs/outputs); fail if it is taken."""
        if name in self.used:
            raise ValueError(f"snncompile.export: the ONNX value name {name!r} is used twice")
        self.used.add(name)
        return name


class Initializers:
    """The model's initializers, with float32 scalars shared by value."""

    def __init__(self, names: NameSource) -> None:
        self.names = names
        self.tensors: list[TensorProto] = []
        self._scalars: dict[bytes, str] = {}

    def add(self, array: np.ndarray, hint: str) -> str:
        """Register ``array`` as an initializer and return its name."""
        name = self.names.fresh(hint)
        self.tensors.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def scalar(self, value: float) -> str:
        """A float32 scalar initializer holding ``value`` (rounded to float32 once)."""
        key = struct.pack("<f", value)
        name = self._scalars.get(key)
        if name is None:
            f = np.float32(value)
            text = f"{float(f):g}".replace("-", "m").replace(".", "p").replace("+", "")
            name = self.add(np.array(f, dtype=np.float32), f"c_{text}")
            self._scalars[key] = name
        return name

    def int64(self, values: list[int], hint: str) -> str:
        """An int64 1-D initializer (shapes, axes)."""
        return self.add(np.asarray(values, dtype=np.int64), hint)


class GraphBuilder:
    """The nodes of one ONNX graph (main graph or a subgraph body)."""

    def __init__(self, names: NameSource, inits: Initializers) -> None:
        self.names = names
        self.inits = inits
        self.nodes: list[NodeProto] = []

    def node(self, op_type: str, inputs: list[str], hint: str = "", **attrs: Any) -> str:
        """Append a node with one output; return the output's name."""
        return self.node_multi(op_type, inputs, 1, hint, **attrs)[0]

    def node_multi(
        self, op_type: str, inputs: list[str], n_out: int, hint: str = "", **attrs: Any
    ) -> list[str]:
        """Append a node with ``n_out`` outputs; return their names."""
        base = hint or op_type.lower()
        outs = [self.names.fresh(base) for _ in range(n_out)]
        node_name = self.names.fresh(f"n_{base}")
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, **attrs))
        return outs

    def scalar(self, value: float) -> str:
        """A float32 scalar constant (see :meth:`Initializers.scalar`)."""
        return self.inits.scalar(value)

    def rename_output(self, old: str, new: str) -> bool:
        """Rename value ``old`` produced by a node of this graph to ``new`` (and its uses).

        Returns ``False`` (and changes nothing) when no node of this graph produces ``old``.
        """
        producers = [n for n in self.nodes if old in n.output]
        if not producers:
            return False
        for n in self.nodes:
            for i, name in enumerate(n.output):
                if name == old:
                    n.output[i] = new
            for i, name in enumerate(n.input):
                if name == old:
                    n.input[i] = new
            for attr in n.attribute:
                if attr.type == attr.GRAPH:
                    _rename_in_subgraph(attr.g, old, new)
        return True


def _rename_in_subgraph(g: Any, old: str, new: str) -> None:
    for n in g.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
        for attr in n.attribute:
            if attr.type == attr.GRAPH:
                _rename_in_subgraph(attr.g, old, new)
