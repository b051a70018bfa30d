"""Renderers of dynamics expressions: targets differ by tables, not by branches.

A :class:`Target` is a table from :class:`~snncompile.dynamics.expr.Op` to a format string (for
source-code targets: C, CUDA) plus how to print a constant and declare a temporary. :func:`
render_block` turns a set of named expressions into straight-line statements, one per distinct
node (common sub-expressions are shared because equal nodes are equal keys). The torch
renderer (:data:`TORCH_OPS` and :func:`evaluate`) is the same walk with callables instead of
format strings; it is the eager reference.

Forward expressions are rendered exactly as written (no reassociation, no folding beyond the
Python-double folding of constants the expression builder already did), and C/CUDA sources are
compiled without FMA contraction, so a fused kernel performs the same float32 operations in the
same order as PyTorch does.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from snncompile.dynamics.expr import Expr, Op, toposort
from snncompile.dynamics.names import check_identifier


def f32_literal(value: float) -> str:
    """A C float literal that round-trips the float32 rounding of ``value`` exactly."""
    f = struct.unpack("f", struct.pack("f", value))[0]
    if math.isinf(f):
        return "(1.0f/0.0f)" if f > 0 else "(-1.0f/0.0f)"
    if math.isnan(f):
        return "(0.0f/0.0f)"
    text = f"{f:.9g}"
    if "e" not in text and "." not in text:
        text += ".0"
    return text + "f"


# C source table: every op as a format string over its operands' names.
C_OPS: dict[Op, str] = {
    Op.ADD: "({0} + {1})",
    Op.SUB: "({0} - {1})",
    Op.MUL: "({0} * {1})",
    Op.DIV: "({0} / {1})",
    Op.NEG: "(-{0})",
    Op.MAX: "fmaxf({0}, {1})",
    Op.MIN: "fminf({0}, {1})",
    Op.LT: "(({0} < {1}) ? 1.0f : 0.0f)",
    Op.LE: "(({0} <= {1}) ? 1.0f : 0.0f)",
    Op.GT: "(({0} > {1}) ? 1.0f : 0.0f)",
    Op.GE: "(({0} >= {1}) ? 1.0f : 0.0f)",
    Op.WHERE: "(({0} != 0.0f) ? {1} : {2})",
    Op.EXP: "snn_expf({0})",
    Op.LOG: "snn_logf({0})",
    Op.SQRT: "sqrtf({0})",
    Op.SIGMOID: "(1.0f / (1.0f + snn_expf(-{0})))",
    Op.TANH: "snn_tanhf({0})",
    Op.ATAN: "snn_atanf({0})",
    Op.ERF: "snn_erff({0})",
    Op.ERFC: "snn_erfcf({0})",
    Op.ABS: "fabsf({0})",
    Op.HEAVISIDE: "(({0} >= 0.0f) ? 1.0f : 0.0f)",
    Op.DETACH: "{0}",
}

# CUDA device code uses the same table: the snn_* transcendental functions are defined in both the
# C and the CUDA kernel headers (codegen/kernels.py) from IEEE-exact operations only, so CPU and
# GPU kernels, at any vector width, compute the same bits. Entries that differ would override.
CUDA_OPS: dict[Op, str] = {**C_OPS}


@dataclass(frozen=True)
class Target:
    """A source-code target: op table, temporaries' declaration, constant printer."""

    name: str
    ops: Mapping[Op, str]
    decl: str = "const float {name} = {value};"
    literal: Callable[[float], str] = f32_literal
    keywords: frozenset[str] = field(default_factory=frozenset)


C_TARGET = Target("c", C_OPS)
CUDA_TARGET = Target("cuda", CUDA_OPS)


def render_block(
    target: Target,
    outputs: Mapping[str, Expr],
    names: Mapping[str, str] | None = None,
    prefix: str = "t",
    indent: str = "",
) -> str:
    """Render ``outputs`` (``{c_name: expr}``) as straight-line statements for ``target``.

    Leaves: ``VAR``/``PARAM`` named ``n`` print as ``names.get(n, n)``; constants use the target's
    literal printer. Every other node gets its own ``const float`` temporary (``{prefix}{i}``) in
    topological order, and each output name is declared last from its node.
    """
    names = dict(names or {})
    for out_name in outputs:
        check_identifier(out_name, "kernel output name")
    order = toposort(outputs.values())
    rendered: dict[Expr, str] = {}
    lines: list[str] = []
    counter = 0
    for node in order:
        if node.op is Op.VAR or node.op is Op.PARAM:
            check_identifier(node.arg, f"{node.op.name.lower()} name")
            rendered[node] = names.get(node.arg, node.arg)  # a mapped value is caller's code
            continue
        if node.op is Op.CONST:
            rendered[node] = target.literal(node.arg)
            continue
        fmt = target.ops.get(node.op)
        if fmt is None:
            raise NotImplementedError(
                f"snncompile.codegen: target {target.name!r} has no rendering for {node.op.name}."
            )
        text = fmt.format(*(rendered[s] for s in node.src))
        if node.op is Op.DETACH:
            rendered[node] = text
            continue
        tmp = f"{prefix}{counter}"
        counter += 1
        lines.append(indent + target.decl.format(name=tmp, value=text))
        rendered[node] = tmp
    for out_name, expr in outputs.items():
        lines.append(indent + target.decl.format(name=out_name, value=rendered[expr]))
    return "\n".join(lines)


