"""Fused backends for :mod:`snncompile.neuron`: ``backend='cpu' | 'cuda' | 'auto'``.

:func:`install` registers three implementations with
:meth:`snncompile.neuron.BaseNode.register_backend` (``snncompile.neuron`` calls it on import):

* ``'cpu'``: the generated C kernel (OpenMP over neurons); CPU tensors only.
* ``'cuda'``: the generated CUDA kernel through CuPy; CUDA tensors only.
* ``'auto'``: the fused kernel of the input's device when the call is big enough (``T >=
  AUTO_MIN_STEPS`` or ``T * N >= AUTO_MIN_ELEMENTS``) and the neuron is supported, else the
  node's torch loop.

Every fused backend falls back to the torch loop (silently for ``'auto'``, with one warning per
configuration otherwise) when the neuron cannot be fused (:func:`fusion_blocker` says why): a
surrogate whose class is not registered with an expression form (matched by class identity, so a
user's own ``class ATan`` is not snncompile's ATan; see :mod:`snncompile.dynamics.surrogates`),
or a subclass whose dynamics are not described by its class's ``define_dynamics`` (and could not
be captured). The states a fused
backend leaves in the node are float32 (the kernels' state precision), also for float16/bfloat16
inputs.

Availability is checked when a backend is chosen, not when the first tensor arrives:
``backend='cuda'`` on a machine without a CUDA GPU (or without CuPy) raises at construction,
at ``node.backend = 'cuda'`` and in ``snncompile.optimize(..., backend='cuda')``
(:func:`check_available`). Names other libraries use for the same thing (``'cupy'``, ``'gpu'``)
are answered with the name used here (:data:`BACKEND_ALIASES`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from snncompile.dynamics.neuron import NeuronDynamics
from snncompile.runtime.fused import (
    AUTO_MIN_ELEMENTS,
    AUTO_MIN_STEPS,
    FUSED_DTYPES,
    fused_multi_step_states,
)

#: Backend names of other libraries (SpikingJelly 0.0.0.x's ``'cupy'``) -> the backend here.
BACKEND_ALIASES: dict[str, str] = {"cupy": "cuda", "gpu": "cuda"}

_warned: set[tuple[Any, ...]] = set()
_STEP_METHODS = ("neuronal_charge", "neuronal_fire", "neuronal_reset", "_step")
#: Why the last :func:`dynamics_for` call of a class found no fused form (for pass notes).
REASONS: dict[type, str] = {}


def _owner(cls: type, method: str) -> type | None:
    return next((c for c in cls.__mro__ if method in c.__dict__), None)


#: Per class: the methods the analysis below looked at (to notice a class patched later), the
#: class defining ``define_dynamics`` and the overridden step methods. Walking the MRO cost
#: ~4 us per neuron call, more than a small fused kernel.
_CLASS_ANALYSIS: dict[type, tuple[tuple[Any, ...], type | None, tuple[str, ...]]] = {}


def _analysis(cls: type) -> tuple[type | None, tuple[str, ...]]:
    """``(class defining define_dynamics, overridden step methods)`` of ``cls``, cached."""
    methods = tuple(getattr(cls, m, None) for m in ("define_dynamics", *_STEP_METHODS))
    hit = _CLASS_ANALYSIS.get(cls)
    if hit is not None and hit[0] == methods:
        return hit[1], hit[2]
    defining = _owner(cls, "define_dynamics")
    overridden: tuple[str, ...] = ()
    if defining is not None:
        overridden = tuple(
            m
            for m in _STEP_METHODS
            if (o := _owner(cls, m)) is not None and o not in defining.__mro__
        )
    _CLASS_ANALYSIS[cls] = (methods, defining, overridden)
    return defining, overridden


def overridden_step_methods(cls: type) -> list[str]:
    """The step methods ``cls`` overrides below the class that defines its dynamics (empty when
    its ``define_dynamics`` describes it as it is)."""
    return list(_analysis(cls)[1])


def dynamics_for(node: Any) -> NeuronDynamics | None:
    """The :class:`NeuronDynamics` of a snncompile neuron node, or None when it cannot be fused.

    The dynamics are the node's own definition (``node.neuron_dynamics()``, defined next to its
    class). A subclass that overrides a step method below the class that defines its dynamics
    has dynamics of its own: an overridden ``neuronal_charge`` of elementwise torch code is
    captured into expressions (:mod:`snncompile.dynamics.capture`), checked against the method
    itself; anything else runs as written. :data:`REASONS` keeps why a class is not fused.
    """
    fn = getattr(node, "neuron_dynamics", None)
    if fn is None:
        return None
    cls = type(node)
    defining, overridden_methods = _analysis(cls)
    overridden = list(overridden_methods)
    from snncompile.neuron import BaseNode

    if defining is None or (defining is BaseNode and "neuronal_charge" not in overridden):
        # BaseNode's own definition has no charge: a subclass must define or override one.
        REASONS[cls] = f"{cls.__name__} defines no dynamics (define_dynamics or neuronal_charge)"
        return None
    try:
        if overridden == ["neuronal_charge"]:
            from snncompile.dynamics.capture import captured_dynamics

            return captured_dynamics(node)
        if overridden:
            REASONS[cls] = (
                f"{cls.__name__} overrides {', '.join(overridden)} (only an overridden "
                "neuronal_charge is captured)"
            )
            return None
        return fn()
    except (ValueError, TypeError, NotImplementedError) as err:
        REASONS[cls] = str(err)
        return None


def fusion_blocker(node: Any) -> str | None:
    """Why the neuron module ``node`` has no fused kernel, or ``None`` when it has one.

    Reasons: no dynamics definition, a subclass with its own step methods that could not be
    captured, or a surrogate that is not a registered surrogate class (matched by identity, see
    :func:`snncompile.dynamics.surrogates.resolve_surrogate`) or has non-finite parameters.
    """
    if dynamics_for(node) is not None:
        return None
    if not callable(getattr(node, "neuron_dynamics", None)):
        return f"{type(node).__name__} has no dynamics definition (define_dynamics)"
    return REASONS.get(type(node), "its configuration has no expression form")


def auto_fuses_size(x_seq: torch.Tensor) -> bool:
    """Whether ``backend='auto'`` runs a call of this size fused (the ``AUTO_MIN_*`` rule)."""
    return x_seq.shape[0] >= AUTO_MIN_STEPS or x_seq.numel() >= AUTO_MIN_ELEMENTS


def run_fused(
    node: Any,
    x_seq: torch.Tensor,
    dynamics: NeuronDynamics,
    extra_params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run ``dynamics`` fused from the neuron module ``node``'s state; update its ``v``/``v_seq``.

    The charge's parameters are read from ``node`` by name, except those in ``extra_params``
    (e.g. the gains of :class:`snncompile.runtime.scaled_neuron.ScaledNeuron`).
    """
    extra = extra_params or {}
    params = {n: extra[n] if n in extra else getattr(node, n) for n in dynamics.param_names}
    node.v_float_to_tensor(x_seq[0])
    states = {n: getattr(node, n) for n in dynamics.state_names}
    spikes, last, v_seq = fused_multi_step_states(
        dynamics, x_seq, states, params or None, store_v_seq=node.store_v_seq
    )
    for name, value in last.items():
        setattr(node, name, value)
    if node.store_v_seq:
        node.v_seq = v_seq
    return spikes


