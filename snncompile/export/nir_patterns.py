"""Which NIR neuron a dynamics definition is: a table of dynamics patterns.

NIR describes neurons by a few fixed models (``IF``, ``LIF``, ``CubaLIF``, ...), so the exporter
must recognise a neuron's dynamics as one of them. Instead of switching on a class or a kind
string, :data:`PATTERNS` lists charge expressions with wildcards (:func:`wild`: any number,
bound by name) and :func:`classify` matches a :class:`~snncompile.dynamics.neuron.NeuronDynamics`
against them structurally (same ops, same operand order, the same leaves). A neuron type of any
class whose dynamics are the LIF formula exports as LIF; one that matches no pattern (QIF, an
adaptive threshold, a captured custom charge) is refused with its formula in the message.

Patterns (``v_r``: the reset value the charge leaks to; ``tau``: the time constant)::

    if      h = v + x
    lif     h = v + (x - (v - v_r)) / tau          decay_input = 1
    lif     h = v - (v - v_r) / tau + x            decay_input = 0
    plif    h = v + (x - (v - v_r)) * sigmoid(w)   decay_input = 1   (w: the PLIF parameter)
    plif    h = v - (v - v_r) * sigmoid(w) + x     decay_input = 0
    cubalif h = v * v_decay + (c * c_decay + x),   c <- c * c_decay + x   (one extra state c)
"""

from __future__ import annotations

from dataclasses import dataclass

from snncompile.dynamics.expr import Expr, Op, param, sigmoid, var
from snncompile.dynamics.neuron import NeuronDynamics

_WILD = "?"


def wild(name: str) -> Expr:
    """A pattern leaf that matches any number (a ``CONST``) and binds it to ``name``.

    It is a ``VAR`` whose name no expression can have (``?`` is not an identifier character),
    built directly rather than through :func:`var`, which accepts identifiers only.
    """
    return Expr(Op.VAR, (), _WILD + name)


def match(pattern: Expr, expr: Expr, binds: dict[str, float]) -> bool:
    """Whether ``expr`` has the shape of ``pattern``; wildcards bind into ``binds``."""
    if pattern.op is Op.VAR and str(pattern.arg).startswith(_WILD):
        if expr.op is not Op.CONST:
            return False
        name = pattern.arg[len(_WILD) :]
        if name in binds and binds[name] != expr.arg:
            return False
        binds[name] = float(expr.arg)
        return True
    if pattern.op is not expr.op or len(pattern.src) != len(expr.src):
        return False
    if not pattern.src:
        return pattern.arg == expr.arg
    return all(match(p, e, binds) for p, e in zip(pattern.src, expr.src, strict=True))


@dataclass(frozen=True)
class Pattern:
    """One NIR neuron form: its kind, charge pattern, extra states' update patterns (by name)
    and fixed attributes."""

    kind: str
    charge: Expr
    fixed: tuple[tuple[str, float], ...] = ()
    states: tuple[tuple[str, Expr], ...] = ()


V, X = var("v"), var("x")
_VR, _TAU, _K = wild("v_r"), wild("tau"), sigmoid(param("w"))

PATTERNS: tuple[Pattern, ...] = (
    Pattern("if", V + X),
    Pattern("lif", V + (X - (V - _VR)) / _TAU, (("decay_input", 1.0),)),
    Pattern("lif", V - (V - _VR) / _TAU + X, (("decay_input", 0.0),)),
    Pattern("plif", V + (X - (V - _VR)) * _K, (("decay_input", 1.0),)),
    Pattern("plif", V - (V - _VR) * _K + X, (("decay_input", 0.0),)),
    Pattern(
        "cubalif",
        V * wild("v_decay") + (var("c") * wild("c_decay") + X),
        states=(("c", var("c") * wild("c_decay") + X),),
    ),
)


def classify(d: NeuronDynamics) -> tuple[str, dict[str, float]] | None:
    """``(kind, bound values)`` of the first pattern ``d`` matches, or ``None``.

    Only neurons with a constant threshold and without an output gain have a NIR form here;
    the extra states must be the pattern's (same names, matching updates, initial value 0), and
    the leak target ``v_r`` must be the reset value (as every built-in writes it).
    """
    if d.threshold is not None or d.output_gain is not None:
        return None
    for p in PATTERNS:
        if tuple(s.name for s in d.states) != tuple(n for n, _ in p.states):
            continue
        binds: dict[str, float] = {}
        if not match(p.charge, d.charge, binds):
            continue
        updates = {s.name: s for s in d.states}
        if not all(
            updates[n].init == 0.0 and match(u, updates[n].update, binds) for n, u in p.states
        ):
            continue
        if "v_r" in binds and binds["v_r"] != d.reset_value:
            continue
        return p.kind, {**binds, **dict(p.fixed)}
    return None