# -- the torch renderer: the same walk with callables (the eager reference) ------------------------
class _SurrogateHeaviside(torch.autograd.Function):
    """Heaviside forward; the surrogate derivative expression (torch-rendered) in backward."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, surrogate: Any) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.surrogate = surrogate
        return (z >= 0).to(z)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (z,) = ctx.saved_tensors
        from snncompile.dynamics.expr import var

        d = evaluate({"d": ctx.surrogate.derivative(var("z"))}, {"z": z})["d"]
        return grad_out * d, None


def _cmp(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def run(a: Any, b: Any) -> Any:
        out = fn(a, b)
        ref = a if isinstance(a, torch.Tensor) else b
        return out.to(ref.dtype) if isinstance(out, torch.Tensor) else float(out)

    return run


def _t(fn_name: str) -> Callable[[Any], Any]:
    def run(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return getattr(torch, fn_name)(a)
        return getattr(torch, fn_name)(torch.tensor(a, dtype=torch.float32))

    return run


def _minmax(a: Any, b: Any, clamp: str, both: Callable[[Any, Any], Any]) -> Any:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return both(a, b)
    if isinstance(a, torch.Tensor):
        return getattr(a, clamp)(b)
    return getattr(b, clamp)(a)


def _where(c: Any, a: Any, b: Any) -> Any:
    cond = c != 0
    return torch.where(cond, a, b)


TORCH_OPS: dict[Op, Callable[..., Any]] = {
    Op.ADD: lambda a, b: a + b,
    Op.SUB: lambda a, b: a - b,
    Op.MUL: lambda a, b: a * b,
    Op.DIV: lambda a, b: a / b,
    Op.NEG: lambda a: -a,
    Op.MAX: lambda a, b: _minmax(a, b, "clamp_min", torch.maximum),
    Op.MIN: lambda a, b: _minmax(a, b, "clamp_max", torch.minimum),
    Op.LT: _cmp(lambda a, b: a < b),
    Op.LE: _cmp(lambda a, b: a <= b),
    Op.GT: _cmp(lambda a, b: a > b),
    Op.GE: _cmp(lambda a, b: a >= b),
    Op.WHERE: _where,
    Op.EXP: _t("exp"),
    Op.LOG: _t("log"),
    Op.SQRT: _t("sqrt"),
    Op.SIGMOID: _t("sigmoid"),
    Op.TANH: _t("tanh"),
    Op.ATAN: _t("atan"),
    Op.ERF: _t("erf"),
    Op.ERFC: _t("erfc"),
    Op.ABS: _t("abs"),
    Op.HEAVISIDE: lambda a, sg: _SurrogateHeaviside.apply(a, sg),
    Op.DETACH: lambda a: a.detach() if isinstance(a, torch.Tensor) else a,
}


def evaluate(
    outputs: Mapping[str, Expr], env: Mapping[str, Any], ops: Mapping[Op, Callable] = TORCH_OPS
) -> dict[str, Any]:
    """Evaluate ``outputs`` with PyTorch, leaves bound by name in ``env`` (tensors or floats).

    Each distinct node is computed once, in the order and with the operands the expression
    states, so results are bit-identical to the same formula typed in PyTorch.
    """
    values: dict[Expr, Any] = {}
    for node in toposort(outputs.values()):
        if node.op is Op.VAR or node.op is Op.PARAM:
            try:
                values[node] = env[node.arg]
            except KeyError:
                raise KeyError(
                    f"snncompile.codegen.evaluate: no value bound for {node.op.name.lower()} "
                    f"{node.arg!r}; pass it in env."
                ) from None
        elif node.op is Op.CONST:
            values[node] = node.arg
        elif node.op is Op.HEAVISIDE:
            values[node] = ops[Op.HEAVISIDE](values[node.src[0]], node.arg)
        else:
            values[node] = ops[node.op](*(values[s] for s in node.src))
    return {k: values[e] for k, e in outputs.items()}


def used_names(exprs: Iterable[Expr]) -> set[str]:
    """Names of all ``VAR`` and ``PARAM`` leaves in ``exprs``."""
    return {n.arg for n in toposort(exprs) if n.op in (Op.VAR, Op.PARAM)}
