r"""Current-based LIF neuron (SpikingJelly 2.0.0's ``CUBALIFNode``).

Two states, the synaptic current ``c`` (starting at 0) and the membrane ``v``. One step, in
SpikingJelly's operation order (``cuba_lif_step``)::

    C = C * c_decay + X
    H = V * v_decay + C
    S = heaviside(H - v_threshold)
    V = reset(H, S)

SpikingJelly's constructor takes ``(c_decay, v_decay, v_threshold, v_reset,
surrogate_function)`` with the ``Rect`` surrogate by default; the usual ``detach_reset``,
``step_mode``, ``store_v_seq`` follow here (keyword ``backend`` last). ``Rect`` has no expression
form, so the default configuration runs the torch loop; any surrogate with one is fused.
"""

from __future__ import annotations

from torch import nn

from snncompile import surrogate as sg
from snncompile.dynamics.expr import var
from snncompile.dynamics.neuron import NeuronDynamics, State
from snncompile.dynamics.surrogates import SurrogateExpr
from snncompile.neuron import BaseNode, _as_float

_DEFAULT_RECT = sg.Rect()


class CUBALIFNode(BaseNode):
    """CUrrent-BAsed LIF: the input charges a decaying current, which charges the membrane."""

    spikingjelly_name = "CUBALIFNode"

    def __init__(
        self,
        c_decay: float = 0.5,
        v_decay: float = 0.75,
        v_threshold: float = 0.5,
        v_reset: float | None = 0.0,
        surrogate_function: nn.Module = _DEFAULT_RECT,
        detach_reset: bool = False,
        step_mode: str = "s",
        store_v_seq: bool = False,
        *,
        backend: str = "torch",
    ) -> None:
        owner = type(self).__name__
        c_decay = _as_float(owner, "c_decay", c_decay)
        v_decay = _as_float(owner, "v_decay", v_decay)
        if surrogate_function is _DEFAULT_RECT:
            surrogate_function = sg.Rect()
        base = (v_threshold, v_reset, surrogate_function, detach_reset, step_mode, store_v_seq)
        super().__init__(*base, backend=backend)
        self.register_memory("c", 0.0)
        self.c_decay, self.v_decay = c_decay, v_decay

    def define_dynamics(self, surrogate: SurrogateExpr) -> NeuronDynamics:
        v, x, c = var("v"), var("x"), var("c")
        c_next = c * self.c_decay + x
        return NeuronDynamics(
            "cubalif",
            v * self.v_decay + c_next,
            self.v_threshold,
            self.v_reset,
            surrogate,
            self.detach_reset,
            states=(State("c", 0.0, c_next),),
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", c_decay={self.c_decay}, v_decay={self.v_decay}"
