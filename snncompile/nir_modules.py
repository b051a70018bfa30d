"""Modules for NIR primitives that have no SpikingJelly counterpart (used by ``import_nir``).

:func:`snncompile.import_nir` maps NIR ``IF``/``LIF`` nodes with uniform parameters onto
:class:`snncompile.neuron.IFNode` / :class:`~snncompile.neuron.LIFNode`. Everything else that
NIR can express lives here, written with the same conventions as the rest of snncompile
(``step_mode`` ``'s'`` for ``[N, *]`` and ``'m'`` for ``[T, N, *]``, state in memories, reset
by :func:`snncompile.functional.reset_net`):

* :class:`NIRNeuron` -- the forward-Euler discretisation of NIR's ``LIF``, ``LI``, ``IF`` and
  ``I`` nodes with per-neuron parameters;
* :class:`NIRCubaNeuron` -- NIR's ``CubaLIF`` and ``CubaLI`` (a synaptic current in front of the
  membrane);
* :class:`Scale` and :class:`Threshold` -- the stateless ``Scale`` and ``Threshold`` nodes;
* :class:`RecurrentBlock` -- a strongly connected part of a NIR graph stepped through time with
  a one-step delay on its feedback edges (see its docstring).

Every discretised update uses the *decay* ``beta = 1 - dt / tau`` and the per-step *input gain*
of the NIR equations (``r * dt / tau`` for leaky nodes); the charge is written as
``H = beta * (V - v_leak) + v_leak + gain * X`` so that the common case ``v_leak = 0``,
``gain = 1`` computes exactly ``beta * V + X``. Firing follows SpikingJelly's rule
``S = [H >= v_threshold]`` (NIR's text says ``>``; see ``docs/nir.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from snncompile import surrogate
from snncompile.base import MemoryModule, check_multi_step_input

__all__ = ["NIRCubaNeuron", "NIRNeuron", "RecurrentBlock", "Scale", "Threshold"]


def _first_bad(t: torch.Tensor, ok: torch.Tensor) -> str:
    idx = tuple(int(i) for i in torch.nonzero(~ok)[0]) if t.dim() else ()
    return f"{float(t[idx])!r}" + (f" at index {idx}" if t.dim() else "")


def _buffer(value: Any, owner: str = "", name: str = "") -> torch.Tensor:
    """A float32 tensor of a parameter array (scalars stay 0-d and broadcast), checked finite."""
    t = torch.as_tensor(value, dtype=torch.float32).detach().clone()
    ok = torch.isfinite(t)
    if owner and not bool(ok.all()):
        raise ValueError(f"{owner}: {name} must be finite, got {_first_bad(t, ok)}.")
    return t


def _retention(owner: str, name: str, value: Any) -> torch.Tensor:
    """A per-step retention (``1 - dt / tau``), checked to lie in ``(0, 1]``."""
    t = _buffer(value, owner, name)
    ok = (t > 0) & (t <= 1)
    if not bool(ok.all()):
        raise ValueError(
            f"{owner}: {name} (the per-step retention 1 - dt/tau) must lie in (0, 1], got "
            f"{_first_bad(t, ok)}; tau must be longer than the step dt."
        )
    return t


def _spike(fn: nn.Module, h: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """Heaviside forward (fires at ``h >= thr``) with the surrogate's gradient."""
    return fn(h - thr)


class _StepLoop(MemoryModule):
    """Shared multi-step loop: ``single_step_forward`` over ``x.unbind(0)``, outputs stacked."""

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        check_multi_step_input(x_seq, type(self).__name__)
        return torch.stack([self.single_step_forward(x) for x in x_seq.unbind(0)])


