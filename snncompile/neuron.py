r"""Spiking neurons with SpikingJelly 2.0.0 semantics: :class:`IFNode`, :class:`LIFNode`,
:class:`ParametricLIFNode` and their base :class:`BaseNode`.

One time step is *charge -> fire -> reset* on the membrane potential ``v`` (``v_r`` is
``v_reset``, or 0 for soft reset, ``v_reset=None``):

* charge ``H``:

  - IF: ``H = V + X``
  - LIF, ``decay_input=True``: ``H = V + (X - (V - v_r)) / tau``;
    ``decay_input=False``: ``H = V - (V - v_r) / tau + X``
  - ParametricLIF: as LIF with ``1/tau`` replaced by ``k = sigmoid(w)``
    (``H = V + (X - (V - v_r)) * k``), ``w`` a learnable scalar initialised to
    ``-log(init_tau - 1)``
* fire: ``S = surrogate(H - v_threshold)``: Heaviside forward (fires at ``H >= v_threshold``),
  the surrogate's gradient backward;
* reset (``S`` detached first when ``detach_reset``): hard ``V = S * v_reset + (1 - S) * H``,
  soft ``V = H - S * v_threshold``.

The expressions are written in exactly SpikingJelly's operation order, so spikes and ``v`` are
bit-identical to SpikingJelly's on float32 and gradients agree to float rounding.

State: ``v`` is registered as the float ``v_reset`` (0.0 for soft reset) and becomes a tensor of
the input's shape, dtype and device on the first step (:meth:`BaseNode.v_float_to_tensor`);
``reset()`` restores the float. Like SpikingJelly, the state is kept in the *input's dtype*
(float16 inputs give a float16 ``v`` on the ``'torch'`` backend). A stored ``v`` whose shape no
longer matches the input is an error here (SpikingJelly silently re-initialises it): call
``functional.reset_net(net)`` between samples of different shape.

Backends: ``backend`` is validated against the class-level ``supported_backends`` (``('torch',)``
here) and used by :meth:`BaseNode.multi_step_forward`, the single dispatch point; the single-step
path is always plain torch (fusion only pays over many steps). Fused implementations are added
with :meth:`BaseNode.register_backend`. Compilers read a node's configuration through
:meth:`BaseNode.dynamics_spec` (a :class:`NeuronSpec`).

Constructor arguments follow SpikingJelly 2.0.0's order (which has no ``backend``); ``backend``
is therefore keyword-only and last, so positional SpikingJelly 2.0.0 calls keep working.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from snncompile import surrogate
from snncompile.base import MemoryModule, check_multi_step_input
from snncompile.codegen.eager import EagerStep, eager_step
from snncompile.dynamics.expr import var
from snncompile.dynamics.neuron import (
    NeuronDynamics,
    if_dynamics,
    lif_dynamics,
    plif_dynamics,
)
from snncompile.dynamics.surrogates import SurrogateExpr, surrogate_expr

__all__ = ["NeuronSpec", "BaseNode", "IFNode", "LIFNode", "ParametricLIFNode"]

# The signature default, like SpikingJelly's; each node replaces it by its own fresh copy so
# that switching one node's surrogate (e.g. set_spiking_mode) never affects another node.
_DEFAULT_SURROGATE = surrogate.Sigmoid()
#: Attributes a neuron writes while running (not configuration): setting them keeps its cached
#: dynamics.
_RUNTIME_ATTRS = frozenset({"v_seq", "training", "_backend", "_store_v_seq"})
#: What a neuron caches about its definition (dropped on configuration changes and pickling).
_CACHES = ("_eager_cache", "_dyn_cache", "_captured")


def _defining_class(cls: type) -> type:
    """The class in ``cls``'s MRO that defines its dynamics (BaseNode at the latest)."""
    return next(c for c in cls.__mro__ if "define_dynamics" in c.__dict__)


# The eager forward calls the node's own surrogate module; the expressions it compiles need a
# surrogate record only to be well-formed.
_EAGER_SURROGATE = SurrogateExpr("Sigmoid", (4.0,))


