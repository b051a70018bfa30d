"""A tiny expression IR for per-neuron dynamics.

An expression is a tree (a DAG, since equal sub-trees are equal values) of frozen :class:`Expr`
records: one :class:`Op` from a single enum, a tuple of source expressions and one argument (a
variable name, a constant value, or a surrogate for ``HEAVISIDE``). Python operators build trees,
so a LIF charge reads like the formula::

    from snncompile.dynamics.expr import var, const
    v, x = var("v"), var("x")
    h = v + (x - (v - const(0.0))) / const(2.0)

Leaves are :func:`var` (per-neuron values such as the membrane ``v`` or the input ``x``),
:func:`param` (per-call scalars, e.g. a learnable PLIF ``w``) and :func:`const` (numbers baked
into generated code). Constant sub-trees fold in Python double precision, exactly the way a Python
scalar expression folds before PyTorch sees it; everything that touches a variable is computed in
float32 in the order it is written, which is what makes generated kernels bit-exact with PyTorch.

:func:`grad` differentiates symbolically through a derivative table (``_DERIVATIVES``): one rule
per op. ``HEAVISIDE``'s rule is its surrogate's derivative expression and ``DETACH`` stops
gradients, which is how surrogate gradients and ``detach_reset`` enter the backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any

from snncompile.dynamics.names import check_identifier


class Op(Enum):
    """Every operation an expression node can have."""

    VAR = auto()  # per-neuron variable (arg: name)
    PARAM = auto()  # per-call scalar parameter (arg: name)
    CONST = auto()  # number baked into code (arg: float)
    ADD = auto()
    SUB = auto()
    MUL = auto()
    DIV = auto()
    NEG = auto()
    MAX = auto()
    MIN = auto()
    LT = auto()  # comparisons give 1.0 / 0.0 (float), like ``(a < b).to(a)``
    LE = auto()
    GT = auto()
    GE = auto()
    WHERE = auto()  # where(cond != 0, a, b)
    EXP = auto()
    LOG = auto()
    SQRT = auto()
    SIGMOID = auto()
    TANH = auto()
    ATAN = auto()
    ERF = auto()
    ERFC = auto()
    ABS = auto()
    HEAVISIDE = auto()  # 1.0 where src >= 0 (heaviside(0) = 1); arg: the surrogate (gradient)
    DETACH = auto()  # identity forward, zero gradient (stop-gradient)


LEAVES = frozenset({Op.VAR, Op.PARAM, Op.CONST})
BINARY = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.MAX, Op.MIN, Op.LT, Op.LE, Op.GT, Op.GE})
COMPARISONS = frozenset({Op.LT, Op.LE, Op.GT, Op.GE})
UNARY = frozenset(
    {
        Op.NEG,
        Op.EXP,
        Op.LOG,
        Op.SQRT,
        Op.SIGMOID,
        Op.TANH,
        Op.ATAN,
        Op.ERF,
        Op.ERFC,
        Op.ABS,
        Op.HEAVISIDE,
        Op.DETACH,
    }
)

# Python double semantics for folding constant sub-trees (what `alpha / 2` does before torch).
_FOLD: dict[Op, Callable[..., float]] = {
    Op.ADD: lambda a, b: a + b,
    Op.SUB: lambda a, b: a - b,
    Op.MUL: lambda a, b: a * b,
    Op.DIV: lambda a, b: a / b,
    Op.NEG: lambda a: -a,
    Op.MAX: max,
    Op.MIN: min,
    Op.EXP: math.exp,
    Op.LOG: math.log,
    Op.SQRT: math.sqrt,
    Op.ABS: abs,
    Op.TANH: math.tanh,
    Op.ATAN: math.atan,
    Op.ERF: math.erf,
    Op.ERFC: math.erfc,
}


@dataclass(frozen=True)
class Expr:
    """One node: ``op`` applied to ``src`` with argument ``arg``.

    Nodes are immutable and hashable, so equal sub-expressions compare equal and renderers
    emit each distinct node once (common sub-expression elimination for free).
    """

    op: Op
    src: tuple[Expr, ...] = ()
    arg: Any = None

    def __post_init__(self) -> None:
        # Cache the hash: trees share sub-trees, and rehashing them recursively is exponential.
        object.__setattr__(self, "_hash", hash((self.op, self.src, self.arg)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined]

    # -- Python operators build trees -----------------------------------------------------------
    def __add__(self, other: ExprLike) -> Expr:
        return _binary(Op.ADD, self, other)

    def __radd__(self, other: ExprLike) -> Expr:
        return _binary(Op.ADD, other, self)

    def __sub__(self, other: ExprLike) -> Expr:
        return _binary(Op.SUB, self, other)

    def __rsub__(self, other: ExprLike) -> Expr:
        return _binary(Op.SUB, other, self)

    def __mul__(self, other: ExprLike) -> Expr:
        return _binary(Op.MUL, self, other)

    def __rmul__(self, other: ExprLike) -> Expr:
        return _binary(Op.MUL, other, self)

    def __truediv__(self, other: ExprLike) -> Expr:
        return _binary(Op.DIV, self, other)

    def __rtruediv__(self, other: ExprLike) -> Expr:
        return _binary(Op.DIV, other, self)

    def __neg__(self) -> Expr:
        return unary(Op.NEG, self)

    def __lt__(self, other: ExprLike) -> Expr:  # type: ignore[override]
        return _binary(Op.LT, self, other)

    def __le__(self, other: ExprLike) -> Expr:  # type: ignore[override]
        return _binary(Op.LE, self, other)

    def __gt__(self, other: ExprLike) -> Expr:  # type: ignore[override]
        return _binary(Op.GT, self, other)

    def __ge__(self, other: ExprLike) -> Expr:  # type: ignore[override]
        return _binary(Op.GE, self, other)

    def __bool__(self) -> bool:
        raise TypeError(
            "snncompile.dynamics: an expression has no truth value; use where(cond, a, b) "
            "instead of Python `if`/`and`/`or` on expressions."
        )

    # -- helpers -----------------------------------------------------------------------------------
    @property
    def is_const(self) -> bool:
        """True for a ``CONST`` leaf."""
        return self.op is Op.CONST

    def __repr__(self) -> str:
        return to_str(self)


ExprLike = Expr | float | int


def as_expr(value: ExprLike) -> Expr:
    """Wrap a Python number as a ``CONST`` node; pass expressions through."""
    if isinstance(value, Expr):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"snncompile.dynamics: cannot use {value!r} ({type(value).__name__}) in an "
            "expression; use numbers, var(), param() or const()."
        )
    return Expr(Op.CONST, (), float(value))


def var(name: str) -> Expr:
    """A per-neuron variable, e.g. ``var('v')`` (membrane) or ``var('x')`` (input).

    ``name`` must be a C identifier (it is spliced into generated kernels).
    """
    return Expr(Op.VAR, (), check_identifier(name, "var() name"))


def param(name: str) -> Expr:
    """A per-call scalar parameter (a 0-dim tensor at run time), e.g. PLIF's learnable ``w``.

    ``name`` must be a C identifier (it is spliced into generated kernels).
    """
    return Expr(Op.PARAM, (), check_identifier(name, "param() name"))


def const(value: float) -> Expr:
    """A number baked into generated code (folded in double, applied in float32)."""
    return as_expr(float(value))


def _binary(op: Op, a: ExprLike, b: ExprLike) -> Expr:
    a, b = as_expr(a), as_expr(b)
    if a.is_const and b.is_const and op in _FOLD:
        return const(_FOLD[op](a.arg, b.arg))
    return Expr(op, (a, b))


def unary(op: Op, a: ExprLike) -> Expr:
    """Build a unary node (constant operands fold in double precision)."""
    a = as_expr(a)
    if a.is_const and op in _FOLD:
        return const(_FOLD[op](a.arg))
    return Expr(op, (a,))


def exp(a: ExprLike) -> Expr:
    """``exp(a)``."""
    return unary(Op.EXP, a)


def log(a: ExprLike) -> Expr:
    """Natural logarithm."""
    return unary(Op.LOG, a)


def sqrt(a: ExprLike) -> Expr:
    """Square root."""
    return unary(Op.SQRT, a)


def sigmoid(a: ExprLike) -> Expr:
    """``1 / (1 + exp(-a))``."""
    return unary(Op.SIGMOID, a)


def tanh(a: ExprLike) -> Expr:
    """Hyperbolic tangent."""
    return unary(Op.TANH, a)


def atan(a: ExprLike) -> Expr:
    """Arctangent."""
    return unary(Op.ATAN, a)


def erf(a: ExprLike) -> Expr:
    """Gauss error function."""
    return unary(Op.ERF, a)


def erfc(a: ExprLike) -> Expr:
    """Complementary error function ``1 - erf(a)``."""
    return unary(Op.ERFC, a)


def abs_(a: ExprLike) -> Expr:
    """Absolute value."""
    return unary(Op.ABS, a)


def maximum(a: ExprLike, b: ExprLike) -> Expr:
    """Element-wise maximum."""
    return _binary(Op.MAX, a, b)


def minimum(a: ExprLike, b: ExprLike) -> Expr:
    """Element-wise minimum."""
    return _binary(Op.MIN, a, b)


def where(cond: ExprLike, a: ExprLike, b: ExprLike) -> Expr:
    """``a`` where ``cond`` is non-zero, else ``b`` (``cond`` is usually a comparison)."""
    return Expr(Op.WHERE, (as_expr(cond), as_expr(a), as_expr(b)))


def heaviside(a: ExprLike, surrogate: Any) -> Expr:
    """The spike: 1.0 where ``a >= 0``, else 0.0; its gradient is ``surrogate``'s derivative.

    ``surrogate`` is a :class:`snncompile.dynamics.surrogates.SurrogateExpr`.
    """
    return Expr(Op.HEAVISIDE, (as_expr(a),), surrogate)


def detach(a: ExprLike) -> Expr:
    """Identity in the forward pass, no gradient in the backward pass."""
    return unary(Op.DETACH, a)


# -- traversal ------------------------------------------------------------------------------------
def toposort(roots: Iterable[Expr]) -> list[Expr]:
    """Return every node reachable from ``roots``, each after its sources (iterative DFS)."""
    order: list[Expr] = []
    seen: set[Expr] = set()
    for root in roots:
        stack: list[tuple[Expr, bool]] = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if node in seen:
                continue
            seen.add(node)
            stack.append((node, True))
            stack.extend((s, False) for s in reversed(node.src) if s not in seen)
    return order


def free_names(roots: Iterable[Expr], op: Op) -> list[str]:
    """Sorted names of the ``VAR`` (or ``PARAM``) leaves used by ``roots``."""
    return sorted({n.arg for n in toposort(roots) if n.op is op})


def substitute(root: Expr, mapping: dict[Expr, Expr]) -> Expr:
    """Return ``root`` with every node found in ``mapping`` replaced (no refolding)."""
    memo: dict[Expr, Expr] = {}
    for node in toposort([root]):
        if node in mapping:
            memo[node] = mapping[node]
        elif node.src:
            memo[node] = Expr(node.op, tuple(memo[s] for s in node.src), node.arg)
        else:
            memo[node] = node
    return memo[root]


def is_uniform(node: Expr) -> bool:
    """True when ``node`` depends on no per-neuron variable (only params and constants)."""
    return all(n.op is not Op.VAR for n in toposort([node]))


# -- symbolic differentiation ---------------------------------------------------------------------
ZERO = const(0.0)
ONE = const(1.0)


def _is(e: Expr, value: float) -> bool:
    return e.is_const and e.arg == value


def s_add(a: Expr, b: Expr) -> Expr:
    """``a + b`` with ``0 + b = b`` (only used for gradients, where exact IEEE order is moot)."""
    if _is(a, 0.0):
        return b
    if _is(b, 0.0):
        return a
    return a + b


def s_mul(a: Expr, b: Expr) -> Expr:
    """``a * b`` with ``0 * b = 0`` and ``1 * b = b`` (gradient simplification)."""
    if _is(a, 0.0) or _is(b, 0.0):
        return ZERO
    if _is(a, 1.0):
        return b
    if _is(b, 1.0):
        return a
    return a * b


def s_neg(a: Expr) -> Expr:
    """``-a`` with ``-0 = 0``."""
    return ZERO if _is(a, 0.0) else -a


def s_div(a: Expr, b: Expr) -> Expr:
    """``a / b`` with ``0 / b = 0`` and ``a / 1 = a``."""
    if _is(a, 0.0):
        return ZERO
    if _is(b, 1.0):
        return a
    return a / b


# Each rule maps (node, adjoint g) to the adjoints of node.src, in order.
_DERIVATIVES: dict[Op, Callable[[Expr, Expr], tuple[Expr, ...]]] = {
    Op.ADD: lambda n, g: (g, g),
    Op.SUB: lambda n, g: (g, s_neg(g)),
    Op.MUL: lambda n, g: (s_mul(g, n.src[1]), s_mul(g, n.src[0])),
    Op.DIV: lambda n, g: (
        s_div(g, n.src[1]),
        s_neg(s_div(s_mul(g, n.src[0]), s_mul(n.src[1], n.src[1]))),
    ),
    Op.NEG: lambda n, g: (s_neg(g),),
    Op.MAX: lambda n, g: (
        s_mul(g, n.src[0] >= n.src[1]),
        s_mul(g, n.src[0] < n.src[1]),
    ),
    Op.MIN: lambda n, g: (
        s_mul(g, n.src[0] <= n.src[1]),
        s_mul(g, n.src[0] > n.src[1]),
    ),
    Op.LT: lambda n, g: (ZERO, ZERO),
    Op.LE: lambda n, g: (ZERO, ZERO),
    Op.GT: lambda n, g: (ZERO, ZERO),
    Op.GE: lambda n, g: (ZERO, ZERO),
    Op.WHERE: lambda n, g: (ZERO, where(n.src[0], g, ZERO), where(n.src[0], ZERO, g)),
    Op.EXP: lambda n, g: (s_mul(g, n),),
    Op.LOG: lambda n, g: (s_div(g, n.src[0]),),
    Op.SQRT: lambda n, g: (s_div(g, 2.0 * n),),
    Op.SIGMOID: lambda n, g: (s_mul(g, n * (1.0 - n)),),
    Op.TANH: lambda n, g: (s_mul(g, 1.0 - n * n),),
    Op.ATAN: lambda n, g: (s_div(g, 1.0 + n.src[0] * n.src[0]),),
    Op.ERF: lambda n, g: (s_mul(g, (2.0 / math.sqrt(math.pi)) * exp(-(n.src[0] * n.src[0]))),),
    Op.ERFC: lambda n, g: (s_mul(g, (-2.0 / math.sqrt(math.pi)) * exp(-(n.src[0] * n.src[0]))),),
    Op.ABS: lambda n, g: (s_mul(g, where(n.src[0] >= 0.0, ONE, const(-1.0))),),
    # The surrogate gradient: heaviside's derivative is the surrogate's g'(x).
    Op.HEAVISIDE: lambda n, g: (s_mul(g, n.arg.derivative(n.src[0])),),
    Op.DETACH: lambda n, g: (ZERO,),
}


def grad(outputs: dict[Expr, Expr], wrt: Iterable[Expr]) -> dict[Expr, Expr]:
    """Reverse-mode symbolic differentiation.

    ``outputs`` maps each output expression to its incoming adjoint (seed) expression; the result
    maps each node in ``wrt`` to the expression of its total adjoint (``ZERO`` when it does not
    influence any output).
    """
    adj: dict[Expr, Expr] = {}
    for out, seed in outputs.items():
        adj[out] = s_add(adj.get(out, ZERO), seed)
    for node in reversed(toposort(outputs)):
        g = adj.get(node)
        if g is None or _is(g, 0.0) or node.op in LEAVES:
            continue
        rule = _DERIVATIVES.get(node.op)
        if rule is None:  # pragma: no cover - every op has a rule
            raise NotImplementedError(f"snncompile.dynamics: no derivative rule for {node.op}")
        for src, g_src in zip(node.src, rule(node, g), strict=True):
            if not _is(g_src, 0.0):
                adj[src] = s_add(adj.get(src, ZERO), g_src)
    return {w: adj.get(w, ZERO) for w in wrt}


# -- printing -------------------------------------------------------------------------------------
_INFIX = {
    Op.ADD: "+",
    Op.SUB: "-",
    Op.MUL: "*",
    Op.DIV: "/",
    Op.LT: "<",
    Op.LE: "<=",
    Op.GT: ">",
    Op.GE: ">=",
}


def to_str(e: Expr) -> str:
    """A readable infix form (used in reprs and error messages)."""
    if e.op is Op.VAR or e.op is Op.PARAM:
        return str(e.arg)
    if e.op is Op.CONST:
        return repr(e.arg)
    if e.op in _INFIX:
        return f"({to_str(e.src[0])} {_INFIX[e.op]} {to_str(e.src[1])})"
    if e.op is Op.NEG:
        return f"-{to_str(e.src[0])}"
    if e.op is Op.HEAVISIDE:
        return f"heaviside[{e.arg}]({to_str(e.src[0])})"
    return f"{e.op.name.lower()}({', '.join(to_str(s) for s in e.src)})"
