"""Building blocks of a converted SNN: the voltage scaler and the half-threshold IF neuron.

Each ReLU of the ANN becomes ``VoltageScale(1/s) -> IF neuron (v_threshold=1, soft reset) ->
VoltageScale(s)`` where ``s`` is the calibrated activation scale of that ReLU. The IF neuron's
firing rate approximates ``clamp(x / s, 0, 1)``, so the rescaled rate approximates
``clamp(relu(x), 0, s)``.

Both are first-class for the compiler (registered with the frontend below): a
``HalfThresholdIFNode`` is a ``NEURON`` (plain IF dynamics, ``v_init`` in its ``NeuronSpec``),
so ``snncompile.optimize`` fuses it and ``export_onnx`` starts its state at ``v_init``; a
``VoltageScale`` is one ``ELEMENTWISE`` leaf (``x * scale``), not a traced
``getattr``/``.to``/``mul`` chain, so it exports as a single ONNX ``Mul``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from snncompile.frontend.rules import (
    Kind,
    ModuleInfo,
    register_module_rule,
    register_neuron_subclass,
)
from snncompile.ir.ops import Op
from snncompile.neuron import IFNode, NeuronSpec

__all__ = ["HalfThresholdIFNode", "VoltageScale"]


class VoltageScale(nn.Module):
    """Multiply the input by a fixed scale (a scalar, or one value per channel).

    ``scale`` is stored as a buffer. A per-channel scale has shape ``[C, 1, ..., 1]`` (trailing
    ones for the spatial dimensions), so it broadcasts from the right over both ``[N, C, *]`` and
    ``[T, N, C, *]`` (and ``[T*N, C, *]``) tensors.
    """

    def __init__(self, scale: float | torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x * scale``."""
        return x * self.scale.to(dtype=x.dtype)

    def extra_repr(self) -> str:
        if self.scale.numel() == 1:
            return f"scale={self.scale.item():.6g}"
        return f"scale=per-channel{tuple(self.scale.shape)}"


class HalfThresholdIFNode(IFNode):
    """Soft-reset IF neuron whose membrane starts (and is reset to) ``v_threshold / 2``.

    Starting at half threshold turns the IF neuron's floor quantisation of the rate into
    rounding: after ``T`` steps of constant input ``x`` the spike count is ``round(T * x)``
    instead of ``floor(T * x)`` (for ``0 <= x <= 1``), which removes the systematic
    under-estimation that makes converted SNNs need many steps. The charge, fire and soft-reset
    dynamics are the plain IF ones. ``reset()`` (and therefore ``functional.reset_net``) restores
    ``v`` to ``v_init = v_threshold / 2``; compilers read the start value from ``v_init``.
    """

    def __init__(
        self,
        v_threshold: float = 1.0,
        step_mode: str = "s",
        *,
        backend: str = "torch",
    ) -> None:
        super().__init__(v_threshold=v_threshold, v_reset=None, step_mode=step_mode,
                         backend=backend)
        self.v_init = 0.5 * self.v_threshold
        self.set_reset_value("v", self.v_init)
        self.v = self.v_init

    def dynamics_spec(self) -> NeuronSpec:
        """The plain IF spec with ``v_init = v_threshold / 2`` (the start and reset value)."""
        return dataclasses.replace(super().dynamics_spec(), v_init=float(self.v_init))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, v_init={self.v_init}"


def _voltage_scale_rule(module: nn.Module) -> ModuleInfo:
    scale = module.scale
    shape = tuple(scale.shape)
    return ModuleInfo(Op.ELEMENTWISE, Kind.STATELESS, {"fn": "VoltageScale", "scale_shape": shape})


# HalfThresholdIFNode changes only the initial membrane, so it may run as an IF NEURON (the
# registration checks that it overrides none of the dynamics methods).
register_neuron_subclass(HalfThresholdIFNode)
# VoltageScale is pointwise and stateless: one leaf op (it never mixes samples or time steps).
register_module_rule(VoltageScale, _voltage_scale_rule)