@dataclass(frozen=True)
class NeuronSpec:
    """A neuron's dynamics configuration, for compilers and exporters.

    ``kind`` is ``'if'``, ``'lif'`` or ``'plif'``; ``v_reset`` is ``None`` for soft reset;
    ``tau`` is the LIF time constant (``None`` for IF and PLIF, whose decay is
    ``sigmoid(w)`` with the learnable parameter ``w``); ``decay_input`` is ``False`` for IF;
    ``surrogate`` is the node's surrogate module (read ``surrogate.params`` and use
    ``type(surrogate).derivative``); ``w`` is the PLIF parameter itself (not compared).
    ``v_init`` is the initial membrane potential (the value ``reset()`` restores) when it
    differs from the reset value, e.g. ``v_threshold / 2`` for ann2snn's
    ``HalfThresholdIFNode``; ``None`` means the usual start, ``v_reset`` (or 0.0 for soft
    reset). It does not change the dynamics, only the initial state.
    """

    kind: Literal["if", "lif", "plif"]
    v_threshold: float
    v_reset: float | None
    tau: float | None
    decay_input: bool
    detach_reset: bool
    surrogate: nn.Module = field(compare=False)
    w: torch.Tensor | None = field(default=None, compare=False)
    v_init: float | None = None

    @property
    def initial_v(self) -> float:
        """The membrane potential a fresh (or reset) neuron starts from."""
        if self.v_init is not None:
            return self.v_init
        return 0.0 if self.v_reset is None else self.v_reset


