"""Neuron dynamics defined once, as expressions: charge, fire, reset, state updates, backward.

A :class:`NeuronDynamics` is a charge expression ``H(v, x, states, params)`` in the membrane ``v``
(after the previous step's reset), this step's input ``x`` and any extra per-neuron states
(:class:`State`: an adaptation current ``w``, a synaptic current ``c``, an adaptive-threshold
trace ``a``), plus the threshold (a number, or an expression of the extra states and
parameters), the reset (hard to ``v_reset`` or soft when ``v_reset is None``), ``detach_reset``
and a surrogate. One step is, with SpikingJelly's operation order::

    h = H(v, x, states)
    theta = v_threshold                             # or threshold(states)
    s = heaviside(h - theta)                        # surrogate gradient in backward
    out = s * G if output_gain else s               # what the neuron emits (G: output_gain)
    r = detach(s) if detach_reset else s
    v = r * v_reset + (1.0 - r) * h                 # hard reset
    v = h - r * theta                               # soft reset
    state_k = update_k(x, v_prev, states_prev, h, spike)   # each extra state, from pre-step values

The state updates may read ``var('h')`` (the charged membrane) and ``var('spike')`` (the
unscaled spike, not detached: write ``detach(var('spike'))`` for that) besides ``x`` and the
pre-step states, so the charge and the updates together describe multi-state neurons such as
Izhikevich (``w``) or current-based LIF (``c``).

:meth:`NeuronDynamics.step_program` turns that into a :class:`StepProgram`: the forward step with
sub-expressions that depend only on parameters hoisted into per-call *uniforms* (computed once in
PyTorch, e.g. PLIF's ``sigmoid(w)``, or an output gain), and the backward step (BPTT over every
state) derived by :func:`~snncompile.dynamics.expr.grad`: given the saved ``h`` and the incoming
gradients of the emitted (possibly scaled) spike (``gs``), of the next membrane (``gv``) and of
each next extra state (``g_<name>``), it gives the gradients of the input (``gx``), of every
previous state (``gv_prev``, ``g_<name>_prev``) and of each uniform. What the backward saves is
the least it needs: ``h`` always; the pre-step value of an extra state only when a gradient (or
the recomputation of ``v``) reads it. When a gradient needs the previous ``v`` (a non-linear
charge), the program recomputes it from the previous step's saved ``h``.

Built-in constructors follow SpikingJelly 2.0.0 formulas exactly: :func:`if_dynamics`,
:func:`lif_dynamics`, :func:`plif_dynamics`; neuron classes define theirs next to the class
(``snncompile.neuron``, ``snncompile.neurons``). A new neuron is just new expressions, e.g. a
quadratic integrate-and-fire neuron::

    from snncompile.dynamics import NeuronDynamics, var
    v, x = var("v"), var("x")
    qif = NeuronDynamics("qif", v + (x + 0.5 * (v - 0.0) * (v - 0.8)) / 2.0, v_threshold=1.0,
                         v_reset=0.0, surrogate=SurrogateExpr("ATan", (2.0,)))
"""

from __future__ import annotations

import dataclasses
import hashlib
import keyword
import re
from dataclasses import dataclass, field
from typing import Any

