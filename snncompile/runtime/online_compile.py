"""Per-step compiled modules for the online training loops (:func:`compile_online`).

The online loops of :mod:`snncompile.online` (OTTT, SLTT, FPTT) call a network once per time
step. :func:`compile_online` compiles such a network into a module that runs one step per call
and shares its parameters: an :class:`~snncompile.online.OTTTSequential` gets its spike/trace
routing resolved once into generated ``fx`` code; any other network goes through
:func:`snncompile.optimize` with ``T = 1``. This is the compiler side of online training; the
eager modules and the loops (:mod:`snncompile.online`) do not import it (``compile_online``
there forwards here on first use).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from snncompile.neuron import BaseNode, OTTTLIFNode
from snncompile.online import GradwithTrace, OTTTSequential, SpikeTraceOp, _memory_modules

__all__ = ["OnlineModule", "compile_online"]


def _contains_ottt(module: nn.Module) -> bool:
    return any(isinstance(m, OTTTLIFNode) for m in module.modules())


def _reset_states(module: nn.Module) -> None:
    for m in _memory_modules(module):
        m.reset()


def _unstep(y: Any) -> Any:
    """Drop the length-1 time axis of a compiled module's output (tensors inside lists too)."""
    if isinstance(y, torch.Tensor):
        return y[0]
    if isinstance(y, (list, tuple)):
        return type(y)(_unstep(e) for e in y)
    return y


