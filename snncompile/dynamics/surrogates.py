"""Surrogate gradients as expressions.

Each surrogate with a fused-kernel form is registered here in :data:`SURROGATE_EXPRESSIONS`,
under an *expression name* (``'ATan'``), as a pair of builders ``(primitive(x, *params),
derivative(x, *params))`` that return :class:`~snncompile.dynamics.expr.Expr` trees. The formulas
are the ones :mod:`snncompile.surrogate` (and SpikingJelly 2.0.0) compute, written in the same
arithmetic order, so a kernel's surrogate gradient agrees with the PyTorch one to float rounding.
Python-scalar sub-expressions such as ``alpha / 2`` fold in double precision exactly as they do
before PyTorch sees them.

Surrogate *modules* are matched to expression forms by **class identity**, never by class name:
``snncompile.surrogate.ATan`` and ``spikingjelly.activation_based.surrogate.ATan`` (registered
lazily, once SpikingJelly has been imported) are the ATan form; a user's own ``class ATan`` or a
subclass of ours, which may compute another gradient, has no form and runs as written (the
reason comes from :func:`unfusable_reason`). :func:`register_surrogate` adds a form and, with
``surrogate_class=``, the class that computes it.

A :class:`SurrogateExpr` is the hashable record a ``HEAVISIDE`` node carries: the expression
name and the parameter values (finite floats). :func:`surrogate_expr` builds one from a surrogate
module instance.
"""

from __future__ import annotations

import math
import sys
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


#: ``expression name -> (primitive builder, derivative builder)``; builders take ``(x, *params)``.
#: The names are the IR's names for the expression forms; surrogate *modules* are matched to them
#: by class identity (:func:`register_surrogate_class`), never by their class name.
SURROGATE_EXPRESSIONS: dict[str, tuple[Builder, Builder]] = {
    "Sigmoid": (_sigmoid_prim, _sigmoid_grad),
    "ATan": (_atan_prim, _atan_grad),
    "PiecewiseQuadratic": (_pq_prim, _pq_grad),
    "PiecewiseExp": (_pe_prim, _pe_grad),
    "SoftSign": (_softsign_prim, _softsign_grad),
    "SuperSpike": (_superspike_prim, _superspike_grad),
    "Erf": (_erf_prim, _erf_grad),
}

#: Default ``alpha`` of each built-in expression form (SpikingJelly's defaults).
DEFAULT_ALPHA: dict[str, float] = {
    "Sigmoid": 4.0,
    "ATan": 2.0,
    "PiecewiseQuadratic": 1.0,
    "PiecewiseExp": 1.0,
    "SoftSign": 2.0,
    "SuperSpike": 1.0,
    "Erf": 2.0,
}

# The forms that snncompile.surrogate and SpikingJelly both define under these class names.
_BUILTIN_FORMS = tuple(SURROGATE_EXPRESSIONS)

#: The module that defines SpikingJelly 2.0.0's surrogate classes.
SPIKINGJELLY_SURROGATE_MODULE = "spikingjelly.activation_based.surrogate"

# surrogate class (by identity) -> (expression name, names of the attributes holding its params).
_CLASSES: dict[type, tuple[str, tuple[str, ...]]] = {}
_loaded: set[str] = set()


def _load_builtin_classes() -> None:
    """Register snncompile's own classes, and SpikingJelly's once its module has been imported.

    SpikingJelly is never imported here: an instance of one of its classes can only exist once
    its module is in ``sys.modules``, so looking there at lookup time is enough.
    """
    if "snncompile" not in _loaded:
        from snncompile import surrogate as ours

        for name in _BUILTIN_FORMS:
            cls = getattr(ours, name, None)
            if isinstance(cls, type):
                _CLASSES.setdefault(cls, (name, ("alpha",)))
        _loaded.add("snncompile")
    if "spikingjelly" not in _loaded:
        sj = sys.modules.get(SPIKINGJELLY_SURROGATE_MODULE)
        if sj is not None:
            # The same formulas in the same arithmetic order (tests/test_dynamics.py checks them
            # against SpikingJelly's own backward).
            for name in _BUILTIN_FORMS:
                cls = getattr(sj, name, None)
                if isinstance(cls, type):
                    _CLASSES.setdefault(cls, (name, ("alpha",)))
            _loaded.add("spikingjelly")


def register_surrogate_class(
    surrogate_class: type, name: str, param_names: tuple[str, ...] = ("alpha",)
) -> None:
    """Declare that instances of exactly ``surrogate_class`` compute the expression form ``name``.

    ``param_names`` are the instance attributes that hold the form's parameters, in the order
    its builders take them. Matching is by class identity: subclasses are not covered (they may
    override the gradient) and must be registered themselves.
    """
    if not isinstance(surrogate_class, type):
        raise TypeError(
            f"register_surrogate_class: expected a class, got {type(surrogate_class).__name__}"
        )
    if name not in SURROGATE_EXPRESSIONS:
        raise ValueError(
            f"register_surrogate_class: no expression form named {name!r}; register one first "
            f"with register_surrogate() (known: {sorted(SURROGATE_EXPRESSIONS)})"
        )
    _CLASSES[surrogate_class] = (name, tuple(str(p) for p in param_names))


