"""The ONNX renderer of dynamics expressions: one table from expression op to ONNX node(s).

It is the same walk as the C/CUDA renderers of :mod:`snncompile.codegen.render` (each distinct
expression node is emitted once, operands in the order the expression states them), with a table
of small emitter functions instead of format strings: :data:`ONNX_OPS` maps every
:class:`~snncompile.dynamics.expr.Op` to a function ``(emitter, operand names) -> value name``.
Comparisons and ``HEAVISIDE`` become an ONNX comparison followed by a ``Cast`` to float (the
``1.0``/``0.0`` convention of the expression IR), ``WHERE`` casts its condition to bool (non-zero
is true), ``DETACH`` is the identity (export is inference only) and ``ERFC`` is ``1 - Erf``.
Constants become float32 scalar initializers, so ``x / 2.0`` is a float32 ``Div`` by ``2.0f``
exactly as PyTorch computes ``tensor / 2.0`` on float32 tensors.

An op without an entry raises :class:`OnnxRenderError` naming the op; add an entry to
:data:`ONNX_OPS` to support it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from onnx import TensorProto

from snncompile.dynamics.expr import Expr, Op, toposort


class OnnxRenderError(NotImplementedError):
    """An expression op has no entry in the ONNX rendering table."""


class Emitter(Protocol):
    """What the table entries need from a graph builder."""

    def node(self, op_type: str, inputs: list[str], hint: str = "", **attrs: Any) -> str:
        """Append one node with a single output and return the output's name."""
        ...

    def scalar(self, value: float) -> str:
        """Return the name of a float32 scalar initializer holding ``value``."""
        ...


def _binary(op_type: str) -> Callable[[Emitter, tuple[str, ...]], str]:
    def emit(e: Emitter, a: tuple[str, ...]) -> str:
        return e.node(op_type, [a[0], a[1]], op_type.lower())

    return emit


def _unary(op_type: str) -> Callable[[Emitter, tuple[str, ...]], str]:
    def emit(e: Emitter, a: tuple[str, ...]) -> str:
        return e.node(op_type, [a[0]], op_type.lower())

    return emit


def _compare(op_type: str) -> Callable[[Emitter, tuple[str, ...]], str]:
    # The expression IR's comparisons give float 1.0 / 0.0, like ``(a < b).to(a)``.
    def emit(e: Emitter, a: tuple[str, ...]) -> str:
        flag = e.node(op_type, [a[0], a[1]], op_type.lower())
        return e.node("Cast", [flag], "cmp_f", to=TensorProto.FLOAT)

    return emit


def _where(e: Emitter, a: tuple[str, ...]) -> str:
    cond = e.node("Cast", [a[0]], "cond", to=TensorProto.BOOL)  # non-zero (and NaN) -> true
    return e.node("Where", [cond, a[1], a[2]], "where")


def _heaviside(e: Emitter, a: tuple[str, ...]) -> str:
    # heaviside(0) = 1: the spike fires at h - v_threshold >= 0.
    flag = e.node("GreaterOrEqual", [a[0], e.scalar(0.0)], "fire")
    return e.node("Cast", [flag], "spike", to=TensorProto.FLOAT)


def _erfc(e: Emitter, a: tuple[str, ...]) -> str:
    return e.node("Sub", [e.scalar(1.0), e.node("Erf", [a[0]], "erf")], "erfc")


#: ``expression op -> emitter``: the whole ONNX target.
ONNX_OPS: dict[Op, Callable[[Emitter, tuple[str, ...]], str]] = {
    Op.ADD: _binary("Add"),
    Op.SUB: _binary("Sub"),
    Op.MUL: _binary("Mul"),
    Op.DIV: _binary("Div"),
    Op.NEG: _unary("Neg"),
    Op.MAX: _binary("Max"),
    Op.MIN: _binary("Min"),
    Op.LT: _compare("Less"),
    Op.LE: _compare("LessOrEqual"),
    Op.GT: _compare("Greater"),
    Op.GE: _compare("GreaterOrEqual"),
    Op.WHERE: _where,
    Op.EXP: _unary("Exp"),
    Op.LOG: _unary("Log"),
    Op.SQRT: _unary("Sqrt"),
    Op.SIGMOID: _unary("Sigmoid"),
    Op.TANH: _unary("Tanh"),
    Op.ATAN: _unary("Atan"),
    Op.ERF: _unary("Erf"),
    Op.ERFC: _erfc,
    Op.ABS: _unary("Abs"),
    Op.HEAVISIDE: _heaviside,
    Op.DETACH: lambda e, a: a[0],  # identity: exported models never run backward
}


def render_onnx(
    emitter: Emitter,
    outputs: Mapping[str, Expr],
    names: Mapping[str, str],
    table: Mapping[Op, Callable[[Emitter, tuple[str, ...]], str]] = ONNX_OPS,
) -> dict[str, str]:
    """Emit ONNX nodes computing ``outputs`` (``{key: expr}``) and return ``{key: value name}``.

    ``VAR``/``PARAM`` leaves named ``n`` read the ONNX value ``names[n]`` (a missing binding is a
    ``KeyError`` naming the leaf); constants become float32 scalar initializers. Every distinct
    node is emitted once, in topological order.
    """
    rendered: dict[Expr, str] = {}
    for node in toposort(outputs.values()):
        if node.op is Op.VAR or node.op is Op.PARAM:
            if node.arg not in names:
                raise KeyError(
                    f"snncompile.codegen.onnx_renderer: no ONNX value bound for "
                    f"{node.op.name.lower()} {node.arg!r}; pass it in names."
                )
            rendered[node] = names[node.arg]
            continue
        if node.op is Op.CONST:
            rendered[node] = emitter.scalar(float(node.arg))
            continue
        entry = table.get(node.op)
        if entry is None:
            raise OnnxRenderError(
                f"snncompile.codegen.onnx_renderer: the ONNX target has no rendering for "
                f"expression op {node.op.name}; add an entry to ONNX_OPS."
            )
        rendered[node] = entry(emitter, tuple(rendered[s] for s in node.src))
    return {key: rendered[expr] for key, expr in outputs.items()}
