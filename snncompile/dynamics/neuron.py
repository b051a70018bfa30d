"""Neuron dynamics defined once, as expressions: charge, fire, reset, and the derived backward.

A :class:`NeuronDynamics` is a charge expression ``H(v, x, params)`` in the variables ``v``
(membrane potential after the previous step's reset) and ``x`` (this step's input), plus the
threshold, the reset (hard to ``v_reset`` or soft when ``v_reset is None``), ``detach_reset`` and a
surrogate. One step is, with SpikingJelly's operation order::

    h = H(v, x)
    s = heaviside(h - v_threshold)                  # surrogate gradient in backward
    out = s * G if output_gain else s               # what the neuron emits (G: output_gain)
    r = detach(s) if detach_reset else s
    v = r * v_reset + (1.0 - r) * h                 # hard reset
    v = h - r * v_threshold                         # soft reset

:meth:`NeuronDynamics.step_program` turns that into a :class:`StepProgram`: the forward step with
sub-expressions that depend only on parameters hoisted into per-call *uniforms* (computed once in
PyTorch, e.g. PLIF's ``sigmoid(w)``, or an output gain), and the backward step derived by
:func:`~snncompile.dynamics.expr.grad`: given the saved ``h`` and the incoming gradients of the
emitted (possibly scaled) spike (``gs``) and of
the next membrane potential (``gv``), it gives the gradients of the input (``gx``), of the previous
membrane potential (``gv_prev``) and of each uniform. When a gradient needs the previous ``v``
(a non-linear charge), the program recomputes it from the previous step's saved ``h``, so only
``h`` is ever stored.

Built-in constructors follow SpikingJelly 2.0.0 formulas exactly: :func:`if_dynamics`,
:func:`lif_dynamics`, :func:`plif_dynamics`; :func:`from_spec` maps a ``NeuronSpec``. A new
neuron is just a new charge expression, e.g. a quadratic integrate-and-fire neuron::

    from snncompile.dynamics import NeuronDynamics, var
    v, x = var("v"), var("x")
    qif = NeuronDynamics("qif", v + (x + 0.5 * (v - 0.0) * (v - 0.8)) / 2.0, v_threshold=1.0,
                         v_reset=0.0, surrogate=SurrogateExpr("ATan", (2.0,)))
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

from snncompile.dynamics.expr import (
    ONE,
    Expr,
    Op,
    const,
    detach,
    free_names,
    grad,
    heaviside,
    is_uniform,
    param,
    sigmoid,
    substitute,
    to_str,
    toposort,
    var,
)
from snncompile.dynamics.names import check_identifier
from snncompile.dynamics.surrogates import SurrogateExpr, surrogate_expr

V = var("v")
X = var("x")
H = var("h")  # the saved pre-reset membrane potential, a leaf in the backward step
GS = var("gs")  # incoming gradient of the spike
GV = var("gv")  # incoming gradient of the post-reset membrane potential
H_PREV = var("h_prev")  # previous step's saved h (to recompute v when a gradient needs it)
STATE_VARS = ("v", "x")


@dataclass(frozen=True)
class StepProgram:
    """The per-neuron forward and backward step of one neuron configuration, as expressions.

    Forward: ``h``, ``spike`` (what the neuron emits: the Heaviside spike, times the output gain
    when the neuron has one) and ``v_next`` (reset with the unscaled spike) in the variables
    ``v``, ``x``, ``h`` and the uniform parameters ``u0, u1, ...``. Backward: ``grad_x``,
    ``grad_v`` (of the previous ``v``) and ``grad_uniforms`` in ``h``, ``gs``, ``gv`` (and ``v``,
    ``x`` when the gradient needs them); ``v_from_h_prev`` recomputes ``v`` from the previous
    step's ``h``.
    """

    h: Expr
    spike: Expr
    v_next: Expr
    uniforms: tuple[Expr, ...]  # expressions over PARAMs, evaluated once per call in PyTorch
    grad_x: Expr
    grad_v: Expr
    grad_uniforms: tuple[Expr, ...]
    v_from_h_prev: Expr
    backward_needs: tuple[str, ...]  # subset of ('v', 'x') the backward reads

    @property
    def num_uniforms(self) -> int:
        """How many per-call uniform scalars the kernels take."""
        return len(self.uniforms)


@dataclass(frozen=True)
class NeuronDynamics:
    """A neuron model: charge expression, threshold, reset, surrogate.

    ``charge`` may use ``var('v')``, ``var('x')``, :func:`~snncompile.dynamics.expr.param`
    leaves (per-call scalars, e.g. a learnable parameter; values are passed at call time) and
    numbers. ``v_reset=None`` selects the soft reset. With ``spiking=False`` the neuron emits the
    surrogate's smooth primitive instead of the Heaviside step.

    ``output_gain`` (optional) is a parameter-only expression, e.g. ``param('out_gain')``: the
    neuron emits ``spike * output_gain`` (one float32 multiply after the fire) while the reset
    still uses the unscaled spike. With an input gain in the charge (``v + x * param('in_gain')``)
    this is how a ``scale -> neuron -> scale`` chain becomes one kernel
    (:mod:`snncompile.passes.fuse_elementwise`).
    """

    name: str
    charge: Expr
    v_threshold: float = 1.0
    v_reset: float | None = 0.0
    surrogate: SurrogateExpr = field(default_factory=lambda: SurrogateExpr("Sigmoid", (4.0,)))
    detach_reset: bool = False
    spiking: bool = True
    output_gain: Expr | None = None

    def __post_init__(self) -> None:
        check_identifier(self.name, "neuron dynamics name", part=True)
        if not isinstance(self.charge, Expr):
            raise TypeError(
                f"NeuronDynamics {self.name!r}: charge must be an expression built from "
                f"var('v'), var('x'), param(...) and numbers, got {type(self.charge).__name__}."
            )
        bad = [n for n in free_names([self.charge], Op.VAR) if n not in STATE_VARS]
        if bad:
            raise ValueError(
                f"NeuronDynamics {self.name!r}: the charge uses unknown variables {bad}; only "
                "var('v') (membrane) and var('x') (input) exist. Use param(name) for scalars."
            )
        if any(n.op is Op.HEAVISIDE for n in toposort([self.charge])):
            raise ValueError(
                f"NeuronDynamics {self.name!r}: the charge must not contain heaviside(); firing "
                "is added by the neuron (v_threshold, surrogate)."
            )
        gain = self.output_gain
        if gain is not None and (not isinstance(gain, Expr) or not is_uniform(gain)):
            raise ValueError(
                f"NeuronDynamics {self.name!r}: output_gain must be an expression of param(...) "
                f"leaves and numbers only (e.g. param('out_gain')), got {gain!r}; per-neuron "
                "gains are not supported."
            )
        if gain is not None and any(n.op is Op.HEAVISIDE for n in toposort([gain])):
            raise ValueError(
                f"NeuronDynamics {self.name!r}: output_gain must not contain heaviside()."
            )
        object.__setattr__(self, "surrogate", surrogate_expr(self.surrogate))

    @property
    def _roots(self) -> list[Expr]:
        return [self.charge] if self.output_gain is None else [self.charge, self.output_gain]

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the per-call parameters the charge and the output gain use, sorted."""
        return tuple(free_names(self._roots, Op.PARAM))

    @property
    def reset_value(self) -> float:
        """``v_reset``, or 0.0 for the soft reset (what the charge's ``v - v_r`` uses)."""
        return 0.0 if self.v_reset is None else float(self.v_reset)

    # -- the step ------------------------------------------------------------------------------
    def fire(self, h: Expr) -> Expr:
        """The spike expression for pre-reset potential ``h``."""
        z = h - const(self.v_threshold)
        return heaviside(z, self.surrogate) if self.spiking else self.surrogate.primitive(z)

    def emit(self, spike: Expr, gain: Expr | None = None) -> Expr:
        """What the neuron outputs for ``spike``: ``spike * gain`` with an output gain."""
        gain = self.output_gain if gain is None else gain
        return spike if gain is None else spike * gain

    def reset(self, h: Expr, spike: Expr) -> Expr:
        """The post-reset potential for pre-reset ``h`` and ``spike``."""
        r = detach(spike) if self.detach_reset else spike
        if self.v_reset is None:
            return h - r * const(self.v_threshold)
        return r * const(self.v_reset) + (ONE - r) * h

    def step_program(self) -> StepProgram:
        """Build (and cache) the forward/backward :class:`StepProgram` of this neuron."""
        cached = self.__dict__.get("_program")
        if cached is not None:
            return cached
        program = _build_program(self)
        object.__setattr__(self, "_program", program)
        return program

    def key(self) -> str:
        """A short stable hash of the definition (names generated kernels)."""
        cached = self.__dict__.get("_key")
        if cached is not None:
            return cached
        text = "|".join(
            [
                self.name,
                to_str(self.charge),
                repr(float(self.v_threshold)),
                repr(self.v_reset),
                str(self.surrogate),
                str(self.detach_reset),
                str(self.spiking),
                "" if self.output_gain is None else to_str(self.output_gain),
            ]
        )
        key = hashlib.sha256(text.encode()).hexdigest()[:16]
        object.__setattr__(self, "_key", key)
        return key

    def describe(self) -> str:
        """A one-line human-readable form."""
        reset = "soft" if self.v_reset is None else f"hard({self.v_reset})"
        gain = "" if self.output_gain is None else f"; emit s * {to_str(self.output_gain)}"
        return (
            f"{self.name}: h = {to_str(self.charge)}; fire h >= {self.v_threshold} "
            f"[{self.surrogate}]{gain}; reset {reset}; detach_reset={self.detach_reset}"
        )