def _fallback(node: Any, x_seq: torch.Tensor, why: str, key: tuple[Any, ...]) -> torch.Tensor:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"{type(node).__name__}(backend={node.backend!r}): {why}; running the torch loop.",
            RuntimeWarning,
            stacklevel=4,
        )
    return node._multi_step_torch(x_seq)


def _make_impl(device_type: str) -> Any:
    def impl(node: Any, x_seq: torch.Tensor) -> torch.Tensor:
        d = dynamics_for(node)
        if d is None:
            why = "no fused kernel: " + (fusion_blocker(node) or "unsupported configuration")
            return _fallback(node, x_seq, why, (type(node).__name__, device_type, why))
        if x_seq.dtype not in FUSED_DTYPES:
            return _fallback(
                node,
                x_seq,
                f"fused kernels compute in float32 and take float32/float16/bfloat16 inputs, "
                f"not {x_seq.dtype}",
                (type(node).__name__, device_type, str(x_seq.dtype)),
            )
        if x_seq.device.type != device_type:
            raise RuntimeError(
                f"{type(node).__name__}(backend={device_type!r}) got a tensor on "
                f"{x_seq.device}; move the input to {device_type} or use backend='auto'."
            )
        return run_fused(node, x_seq, d)

    return impl


def _auto_impl(node: Any, x_seq: torch.Tensor) -> torch.Tensor:
    d = dynamics_for(node)
    if (
        d is None
        or x_seq.device.type not in ("cpu", "cuda")
        or x_seq.dtype not in FUSED_DTYPES
        or not auto_fuses_size(x_seq)
        or (x_seq.device.type == "cuda" and not _cupy_available())
    ):
        return node._multi_step_torch(x_seq)
    return run_fused(node, x_seq, d)


def alias_hint(backend: Any) -> str:
    """A sentence suggesting the backend meant by another library's name, or ``""``."""
    target = BACKEND_ALIASES.get(backend) if isinstance(backend, str) else None
    if target is None:
        return ""
    return f" Did you mean backend={target!r}? (snncompile's name for its {backend} kernels)"


def unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine, or None when it can."""
    if backend != "cuda":
        return None
    if not torch.cuda.is_available():
        return "this machine has no CUDA GPU (torch.cuda.is_available() is False)"
    if not _cupy_available():
        return (
            "CuPy is not installed; the CUDA kernels are compiled and launched through it "
            "(pip install cupy-cuda12x, or the build matching your CUDA version)"
        )
    return None


def check_available(backend: str, owner: str) -> None:
    """Raise a RuntimeError naming ``owner`` when ``backend`` cannot run on this machine."""
    why = unavailable_reason(backend)
    if why is not None:
        raise RuntimeError(
            f"{owner}: backend={backend!r} cannot run here: {why}. Use backend='cpu' (the C "
            "kernel), 'auto' (the fused kernel of each input's device) or 'torch'."
        )


def _cupy_available() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def install() -> None:
    """Register the ``'cpu'``, ``'cuda'`` and ``'auto'`` backends on snncompile's neurons."""
    from snncompile import neuron

    neuron.BaseNode.register_backend("cpu", _make_impl("cpu"))
    neuron.BaseNode.register_backend(
        "cuda", _make_impl("cuda"), check=lambda owner: check_available("cuda", owner)
    )
    neuron.BaseNode.backend_aliases = dict(BACKEND_ALIASES)
    neuron.BaseNode.register_backend("auto", _auto_impl)