class _SpikeOf(nn.Module):
    """Select the spike of a ``[spike, trace]`` pair (what OTTTSequential does before a neuron)."""

    def forward(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        return x[0]


def _plan_ottt(model: OTTTSequential, backend: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Resolve OTTTSequential's run-time routing once and emit train/eval ``fx.GraphModule``s.

    In training the value after an OTTT neuron is a ``[spike, trace]`` pair, so whether each
    member is a neuron, a :class:`GradwithTrace` or a :class:`SpikeTraceOp` is known statically;
    the generated code calls the right wrapper directly instead of testing types and parameters
    at every step. Neurons are copies (the compiled module's own state, with ``backend`` set);
    every other member is the model's own module, so parameters are shared.
    """
    root = nn.Module()
    train_g, eval_g = fx.Graph(), fx.Graph()
    x_train = train_g.placeholder("x")
    x_eval = eval_g.placeholder("x")
    pair = False
    for index, member in enumerate(model):
        where = f"OTTTSequential[{index}] ({type(member).__name__})"
        if isinstance(member, OTTTLIFNode):
            node = copy.deepcopy(member)
            node.reset()
            node.backend = backend
            root.add_module(f"neuron{index}", node)
            if pair:
                root.add_module(f"spike_of{index}", _SpikeOf())
                x_train = train_g.call_module(f"spike_of{index}", (x_train,))
            x_train = train_g.call_module(f"neuron{index}", (x_train,))
            x_eval = eval_g.call_module(f"neuron{index}", (x_eval,))
            pair = True
            continue
        if _contains_ottt(member):
            raise NotImplementedError(
                f"compile_online: {where} contains an OTTTLIFNode below the top level; "
                f"OTTTSequential only routes [spike, trace] pairs between its direct members. "
                f"Flatten the network into one OTTTSequential."
            )
        inner = member.module if isinstance(member, (GradwithTrace, SpikeTraceOp)) else member
        root.add_module(f"layer{index}", inner)
        x_eval = eval_g.call_module(f"layer{index}", (x_eval,))
        if not pair:
            if isinstance(member, (GradwithTrace, SpikeTraceOp)):
                raise TypeError(
                    f"compile_online: {where} expects a [spike, trace] pair but no OTTTLIFNode "
                    f"comes before it; remove the wrapper or put an OTTTLIFNode before it."
                )
            x_train = train_g.call_module(f"layer{index}", (x_train,))
            continue
        if isinstance(member, SpikeTraceOp) or (
            not isinstance(member, GradwithTrace) and next(member.parameters(), None) is None
        ):
            root.add_module(f"spike_trace{index}", SpikeTraceOp(inner))
            x_train = train_g.call_module(f"spike_trace{index}", (x_train,))
        else:
            root.add_module(f"grad_with_trace{index}", GradwithTrace(inner))
            x_train = train_g.call_module(f"grad_with_trace{index}", (x_train,))
            pair = False
    train_g.output(x_train)
    eval_g.output(x_eval)
    return (
        fx.GraphModule(root, train_g, class_name="OTTTStepTrain"),
        fx.GraphModule(root, eval_g, class_name="OTTTStepEval"),
    )


class OnlineModule(nn.Module):
    """One time step of a compiled network, for the online training loops.

    Built by :func:`compile_online`. Call it like the eager single-step network: ``[N, ...]`` in,
    one step's output out; its state persists between calls until ``functional.reset_net``
    (which resets this module's own neuron copies; the eager model's state is never touched).
    Parameters are the eager model's own tensors, so an optimizer built on
    ``model.parameters()`` trains both.

    Attributes:
        kind: ``'ottt'`` (an :class:`OTTTSequential` resolved into fixed train/eval code) or
            ``'graph'`` (a :func:`snncompile.optimize` module run with ``T = 1`` per call).
        backend: the neuron backend (``'auto'``, ``'torch'``, ``'cpu'``, ``'cuda'``).
        compiled: the :class:`~snncompile.runtime.compiled.CompiledModule` (``'graph'``) or the
            training-mode ``fx.GraphModule`` (``'ottt'``); ``.code`` shows the generated code.
    """

    def __init__(
        self,
        kind: str,
        compiled: nn.Module,
        *,
        eval_module: nn.Module | None,
        example_shape: tuple[int, ...],
        backend: str,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.compiled = compiled
        # Registered under a name that shares submodules with `compiled` (no duplicate params).
        self._eval_module = eval_module
        self.example_shape = tuple(example_shape)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> Any:
        """Run one time step ``x`` of shape ``[N, ...]``."""
        if isinstance(x, torch.Tensor) and x.dim() != len(self.example_shape):
            raise ValueError(
                f"OnlineModule runs ONE time step: expected input [N, ...] with "
                f"{len(self.example_shape)} dims like the example {list(self.example_shape)}, "
                f"got shape {list(x.shape)}. Call it once per step (ottt_online_training and "
                f"fptt_online_training do) instead of passing a whole sequence."
            )
        if self.kind == "graph":
            return _unstep(self.compiled(x.unsqueeze(0)))
        if self.training or self._eval_module is None:
            return self.compiled(x)
        return self._eval_module(x)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, backend={self.backend}"


def compile_online(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    backend: str = "auto",
    strict: bool = False,
) -> OnlineModule:
    """The implementation of :func:`snncompile.online.compile_online` (documented there)."""
    if backend not in ("auto", "torch", "cpu", "cuda"):
        raise ValueError(
            f"compile_online: backend must be 'auto', 'torch', 'cpu' or 'cuda', got {backend!r}."
        )
    if not isinstance(example_input, torch.Tensor):
        raise TypeError("compile_online: example_input must be one time step [N, ...] tensor.")
    if _contains_ottt(model):
        if not isinstance(model, OTTTSequential):
            raise NotImplementedError(
                f"compile_online: {type(model).__name__} contains OTTTLIFNode but is not an "
                f"OTTTSequential; OTTT networks must be an OTTTSequential (it routes the "
                f"[spike, trace] pairs) whose direct members are the neurons and layers."
            )
        train_gm, eval_gm = _plan_ottt(model, backend)
        online_module = OnlineModule(
            "ottt",
            train_gm,
            eval_module=eval_gm,
            example_shape=tuple(example_input.shape),
            backend=backend,
        )
    else:
        from snncompile.api import optimize

        compiled = optimize(
            model, example_input.unsqueeze(0), mode="train", backend=backend, strict=strict
        )
        for m in compiled.modules():
            # The compiled module's own neuron copies: T = 1 per call, so 'auto' fuses a step
            # when it has enough neurons (the multi-step kernels with one step).
            if isinstance(m, BaseNode) and backend in m.supported_backends:
                m.backend = backend
        _reset_states(compiled)
        online_module = OnlineModule(
            "graph",
            compiled,
            eval_module=None,
            example_shape=tuple(example_input.shape),
            backend=backend,
        )
    return online_module.train(model.training)