def register_surrogate(
    name: str,
    primitive: Builder,
    derivative: Builder,
    surrogate_class: type | None = None,
    param_names: tuple[str, ...] = ("alpha",),
) -> None:
    """Register the expression form ``name`` of a surrogate, optionally for a surrogate class.

    ``primitive(x, *params)`` and ``derivative(x, *params)`` build expressions in ``x``. With
    ``surrogate_class`` (see :func:`register_surrogate_class`), neurons whose surrogate is an
    instance of exactly that class get fused kernels; ``param_names`` name the attributes that
    hold its parameters. A class is never matched by its name. ``name`` must be a C identifier
    (it appears in generated kernel source).
    """
    check_identifier(name, "surrogate name")
    old = SURROGATE_EXPRESSIONS.get(name)
    if old is not None and old != (primitive, derivative):
        raise ValueError(
            f"register_surrogate: an expression form named {name!r} exists already with other "
            "builders; pick another name (kernels and caches identify a form by its name)"
        )
    SURROGATE_EXPRESSIONS[name] = (primitive, derivative)
    if surrogate_class is not None:
        register_surrogate_class(surrogate_class, name, param_names)


def registered_form(surrogate_class: type) -> tuple[str, tuple[str, ...]] | None:
    """``(expression name, parameter attribute names)`` registered for exactly this class."""
    _load_builtin_classes()
    return _CLASSES.get(surrogate_class)


@dataclass(frozen=True)
class SurrogateExpr:
    """An expression form by name and parameters; what a ``HEAVISIDE`` node carries."""

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


def _describe(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_surrogate(surrogate: Any) -> tuple[SurrogateExpr | None, str | None]:
    """``(form, None)`` for a surrogate module with an expression form, else ``(None, why)``."""
    if isinstance(surrogate, SurrogateExpr):
        return surrogate, None
    cls = type(surrogate)
    entry = registered_form(cls)
    if entry is None:
        known = sorted({n for n, _ in _CLASSES.values()})
        if cls.__name__ in SURROGATE_EXPRESSIONS:
            return None, (
                f"surrogate {_describe(cls)} is not snncompile's or SpikingJelly's "
                f"{cls.__name__} (another class with that name, or a subclass); surrogates are "
                "matched by class identity, not by name. To fuse it, register its gradient with "
                "snncompile.dynamics.register_surrogate(..., surrogate_class=...)"
            )
        return None, (
            f"surrogate {_describe(cls)} has no expression form; fused kernels support the "
            f"surrogate classes {known} of snncompile.surrogate (and SpikingJelly's). Use "
            f"backend='torch' for {cls.__name__}, or register its gradient with "
            "snncompile.dynamics.register_surrogate(..., surrogate_class=...)"
        )
    name, param_names = entry
    values = []
    for pname in param_names:
        p = getattr(surrogate, pname, None)
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            return None, (
                f"surrogate {cls.__name__} parameter {pname}={p!r} is not a Python number; "
                "fused kernels bake surrogate parameters into code. Use backend='torch'"
            )
        if not math.isfinite(float(p)):
            return None, (
                f"surrogate {cls.__name__} parameter {pname}={p!r} is not finite; fused kernels "
                "need finite surrogate parameters"
            )
        values.append(float(p))
    return SurrogateExpr(name, tuple(values)), None


def unfusable_reason(surrogate: Any) -> str | None:
    """Why ``surrogate`` (a module) has no expression form, or ``None`` when it has one."""
    if isinstance(surrogate, SurrogateExpr):
        return None
    return resolve_surrogate(surrogate)[1]


def surrogate_expr(surrogate: Any) -> SurrogateExpr:
    """Build a :class:`SurrogateExpr` from a surrogate module (ours or SpikingJelly's).

    The module's class must be registered *by identity* (snncompile's and SpikingJelly's
    Sigmoid, ATan, PiecewiseQuadratic, PiecewiseExp, SoftSign, SuperSpike and Erf are; others
    through :func:`register_surrogate`); its parameters must be finite Python numbers. Raises
    ``ValueError`` saying why otherwise (e.g. a user class that merely shares a built-in's name).
    """
    if isinstance(surrogate, SurrogateExpr):
        return surrogate
    expr, why = resolve_surrogate(surrogate)
    if expr is None:
        raise ValueError(f"snncompile.dynamics: {why}.")
    return expr
