r"""Exponential integrate-and-fire neuron (SpikingJelly 2.0.0's ``EIFNode``).

Charge (SpikingJelly's operation order)::

    H = V + (X + v_rest - V + delta_T * exp((V - theta_rh) / delta_T)) / tau

then fire (``H >= v_threshold``) and hard (``v_reset``, default -0.1) or soft reset. ``exp`` is
libm's ``expf`` in the fused C kernel and PyTorch's in the eager path: they may differ in the last
ulp, so the fused membrane can differ from the eager one by float rounding (spikes at exact ties).
"""

from __future__ import annotations

from torch import nn

from snncompile.dynamics.expr import exp, var
from snncompile.dynamics.neuron import NeuronDynamics
from snncompile.dynamics.surrogates import SurrogateExpr
from snncompile.neuron import _DEFAULT_SURROGATE, BaseNode, _as_float, _check_tau, _positive
from snncompile.neurons.qif import check_rest


class EIFNode(BaseNode):
    """Exponential integrate-and-fire (``delta_T > 0``; LIF as ``delta_T -> 0``).

    Arguments as SpikingJelly 2.0.0's ``EIFNode``; ``backend`` is keyword-only.
    """

    spikingjelly_name = "EIFNode"

    def __init__(
        self,
        tau: float = 2.0,
        delta_T: float = 1.0,  # noqa: N803 - SpikingJelly's argument name
        theta_rh: float = 0.8,
        v_threshold: float = 1.0,
        v_rest: float = 0.0,
        v_reset: float | None = -0.1,
        surrogate_function: nn.Module = _DEFAULT_SURROGATE,
        detach_reset: bool = False,
        step_mode: str = "s",
        store_v_seq: bool = False,
        *,
        backend: str = "torch",
    ) -> None:
        owner = type(self).__name__
        tau = _check_tau(owner, "tau", tau)
        delta_T = _positive(owner, "delta_T", delta_T)  # noqa: N806
        theta_rh = _as_float(owner, "theta_rh", theta_rh)
        v_rest = _as_float(owner, "v_rest", v_rest)
        base = (v_threshold, v_reset, surrogate_function, detach_reset, step_mode, store_v_seq)
        super().__init__(*base, backend=backend)
        check_rest(owner, self.v_threshold, v_rest, self.v_reset)
        self.tau, self.delta_T, self.theta_rh, self.v_rest = tau, delta_T, theta_rh, v_rest

    def define_dynamics(self, surrogate: SurrogateExpr) -> NeuronDynamics:
        v, x = var("v"), var("x")
        d = self.delta_T
        charge = v + (x + self.v_rest - v + d * exp((v - self.theta_rh) / d)) / self.tau
        return NeuronDynamics(
            "eif", charge, self.v_threshold, self.v_reset, surrogate, self.detach_reset
        )

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", tau={self.tau}, delta_T={self.delta_T}, theta_rh={self.theta_rh}"
        )
