"""Views of an IR graph for people: networkx, Graphviz dot text and a drawing (PNG/SVG/PDF).

:func:`draw` uses the Graphviz ``dot`` program when it is installed and matplotlib otherwise
(a layered layout: column = depth in the graph), so drawing works without Graphviz.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from snncompile.ir.graph import Graph, Node
from snncompile.ir.ops import OpGroup

_COLORS = {
    OpGroup.IO: "#dddddd",
    OpGroup.SYNAPSE: "#cfe2ff",
    OpGroup.NEURON: "#ffd6a5",
    OpGroup.TIME: "#d8f3dc",
}


def _label(node: Node) -> str:
    shape = "" if node.shape is None else "x".join(str(d) for d in node.shape)
    return f"{node.name}\n{node.op.name} ({node.layout.value})\n{shape}".rstrip()


def to_networkx(graph: Graph) -> Any:
    """A ``networkx.DiGraph``: one node per IR node (attrs ``op``, ``group``, ``layout``,
    ``shape``), one edge per input (attr ``index``: position in the reader's inputs)."""
    import networkx as nx

    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(
            node.name,
            op=node.op.name,
            group=node.op.group.value,
            layout=node.layout.value,
            shape=node.shape,
        )
    for node in graph.nodes:
        for i, inp in enumerate(node.inputs):
            g.add_edge(inp, node.name, index=i)
    return g


def to_dot(graph: Graph) -> str:
    """Graphviz dot text for ``graph`` (stable: nodes and edges in graph order)."""
    lines = ["digraph snn {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled"];']
    for node in graph.nodes:
        label = _label(node).replace('"', "'").replace("\n", "\\n")
        lines.append(f'  "{node.name}" [label="{label}", fillcolor="{_COLORS[node.op.group]}"];')
    for node in graph.nodes:
        for inp in dict.fromkeys(node.inputs):
            lines.append(f'  "{inp}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def draw(graph: Graph, path: str) -> str:
    """Draw ``graph`` to ``path``; the suffix (``.png``, ``.svg``, ``.pdf``) picks the format."""
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    if fmt not in ("png", "svg", "pdf"):
        raise ValueError(f"draw: unsupported format {fmt!r} for {path!r}; use .png, .svg or .pdf")
    dot = shutil.which("dot")
    if dot is not None:
        try:
            subprocess.run(
                [dot, f"-T{fmt}", "-o", path],
                input=to_dot(graph).encode(),
                check=True,
                capture_output=True,
                timeout=60,
            )
            return path
        except (subprocess.SubprocessError, OSError):
            pass  # fall back to matplotlib below
    return _draw_matplotlib(graph, path, fmt)


def _draw_matplotlib(graph: Graph, path: str, fmt: str) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    depth: dict[str, int] = {}
    for node in graph.nodes:
        depth[node.name] = 1 + max((depth[i] for i in node.inputs if i in depth), default=-1)
    rows: dict[int, int] = {}
    pos: dict[str, tuple[float, float]] = {}
    for node in graph.nodes:
        d = depth[node.name]
        pos[node.name] = (rows.get(d, 0) * 3.0, -d * 1.4)
        rows[d] = rows.get(d, 0) + 1
    width = max(4.0, 3.0 * max(rows.values(), default=1))
    height = max(3.0, 1.4 * (max(depth.values(), default=0) + 1))
    fig, ax = plt.subplots(figsize=(min(width, 40), min(height, 200)))
    for node in graph.nodes:
        x1, y1 = pos[node.name]
        for inp in dict.fromkeys(node.inputs):
            x0, y0 = pos[inp]
            ax.annotate(
                "",
                xy=(x1, y1 + 0.35),
                xytext=(x0, y0 - 0.35),
                arrowprops={"arrowstyle": "->", "color": "#555555"},
            )
    for node in graph.nodes:
        x, y = pos[node.name]
        ax.text(
            x,
            y,
            _label(node),
            ha="center",
            va="center",
            fontsize=7,
            bbox={"boxstyle": "round", "facecolor": _COLORS[node.op.group]},
        )
    xs = [p[0] for p in pos.values()] or [0.0]
    ys = [p[1] for p in pos.values()] or [0.0]
    ax.set_xlim(min(xs) - 1.5, max(xs) + 1.5)
    ax.set_ylim(min(ys) - 1.0, max(ys) + 1.0)
    ax.axis("off")
    fig.savefig(path, format=fmt, bbox_inches="tight")
    plt.close(fig)
    return path
