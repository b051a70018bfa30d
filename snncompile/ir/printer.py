"""The stable text form of an IR graph (``print(graph)``), used by golden tests and errors.

One line per node::

    %name : layout[shape] = OP[target](args) {attr=value, ...}

``layout`` is ``step``/``seq``/``flat``/``none``; the shape is the example input's; ``[target]``
appears for nodes that call a torch function (``torch.flatten``) or method (``.view``); attributes
whose key starts with ``_`` are hidden. Nothing printed depends on memory addresses or dict
iteration of unordered containers, so the text is stable across runs.
"""

from __future__ import annotations

import enum
from typing import Any

from snncompile.ir.graph import Graph, Node, Ref
from snncompile.ir.ops import Op

_HIDDEN = {"args", "kwargs"}


def target_name(target: Any) -> str:
    """A stable, readable name for a call target (function, builtin or method name)."""
    if target is None:
        return ""
    if isinstance(target, str):
        return f".{target}"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if name is None:
        return type(target).__name__
    if module in ("builtins", "_operator"):
        module = "operator" if module == "_operator" else ""
    if module.startswith("torch._C") or module == "torch._tensor":
        module = "torch"
    if module.startswith("torch.nn.functional") or module == "torch._C._nn":
        module = "torch.nn.functional"
    return f"{module}.{name}" if module else name


def format_value(value: Any, node: Node | None = None) -> str:
    """Render one attribute or argument value stably."""
    if isinstance(value, Ref):
        if node is not None and value.index < len(node.inputs):
            return f"%{node.inputs[value.index]}"
        return f"%<{value.index}>"
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        inner = ", ".join(format_value(v, node) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v, node) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v, node)}" for k, v in value.items()) + "}"
    if callable(value) and not isinstance(value, type):
        return target_name(value)
    if isinstance(value, type):
        return value.__name__
    return repr(value)


def _format_args(node: Node) -> str:
    args = node.attrs.get("args")
    kwargs = node.attrs.get("kwargs") or {}
    if args is None:
        parts = [f"%{i}" for i in node.inputs]
    else:
        parts = [format_value(a, node) for a in args]
    parts += [f"{k}={format_value(v, node)}" for k, v in kwargs.items()]
    return ", ".join(parts)


def format_node(node: Node) -> str:
    """One node as a line of text (without indentation)."""
    shape = "" if node.shape is None else "[" + ", ".join(str(d) for d in node.shape) + "]"
    head = f"%{node.name} : {node.layout.value}{shape} = {node.op.name}"
    if node.target is not None:
        head += f"[{target_name(node.target)}]"
    head += f"({_format_args(node)})"
    shown = {k: v for k, v in node.attrs.items() if k not in _HIDDEN and not str(k).startswith("_")}
    if shown:
        head += " {" + ", ".join(f"{k}={format_value(v, node)}" for k, v in shown.items()) + "}"
    return head


def format_graph(graph: Graph) -> str:
    """The whole graph as stable text."""
    facts = {k: graph.meta[k] for k in ("step_mode",) if k in graph.meta}
    options = getattr(graph, "options", None)
    if options is not None:
        facts["mode"] = options.mode
        if options.backend is not None:
            facts["backend"] = options.backend
    facts.update({k: graph.meta[k] for k in ("T", "N") if k in graph.meta})
    header = ", ".join(f"{k}={v}" for k, v in facts.items())
    lines = [f"graph({header}):"]
    for node in graph.nodes:
        if node.op is Op.OUTPUT:
            lines.append(f"  return {_format_args(node)}")
        else:
            lines.append("  " + format_node(node))
    return "\n".join(lines)
