"""The torch renderer of neuron dynamics: the eager reference (and the no-compiler fallback).

:func:`torch_multi_step` runs a :class:`~snncompile.dynamics.neuron.NeuronDynamics` over a sequence
with PyTorch ops in the order the expressions state (bit-identical to SpikingJelly's formulas on
float32) and lets autograd differentiate it; ``heaviside`` uses the surrogate derivative
expression in backward. It is independent of the symbolic backward, which makes it the check for
:func:`~snncompile.dynamics.expr.grad` and the generated kernels.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from snncompile.codegen.render import evaluate
from snncompile.dynamics.expr import Expr
from snncompile.dynamics.neuron import H, NeuronDynamics

_programs: dict[NeuronDynamics, dict[str, Expr]] = {}


def _step_exprs(d: NeuronDynamics) -> dict[str, Expr]:
    exprs = _programs.get(d)
    if exprs is None:
        spike = d.fire(H)
        exprs = {"h": d.charge, "s": d.emit(spike), "v": d.reset(H, spike)}
        _programs[d] = exprs
    return exprs


def torch_step(
    dynamics: NeuronDynamics,
    x: torch.Tensor,
    v: torch.Tensor,
    params: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step: returns ``(spike, v_next, h)`` in the dtype of ``x``/``v``.

    ``spike`` is what the neuron emits (times its ``output_gain``, if it has one).
    """
    e = _step_exprs(dynamics)
    env = dict(params or {})
    env.update(v=v, x=x)
    h = evaluate({"h": e["h"]}, env)["h"]
    out = evaluate({"s": e["s"], "v": e["v"]}, {**(params or {}), "h": h})
    return out["s"], out["v"], h


def torch_multi_step(
    dynamics: NeuronDynamics,
    x_seq: torch.Tensor,
    v_init: torch.Tensor,
    params: Mapping[str, torch.Tensor] | None = None,
    store_v_seq: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run ``x_seq`` ``[T, *]`` from ``v_init`` ``[*]``; returns ``(spike_seq, v_last, v_seq)``.

    State and arithmetic are float32 for float16/bfloat16 inputs (like the fused kernels);
    ``spike_seq`` and ``v_seq`` come back in the input dtype, ``v_last`` in float32.
    """
    in_dtype = x_seq.dtype
    low = in_dtype in (torch.float16, torch.bfloat16)
    xs = x_seq.float() if low else x_seq
    v = v_init.float() if low else v_init
    spikes: list[torch.Tensor] = []
    vs: list[torch.Tensor] = []
    for x in xs.unbind(0):  # unbind, not x_seq[t]: keeps backward linear in T
        s, v, _ = torch_step(dynamics, x, v, params)
        spikes.append(s)
        if store_v_seq:
            vs.append(v)
    spike_seq = torch.stack(spikes).to(in_dtype)
    v_seq = torch.stack(vs).to(in_dtype) if store_v_seq else None
    return spike_seq, v, v_seq