class NIRNeuron(_StepLoop):
    """A NIR ``LIF`` / ``LI`` / ``IF`` / ``I`` node with per-neuron parameters.

    One step: ``H = beta * (V - v_leak) + v_leak + gain * X``; without a threshold (``LI``,
    ``I``) the output is ``H`` and ``V = H``; with one, ``S = [H >= v_threshold]`` is the output
    and the membrane is reset hard (``V = S * v_reset + (1 - S) * H``) or, when ``v_reset`` is
    ``None``, by subtraction (``V = H - S * v_threshold``). The membrane starts at ``v_reset``
    (hard reset) or at 0.

    Args:
        beta: Per-step membrane retention ``1 - dt / tau`` (1 for ``IF``/``I``).
        gain: Per-step input gain (``r * dt / tau`` for leaky nodes, ``r * dt`` or ``r`` for
            integrators, see :func:`snncompile.import_nir`).
        v_leak: Leak (resting) potential.
        v_threshold: Firing threshold, or ``None`` for a non-spiking node.
        v_reset: Hard-reset potential, or ``None`` for reset by subtraction.
        surrogate_function: Surrogate gradient of the spike (forward: Heaviside).
        step_mode: ``'s'`` (``[N, *]``) or ``'m'`` (``[T, N, *]``).
    """

    def __init__(
        self,
        beta: Any,
        gain: Any,
        v_leak: Any = 0.0,
        v_threshold: Any | None = None,
        v_reset: Any | None = 0.0,
        surrogate_function: nn.Module | None = None,
        step_mode: str = "m",
    ) -> None:
        super().__init__(step_mode=step_mode)
        owner = type(self).__name__
        self.register_buffer("beta", _retention(owner, "beta", beta))
        self.register_buffer("gain", _buffer(gain, owner, "gain"))
        self.register_buffer("v_leak", _buffer(v_leak, owner, "v_leak"))
        self.spiking = v_threshold is not None
        self.soft_reset = v_reset is None
        thr = 0.0 if v_threshold is None else v_threshold
        self.register_buffer("v_threshold", _buffer(thr, owner, "v_threshold"))
        v_r = 0.0 if v_reset is None else v_reset
        self.register_buffer("v_reset", _buffer(v_r, owner, "v_reset"))
        self.surrogate_function = surrogate_function or surrogate.Sigmoid()
        self.register_memory("v", None)

    def _initial_v(self, x: torch.Tensor) -> torch.Tensor:
        if self.spiking and not self.soft_reset:
            return torch.zeros_like(x) + self.v_reset.to(x)
        return torch.zeros_like(x)

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Run one step on ``x`` (``[N, *]``) and return the spikes (or the membrane)."""
        v = self.v if isinstance(self.v, torch.Tensor) else self._initial_v(x)
        h = self.beta * (v - self.v_leak) + self.v_leak + self.gain * x
        if not self.spiking:
            self.v = h
            return h
        s = _spike(self.surrogate_function, h, self.v_threshold)
        if self.soft_reset:
            self.v = h - s * self.v_threshold
        else:
            self.v = s * self.v_reset + (1.0 - s) * h
        return s

    def extra_repr(self) -> str:
        kind = ("soft" if self.soft_reset else "hard") if self.spiking else "non-spiking"
        return f"shape={tuple(self.beta.shape)}, reset={kind}, step_mode={self.step_mode}"


class NIRCubaNeuron(_StepLoop):
    """A NIR ``CubaLIF`` (or, without threshold, ``CubaLI``) node.

    One step: ``I = alpha * I + syn_gain * X`` (``alpha = 1 - dt / tau_syn``,
    ``syn_gain = w_in * dt / tau_syn``), then the membrane update of :class:`NIRNeuron` driven by
    the new ``I`` (``beta = 1 - dt / tau_mem``, ``gain = r * dt / tau_mem``), fire and reset.
    Current and membrane start at 0 (the membrane at ``v_reset`` for hard reset).
    """

    def __init__(
        self,
        alpha: Any,
        syn_gain: Any,
        beta: Any,
        gain: Any,
        v_leak: Any = 0.0,
        v_threshold: Any | None = None,
        v_reset: Any | None = 0.0,
        surrogate_function: nn.Module | None = None,
        step_mode: str = "m",
    ) -> None:
        super().__init__(step_mode=step_mode)
        owner = type(self).__name__
        self.register_buffer("alpha", _retention(owner, "alpha", alpha))
        self.register_buffer("syn_gain", _buffer(syn_gain, owner, "syn_gain"))
        self.membrane = NIRNeuron(
            beta, gain, v_leak, v_threshold, v_reset, surrogate_function, step_mode="s"
        )
        self.register_memory("i_syn", None)

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Run one step on ``x`` (``[N, *]``)."""
        i_prev = self.i_syn if isinstance(self.i_syn, torch.Tensor) else torch.zeros_like(x)
        self.i_syn = self.alpha * i_prev + self.syn_gain * x
        return self.membrane.single_step_forward(self.i_syn)


