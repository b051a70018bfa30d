r"""Quadratic integrate-and-fire neuron (SpikingJelly 2.0.0's ``QIFNode``).

Charge (SpikingJelly's operation order, bit-identical spikes and membrane on float32)::

    H = V + (X + a0 * (V - v_rest) * (V - v_c)) / tau

then the usual fire (``H >= v_threshold``) and hard (``v_reset``, default -0.1) or soft reset.
"""

from __future__ import annotations

from torch import nn

from snncompile.dynamics.expr import var
from snncompile.dynamics.neuron import NeuronDynamics
from snncompile.dynamics.surrogates import SurrogateExpr
from snncompile.neuron import _DEFAULT_SURROGATE, BaseNode, _as_float, _check_tau, _positive


def check_rest(owner: str, v_threshold: float, v_rest: float, v_reset: float | None) -> None:
    """SpikingJelly's constraints: ``v_threshold > v_reset`` and ``v_rest >= v_reset``."""
    if v_reset is not None and not (v_threshold > v_reset and v_rest >= v_reset):
        raise ValueError(
            f"{owner}: needs v_threshold > v_reset and v_rest >= v_reset (as SpikingJelly), got "
            f"v_threshold={v_threshold}, v_rest={v_rest}, v_reset={v_reset}."
        )


class QIFNode(BaseNode):
    """Quadratic integrate-and-fire: ``H = V + (X + a0 (V - v_rest)(V - v_c)) / tau``.

    Arguments as SpikingJelly 2.0.0's ``QIFNode`` (``tau > 1``, ``a0 > 0``); ``backend`` is
    keyword-only (``'torch'``, ``'cpu'``, ``'cuda'``, ``'auto'``).
    """

    spikingjelly_name = "QIFNode"

    def __init__(
        self,
        tau: float = 2.0,
        v_c: float = 0.8,
        a0: float = 1.0,
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
        a0 = _positive(owner, "a0", a0)
        v_c = _as_float(owner, "v_c", v_c)
        v_rest = _as_float(owner, "v_rest", v_rest)
        base = (v_threshold, v_reset, surrogate_function, detach_reset, step_mode, store_v_seq)
        super().__init__(*base, backend=backend)
        check_rest(owner, self.v_threshold, v_rest, self.v_reset)
        self.tau, self.v_c, self.a0, self.v_rest = tau, v_c, a0, v_rest

    def define_dynamics(self, surrogate: SurrogateExpr) -> NeuronDynamics:
        v, x = var("v"), var("x")
        charge = v + (x + self.a0 * (v - self.v_rest) * (v - self.v_c)) / self.tau
        return NeuronDynamics(
            "qif", charge, self.v_threshold, self.v_reset, surrogate, self.detach_reset
        )

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", tau={self.tau}, v_c={self.v_c}, a0={self.a0}, v_rest={self.v_rest}"
        )


__all__ = ["QIFNode", "check_rest"]
