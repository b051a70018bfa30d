"""Surrogate gradients as expressions.

Each surrogate of :mod:`snncompile.surrogate` with a fused-kernel form is registered here in
:data:`SURROGATE_EXPRESSIONS`, keyed by its class name, as a pair of builders
``(primitive(x, *params), derivative(x, *params))`` that return :class:`~snncompile.dynamics.expr.
Expr` trees. The formulas are the ones :mod:`snncompile.surrogate` (and SpikingJelly 2.0.0)
compute, written in the same arithmetic order, so a kernel's surrogate gradient agrees with the
PyTorch one to float rounding. Python-scalar sub-expressions such as ``alpha / 2`` fold in double
precision exactly as they do before PyTorch sees them.

A :class:`SurrogateExpr` is the hashable record a ``HEAVISIDE`` node carries: the class name and
the parameter values. :func:`surrogate_expr` builds one from a surrogate module instance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from snncompile.dynamics.expr import (
    Expr,
    abs_,
    atan,
    erfc,
    exp,
    maximum,
    sigmoid,
    where,
)
from snncompile.dynamics.names import check_identifier

Builder = Callable[..., Expr]


def _sigmoid_prim(x: Expr, alpha: float) -> Expr:
    return sigmoid(x * alpha)


def _sigmoid_grad(x: Expr, alpha: float) -> Expr:
    s = sigmoid(alpha * x)
    return (1.0 - s) * s * alpha


def _atan_prim(x: Expr, alpha: float) -> Expr:
    return atan(math.pi / 2 * alpha * x) / math.pi + 0.5


def _atan_grad(x: Expr, alpha: float) -> Expr:
    z = x * (math.pi / 2 * alpha)
    return (alpha / 2) / (1.0 + z * z)


def _pq_prim(x: Expr, alpha: float) -> Expr:
    a = abs_(x)
    inner = -(alpha**2) / 2 * x * a + alpha * x + 0.5
    return where(x > 1.0 / alpha, 1.0, where(a <= 1.0 / alpha, inner, 0.0))


def _pq_grad(x: Expr, alpha: float) -> Expr:
    return maximum(alpha - alpha * alpha * abs_(x), 0.0)


def _pe_prim(x: Expr, alpha: float) -> Expr:
    return where(x >= 0.0, 1.0 - exp(-alpha * x) / 2.0, exp(alpha * x) / 2.0)


def _pe_grad(x: Expr, alpha: float) -> Expr:
    return (alpha / 2) * exp(-alpha * abs_(x))


def _softsign_prim(x: Expr, alpha: float) -> Expr:
    z = x * alpha
    return (z / (1.0 + abs_(z)) + 1.0) / 2.0


def _softsign_grad(x: Expr, alpha: float) -> Expr:
    z = 1 / alpha + abs_(x)
    return 1.0 / (2 * alpha * z * z)


def _superspike_prim(x: Expr, alpha: float) -> Expr:
    return alpha * x / (1.0 + abs_(x)) + 0.5


def _superspike_grad(x: Expr, alpha: float) -> Expr:
    z = 1.0 + abs_(x)
    return alpha / (z * z)


def _erf_prim(x: Expr, alpha: float) -> Expr:
    return erfc(-alpha * x) / 2.0


def _erf_grad(x: Expr, alpha: float) -> Expr:
    z = alpha * x
    return (alpha / math.sqrt(math.pi)) * exp(-z * z)


#: ``class name -> (primitive builder, derivative builder)``; builders take ``(x, *params)``.
SURROGATE_EXPRESSIONS: dict[str, tuple[Builder, Builder]] = {
    "Sigmoid": (_sigmoid_prim, _sigmoid_grad),
    "ATan": (_atan_prim, _atan_grad),
    "PiecewiseQuadratic": (_pq_prim, _pq_grad),
    "PiecewiseExp": (_pe_prim, _pe_grad),
    "SoftSign": (_softsign_prim, _softsign_grad),
    "SuperSpike": (_superspike_prim, _superspike_grad),
    "Erf": (_erf_prim, _erf_grad),
}

#: Default ``alpha`` of each registered surrogate (SpikingJelly's defaults).
DEFAULT_ALPHA: dict[str, float] = {
    "Sigmoid": 4.0,
    "ATan": 2.0,
    "PiecewiseQuadratic": 1.0,
    "PiecewiseExp": 1.0,
    "SoftSign": 2.0,
    "SuperSpike": 1.0,
    "Erf": 2.0,
}


def register_surrogate(name: str, primitive: Builder, derivative: Builder) -> None:
    """Register the expression form of a surrogate class called ``name``.

    ``primitive(x, *params)`` and ``derivative(x, *params)`` build expressions in ``x``. After
    registration neurons using that surrogate class get fused kernels. ``name`` must be a C
    identifier (it appears in generated kernel source).
    """
    check_identifier(name, "surrogate name")
    SURROGATE_EXPRESSIONS[name] = (primitive, derivative)


@dataclass(frozen=True)
class SurrogateExpr:
    """A surrogate by class name and parameters; what a ``HEAVISIDE`` node carries."""

    name: str
    params: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.name not in SURROGATE_EXPRESSIONS:
            raise ValueError(
                f"snncompile.dynamics: surrogate {self.name!r} has no expression form; fused "
                f"kernels support {sorted(SURROGATE_EXPRESSIONS)}. Use backend='torch' or "
                "register one with snncompile.dynamics.surrogates.register_surrogate()."
            )

    def primitive(self, x: Expr) -> Expr:
        """The smooth step ``g(x)`` as an expression."""
        return SURROGATE_EXPRESSIONS[self.name][0](x, *self.params)

    def derivative(self, x: Expr) -> Expr:
        """The surrogate gradient ``g'(x)`` as an expression (heaviside's derivative)."""
        return SURROGATE_EXPRESSIONS[self.name][1](x, *self.params)

    def __str__(self) -> str:
        return f"{self.name}({', '.join(repr(p) for p in self.params)})"


def surrogate_expr(surrogate: Any) -> SurrogateExpr:
    """Build a :class:`SurrogateExpr` from a surrogate module (ours or SpikingJelly's).

    Raises ``ValueError`` naming the class when it has no registered expression form.
    """
    if isinstance(surrogate, SurrogateExpr):
        return surrogate
    name = type(surrogate).__name__
    if name not in SURROGATE_EXPRESSIONS:
        raise ValueError(
            f"snncompile.dynamics: surrogate {name} has no expression form; fused kernels "
            f"support {sorted(SURROGATE_EXPRESSIONS)}. Use backend='torch' for {name}."
        )
    params = getattr(surrogate, "params", None)
    if params is None:
        params = (getattr(surrogate, "alpha", DEFAULT_ALPHA[name]),)
    values = []
    for p in params:
        if not isinstance(p, (int, float)) or isinstance(p, bool):
            raise ValueError(
                f"snncompile.dynamics: surrogate {name} parameter {p!r} is not a Python number; "
                "fused kernels bake surrogate parameters into code. Use backend='torch'."
            )
        values.append(float(p))
    return SurrogateExpr(name, tuple(values))
