r"""Adaptive-threshold LIF neuron (ALIF, as in LSNN: Bellec et al., 2018).

Two states, the membrane ``v`` and the threshold adaptation ``a`` (starting at 0). One step::

    H     = V + (X - (V - v_r)) / tau          # decay_input=True (LIFNode's charge)
    H     = V - (V - v_r) / tau + X            # decay_input=False
    theta = v_threshold + beta * A             # the adaptive threshold b_t = b0 + beta * a_t
    S     = heaviside(H - theta)
    V     = H - S * theta                      # soft reset (default), or hard to v_reset
    A     = rho * A + S,   rho = exp(-1 / tau_a)

``v_r`` is ``v_reset`` (0 for the soft reset). The threshold and the soft reset read the
pre-step ``a``; the spike in the adaptation is not detached (BPTT flows through the threshold,
as in LSNN's training). With ``beta = 0`` it is a LIF neuron with soft reset. Not a SpikingJelly
class (SpikingJelly 2.0.0 has none); the whole neuron is this file.
"""

from __future__ import annotations

import math

from torch import nn

from snncompile.dynamics.expr import var
from snncompile.dynamics.neuron import NeuronDynamics, State
from snncompile.dynamics.surrogates import SurrogateExpr
from snncompile.neuron import _DEFAULT_SURROGATE, BaseNode, _as_float, _check_tau, _positive


class ALIFNode(BaseNode):
    """LIF with an adaptive threshold ``v_threshold + beta * a``, ``a <- rho * a + spike``.

    Args:
        tau: membrane time constant (> 1).
        tau_a: adaptation time constant (> 0); ``rho = exp(-1 / tau_a)``.
        beta: adaptation strength (threshold increase per unit of ``a``).
        decay_input: whether the input is divided by ``tau`` during charge.
        v_threshold: the baseline threshold ``b0``.
        v_reset: hard-reset value, or ``None`` (default) for the soft reset by the threshold.
        surrogate_function, detach_reset, step_mode, store_v_seq, backend: as ``LIFNode``.
    """

    def __init__(
        self,
        tau: float = 2.0,
        tau_a: float = 20.0,
        beta: float = 1.8,
        decay_input: bool = True,
        v_threshold: float = 1.0,
        v_reset: float | None = None,
        surrogate_function: nn.Module = _DEFAULT_SURROGATE,
        detach_reset: bool = False,
        step_mode: str = "s",
        store_v_seq: bool = False,
        *,
        backend: str = "torch",
    ) -> None:
        owner = type(self).__name__
        tau = _check_tau(owner, "tau", tau)
        tau_a = _positive(owner, "tau_a", tau_a)
        beta = _as_float(owner, "beta", beta)
        if not isinstance(decay_input, bool):
            raise TypeError(f"{owner}: decay_input must be a bool.")
        base = (v_threshold, v_reset, surrogate_function, detach_reset, step_mode, store_v_seq)
        super().__init__(*base, backend=backend)
        self.register_memory("a", 0.0)
        self.tau, self.tau_a, self.beta, self.decay_input = tau, tau_a, beta, decay_input

    @property
    def rho(self) -> float:
        """The per-step decay of the adaptation, ``exp(-1 / tau_a)``."""
        return math.exp(-1.0 / self.tau_a)

    def define_dynamics(self, surrogate: SurrogateExpr) -> NeuronDynamics:
        v, x, a, s = var("v"), var("x"), var("a"), var("spike")
        v_r = 0.0 if self.v_reset is None else self.v_reset
        if self.decay_input:
            charge = v + (x - (v - v_r)) / self.tau
        else:
            charge = v - (v - v_r) / self.tau + x
        return NeuronDynamics(
            "alif",
            charge,
            self.v_threshold,
            self.v_reset,
            surrogate,
            self.detach_reset,
            states=(State("a", 0.0, self.rho * a + s),),
            threshold=self.v_threshold + self.beta * a,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", tau={self.tau}, tau_a={self.tau_a}, beta={self.beta}, "
            f"decay_input={self.decay_input}"
        )