from snncompile.dynamics.expr import (
    ONE,
    ZERO,
    Expr,
    Op,
    const,
    detach,
    free_names,
    grad,
    heaviside,
    is_uniform,
    param,
    s_add,
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
SPIKE = var("spike")  # the unscaled spike, readable by the extra states' updates
GS = var("gs")  # incoming gradient of the spike
GV = var("gv")  # incoming gradient of the post-reset membrane potential
H_PREV = var("h_prev")  # previous step's saved h (to recompute v when a gradient needs it)
#: The variables every neuron has (the membrane and the input); extra states add their names.
STATE_VARS = ("v", "x")
#: Names the generated kernels use for their own locals; extra states may not take them.
RESERVED_NAMES = frozenset(
    {
        "v", "x", "h", "s", "spike", "v_next", "h_prev", "v_rec", "gs", "gv", "gx", "gv_prev",
        "j", "t", "n", "b", "n0", "nb", "off", "T", "N", "xt", "st", "ht", "carry", "uniforms",
        "v_state", "x_seq", "v_init", "h_seq", "v_seq", "v_last", "spike_seq", "num_threads",
        "n_blocks", "grad_spike_seq", "grad_v_seq", "grad_v_last", "grad_x_seq", "grad_v_init",
        "grad_uniforms", "expf", "logf", "sqrtf", "fabsf", "fmaxf", "fminf",
    }
)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GENERATED = re.compile(r"^([cfbru]\d+|gu\d+|gu_acc\d+|g_.*|st_.*|sv_.*|.*_next|.*_prev)$")


def g_var(name: str) -> Expr:
    """The incoming-gradient leaf of an extra state's next value (``g_<name>``)."""
    return var(f"g_{name}")


def prev_var(name: str) -> Expr:
    """An extra state's pre-step value one step earlier (``<name>_prev``, for recomputing v)."""
    return var(f"{name}_prev")


@dataclass(frozen=True)
class State:
    """An extra per-neuron state: its name, initial value and next-value expression.

    ``update`` may use ``var('x')``, ``var('v')`` and every state (their values before this
    step), ``var('h')`` (this step's charged membrane), ``var('spike')`` (this step's unscaled
    spike) and ``param(...)`` leaves. ``init`` is the value a fresh neuron starts from.
    """

    name: str
    init: float
    update: Expr


def _check_state_name(owner: str, name: str) -> None:
    if not isinstance(name, str) or not _IDENT.match(name) or keyword.iskeyword(name):
        raise ValueError(
            f"NeuronDynamics {owner!r}: state name {name!r} is not an identifier; use letters, "
            "digits and underscores (e.g. 'w', 'a', 'i_syn')."
        )
    if name in RESERVED_NAMES or _GENERATED.match(name):
        raise ValueError(
            f"NeuronDynamics {owner!r}: state name {name!r} is used by the generated kernels "
            "(or looks like one of their temporaries); pick another name, e.g. 'w' or 'adapt'."
        )


@dataclass(frozen=True)
class StepProgram:
    """The per-neuron forward and backward step of one neuron configuration, as expressions.

    Forward: ``h``, ``spike`` (what the neuron emits: the Heaviside spike, times the output gain
    when the neuron has one), ``v_next`` (reset with the unscaled spike) and ``state_next`` (one
    per extra state) in the variables ``v``, ``x``, the extra states, ``h`` and the uniform
    parameters ``u0, u1, ...``. Backward: ``grad_x``, ``grad_v`` (of the previous ``v``),
    ``grad_states`` (of each previous extra state) and ``grad_uniforms`` in ``h``, ``gs``,
    ``gv``, ``g_<state>`` (and the forward variables listed in ``backward_needs``);
    ``v_from_h_prev`` recomputes ``v`` from the previous step's ``h`` (and ``<state>_prev``).
    ``saved_states`` are the extra states whose pre-step values the forward saves beside ``h``.
    """

    h: Expr
    spike: Expr
    v_next: Expr
    uniforms: tuple[Expr, ...]  # expressions over PARAMs, evaluated once per call in PyTorch
    grad_x: Expr
    grad_v: Expr
    grad_uniforms: tuple[Expr, ...]
    v_from_h_prev: Expr
    backward_needs: tuple[str, ...]  # subset of ('v', 'x', *extra states) the backward reads
    state_names: tuple[str, ...] = ("v",)  # 'v' first, then the extra states in order
    state_inits: tuple[float, ...] = (0.0,)
    state_next: tuple[Expr, ...] = ()  # next value of each extra state
    grad_states: tuple[Expr, ...] = ()  # gradient of each previous extra state
    saved_states: tuple[str, ...] = ()  # extra states whose pre-step values are saved

    @property
    def num_uniforms(self) -> int:
        """How many per-call uniform scalars the kernels take."""
        return len(self.uniforms)

    @property
    def num_states(self) -> int:
        """How many per-neuron states (``v`` and the extra ones) the kernels carry."""
        return len(self.state_names)

    @property
    def extra_states(self) -> tuple[str, ...]:
        """The states beside ``v``."""
        return self.state_names[1:]

    @property
    def num_saved(self) -> int:
        """Sequences saved for backward: ``h`` plus one per saved extra state."""
        return 1 + len(self.saved_states)


@dataclass(frozen=True)
class NeuronDynamics:
    """A neuron model: charge, threshold, reset, extra states and surrogate.

    ``charge`` may use ``var('v')``, ``var('x')``, the extra states' ``var(name)``,
    :func:`~snncompile.dynamics.expr.param` leaves (per-call scalars, e.g. a learnable
    parameter; values are passed at call time) and numbers. ``v_reset=None`` selects the soft
    reset. With ``spiking=False`` the neuron emits the surrogate's smooth primitive instead of
    the Heaviside step.

    ``states`` are the extra per-neuron states (:class:`State`), ``threshold`` an optional
    expression of the extra states and parameters that replaces the constant ``v_threshold``
    (an adaptive threshold; the soft reset then subtracts it).

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
    states: tuple[State, ...] = ()
    threshold: Expr | None = None

    def __post_init__(self) -> None:
        check_identifier(self.name, "neuron dynamics name", part=True)
        if not isinstance(self.charge, Expr):
            raise TypeError(
                f"NeuronDynamics {self.name!r}: charge must be an expression built from "
                f"var('v'), var('x'), param(...) and numbers, got {type(self.charge).__name__}."
            )
        object.__setattr__(self, "states", tuple(self.states))
        names = [s.name for s in self.states]
        for s in self.states:
            if not isinstance(s, State):
                raise TypeError(
                    f"NeuronDynamics {self.name!r}: states must be State records, got {s!r}."
                )
            _check_state_name(self.name, s.name)
            if not isinstance(s.update, Expr):
                raise TypeError(
                    f"NeuronDynamics {self.name!r}: the update of state {s.name!r} must be an "
                    f"expression, got {type(s.update).__name__}."
                )
        if len(set(names)) != len(names):
            raise ValueError(f"NeuronDynamics {self.name!r}: duplicate state names {names}.")
        known = set(STATE_VARS) | set(names)
        self._check_vars("the charge", [self.charge], known)
        for s in self.states:
            self._check_vars(f"the update of state {s.name!r}", [s.update], known | {"h", "spike"})
        if self.threshold is not None:
            if not isinstance(self.threshold, Expr):
                object.__setattr__(self, "threshold", const(float(self.threshold)))
            self._check_vars("the threshold", [self.threshold], set(names))
        if any(n.op is Op.HEAVISIDE for n in toposort(self._dyn_roots)):
            raise ValueError(
                f"NeuronDynamics {self.name!r}: the charge, threshold and state updates must not "
                "contain heaviside(); firing is added by the neuron (v_threshold, surrogate); "
                "updates read the spike as var('spike')."
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

    def _check_vars(self, what: str, roots: list[Expr], known: set[str]) -> None:
        bad = [n for n in free_names(roots, Op.VAR) if n not in known]
        if bad:
            raise ValueError(
                f"NeuronDynamics {self.name!r}: {what} uses unknown variables {bad}; it may use "
                f"{sorted(known)}. Use param(name) for scalars, or declare a State."
            )

    @property
    def _dyn_roots(self) -> list[Expr]:
        roots = [self.charge, *(s.update for s in self.states)]
        return roots if self.threshold is None else [*roots, self.threshold]

    @property
    def _roots(self) -> list[Expr]:
        gain = [] if self.output_gain is None else [self.output_gain]
        return [*self._dyn_roots, *gain]

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the per-call parameters the expressions and the output gain use, sorted."""
        cached = self.__dict__.get("_param_names")
        if cached is None:
            cached = tuple(free_names(self._roots, Op.PARAM))
            object.__setattr__(self, "_param_names", cached)
        return cached

    @property
    def state_names(self) -> tuple[str, ...]:
        """``('v', *extra states)``: the per-neuron states, in kernel order."""
        return ("v", *(s.name for s in self.states))

    @property
    def reset_value(self) -> float:
        """``v_reset``, or 0.0 for the soft reset (what the charge's ``v - v_r`` uses)."""
        return 0.0 if self.v_reset is None else float(self.v_reset)

    @property
    def initial_states(self) -> dict[str, float]:
        """The default initial value of every state (``v``: the reset value)."""
        return {"v": self.reset_value, **{s.name: float(s.init) for s in self.states}}

    # -- the step ------------------------------------------------------------------------------
    def theta(self, threshold: Expr | None = None) -> Expr:
        """The firing threshold as an expression (the constant, or the adaptive expression)."""
        thr = self.threshold if threshold is None else threshold
        return const(self.v_threshold) if thr is None else thr

    def fire(self, h: Expr, threshold: Expr | None = None) -> Expr:
        """The spike expression for pre-reset potential ``h``."""
        z = h - self.theta(threshold)
        return heaviside(z, self.surrogate) if self.spiking else self.surrogate.primitive(z)

    def emit(self, spike: Expr, gain: Expr | None = None) -> Expr:
        """What the neuron outputs for ``spike``: ``spike * gain`` with an output gain."""
        gain = self.output_gain if gain is None else gain
        return spike if gain is None else spike * gain

    def reset(self, h: Expr, spike: Expr, threshold: Expr | None = None) -> Expr:
        """The post-reset potential for pre-reset ``h`` and ``spike``."""
        r = detach(spike) if self.detach_reset else spike
        if self.v_reset is None:
            return h - r * self.theta(threshold)
        return r * const(self.v_reset) + (ONE - r) * h

    def step_program(self) -> StepProgram:
        """Build (and cache) the forward/backward :class:`StepProgram` of this neuron."""
        cached = self.__dict__.get("_program")
        if cached is not None:
            return cached
        # Equal definitions (e.g. rebuilt by a module after a configuration change) share one
        # program: building it (symbolic backward) costs about a millisecond.
        program = _PROGRAMS.get(self)
        if program is None:
            program = _PROGRAMS.setdefault(self, _build_program(self))
        object.__setattr__(self, "_program", program)
        return program

    def key(self) -> str:
        """A short stable hash of the definition (names generated kernels)."""
        cached = self.__dict__.get("_key") or _KEYS.get(self)
        if cached is not None:
            object.__setattr__(self, "_key", cached)
            return cached
        parts = [
            self.name,
            to_str(self.charge),
            repr(float(self.v_threshold)),
            repr(self.v_reset),
            str(self.surrogate),
            str(self.detach_reset),
            str(self.spiking),
            "" if self.output_gain is None else to_str(self.output_gain),
        ]
        if self.states or self.threshold is not None:
            parts += [f"{s.name}={s.init!r}:{to_str(s.update)}" for s in self.states]
            parts.append("" if self.threshold is None else to_str(self.threshold))
        key = _KEYS.setdefault(self, hashlib.sha256("|".join(parts).encode()).hexdigest()[:16])
        object.__setattr__(self, "_key", key)
        return key

    def describe(self) -> str:
        """A one-line human-readable form."""
        reset = "soft" if self.v_reset is None else f"hard({self.v_reset})"
        gain = "" if self.output_gain is None else f"; emit s * {to_str(self.output_gain)}"
        thr = self.v_threshold if self.threshold is None else to_str(self.threshold)
        states = "".join(f"; {s.name} <- {to_str(s.update)}" for s in self.states)
        return (
            f"{self.name}: h = {to_str(self.charge)}; fire h >= {thr} "
            f"[{self.surrogate}]{gain}; reset {reset}; detach_reset={self.detach_reset}{states}"
        )


_PROGRAMS: dict[NeuronDynamics, StepProgram] = {}
_KEYS: dict[NeuronDynamics, str] = {}


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
    n_up = len(d.states)
    roots = [d.charge, *(s.update for s in d.states), d.theta()]
    if d.output_gain is not None:
        roots.append(d.output_gain)
    rewritten, uniforms = _hoist_uniforms(*roots)
    charge = rewritten[0]
    updates = rewritten[1 : 1 + n_up]
    thr = rewritten[1 + n_up]
    gain = rewritten[2 + n_up] if d.output_gain is not None else None
    u_leaves = tuple(param(f"u{i}") for i in range(len(uniforms)))
    extra = tuple(var(s.name) for s in d.states)
    spike = d.fire(charge, thr)
    v_next = d.reset(charge, spike, thr)
    to_full = {H: charge, SPIKE: spike}
    nexts = [substitute(u, to_full) for u in updates]
    # The incoming spike gradient is that of what the neuron emits (the scaled spike); equal
    # outputs (a state whose update is the spike itself) add their seeds.
    seeds: dict[Expr, Expr] = {}
    for out, seed in [
        (d.emit(spike, gain), GS),
        (v_next, GV),
        *zip(nexts, (g_var(s.name) for s in d.states), strict=True),
    ]:
        seeds[out] = s_add(seeds.get(out, ZERO), seed)
    adj = grad(seeds, [X, V, *extra, *u_leaves])
    # The backward reads the saved h instead of recomputing the charge.
    to_h = {charge: H}
    grad_x = substitute(adj[X], to_h)
    grad_v = substitute(adj[V], to_h)
    grad_s = tuple(substitute(adj[e], to_h) for e in extra)
    grad_u = tuple(substitute(adj[u], to_h) for u in u_leaves)
    known = {"x", "v", *(s.name for s in d.states)}
    needs = [n for n in free_names([grad_x, grad_v, *grad_s, *grad_u], Op.VAR) if n in known]
    # Forward expressions in terms of the leaf h (the kernels compute h once, then fire/reset).
    spike_h = d.fire(H, thr)
    v_next_h = d.reset(H, spike_h, thr)
    state_next = tuple(substitute(u, {SPIKE: spike_h}) for u in updates)
    to_prev = {H: H_PREV, **{e: prev_var(e.arg) for e in extra}}
    v_rec = substitute(v_next_h, to_prev)
    saved = set(n for n in needs if n not in ("x", "v"))
    if "v" in needs:
        saved |= {n[: -len("_prev")] for n in free_names([v_rec], Op.VAR) if n.endswith("_prev")}
        saved.discard("h")
    return StepProgram(
        h=charge,
        spike=d.emit(spike_h, gain),
        v_next=v_next_h,
        uniforms=uniforms,
        grad_x=grad_x,
        grad_v=grad_v,
        grad_uniforms=grad_u,
        v_from_h_prev=v_rec,
        backward_needs=tuple(needs),
        state_names=d.state_names,
        state_inits=tuple(d.initial_states.values()),
        state_next=state_next,
        grad_states=grad_s,
        saved_states=tuple(s.name for s in d.states if s.name in saved),
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


#: ``NeuronSpec.kind -> builder(spec, common keyword arguments)``: the compatibility path for
#: records that carry a kind string (SpikingJelly modules the frontend did not rebuild). Neuron
#: classes define their dynamics themselves (``BaseNode.define_dynamics``).
SPEC_BUILDERS: dict[str, Any] = {
    "if": lambda spec, common: if_dynamics(**common),
    "lif": lambda spec, common: lif_dynamics(tau=spec.tau, decay_input=spec.decay_input, **common),
    "plif": lambda spec, common: plif_dynamics(decay_input=spec.decay_input, **common),
}


def from_spec(spec: Any) -> NeuronDynamics:
    """Build dynamics from a ``NeuronSpec``-like record (fields ``kind`` (a key of
    :data:`SPEC_BUILDERS`), ``v_threshold``, ``v_reset``, ``tau``, ``decay_input``,
    ``detach_reset``, ``surrogate`` (a surrogate module)). Kept for compatibility: neurons
    define their dynamics next to their class."""
    builder = SPEC_BUILDERS.get(spec.kind)
    if builder is None:
        raise ValueError(
            f"snncompile.dynamics.from_spec: unknown neuron kind {spec.kind!r}; expected one of "
            f"{sorted(SPEC_BUILDERS)} (neuron classes define their own dynamics instead)."
        )
    common = dict(
        v_threshold=spec.v_threshold,
        v_reset=spec.v_reset,
        surrogate=spec.surrogate,
        detach_reset=spec.detach_reset,
    )
    d = builder(spec, common)
    if not getattr(spec.surrogate, "spiking", True):
        d = dataclasses.replace(d, spiking=False)
    return d