def _hoist_uniforms(*roots: Expr) -> tuple[tuple[Expr, ...], tuple[Expr, ...]]:
    """Replace maximal parameter-only sub-trees that contain a PARAM by ``u0, u1, ...``.

    Returns the rewritten ``roots`` and the uniforms; the roots share one numbering (a sub-tree
    used by several roots is one uniform).
    """
    uniforms: list[Expr] = []
    mapping: dict[Expr, Expr] = {}

    def visit(node: Expr) -> None:
        if node in mapping or node.op is Op.CONST:
            return
        if node.op is not Op.VAR and is_uniform(node):
            mapping[node] = param(f"u{len(uniforms)}")
            uniforms.append(node)
            return
        for s in node.src:
            visit(s)

    for root in roots:
        visit(root)
    return tuple(substitute(r, mapping) for r in roots), tuple(uniforms)


def _build_program(d: NeuronDynamics) -> StepProgram:
    (charge, *rest), uniforms = _hoist_uniforms(*d._roots)
    gain = rest[0] if rest else None
    u_leaves = tuple(param(f"u{i}") for i in range(len(uniforms)))
    spike = d.fire(charge)
    v_next = d.reset(charge, spike)
    # The incoming spike gradient is that of what the neuron emits (the scaled spike).
    adj = grad({d.emit(spike, gain): GS, v_next: GV}, [X, V, *u_leaves])
    # The backward reads the saved h instead of recomputing the charge.
    to_h = {charge: H}
    grad_x = substitute(adj[X], to_h)
    grad_v = substitute(adj[V], to_h)
    grad_u = tuple(substitute(adj[u], to_h) for u in u_leaves)
    needs = tuple(n for n in free_names([grad_x, grad_v, *grad_u], Op.VAR) if n in STATE_VARS)
    # Forward expressions in terms of the leaf h (the kernels compute h once, then fire/reset).
    spike_h = d.fire(H)
    v_next_h = d.reset(H, spike_h)
    return StepProgram(
        h=charge,
        spike=d.emit(spike_h, gain),
        v_next=v_next_h,
        uniforms=uniforms,
        grad_x=grad_x,
        grad_v=grad_v,
        grad_uniforms=grad_u,
        v_from_h_prev=substitute(v_next_h, {H: H_PREV}),
        backward_needs=needs,
    )