class Scale(nn.Module):
    """NIR ``Scale``: ``y = x * scale`` elementwise (broadcast over the time and batch dims)."""

    def __init__(self, scale: Any) -> None:
        super().__init__()
        self.register_buffer("scale", _buffer(scale, "Scale", "scale"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale ``x`` (any ``[..., *features]`` layout)."""
        return x * self.scale


class Threshold(nn.Module):
    """NIR ``Threshold``: ``y = [x >= threshold]`` (SpikingJelly's tie rule), surrogate backward."""

    def __init__(self, threshold: Any, surrogate_function: nn.Module | None = None) -> None:
        super().__init__()
        self.register_buffer("threshold", _buffer(threshold, "Threshold", "threshold"))
        self.surrogate_function = surrogate_function or surrogate.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the spikes of ``x`` (any layout)."""
        return _spike(self.surrogate_function, x, self.threshold)


class RecurrentBlock(MemoryModule):
    """A cycle (strongly connected part) of a NIR graph, stepped through time.

    The members run in single-step mode in a fixed order each time step. An edge whose value is
    *delayed* carries what its source produced at the previous step (zeros before the first
    step); every other edge carries the value of the current step. :func:`snncompile.import_nir`
    delays the edges that leave a neuron inside the cycle, so a NIR ``LIF -> Affine -> LIF`` loop
    computes ``I_t = x_t + W s_{t-1} + b`` like snnTorch's ``RLeaky``.

    Args:
        members: ``(name, module)`` pairs in evaluation order.
        sources: For each member, ``(source name, delayed)`` pairs of its inputs inside the block.
        entries: For each external input of :meth:`forward` (in order), the member it feeds.
        outputs: Member names whose values :meth:`forward` returns (one tensor or a tuple).
        delayed_shapes: Per-sample output shape of every delayed source (for the zero state).
        step_mode: ``'s'`` or ``'m'`` (inputs ``[N, *]`` or ``[T, N, *]``).
    """

    def __init__(
        self,
        members: Sequence[tuple[str, nn.Module]],
        sources: dict[str, Sequence[tuple[str, bool]]],
        entries: Sequence[str],
        outputs: Sequence[str],
        delayed_shapes: dict[str, tuple[int, ...]],
        step_mode: str = "m",
    ) -> None:
        super().__init__(step_mode=step_mode)
        self.order = [name for name, _ in members]
        if len(set(self.order)) != len(self.order):
            raise ValueError(f"RecurrentBlock: member names repeat: {self.order}")
        # ModuleDict keys cannot hold dots; distinct names ('a.b', 'a_b') get distinct keys.
        self.keys: dict[str, str] = {}
        for name in self.order:
            key = _key(name)
            while key in self.keys.values():
                key += "_"
            self.keys[name] = key
        self.cells = nn.ModuleDict({self.keys[name]: m for name, m in members})
        self.sources = {k: [tuple(s) for s in v] for k, v in sources.items()}
        self.entries = list(entries)
        self.outputs = list(outputs)
        self.delayed_shapes = {k: tuple(int(d) for d in v) for k, v in delayed_shapes.items()}
        self.register_memory("prev", None)

    def single_step_forward(self, *xs: torch.Tensor) -> Any:  # type: ignore[override]
        """Run one step; ``xs`` are the external inputs (``[N, *]``) in ``entries`` order."""
        if len(xs) != len(self.entries):
            raise ValueError(
                f"RecurrentBlock expects {len(self.entries)} external inputs, got {len(xs)}"
            )
        like = xs[0]
        prev = self.prev
        if prev is None:
            n = like.shape[0]
            prev = {
                name: like.new_zeros((n, *shape)) for name, shape in self.delayed_shapes.items()
            }
        now: dict[str, torch.Tensor] = {}
        for name in self.order:
            total: torch.Tensor | None = None
            for x, target in zip(xs, self.entries, strict=True):
                if target == name:
                    total = x if total is None else total + x
            for src, delayed in self.sources.get(name, ()):
                value = prev[src] if delayed else now[src]
                total = value if total is None else total + value
            if total is None:
                raise ValueError(f"RecurrentBlock: member {name!r} received no input")
            now[name] = self.cells[self.keys[name]](total)
        self.prev = {name: now[name] for name in self.delayed_shapes}
        outs = tuple(now[name] for name in self.outputs)
        return outs[0] if len(outs) == 1 else outs

    def multi_step_forward(self, *x_seqs: torch.Tensor) -> Any:  # type: ignore[override]
        """Run ``[T, N, *]`` inputs step by step and stack each output over time."""
        for x in x_seqs:
            check_multi_step_input(x, type(self).__name__)
        per_step = zip(*(x.unbind(0) for x in x_seqs), strict=True)
        steps = [self.single_step_forward(*xs) for xs in per_step]
        if len(self.outputs) == 1:
            return torch.stack(steps)
        return tuple(torch.stack([s[i] for s in steps]) for i in range(len(self.outputs)))

    def extra_repr(self) -> str:
        return f"order={self.order}, step_mode={self.step_mode}"


def _key(name: str) -> str:
    """A ``ModuleDict`` key for a NIR node name (no dots)."""
    return "n_" + "".join(c if c.isalnum() or c == "_" else "_" for c in name)
