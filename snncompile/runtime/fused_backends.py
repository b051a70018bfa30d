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
or a subclass whose dynamics are not described by its ``NeuronSpec``. The membrane ``v`` a fused
backend leaves in the node is float32 (the kernels' state precision), also for float16/bfloat16
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

from snncompile.dynamics.neuron import NeuronDynamics, from_spec
from snncompile.dynamics.surrogates import SurrogateExpr, resolve_surrogate
from snncompile.runtime.fused import (
    AUTO_MIN_ELEMENTS,
    AUTO_MIN_STEPS,
    FUSED_DTYPES,
    fused_multi_step,
)

#: Backend names of other libraries (SpikingJelly 0.0.0.x's ``'cupy'``) -> the backend here.
BACKEND_ALIASES: dict[str, str] = {"cupy": "cuda", "gpu": "cuda"}

_cache: dict[tuple[Any, ...], NeuronDynamics | None] = {}
_warned: set[tuple[Any, ...]] = set()
# The classes whose step methods the NeuronSpec describes; a subclass overriding one of them has
# dynamics of its own and runs in torch.
_KNOWN_CLASSES: set[type] = set()
_STEP_METHODS = ("neuronal_charge", "neuronal_fire", "neuronal_reset", "_step")


def _spec_key(spec: Any, form: SurrogateExpr) -> tuple[Any, ...]:
    return (
        spec.kind,
        spec.v_threshold,
        spec.v_reset,
        spec.tau,
        spec.decay_input,
        spec.detach_reset,
        form,
        bool(getattr(spec.surrogate, "spiking", True)),
    )


def _blocker(node: Any) -> tuple[str | None, Any, SurrogateExpr | None]:
    """``(reason, spec, surrogate form)``: why ``node`` cannot be fused (None when it can)."""
    spec_fn = getattr(node, "dynamics_spec", None)
    if spec_fn is None:
        return f"{type(node).__name__} has no dynamics_spec()", None, None
    for method in _STEP_METHODS:
        owner = next((c for c in type(node).__mro__ if method in c.__dict__), None)
        if owner not in _KNOWN_CLASSES:
            return (
                f"{type(node).__name__} overrides {method}() (its own dynamics, not described "
                "by its NeuronSpec)",
                None,
                None,
            )
    spec = spec_fn()
    form, why = resolve_surrogate(spec.surrogate)
    return why, spec, form


def fusion_blocker(node: Any) -> str | None:
    """Why the neuron module ``node`` has no fused kernel, or ``None`` when it has one.

    Reasons: no ``dynamics_spec``, a subclass with its own step methods, or a surrogate that is
    not a registered surrogate class (matched by identity, see
    :func:`snncompile.dynamics.surrogates.unfusable_reason`) or has non-finite parameters.
    """
    why, _, _ = _blocker(node)
    if why is None and dynamics_for(node) is None:
        return "its configuration has no expression form"
    return why


def dynamics_for(node: Any) -> NeuronDynamics | None:
    """The :class:`NeuronDynamics` of a snncompile neuron node, or None when it cannot be fused.

    The surrogate is identified by its class (and parameters), never by its class name.
    """
    why, spec, form = _blocker(node)
    if why is not None or form is None:
        return None
    key = _spec_key(spec, form)
    if key not in _cache:
        try:
            _cache[key] = from_spec(spec)
        except (ValueError, TypeError):
            _cache[key] = None
    return _cache[key]


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
    v0 = node.v
    spikes, v_last, v_seq = fused_multi_step(
        dynamics, x_seq, v0, params or None, store_v_seq=node.store_v_seq
    )
    node.v = v_last
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

    _KNOWN_CLASSES.update(
        {neuron.BaseNode, neuron.IFNode, neuron.LIFNode, neuron.ParametricLIFNode}
    )
    neuron.BaseNode.register_backend("cpu", _make_impl("cpu"))
    neuron.BaseNode.register_backend(
        "cuda", _make_impl("cuda"), check=lambda owner: check_available("cuda", owner)
    )
    neuron.BaseNode.backend_aliases = dict(BACKEND_ALIASES)
    neuron.BaseNode.register_backend("auto", _auto_impl)