# -- built-in neurons (SpikingJelly 2.0.0 formulas, same operation order) --------------------------
def if_dynamics(
    v_threshold: float = 1.0,
    v_reset: float | None = 0.0,
    surrogate: Any = None,
    detach_reset: bool = False,
) -> NeuronDynamics:
    """Integrate-and-fire: ``h = v + x``."""
    return NeuronDynamics(
        "if", V + X, float(v_threshold), _reset(v_reset), _sg(surrogate), bool(detach_reset)
    )


def lif_dynamics(
    tau: float = 2.0,
    decay_input: bool = True,
    v_threshold: float = 1.0,
    v_reset: float | None = 0.0,
    surrogate: Any = None,
    detach_reset: bool = False,
) -> NeuronDynamics:
    """Leaky integrate-and-fire: ``h = v + (x - (v - v_r)) / tau`` (decay_input) or
    ``h = v - (v - v_r) / tau + x``, with ``v_r = v_reset`` or 0 for the soft reset."""
    vr = const(0.0 if v_reset is None else float(v_reset))
    t = const(float(tau))
    charge = V + (X - (V - vr)) / t if decay_input else V - (V - vr) / t + X
    return NeuronDynamics(
        "lif", charge, float(v_threshold), _reset(v_reset), _sg(surrogate), bool(detach_reset)
    )


