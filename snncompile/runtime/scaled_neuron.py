"""A neuron with its input and output scales in one fused kernel: :class:`ScaledNeuron`.

:mod:`snncompile.passes.fuse_elementwise` replaces ``scale_in -> neuron -> scale_out`` (scalar
``VoltageScale`` ops, as ann2snn writes them) by one ``FUSED_NEURON`` node running a
:class:`ScaledNeuron`. The module holds the compiled model's neuron (its state ``v`` stays there,
so ``functional.reset_net``, chunked inference, ``v_init`` and ``store_v_seq`` work unchanged)
and the two ``VoltageScale`` modules (their ``scale`` buffers are shared, not copied). A call
runs :func:`~snncompile.runtime.fused.fused_multi_step` with the neuron's dynamics extended by
:func:`scaled_dynamics`::

    h = H(v, x * in_gain)        # the input scale's float32 multiply, before the charge
    s = heaviside(h - v_th)      # the reset uses this s
    out = s * out_gain           # the output scale's float32 multiply, after the fire

which performs the same float32 operations in the same order as the unfused chain, so results
are bit-identical. When the fused kernel would not run (the table :data:`FUSED_DEVICES` and the
checks in :meth:`ScaledNeuron.fused_dynamics`), the module computes exactly the unfused chain:
``scale_out(neuron(scale_in(x)))``.
"""

from __future__ import annotations

import dataclasses
import threading

import torch
from torch import nn

from snncompile.dynamics.expr import param, substitute, var
from snncompile.dynamics.neuron import NeuronDynamics
from snncompile.runtime.fused import compiler_available
from snncompile.runtime.fused_backends import (
    _cupy_available,
    auto_fuses_size,
    dynamics_for,
    run_fused,
)

__all__ = ["FUSED_DEVICES", "IN_GAIN", "OUT_GAIN", "ScaledNeuron", "scaled_dynamics"]

#: Names of the two per-call parameters the extended dynamics take.
IN_GAIN = "in_gain"
OUT_GAIN = "out_gain"

#: For each neuron backend, the devices whose inputs run the fused kernel and whether the
#: ``'auto'`` size threshold applies. Other backends (``'torch'``) always run the unfused chain.
FUSED_DEVICES: dict[str, tuple[frozenset[str], bool]] = {
    "cpu": (frozenset({"cpu"}), False),
    "cuda": (frozenset({"cuda"}), False),
    "auto": (frozenset({"cpu", "cuda"}), True),
}

_cache: dict[tuple[NeuronDynamics, bool, bool], NeuronDynamics] = {}
_lock = threading.Lock()


def scaled_dynamics(base: NeuronDynamics, scale_in: bool, scale_out: bool) -> NeuronDynamics:
    """``base`` with ``x`` replaced by ``x * param('in_gain')`` (if ``scale_in``) and the
    output gain ``param('out_gain')`` (if ``scale_out``); cached per configuration."""
    key = (base, scale_in, scale_out)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    clash = {IN_GAIN, OUT_GAIN} & set(base.param_names)
    if clash:
        raise ValueError(
            f"scaled_dynamics: neuron {base.name!r} already uses the parameter(s) "
            f"{sorted(clash)}; rename them in its charge to fuse scales into it."
        )
    if base.output_gain is not None and scale_out:
        raise ValueError(
            f"scaled_dynamics: neuron {base.name!r} already has an output gain; it cannot take "
            "a second one."
        )
    charge, states = base.charge, base.states
    if scale_in:  # every read of the input (the charge and the extra states' updates)
        x = var("x")
        gained = {x: x * param(IN_GAIN)}
        charge = substitute(charge, gained)
        states = tuple(
            dataclasses.replace(s, update=substitute(s.update, gained)) for s in base.states
        )
    d = dataclasses.replace(
        base,
        name=f"{base.name}_scaled",
        charge=charge,
        states=states,
        output_gain=param(OUT_GAIN) if scale_out else base.output_gain,
    )
    with _lock:
        return _cache.setdefault(key, d)


class ScaledNeuron(nn.Module):
    """``scale_out(neuron(scale_in(x)))`` on ``[T, N, *]`` as one fused kernel when possible.

    ``scale_in`` / ``scale_out`` are ``VoltageScale`` modules with a scalar ``scale`` (either may
    be None). See the module docstring for the math and when the fused path runs.
    """

    def __init__(
        self, neuron: nn.Module, scale_in: nn.Module | None, scale_out: nn.Module | None
    ) -> None:
        super().__init__()
        if scale_in is None and scale_out is None:
            raise ValueError("ScaledNeuron: give scale_in, scale_out or both.")
        for what, m in (("scale_in", scale_in), ("scale_out", scale_out)):
            if m is not None and getattr(m, "scale", torch.zeros(2)).numel() != 1:
                raise ValueError(
                    f"ScaledNeuron: {what} must have a scalar scale (per-channel scales are "
                    "not fused); keep it as a separate op."
                )
        self.neuron = neuron
        self.scale_in = scale_in
        self.scale_out = scale_out

    @property
    def in_gain(self) -> torch.Tensor | None:
        """The input scale (the shared buffer of ``scale_in``), or None."""
        return None if self.scale_in is None else self.scale_in.scale

    @property
    def out_gain(self) -> torch.Tensor | None:
        """The output scale (the shared buffer of ``scale_out``), or None."""
        return None if self.scale_out is None else self.scale_out.scale

    def fused_dynamics(self, x_seq: torch.Tensor) -> NeuronDynamics | None:
        """The extended dynamics when this call runs the fused kernel, else None.

        Fused: a neuron with a fused form (``dynamics_for``), a backend and device from
        :data:`FUSED_DEVICES` (``'auto'``: at least ``AUTO_MIN_STEPS`` steps or
        ``AUTO_MIN_ELEMENTS`` elements), a C compiler for CPU inputs, CuPy for CUDA ones, and
        float32 inputs only: ``VoltageScale`` multiplies float16/bfloat16 inputs in their own
        dtype, which the float32 kernel would not reproduce bit for bit.
        """
        neuron = self.neuron
        entry = FUSED_DEVICES.get(getattr(neuron, "backend", "torch"))
        base = dynamics_for(neuron)
        if entry is None or base is None or x_seq.dtype != torch.float32 or x_seq.dim() < 2:
            return None
        if getattr(neuron, "step_mode", "m") != "m":
            return None
        devices, thresholded = entry
        device = x_seq.device.type
        if device not in devices:
            return None
        if thresholded and not auto_fuses_size(x_seq):
            return None
        if device == "cpu" and not compiler_available():
            return None
        if device == "cuda" and not _cupy_available():
            return None
        return scaled_dynamics(base, self.scale_in is not None, self.scale_out is not None)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Run ``x_seq`` ``[T, N, *]``; returns the scaled spikes ``[T, N, *]``."""
        d = self.fused_dynamics(x_seq)
        if d is None:
            return self.unfused(x_seq)
        gains: dict[str, torch.Tensor] = {}
        if self.scale_in is not None:
            gains[IN_GAIN] = self.scale_in.scale
        if self.scale_out is not None:
            gains[OUT_GAIN] = self.scale_out.scale
        return run_fused(self.neuron, x_seq, d, gains)

    def unfused(self, x_seq: torch.Tensor) -> torch.Tensor:
        """The chain as separate ops: ``scale_out(neuron(scale_in(x_seq)))``."""
        if self.scale_in is not None:
            x_seq = self.scale_in(x_seq)
        out = self.neuron(x_seq)
        return out if self.scale_out is None else self.scale_out(out)
