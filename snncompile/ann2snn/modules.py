"""Building blocks of a converted SNN: the voltage scaler and the half-threshold IF neuron.

Each ReLU of the ANN becomes ``VoltageScale(1/s) -> IF neuron (v_threshold=1, soft reset) ->
VoltageScale(s)`` where ``s`` is the calibrated activation scale of that ReLU. The IF neuron's
firing rate approximates ``clamp(x / s, 0, 1)``, so the rescaled rate approximates
``clamp(relu(x), 0, s)``.
"""

from __future__ import annotations

import torch
from torch import nn

from snncompile.neuron import IFNode

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

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, v_init={self.v_init}"
