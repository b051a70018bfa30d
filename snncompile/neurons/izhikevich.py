r"""Izhikevich-type neuron with an adaptation current (SpikingJelly 2.0.0's ``IzhikevichNode``).

Two states, the membrane ``v`` and the adaptation current ``w`` (starting at ``w_rest``). One
step, in SpikingJelly's operation order (bit-identical spikes and states on float32)::

    H = V + (X + a0 * (V - v_rest) * (V - v_c) - W) / tau
    S = heaviside(H - v_threshold)
    W = W + (a * (H - v_rest) - W) / tau_w + b * S      # S not detached, as in SpikingJelly
    V = reset(H, S)                                      # hard to v_reset, or soft
"""

from __future__ import annotations

from torch import nn

from snncompile.dynamics.expr import var
from snncompile.dynamics.neuron import NeuronDynamics, State
from snncompile.dynamics.surrogates import SurrogateExpr
from snncompile.neuron import _DEFAULT_SURROGATE, BaseNode, _as_float, _check_tau, _positive


class IzhikevichNode(BaseNode):
    """Quadratic membrane plus the adaptation current ``w`` (spike-triggered jump ``b``,
    subthreshold coupling ``a``, time constant ``tau_w``).

    Arguments as SpikingJelly 2.0.0's ``IzhikevichNode``; ``backend`` is keyword-only.
    """

    spikingjelly_name = "IzhikevichNode"

    def __init__(
        self,
        tau: float = 2.0,
        v_c: float = 0.8,
        a0: float = 1.0,
        v_threshold: float = 1.0,
        v_reset: float | None = 0.0,
        v_rest: float = -0.1,
        w_rest: float = 0.0,
        tau_w: float = 2.0,
        a: float = 0.0,
        b: float = 0.0,
        surrogate_function: nn.Module = _DEFAULT_SURROGATE,
        detach_reset: bool = False,
        step_mode: str = "s",
        store_v_seq: bool = False,
        *,
        backend: str = "torch",
    ) -> None:
        owner = type(self).__name__
        tau = _check_tau(owner, "tau", tau)
        a0 = _positive(owner, "a0", a0)
        values = {
            n: _as_float(owner, n, val)
            for n, val in (("v_c", v_c), ("v_rest", v_rest), ("w_rest", w_rest),
                           ("tau_w", tau_w), ("a", a), ("b", b))
        }
        if values["tau_w"] == 0.0:
            raise ValueError(f"{owner}: tau_w must not be 0.")
        base = (v_threshold, v_reset, surrogate_function, detach_reset, step_mode, store_v_seq)
        super().__init__(*base, backend=backend)
        self.register_memory("w", values["w_rest"])
        self.tau, self.a0 = tau, a0
        self.v_c, self.v_rest, self.w_rest = values["v_c"], values["v_rest"], values["w_rest"]
        self.tau_w, self.a, self.b = values["tau_w"], values["a"], values["b"]

    def define_dynamics(self, surrogate: SurrogateExpr) -> NeuronDynamics:
        v, x, w, h, s = var("v"), var("x"), var("w"), var("h"), var("spike")
        charge = v + (x + self.a0 * (v - self.v_rest) * (v - self.v_c) - w) / self.tau
        w_next = w + (self.a * (h - self.v_rest) - w) / self.tau_w + self.b * s
        return NeuronDynamics(
            "izhikevich",
            charge,
            self.v_threshold,
            self.v_reset,
            surrogate,
            self.detach_reset,
            states=(State("w", self.w_rest, w_next),),
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", tau={self.tau}, v_c={self.v_c}, a0={self.a0}, v_rest={self.v_rest}, "
            f"w_rest={self.w_rest}, tau_w={self.tau_w}, a={self.a}, b={self.b}"
        )
