"""The ``T = 1`` program of a compiled module: one time step without the sequence machinery.

Streaming calls a compiled module once per time step with ``x`` of shape ``[1, N, *]``, the
neuron state carried in the module between calls. The generated sequence code pays for ``T``
on every call: ``flatten(0, 1)`` / ``unflatten(0, (T, -1))`` around every stateless run, and
each neuron's multi-step call checks its input, picks a backend, looks up its fused dynamics and
unbinds and stacks a one-element sequence -- together more than the step itself on small
layers. :func:`build_one_step` lowers the same optimized IR a second time for ``T = 1``:

* every ``seq`` ``[1, N, *]`` and ``flat`` ``[1*N, *]`` value is held as the ``[N, *]`` tensor it
  is at one step: the input is ``x[0]``, ``MERGE_TIME`` / ``SPLIT_TIME`` vanish, and the outputs
  are ``y.unsqueeze(0)``;
* stateless (``flat``) nodes call the very same modules / functions on the same values;
* neurons whose step machinery is :class:`snncompile.neuron.BaseNode`'s own run
  :func:`neuron_step`, i.e. ``single_step_forward`` on ``[N, *]`` -- exactly the one iteration
  their torch loop runs -- whenever their multi-step call would have taken the torch loop;
  otherwise (a fused kernel by the ``'auto'`` size rule or an explicit ``'cpu'``/``'cuda'``
  backend, ``store_v_seq``, forward hooks such as monitors) they are called as before on
  ``[1, N, *]``; other stateful modules, per-step loops and per-step batchnorms are called on
  ``[1, N, *]`` too;
* a graph with anything else (a sequence-level op such as ``x.mean(0)``, which needs the time
  axis) gets no ``T = 1`` program: such modules always run the sequence code.

The program is generated Python code (torch.fx's code generator) whose ``self`` is the compiled
module's ``gm``: it looks up the same attributes at call time, so parameters, ``.to(device)``,
``load_state_dict`` and ``reset_net`` act on it as on the sequence code. The result equals the
sequence code's at ``T = 1`` bit for bit (the same operations on the same values).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from snncompile.ir.graph import Graph, Node, Ref, fill_refs
from snncompile.ir.ops import Layout, Op, OpGroup
from snncompile.runtime.fused import AUTO_MIN_ELEMENTS
from snncompile.runtime.fused_backends import _auto_impl


def steppable(module: nn.Module) -> bool:
    """Whether ``module``'s multi-step call on ``[1, N, *]`` is its ``single_step_forward``.

    True for snncompile neurons whose step-mode machinery is
    :class:`~snncompile.neuron.BaseNode`'s own (the torch loop runs ``v_float_to_tensor`` then
    ``_step`` once per step, as ``single_step_forward`` does); subclasses that replace any of it
    are called as they are.
    """
    from snncompile.base import MemoryModule
    from snncompile.neuron import BaseNode

    if not isinstance(module, BaseNode):
        return False
    cls = type(module)
    return (
        cls.single_step_forward is BaseNode.single_step_forward
        and cls.multi_step_forward is BaseNode.multi_step_forward
        and cls._multi_step_torch is BaseNode._multi_step_torch
        and cls.forward is MemoryModule.forward
    )


def neuron_step(node: Any, x: torch.Tensor) -> torch.Tensor:
    """One time step of the multi-step neuron ``node`` on ``x`` (``[N, *]``); returns ``[N, *]``.

    ``single_step_forward(x)`` when ``node(x.unsqueeze(0))`` would run the torch loop
    (``backend='torch'``, or ``'auto'`` below :data:`~snncompile.runtime.fused.AUTO_MIN_ELEMENTS`
    neuron-steps), keeps no ``v_seq`` and no forward hook watches it; else that call itself.
    """
    if (
        not (node._forward_hooks or node._forward_pre_hooks)
        and not (_global_forward_hooks or _global_forward_pre_hooks)
        and not node.store_v_seq
        and (
            node.backend == "torch"
            or (
                node.backend == "auto"
                and x.numel() < AUTO_MIN_ELEMENTS
                and type(node)._backend_impls.get("auto") is _auto_impl
            )
        )
    ):
        return node.single_step_forward(x)
    return node(x.unsqueeze(0))[0]


class OneStep:
    """A generated ``T = 1`` program; ``program(gm, x)`` runs it on ``x`` ``[1, N, *]``.

    Copies of the compiled module share it (it holds no module state); a pickled and reloaded
    compiled module has none and runs every call through ``gm``.
    """

    def __init__(self, fxg: fx.Graph) -> None:
        code = fxg.python_code(root_module="self")
        namespace: dict[str, Any] = dict(code.globals)
        exec(compile(code.src, "<snncompile one-step program>", "exec"), namespace)  # noqa: S102
        self.fn = namespace["forward"]
        self.src = code.src

    def __call__(self, gm: nn.Module, x: torch.Tensor) -> Any:
        return self.fn(gm, x)

    def __deepcopy__(self, memo: dict[int, Any]) -> OneStep:
        return self

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_none, ())


def _none() -> None:
    return None


class _Unsupported(Exception):
    """The graph has a node that the ``T = 1`` program does not express."""


def build_one_step(graph: Graph, gm: fx.GraphModule) -> OneStep | None:
    """The ``T = 1`` program of ``graph`` as lowered into ``gm``, or ``None`` (module doc)."""
    attrs: dict[str, str] = gm.meta.get("snn_attrs", {})
    try:
        return OneStep(_lower(graph, attrs))
    except _Unsupported:
        return None


def _lower(graph: Graph, attrs: dict[str, str]) -> fx.Graph:
    g = fx.Graph()
    env: dict[str, Any] = {}
    seq_inputs = [n for n in graph.input_nodes if n.layout is Layout.SEQ]
    if len(graph.input_nodes) != 1 or len(seq_inputs) != 1:
        raise _Unsupported

    def fill(template: Any, node: Node) -> Any:
        return fill_refs(template, lambda i: env[node.inputs[i]])

    def out(template: Any, node: Node) -> Any:
        def value(index: int) -> Any:
            src = graph[node.inputs[index]]
            if src.layout is Layout.SEQ and src.is_tensor:
                return g.call_method("unsqueeze", (env[src.name], 0))
            if src.layout not in (Layout.FLAT, Layout.NONE):
                raise _Unsupported
            return env[src.name]

        return fill_refs(template, value)

    def seq_call(node: Node, attr: str) -> Any:
        """Call the gm's module ``attr`` on ``[1, N, *]`` inputs; take step 0 of its output."""
        if not node.is_tensor:
            raise _Unsupported
        args = []
        for name in node.inputs:
            src = graph[name]
            lift = src.layout is Layout.SEQ and src.is_tensor
            args.append(g.call_method("unsqueeze", (env[name], 0)) if lift else env[name])
        return g.call_function(operator.getitem, (g.call_module(attr, tuple(args)), 0))

    for node in graph.nodes:
        args_t = node.attrs.get("args")
        if args_t is None:
            args_t = tuple(Ref(i) for i in range(len(node.inputs)))
        kwargs_t = node.attrs.get("kwargs") or {}
        if node.op is Op.INPUT:
            env[node.name] = g.call_function(operator.getitem, (g.placeholder(node.name), 0))
        elif node.op is Op.CONSTANT:
            env[node.name] = g.get_attr(attrs[node.name])
        elif node.op is Op.OUTPUT:
            g.output(out(args_t[0] if len(args_t) == 1 else args_t, node))
        elif node.op in (Op.MERGE_TIME, Op.SPLIT_TIME):
            env[node.name] = env[node.inputs[0]]
        elif node.name not in attrs and node.module is not None:
            raise _Unsupported
        elif node.attrs.get("per_step") or (
            node.layout is Layout.SEQ and node.op.group is OpGroup.NEURON
        ):
            module = node.module
            if (
                not node.attrs.get("per_step")
                and module is not None
                and steppable(module)
                and len(node.inputs) == 1
                and tuple(args_t) == (Ref(0),)
                and not kwargs_t
            ):
                env[node.name] = g.call_function(
                    neuron_step, (g.get_attr(attrs[node.name]), env[node.inputs[0]])
                )
                continue
            in_order = tuple(Ref(i) for i in range(len(node.inputs)))
            if node.name in attrs and (
                node.attrs.get("per_step")  # the loop / per-step BN take the inputs in order
                or (tuple(args_t) == in_order and not kwargs_t)
            ):
                env[node.name] = seq_call(node, attrs[node.name])
            else:
                raise _Unsupported
        elif node.layout is not Layout.FLAT:
            raise _Unsupported  # sequence-level ops read the time axis
        elif node.module is not None:
            env[node.name] = g.call_module(
                attrs[node.name], fill(args_t, node), fill(kwargs_t, node)
            )
        elif isinstance(node.target, str):
            env[node.name] = g.call_method(node.target, fill(args_t, node), fill(kwargs_t, node))
        elif node.target is not None:
            env[node.name] = g.call_function(node.target, fill(args_t, node), fill(kwargs_t, node))
        else:
            raise _Unsupported
    return g
