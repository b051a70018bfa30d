"""Inference form of SpikingJelly's online-training (OTTT/SLTT) networks.

SpikingJelly 2.0.0's ``OTTTLIFNode`` and ``SLTTLIFNode`` differ from ``LIFNode`` only in
training: there they detach the membrane between steps and (OTTT) also return a presynaptic
trace, ``[spike, trace]``, which ``OTTTSequential`` routes between its members. In eval mode
(``module.training`` false) their step is SpikingJelly's ``functional.lif_step`` with the
Heaviside forward and no trace, i.e. exactly a ``LIFNode`` step with the same ``tau``,
``decay_input``, ``v_threshold`` and ``v_reset``:

    H = V + (X - (V - v_r)) / tau  (decay_input)   or   H = V - (V - v_r) / tau + X
    S = heaviside(H - v_threshold),  V = S * v_reset + (1 - S) * H  (or H - S * v_threshold)

and an ``OTTTSequential`` fed a tensor calls its members in order, like ``nn.Sequential``.

:func:`online_eval_equivalent` builds that form for an inference compile (and so for the ONNX
export): a copy of the model in which every online neuron is a SpikingJelly ``LIFNode`` (no
parameters, so the state dict keeps its keys) and every ``OTTTSequential`` an ``nn.Sequential``
of the same children (same names). Parameters and buffers are shared with the model. Training
semantics are never rewritten: a training compile keeps the containers as written.
"""

from __future__ import annotations

from torch import nn

from snncompile.frontend.rules import sj_modules
from snncompile.frontend.trace import copy_sharing_parameters

_ONLINE_NEURONS = ("OTTTLIFNode", "SLTTLIFNode")
_ONLINE_CONTAINERS = ("OTTTSequential",)


def _is_sj(module: nn.Module, names: tuple[str, ...]) -> bool:
    cls = type(module)
    return cls.__module__.startswith("spikingjelly") and cls.__name__ in names


def has_online_modules(model: nn.Module) -> bool:
    """Whether ``model`` holds a SpikingJelly OTTT/SLTT neuron or ``OTTTSequential``."""
    return any(_is_sj(m, _ONLINE_NEURONS + _ONLINE_CONTAINERS) for m in model.modules())


def _lif_like(node: nn.Module, lif_cls: type) -> nn.Module:
    """A SpikingJelly ``LIFNode`` with the online neuron's eval-mode dynamics and state."""
    lif = lif_cls(
        tau=float(node.tau),
        decay_input=bool(node.decay_input),
        v_threshold=float(node.v_threshold),
        v_reset=None if node.v_reset is None else float(node.v_reset),
        surrogate_function=node.surrogate_function,
        detach_reset=bool(node.detach_reset),
        step_mode="s",
    )
    return lif.train(node.training)


def online_eval_equivalent(model: nn.Module) -> nn.Module:
    """The eval-mode equivalent of ``model`` with its online modules replaced (see above).

    Returns ``model`` itself when it holds no online modules.

    Raises:
        ValueError: an online module is in training mode (its training forward returns
            ``[spike, trace]`` pairs and cannot be replaced; compile it with ``mode='train'``).
    """
    if not has_online_modules(model):
        return model
    sj = sj_modules()
    for name, m in model.named_modules():
        if _is_sj(m, _ONLINE_NEURONS + _ONLINE_CONTAINERS) and m.training:
            raise ValueError(
                f"online_eval_equivalent: {name or 'the model'} ({type(m).__name__}) is in "
                "training mode; its eval-mode form is only exact in eval mode. Call "
                "model.eval() first."
            )
    work = copy_sharing_parameters(model)

    def replace(module: nn.Module) -> nn.Module:
        if _is_sj(module, _ONLINE_NEURONS):
            return _lif_like(module, sj.neuron.LIFNode)
        if _is_sj(module, _ONLINE_CONTAINERS):
            plain = nn.Sequential()
            for k, member in module.named_children():
                plain.add_module(k, member)
            module = plain.train(module.training)
        for child_name, child in list(module.named_children()):
            setattr(module, child_name, replace(child))
        return module

    return replace(work)
