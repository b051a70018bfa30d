"""The torch renderer of neuron dynamics: the eager reference (and the no-compiler fallback).

:func:`torch_multi_step` runs a :class:`~snncompile.dynamics.neuron.NeuronDynamics` over a sequence
with PyTorch ops in the order the expressions state (bit-identical to SpikingJelly's formulas on
float32) and lets autograd differentiate it; ``heaviside`` uses the surrogate derivative
expression in backward. It is independent of the symbolic backward, which makes it the check for
:func:`~snncompile.dynamics.expr.grad` and the generated kernels. Every state of a multi-state
neuron is carried (:func:`torch_multi_step_states`); the extra states' next values are computed
from the pre-step values, ``h`` and the unscaled spike, as the kernels do.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from snncompile.codegen.render import evaluate
from snncompile.dynamics.expr import Expr, substitute
from snncompile.dynamics.neuron import SPIKE, H, NeuronDynamics

_programs: dict[NeuronDynamics, dict[str, Expr]] = {}


def _step_exprs(d: NeuronDynamics) -> dict[str, Expr]:
    exprs = _programs.get(d)
    if exprs is None:
        spike = d.fire(H)
        exprs = {"h": d.charge, "s": d.emit(spike), "v": d.reset(H, spike)}
        for st in d.states:
            exprs[st.name] = substitute(st.update, {SPIKE: spike})
        _programs[d] = exprs
    return exprs


def torch_step_states(
    dynamics: NeuronDynamics,
    x: torch.Tensor,
    states: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One step from ``states`` (``{'v': ..., extra state: ...}``): ``(spike, next states, h)``."""
    e = _step_exprs(dynamics)
    env = dict(params or {})
    env.update(states)
    env["x"] = x
    h = evaluate({"h": e["h"]}, env)["h"]
    env["h"] = h
    names = dynamics.state_names
    out = evaluate({"s": e["s"], **{n: e[n] for n in names}}, env)
    return out["s"], {n: out[n] for n in names}, h


def torch_step(
    dynamics: NeuronDynamics,
    x: torch.Tensor,
    v: torch.Tensor,
    params: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step: returns ``(spike, v_next, h)`` in the dtype of ``x``/``v``.

    ``spike`` is what the neuron emits (times its ``output_gain``, if it has one). Extra states
    (if the neuron has any) start from their initial values.
    """
    states = {n: torch.full_like(v, val) for n, val in dynamics.initial_states.items()}
    states["v"] = v
    spike, nxt, h = torch_step_states(dynamics, x, states, params)
    return spike, nxt["v"], h


def torch_multi_step_states(
    dynamics: NeuronDynamics,
    x_seq: torch.Tensor,
    states: Mapping[str, torch.Tensor | float] | None = None,
    params: Mapping[str, torch.Tensor] | None = None,
    store_v_seq: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """Run ``x_seq`` ``[T, *]`` from ``states`` (missing ones start from their initial values);
    returns ``(spike_seq, last states, v_seq)``.

    State and arithmetic are float32 for float16/bfloat16 inputs (like the fused kernels);
    ``spike_seq`` and ``v_seq`` come back in the input dtype, the states in float32.
    """
    in_dtype = x_seq.dtype
    low = in_dtype in (torch.float16, torch.bfloat16)
    xs = x_seq.float() if low else x_seq
    shape = xs.shape[1:]
    cur: dict[str, torch.Tensor] = {}
    for name, init in dynamics.initial_states.items():
        value = (states or {}).get(name, init)
        if not isinstance(value, torch.Tensor):
            value = torch.full(shape, float(value), dtype=xs.dtype, device=xs.device)
        value = value.float() if low else value
        cur[name] = value.expand(shape) if value.shape != shape else value
    spikes: list[torch.Tensor] = []
    vs: list[torch.Tensor] = []
    for x in xs.unbind(0):  # unbind, not x_seq[t]: keeps backward linear in T
        s, cur, _ = torch_step_states(dynamics, x, cur, params)
        spikes.append(s)
        if store_v_seq:
            vs.append(cur["v"])
    spike_seq = torch.stack(spikes).to(in_dtype)
    v_seq = torch.stack(vs).to(in_dtype) if store_v_seq else None
    return spike_seq, cur, v_seq


def torch_multi_step(
    dynamics: NeuronDynamics,
    x_seq: torch.Tensor,
    v_init: torch.Tensor,
    params: Mapping[str, torch.Tensor] | None = None,
    store_v_seq: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run ``x_seq`` ``[T, *]`` from ``v_init`` ``[*]``; returns ``(spike_seq, v_last, v_seq)``.

    State and arithmetic are float32 for float16/bfloat16 inputs (like the fused kernels);
    ``spike_seq`` and ``v_seq`` come back in the input dtype, ``v_last`` in float32. Extra
    states start from their initial values (use :func:`torch_multi_step_states` to pass them).
    """
    spike_seq, last, v_seq = torch_multi_step_states(
        dynamics, x_seq, {"v": v_init}, params, store_v_seq
    )
    return spike_seq, last["v"], v_seq