def plif_dynamics(
    decay_input: bool = True,
    v_threshold: float = 1.0,
    v_reset: float | None = 0.0,
    surrogate: Any = None,
    detach_reset: bool = False,
) -> NeuronDynamics:
    """Parametric LIF: LIF with ``1/tau`` replaced by ``sigmoid(w)`` (``w`` a per-call parameter):
    ``h = v + (x - (v - v_r)) * sigmoid(w)`` or ``h = v - (v - v_r) * sigmoid(w) + x``."""
    vr = const(0.0 if v_reset is None else float(v_reset))
    q = sigmoid(param("w"))
    charge = V + (X - (V - vr)) * q if decay_input else V - (V - vr) * q + X
    return NeuronDynamics(
        "plif", charge, float(v_threshold), _reset(v_reset), _sg(surrogate), bool(detach_reset)
    )


def _reset(v_reset: float | None) -> float | None:
    return None if v_reset is None else float(v_reset)


def _sg(surrogate: Any) -> SurrogateExpr:
    return SurrogateExpr("Sigmoid", (4.0,)) if surrogate is None else surrogate_expr(surrogate)


def from_spec(spec: Any) -> NeuronDynamics:
    """Build dynamics from a ``NeuronSpec``-like record (``snncompile.neuron``'s
    ``dynamics_spec()``): fields ``kind`` ('if' | 'lif' | 'plif'), ``v_threshold``, ``v_reset``,
    ``tau``, ``decay_input``, ``detach_reset``, ``surrogate`` (a surrogate module)."""
    kind = spec.kind
    common = dict(
        v_threshold=spec.v_threshold,
        v_reset=spec.v_reset,
        surrogate=spec.surrogate,
        detach_reset=spec.detach_reset,
    )
    if kind == "if":
        d = if_dynamics(**common)
    elif kind == "lif":
        d = lif_dynamics(tau=spec.tau, decay_input=spec.decay_input, **common)
    elif kind == "plif":
        d = plif_dynamics(decay_input=spec.decay_input, **common)
    else:
        raise ValueError(
            f"snncompile.dynamics.from_spec: unknown neuron kind {kind!r}; expected 'if', "
            "'lif' or 'plif'."
        )
    if not getattr(spec.surrogate, "spiking", True):
        d = dataclasses.replace(d, spiking=False)
    return d