def _as_float(owner: str, name: str, value: object, allow_none: bool = False) -> float | None:
    """Return ``value`` as a float, or raise a TypeError naming the node and argument."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        expected = "a real number or None (soft reset)" if allow_none else "a real number"
        raise TypeError(f"{owner}: {name} must be {expected}, got {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value!r}.")
    return value


class BaseNode(MemoryModule):
    """Base class of the spiking neurons: state handling, fire, reset and the step loops.

    Subclasses implement :meth:`neuronal_charge` (``self.v`` becomes ``H``) and
    :meth:`dynamics_spec`. ``forward`` runs one step on ``[N, *]`` input in ``step_mode='s'``
    and a whole sequence ``[T, N, *]`` in ``step_mode='m'``; with ``store_v_seq=True`` the
    membrane after reset of every step is kept in ``self.v_seq`` (``[T, N, *]``).
    """

    #: The backends this class can run; :meth:`register_backend` extends it.
    supported_backends: ClassVar[tuple[str, ...]] = ("torch",)
    #: Multi-step implementations of the non-'torch' backends: ``impl(node, x_seq) -> spikes``.
    _backend_impls: ClassVar[dict[str, Callable[[BaseNode, torch.Tensor], torch.Tensor]]] = {}
    #: Availability checks run when a backend is chosen: ``check(owner)`` raises if it cannot run.
    _backend_checks: ClassVar[dict[str, Callable[[str], None]]] = {}
    #: Other libraries' backend names -> the supported backend they correspond to (error hints).
    backend_aliases: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        surrogate_function: nn.Module = _DEFAULT_SURROGATE,
        detach_reset: bool = False,
        step_mode: str = "s",
        store_v_seq: bool = False,
        *,
        backend: str = "torch",
    ) -> None:
        owner = type(self).__name__
        v_threshold = _as_float(owner, "v_threshold", v_threshold)
        v_reset = _as_float(owner, "v_reset", v_reset, allow_none=True)
        if not isinstance(detach_reset, bool):
            raise TypeError(f"{owner}: detach_reset must be a bool, got {detach_reset!r}.")
        if isinstance(store_v_seq, str):
            raise TypeError(
                f"{owner}: store_v_seq must be a bool, got {store_v_seq!r}. backend is "
                f"keyword-only here (SpikingJelly 2.0.0 argument order): pass "
                f"backend={store_v_seq!r}."
            )
        if not isinstance(store_v_seq, bool):
            raise TypeError(f"{owner}: store_v_seq must be a bool, got {store_v_seq!r}.")
        if surrogate_function is _DEFAULT_SURROGATE:
            surrogate_function = surrogate.Sigmoid()
        if not callable(surrogate_function):
            raise TypeError(
                f"{owner}: surrogate_function must be a callable module such as "
                f"snncompile.surrogate.Sigmoid(), got {surrogate_function!r}."
            )
        super().__init__(step_mode=step_mode)
        self.register_memory("v", 0.0 if v_reset is None else v_reset)
        self.v_threshold = v_threshold
        self.v_reset = v_reset
        self.detach_reset = detach_reset
        self.surrogate_function = surrogate_function
        self.backend = backend
        self.store_v_seq = store_v_seq

    # -- configuration --------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The implementation of the multi-step loop (one of ``supported_backends``)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in self.supported_backends:
            hint = self.backend_aliases.get(value) if isinstance(value, str) else None
            raise ValueError(
                f"{type(self).__name__}: unknown backend {value!r}; supported backends are "
                f"{self.supported_backends}."
                + (f" Did you mean backend={hint!r}?" if hint in self.supported_backends else "")
            )
        check = self._backend_checks.get(value)
        if check is not None:
            check(type(self).__name__)
        self._backend = value

    @classmethod
    def register_backend(
        cls,
        name: str,
        impl: Callable[[BaseNode, torch.Tensor], torch.Tensor],
        check: Callable[[str], None] | None = None,
    ) -> None:
        """Make ``backend=name`` available on ``cls`` and its subclasses.

        ``impl(node, x_seq)`` runs a whole ``[T, N, *]`` sequence for ``node`` and returns the
        spikes; like :meth:`_multi_step_torch` it must leave the final membrane in ``node.v``
        (matched to the input with ``node.v_float_to_tensor`` first) and set ``node.v_seq``
        when ``node.store_v_seq``. It may fall back to ``node._multi_step_torch(x_seq)``.
        Registering on :class:`BaseNode` reaches every subclass that has not registered
        backends of its own. ``check(owner)``, if given, runs whenever a node chooses this
        backend (construction, ``node.backend = name``) and raises when it cannot run on this
        machine (e.g. ``'cuda'`` without a GPU), naming ``owner`` (the node's class name).
        """
        if name == "torch":
            raise ValueError(f"{cls.__name__}: the 'torch' backend is built in.")
        if name not in cls.supported_backends:
            cls.supported_backends = (*cls.supported_backends, name)
        cls._backend_impls = {**cls._backend_impls, name: impl}
        checks = {k: v for k, v in cls._backend_checks.items() if k != name}
        cls._backend_checks = {**checks, name: check} if check is not None else checks

    @property
    def store_v_seq(self) -> bool:
        """Whether the per-step membrane (after reset) is kept in ``self.v_seq``."""
        return self._store_v_seq

    @store_v_seq.setter
    def store_v_seq(self, value: bool) -> None:
        self._store_v_seq = value
        self.v_seq: torch.Tensor | None = None

    def dynamics_spec(self) -> NeuronSpec:
        """Return this node's dynamics configuration as a :class:`NeuronSpec` (IF, LIF and PLIF;
        kept for compatibility -- everything else reads :meth:`neuron_dynamics`)."""
        raise NotImplementedError(f"{type(self).__name__} has no NeuronSpec; use neuron_dynamics()")

    # -- the one definition of the dynamics -----------------------------------------------------
    #: The SpikingJelly 2.0.0 class (in ``spikingjelly.activation_based.neuron``) this class is
    #: equivalent to: same name, constructor arguments and spikes. ``optimize`` rebuilds such
    #: SpikingJelly modules as this class (arguments copied by name) and fuses them.
    spikingjelly_name: ClassVar[str | None] = None
    #: Every neuron class with its own :meth:`define_dynamics`, by name (filled on definition).
    registry: ClassVar[dict[str, type[BaseNode]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "define_dynamics" in cls.__dict__:
            BaseNode.registry[cls.__name__] = cls

    def define_dynamics(self, surrogate: SurrogateExpr) -> NeuronDynamics:
        """This neuron type's dynamics for the node's configuration, with ``surrogate``.

        The one definition of the neuron: its charge, extra states (initial value, update),
        threshold and reset as expressions (:class:`snncompile.dynamics.NeuronDynamics`). The
        eager forward, the fused kernels and their backward, ONNX, NIR and the frontend all read
        it. Subclasses define it next to their class; ``surrogate`` is filled in by
        :meth:`neuron_dynamics` (the eager forward calls the node's surrogate module instead).

        The base definition has no charge of its own (``h = v``): a subclass either defines its
        dynamics or overrides :meth:`neuronal_charge`, whose elementwise torch code is then
        captured into this form (:mod:`snncompile.dynamics.capture`) to be fused and exported.
        """
        return NeuronDynamics(
            "base", var("v"), self.v_threshold, self.v_reset, surrogate, self.detach_reset
        )

    def neuron_dynamics(self) -> NeuronDynamics:
        """The node's :class:`~snncompile.dynamics.NeuronDynamics` with its own surrogate.

        Raises ``ValueError`` when the surrogate has no expression form (it then runs eagerly
        only). Cached: setting an attribute of the node (``node.tau = 3.0``) or changing its
        surrogate's parameters rebuilds it.
        """
        sg = self.surrogate_function
        key = (id(sg), getattr(sg, "alpha", None), getattr(sg, "spiking", True))
        cached = self.__dict__.get("_dyn_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        d = self.define_dynamics(surrogate_expr(sg))
        if not getattr(sg, "spiking", True):
            d = dataclasses.replace(d, spiking=False)
        self.__dict__["_dyn_cache"] = (key, d)
        return d

    def _eager(self) -> EagerStep | None:
        """The compiled eager step of the node's dynamics, or None for a class that overrides
        ``neuronal_charge`` without defining its dynamics (cached until an attribute changes)."""
        d = self.__dict__
        if "_eager_cache" in d:
            return d["_eager_cache"]
        # The eager step reads a constant threshold from the node at call time, so it may be a
        # per-neuron tensor (functional.set_threshold_margin); the definition needs a number.
        thr = d.get("v_threshold")
        if isinstance(thr, torch.Tensor):
            d["v_threshold"] = 1.0
        try:
            step: EagerStep | None = eager_step(self.define_dynamics(_EAGER_SURROGATE))
        except NotImplementedError:
            step = None
        finally:
            if isinstance(thr, torch.Tensor):
                d["v_threshold"] = thr
        d["_eager_cache"] = step
        return step

    def __setattr__(self, name: str, value: object) -> None:
        memories = self.__dict__.get("_memories")
        if memories is not None and name in memories:
            memories[name] = value  # state writes (every step) keep the caches
            return
        if name not in _RUNTIME_ATTRS:
            # A configuration change (tau, v_threshold, surrogate_function, ...): rebuild lazily.
            for key in _CACHES:
                self.__dict__.pop(key, None)
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, object]:
        # The caches hold generated functions (not picklable); copies rebuild them lazily.
        return {k: v for k, v in self.__dict__.items() if k not in _CACHES}

    # -- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Restore ``v`` to its initial float value and forget ``v_seq``."""
        super().reset()
        self.v_seq = None

    def detach(self) -> None:
        """Cut ``v`` (and ``v_seq``) from the autograd graph (truncated BPTT).

        The state is replaced by a detached alias rather than detached in place, so a tensor the
        caller passed in as initial state (e.g. a leaf with ``requires_grad``) is left intact.
        """
        for name, value in list(self.named_memories()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.detach())
        if isinstance(self.v_seq, torch.Tensor):
            self.v_seq = self.v_seq.detach()

    def v_float_to_tensor(self, x: torch.Tensor) -> None:
        """Make ``self.v`` a tensor shaped like ``x`` (broadcasting a float state).

        A tensor state keeps its values and follows ``x``'s dtype and device; a tensor state of
        another shape is an error (the network was not reset between inputs of different shape).
        """
        for name in ("v", *self._extra_state_names()):
            self._state_to_tensor(name, x)

    def _extra_state_names(self) -> tuple[str, ...]:
        """The extra states of the dynamics (besides ``v``), memories of this module."""
        step = self._eager()
        return () if step is None else step.extra_states

    def _state_to_tensor(self, name: str, x: torch.Tensor) -> None:
        v = getattr(self, name)
        if not isinstance(v, torch.Tensor):
            setattr(self, name, torch.full_like(x.detach(), v))
            return
        if v.shape != x.shape:
            what = "membrane v" if name == "v" else f"state {name}"
            raise RuntimeError(
                f"{type(self).__name__}: the stored {what} has shape {tuple(v.shape)} but "
                f"the input step has shape {tuple(x.shape)}. The state belongs to a previous "
                f"input: call functional.reset_net(net) (or node.reset()) between samples of "
                f"different shape."
            )
        if v.dtype != x.dtype or v.device != x.device:
            setattr(self, name, v.to(dtype=x.dtype, device=x.device))

    # -- one step: charge -> fire -> reset ------------------------------------------------------
    def neuronal_charge(self, x: torch.Tensor) -> None:
        """Integrate input ``x`` into the membrane: ``self.v`` becomes ``H``.

        Runs the charge expression of :meth:`define_dynamics` (compiled to Python once per
        configuration, :mod:`snncompile.codegen.eager`).
        """
        step = self._eager()
        if step is None or _defining_class(type(self)) is BaseNode:
            raise NotImplementedError(
                f"{type(self).__name__} must define define_dynamics(surrogate) or override "
                "neuronal_charge."
            )
        extra = [getattr(self, n) for n in step.extra_states]
        self.v = step.charge(self, x, self.v, *extra)

    def _theta(self) -> float | torch.Tensor:
        """The firing threshold now: ``v_threshold``, or the adaptive threshold's value."""
        step = self._eager()
        if step is None or step.threshold is None:
            return self.v_threshold
        return step.threshold(self, *(getattr(self, n) for n in step.extra_states))

    def neuronal_fire(self) -> torch.Tensor:
        """Return the spikes ``surrogate(H - v_threshold)`` (1 where ``H >= v_threshold``)."""
        return self.surrogate_function(self.v - self._theta())

    def neuronal_reset(self, spike: torch.Tensor) -> None:
        """Reset the membrane where ``spike`` fired (hard to ``v_reset``, soft by subtraction)."""
        step = self._eager()
        assert step is not None
        self.v = step.reset(self, self.v, spike, self._theta())

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        extra = self._extra_state_names()
        if not extra:
            self.neuronal_charge(x)
            spike = self.neuronal_fire()
            self.neuronal_reset(spike)
            return spike
        # Extra states update from their pre-step values, h and the spike; the threshold and
        # the reset read the pre-step values too, so the new values are stored last.
        v_prev = self.v
        prev = [getattr(self, n) for n in extra]
        self.neuronal_charge(x)
        spike = self.neuronal_fire()
        step = self._eager()
        assert step is not None and step.updates is not None
        nxt = step.updates(self, x, v_prev, self.v, spike, *prev)
        self.neuronal_reset(spike)
        for name, value in zip(extra, nxt, strict=True):
            setattr(self, name, value)
        return spike

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run one time step on ``x`` of shape ``[N, *]`` and return the spikes.

        With ``store_v_seq`` the new membrane is appended to ``self.v_seq`` (restarted when its
        shape, dtype or device changes), as in SpikingJelly.
        """
        self.v_float_to_tensor(x)
        spike = self._step(x)
        if self.store_v_seq:
            v_step = self.v.unsqueeze(0)
            old = self.v_seq
            if (
                old is None
                or old.shape[1:] != v_step.shape[1:]
                or old.dtype != v_step.dtype
                or old.device != v_step.device
            ):
                self.v_seq = v_step.clone()
            else:
                self.v_seq = torch.cat((old, v_step))
        return spike

    # -- many steps -----------------------------------------------------------------------------
    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Run ``x_seq`` of shape ``[T, N, *]`` and return the spikes ``[T, N, *]``.

        This is the one backend dispatch point: ``backend='torch'`` runs
        :meth:`_multi_step_torch`, any other backend the implementation registered with
        :meth:`register_backend`.
        """
        owner = type(self).__name__
        check_multi_step_input(x_seq, owner)
        if x_seq.shape[0] == 0:
            raise ValueError(f"{owner}: the input sequence has no time steps (T = 0).")
        if self.backend == "torch":
            return self._multi_step_torch(x_seq)
        impl = self._backend_impls.get(self.backend)
        if impl is None:
            raise NotImplementedError(
                f"{owner}: backend {self.backend!r} is listed in supported_backends but has no "
                f"implementation; add one with {owner}.register_backend(name, impl)."
            )
        return impl(self, x_seq)

    def _multi_step_torch(self, x_seq: torch.Tensor) -> torch.Tensor:
        # unbind(0) keeps backward O(T); x_seq[t] would make it O(T^2).
        steps = x_seq.unbind(0)
        # The state is matched to the input once per call, as SpikingJelly does. (The 0-dim
        # float32 PLIF decay does not promote a half-precision v: 0-dim tensors never do.)
        self.v_float_to_tensor(steps[0])
        spikes = []
        v_seq = []
        for x in steps:
            spikes.append(self._step(x))
            if self.store_v_seq:
                v_seq.append(self.v)
        if self.store_v_seq:
            self.v_seq = torch.stack(v_seq)
        return torch.stack(spikes)

    def extra_repr(self) -> str:
        return (
            f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, "
            f"detach_reset={self.detach_reset}, step_mode={self.step_mode}, "
            f"backend={self.backend}"
        )


class IFNode(BaseNode):
    """Integrate-and-fire neuron: ``H = V + X``."""

    def __init__(
        self,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        surrogate_function: nn.Module = _DEFAULT_SURROGATE,
        detach_reset: bool = False,
        step_mode: str = "s",
        store_v_seq: bool = False,
        *,
        backend: str = "torch",
    ) -> None:
        super().__init__(
            v_threshold,
            v_reset,
            surrogate_function,
            detach_reset,
            step_mode,
            store_v_seq,
            backend=backend,
        )

    spikingjelly_name = "IFNode"

    def define_dynamics(self, surrogate: SurrogateExpr) -> NeuronDynamics:
        return if_dynamics(self.v_threshold, self.v_reset, surrogate, self.detach_reset)

    def dynamics_spec(self) -> NeuronSpec:
        return NeuronSpec(
            kind="if",
            v_threshold=self.v_threshold,
            v_reset=self.v_reset,
            tau=None,
            decay_input=False,
            detach_reset=self.detach_reset,
            surrogate=self.surrogate_function,
        )


def _positive(owner: str, name: str, value: object) -> float:
    """``value`` as a float, which must be > 0 (a ValueError naming ``owner.name`` otherwise)."""
    number = _as_float(owner, name, value)
    if not number > 0:
        raise ValueError(f"{owner}: {name} must be > 0, got {number!r}.")
    return number


def _check_tau(owner: str, name: str, tau: object) -> float:
    value = _as_float(owner, name, tau)
    if not value > 1.0:
        raise ValueError(
            f"{owner}: {name} must be > 1 (the membrane keeps a fraction 1 - 1/tau per step; "
            f"SpikingJelly requires tau > 1), got {tau!r}."
        )
    return value


class LIFNode(BaseNode):
    """Leaky integrate-and-fire neuron with time constant ``tau`` (> 1).

    ``decay_input=True``: ``H = V + (X - (V - v_r)) / tau``; ``False``:
    ``H = V - (V - v_r) / tau + X``.
    """

    def __init__(
        self,
        tau: float = 2.0,
        decay_input: bool = True,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        surrogate_function: nn.Module = _DEFAULT_SURROGATE,
        detach_reset: bool = False,
        step_mode: str = "s",
        store_v_seq: bool = False,
        *,
        backend: str = "torch",
    ) -> None:
        tau = _check_tau(type(self).__name__, "tau", tau)
        if not isinstance(decay_input, bool):
            raise TypeError(f"{type(self).__name__}: decay_input must be a bool.")
        super().__init__(
            v_threshold,
            v_reset,
            surrogate_function,
            detach_reset,
            step_mode,
            store_v_seq,
            backend=backend,
        )
        self.tau = tau
        self.decay_input = decay_input

    spikingjelly_name = "LIFNode"

    def define_dynamics(self, surrogate: SurrogateExpr) -> NeuronDynamics:
        return lif_dynamics(
            self.tau, self.decay_input, self.v_threshold, self.v_reset, surrogate,
            self.detach_reset,
        )

    def dynamics_spec(self) -> NeuronSpec:
        return NeuronSpec(
            kind="lif",
            v_threshold=self.v_threshold,
            v_reset=self.v_reset,
            tau=self.tau,
            decay_input=self.decay_input,
            detach_reset=self.detach_reset,
            surrogate=self.surrogate_function,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tau={self.tau}, decay_input={self.decay_input}"


class ParametricLIFNode(BaseNode):
    """LIF neuron with a learnable decay ``k = sigmoid(w)`` (PLIF, Fang et al. 2021).

    ``w`` is a scalar :class:`torch.nn.Parameter` initialised to ``-log(init_tau - 1)`` so
    that ``1 / k = init_tau`` at the start. ``decay_input=True``: ``H = V + (X - (V - v_r)) * k``;
    ``False``: ``H = V - (V - v_r) * k + X``.
    """

    def __init__(
        self,
        init_tau: float = 2.0,
        decay_input: bool = True,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        surrogate_function: nn.Module = _DEFAULT_SURROGATE,
        detach_reset: bool = False,
        step_mode: str = "s",
        store_v_seq: bool = False,
        *,
        backend: str = "torch",
    ) -> None:
        init_tau = _check_tau(type(self).__name__, "init_tau", init_tau)
        if not isinstance(decay_input, bool):
            raise TypeError(f"{type(self).__name__}: decay_input must be a bool.")
        super().__init__(
            v_threshold,
            v_reset,
            surrogate_function,
            detach_reset,
            step_mode,
            store_v_seq,
            backend=backend,
        )
        self.decay_input = decay_input
        self.w = nn.Parameter(torch.as_tensor(-math.log(init_tau - 1.0)))

    spikingjelly_name = "ParametricLIFNode"

    def define_dynamics(self, surrogate: SurrogateExpr) -> NeuronDynamics:
        return plif_dynamics(
            self.decay_input, self.v_threshold, self.v_reset, surrogate, self.detach_reset
        )

    def dynamics_spec(self) -> NeuronSpec:
        return NeuronSpec(
            kind="plif",
            v_threshold=self.v_threshold,
            v_reset=self.v_reset,
            tau=None,
            decay_input=self.decay_input,
            detach_reset=self.detach_reset,
            surrogate=self.surrogate_function,
            w=self.w,
        )

    def extra_repr(self) -> str:
        with torch.no_grad():
            tau = 1.0 / self.w.sigmoid().item()
        return super().extra_repr() + f", tau={round(tau, 6)}, decay_input={self.decay_input}"


# Fused backends ('cpu', 'cuda', 'auto'): kernels generated from snncompile.dynamics, registered
# through register_backend so the torch path above stays the reference (snncompile.runtime).
from snncompile.runtime.fused_backends import install as _install_fused_backends  # noqa: E402

_install_fused_backends()


# -- Online-training neurons (OTTT, SLTT) --------------------------------------------------------
# Single-step LIF variants for snncompile.online (OTTT/SLTT training loops, OTTTSequential). They
# subclass LIFNode, so they live here rather than in snncompile.online (no import cycle).
class _OnlineLIFNode(LIFNode):
    """A single-step LIF whose membrane is detached at the start of every training step.

    Detaching ``v`` is what makes the backward of step ``t`` independent of earlier steps, so the
    graph (and memory) never spans more than one step. In eval mode the node is a plain LIF with
    a Heaviside forward.
    """

    def __init__(
        self,
        tau: float = 2.0,
        decay_input: bool = True,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        surrogate_function: nn.Module = _DEFAULT_SURROGATE,
        detach_reset: bool = True,
        step_mode: str = "s",
        store_v_seq: bool = False,
        *,
        backend: str = "torch",
    ) -> None:
        if step_mode != "s":
            raise ValueError(
                f"{type(self).__name__} only supports step_mode='s': online training runs the "
                f"network one step at a time so that memory does not grow with T. Call it once "
                f"per step (ottt_online_training does), got step_mode={step_mode!r}."
            )
        super().__init__(
            tau,
            decay_input,
            v_threshold,
            v_reset,
            surrogate_function,
            detach_reset,
            step_mode,
            store_v_seq,
            backend=backend,
        )

    @property
    def supported_step_mode(self) -> tuple[str, ...]:
        """Only ``'s'``: these neurons exist to be stepped one time step at a time."""
        return ("s",)

    def _online_step(self, x: torch.Tensor) -> torch.Tensor:
        self.v_float_to_tensor(x)
        spike = self._fused_step(x)
        if spike is not None:
            return spike
        if not self.training:
            self.neuronal_charge(x)
            spike = surrogate.heaviside(self.v - self.v_threshold)
            self.neuronal_reset(spike)
            return spike
        self.v = self.v.detach()
        self.neuronal_charge(x)
        spike = self.neuronal_fire()
        self.neuronal_reset(spike)
        return spike

    def _fused_step(self, x: torch.Tensor) -> torch.Tensor | None:
        """Run this step with the generated C/CUDA kernel if ``backend`` asks for it.

        Returns None when the torch path should run instead: ``backend='torch'``, ``'auto'`` on a
        step smaller than the fusion threshold, or a configuration without a kernel (a surrogate
        with no expression form, or ``spiking=False``). The kernel computes the same LIF step;
        spikes and ``v`` agree with the torch path exactly, input gradients to float rounding.
        """
        if self.backend == "torch" or not getattr(self.surrogate_function, "spiking", True):
            return None
        from snncompile.runtime import fused, fused_backends

        if self.backend == "auto" and (
            x.numel() < fused.AUTO_MIN_ELEMENTS or x.device.type not in ("cpu", "cuda")
        ):
            return None
        if self.backend in ("cpu", "cuda") and x.device.type != self.backend:
            raise RuntimeError(
                f"{type(self).__name__}(backend={self.backend!r}) got a tensor on {x.device}; "
                f"move the input to {self.backend} or use backend='auto'."
            )
        dynamics = fused_backends.dynamics_for(self)
        if dynamics is None:
            return None
        v0 = self.v.detach() if self.training else self.v
        spikes, v_last, _ = fused.fused_multi_step(dynamics, x.unsqueeze(0), v0, None)
        self.v = v_last
        return spikes[0]


class OTTTLIFNode(_OnlineLIFNode):
    """LIF neuron for OTTT: detached membrane and a presynaptic trace for the next layer.

    Forward dynamics are a LIF's (:class:`snncompile.neuron.LIFNode`). In training mode the
    membrane is detached at every step and the node also keeps ``trace = trace * (1 - 1/tau) +
    spike`` (no gradient), returning ``[spike, trace]``; the next parametric layer must consume the
    pair (:class:`snncompile.layer.OTTTSequential` or
    :class:`snncompile.layer.GradwithTrace`). In eval mode it returns the spike.
    Defaults follow SpikingJelly: ``decay_input=False``, soft reset (``v_reset=None``),
    ``detach_reset=True``. Single step only; ``store_v_seq`` is accepted for interface
    compatibility and ignored.

    Args:
        tau: membrane time constant (> 1); also the trace's decay.
        decay_input: whether the input is divided by ``tau`` during charge.
        v_threshold: firing threshold.
        v_reset: hard-reset value, or ``None`` for soft reset (subtract the threshold).
        surrogate_function: surrogate spike function used in backward.
        detach_reset: detach the spike in the reset path.
        step_mode: must be ``'s'``.
        store_v_seq: ignored (single-step node).
        backend: must be ``'torch'``.
    """

    def __init__(
        self,
        tau: float = 2.0,
        decay_input: bool = False,
        v_threshold: float = 1.0,
        v_reset: float | None = None,
        surrogate_function: nn.Module = _DEFAULT_SURROGATE,
        detach_reset: bool = True,
        step_mode: str = "s",
        store_v_seq: bool = False,
        *,
        backend: str = "torch",
    ) -> None:
        super().__init__(
            tau,
            decay_input,
            v_threshold,
            v_reset,
            surrogate_function,
            detach_reset,
            step_mode,
            store_v_seq,
            backend=backend,
        )
        self.register_memory("trace", None)

    @staticmethod
    def track_trace(spike: torch.Tensor, trace: torch.Tensor, tau: float) -> torch.Tensor:
        """Return ``trace * (1 - 1/tau) + spike``, computed without autograd."""
        with torch.no_grad():
            return trace * (1.0 - 1.0 / tau) + spike

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Run one step: ``[spike, trace]`` in training mode, ``spike`` in eval mode."""
        spike = self._online_step(x)
        if not self.training:
            return spike
        if self.trace is None:
            self.trace = torch.zeros_like(self.v)
        self.trace = self.track_trace(spike, self.trace, self.tau)
        return [spike, self.trace]


class SLTTLIFNode(_OnlineLIFNode):
    """LIF neuron for SLTT: the membrane is detached at every training step, no trace.

    The gradient of step ``t``'s loss then flows only through the spatial (layer-to-layer) path
    of step ``t``. Returns the spike in both modes. Defaults follow SpikingJelly:
    ``decay_input=True``, hard reset to ``v_reset=0.0``, ``detach_reset=True``. Single step only;
    arguments as :class:`OTTTLIFNode`.
    """

    def __init__(
        self,
        tau: float = 2.0,
        decay_input: bool = True,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        surrogate_function: nn.Module = _DEFAULT_SURROGATE,
        detach_reset: bool = True,
        step_mode: str = "s",
        store_v_seq: bool = False,
        *,
        backend: str = "torch",
    ) -> None:
        super().__init__(
            tau,
            decay_input,
            v_threshold,
            v_reset,
            surrogate_function,
            detach_reset,
            step_mode,
            store_v_seq,
            backend=backend,
        )

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run one step and return the spike."""
        return self._online_step(x)


__all__ += ["OTTTLIFNode", "SLTTLIFNode"]


# -- more built-in neurons, one file each (snncompile.neurons), importable from here too -------
from snncompile.neurons import (  # noqa: E402
    ALIFNode,
    CUBALIFNode,
    EIFNode,
    IzhikevichNode,
    QIFNode,
)

__all__ += ["ALIFNode", "CUBALIFNode", "EIFNode", "IzhikevichNode", "QIFNode"]
