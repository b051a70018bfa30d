"""The eager (module) renderer: a neuron's expressions compiled to small Python functions.

A neuron module's own forward (``backend='torch'``, the single-step path, the reference every
fused kernel is tested against) runs its dynamics from the same expressions the kernels are
generated from. :func:`eager_step` turns a :class:`~snncompile.dynamics.neuron.NeuronDynamics`
into an :class:`EagerStep` of three Python functions, generated as source once per configuration
(one statement per distinct expression node, operands in the order the expression states them):

* ``charge(node, x, v, *extra) -> h``
* ``threshold(node, *extra) -> theta`` (``None`` when the threshold is the constant
  ``v_threshold``)
* ``updates(node, x, v, h, spike, *extra) -> next extra states`` (``None`` without extra states)
* ``reset(node, h, spike, theta) -> v`` (hard or soft, ``detach_reset`` applied)

Parameters (``param(name)``) are read as ``node.<name>`` at call time, so a learnable parameter
gets its gradient through PyTorch autograd. ``+ - * /`` and unary minus are Python operators on
tensors and Python floats -- exactly the operations a hand-written ``self.v + (x - self.v) /
self.tau`` performs, hence bit-identical to SpikingJelly's hand-written modules -- and every other
op calls the torch renderer's table (:data:`snncompile.codegen.render.TORCH_OPS`). Firing calls
the node's surrogate module (the spike is an argument of ``reset`` and ``updates``), so a
surrogate without an expression form still runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from snncompile.codegen.render import TORCH_OPS
from snncompile.dynamics.expr import Expr, Op, toposort, var
from snncompile.dynamics.neuron import NeuronDynamics

PY_OPS: dict[Op, str] = {
    Op.ADD: "({0} + {1})",
    Op.SUB: "({0} - {1})",
    Op.MUL: "({0} * {1})",
    Op.DIV: "({0} / {1})",
    Op.NEG: "(-{0})",
}


@dataclass(frozen=True)
class EagerStep:
    """The compiled eager functions of one neuron configuration (see the module docstring)."""

    charge: Callable[..., Any]
    threshold: Callable[..., Any] | None
    updates: Callable[..., tuple[Any, ...]] | None
    reset: Callable[..., Any]
    extra_states: tuple[str, ...]
    source: str


def _function(
    name: str,
    args: list[str],
    outputs: list[Expr],
    namespace: dict[str, Any],
    as_tuple: bool = False,
) -> str:
    lines = [f"def {name}({', '.join(args)}):"]
    rendered: dict[Expr, str] = {}
    for node in toposort(outputs):
        if node.op is Op.VAR:
            rendered[node] = node.arg
            continue
        if node.op is Op.PARAM:
            rendered[node] = f"_node.{node.arg}"
            continue
        if node.op is Op.CONST:
            rendered[node] = repr(float(node.arg))
            continue
        operands = [rendered[s] for s in node.src]
        fmt = PY_OPS.get(node.op)
        if fmt is not None:
            text = fmt.format(*operands)
        else:
            key = f"_op_{node.op.name.lower()}"
            namespace[key] = TORCH_OPS[node.op]
            text = f"{key}({', '.join(operands)})"
        tmp = f"_t{len(rendered)}"
        lines.append(f"    {tmp} = {text}")
        rendered[node] = tmp
    results = ", ".join(rendered[o] for o in outputs)
    lines.append(f"    return {results}{',' if as_tuple else ''}")
    return "\n".join(lines)


def eager_step(dynamics: NeuronDynamics) -> EagerStep:
    """Compile ``dynamics``' charge, threshold and state updates (cached per configuration)."""
    cached = _cache.get(dynamics)
    if cached is not None:
        return cached
    extra = [s.name for s in dynamics.states]
    namespace: dict[str, Any] = {}
    parts = [_function("charge", ["_node", "x", "v", *extra], [dynamics.charge], namespace)]
    if dynamics.threshold is not None:
        parts.append(_function("threshold", ["_node", *extra], [dynamics.threshold], namespace))
    if extra:
        updates = [s.update for s in dynamics.states]
        parts.append(
            _function(
                "updates",
                ["_node", "x", "v", "h", "spike", *extra],
                updates,
                namespace,
                as_tuple=True,
            )
        )
    # The threshold is an argument: the module passes its current value (the adaptive
    # threshold's, or v_threshold, which may be a per-neuron tensor at run time).
    reset = dynamics.reset(var("h"), var("spike"), var("theta"))
    parts.append(_function("reset", ["_node", "h", "spike", "theta"], [reset], namespace))
    source = "\n\n".join(parts) + "\n"
    exec(compile(source, f"<snncompile eager {dynamics.name}>", "exec"), namespace)  # noqa: S102
    step = EagerStep(
        charge=namespace["charge"],
        threshold=namespace.get("threshold"),
        updates=namespace.get("updates"),
        reset=namespace["reset"],
        extra_states=tuple(extra),
        source=source,
    )
    _cache[dynamics] = step
    return step


_cache: dict[NeuronDynamics, EagerStep] = {}
