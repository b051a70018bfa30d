"""Capture a user's ``neuronal_charge`` (elementwise torch code) into the expression form.

A subclass of a snncompile neuron that overrides only ``neuronal_charge``::

    class MyLIF(neuron.LIFNode):
        def neuronal_charge(self, x):
            self.v = self.v + (x - self.v) / self.tau + 0.1 * torch.tanh(self.v)

keeps its class's fire, reset, threshold and extra states; only the charge differs. The method is
run once under :mod:`torch.fx` with symbolic ``v``, ``x`` (and the extra states) on a stand-in
``self`` that returns the node's own attributes: numbers stay numbers (baked in as constants),
scalar parameters and buffers become ``param(name)`` leaves (read from the node at call time, so
they keep learning), and ``self.v = ...`` records the charge. The recorded graph is translated op
by op through :data:`FUNCTIONS` / :data:`METHODS` into an :class:`~snncompile.dynamics.expr.Expr`;
the node's dynamics with that charge are then *checked against the method itself* on random
float32 values (bit-identical membranes, or the capture is refused), so a captured neuron is never
silently different from its eager run.

What cannot be captured raises :class:`CaptureError` with the reason (control flow on tensor
values, a non-elementwise op, writing another attribute, reading a non-scalar tensor attribute);
the neuron then runs as written, and ``optimize``'s report names the reason.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from snncompile.dynamics import expr as E
from snncompile.dynamics.expr import Expr, const, param, var
from snncompile.dynamics.neuron import NeuronDynamics


class CaptureError(ValueError):
    """The method cannot be turned into expressions; the message says why."""


def _pow(a: Expr, b: Any) -> Expr:
    if isinstance(b, Expr) and b.is_const:
        b = b.arg
    if b == 2:
        return a * a
    if b == 1:
        return a
    raise CaptureError(f"x ** {b!r} (only ** 2 is captured; write it as a product)")


def _clamp(a: Expr, min: Any = None, max: Any = None) -> Expr:  # noqa: A002 - torch's names
    if min is not None:
        a = E.maximum(a, min)
    if max is not None:
        a = E.minimum(a, max)
    return a


def _no_alpha(fn: Callable[[Expr, Expr], Expr]) -> Callable[..., Expr]:
    def run(a: Expr, b: Expr, alpha: Any = None) -> Expr:
        if alpha is not None:
            b = b * alpha
        return fn(a, b)

    return run


_ADD = _no_alpha(lambda a, b: a + b)
_SUB = _no_alpha(lambda a, b: a - b)

#: ``torch`` / ``operator`` function -> expression builder.
FUNCTIONS: dict[Any, Callable[..., Expr]] = {
    operator.add: lambda a, b: a + b,
    operator.sub: lambda a, b: a - b,
    operator.mul: lambda a, b: a * b,
    operator.truediv: lambda a, b: a / b,
    operator.neg: lambda a: -a,
    operator.pow: _pow,
    torch.add: _ADD,
    torch.sub: _SUB,
    torch.mul: lambda a, b: a * b,
    torch.div: lambda a, b: a / b,
    torch.neg: lambda a: -a,
    torch.exp: E.exp,
    torch.log: E.log,
    torch.sqrt: E.sqrt,
    torch.sigmoid: E.sigmoid,
    torch.tanh: E.tanh,
    torch.atan: E.atan,
    torch.erf: E.erf,
    torch.erfc: E.erfc,
    torch.abs: E.abs_,
    torch.maximum: E.maximum,
    torch.minimum: E.minimum,
    torch.where: E.where,
    torch.clamp: _clamp,
    F.relu: lambda a: E.maximum(a, 0.0),
    torch.relu: lambda a: E.maximum(a, 0.0),
}

#: Tensor method name -> expression builder (``self`` first).
METHODS: dict[str, Callable[..., Expr]] = {
    "add": _ADD,
    "sub": _SUB,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "neg": lambda a: -a,
    "exp": E.exp,
    "log": E.log,
    "sqrt": E.sqrt,
    "sigmoid": E.sigmoid,
    "tanh": E.tanh,
    "atan": E.atan,
    "erf": E.erf,
    "abs": E.abs_,
    "clamp": _clamp,
    "relu": lambda a: E.maximum(a, 0.0),
    "pow": _pow,
}


class _Self:
    """Stand-in for the neuron inside the traced method: records ``self.v = ...``."""

    def __init__(self, node: Any, tracer: Any, graph: fx.Graph, states: dict[str, Any]) -> None:
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_tracer", tracer)
        object.__setattr__(self, "_graph", graph)
        object.__setattr__(self, "_states", states)
        object.__setattr__(self, "_params", {})

    def __getattr__(self, name: str) -> Any:
        states = self._states
        if name in states:
            return states[name]
        value = getattr(self._node, name)
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise CaptureError(
                    f"reads self.{name}, a tensor of shape {tuple(value.shape)} (only scalar "
                    "parameters and buffers are captured)"
                )
            params = self._params
            if name not in params:
                params[name] = fx.Proxy(self._graph.placeholder(f"param.{name}"), self._tracer)
            return params[name]
        if callable(value) and hasattr(value, "__func__"):
            return value.__func__.__get__(self)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._states:
            raise CaptureError(f"assigns self.{name} (only the states may be written)")
        self._states[name] = value


def _to_expr(graph: fx.Graph, result: Any) -> Expr:
    env: dict[fx.Node, Expr] = {}

    def conv(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return env[a]
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            raise CaptureError(f"uses the value {a!r} ({type(a).__name__}) in an operation")
        return const(float(a))

    for n in graph.nodes:
        if n.op == "placeholder":
            name = str(n.target)
            env[n] = param(name[len("param.") :]) if name.startswith("param.") else var(name)
        elif n.op in ("call_function", "call_method"):
            if n.op == "call_function":
                fn = FUNCTIONS.get(n.target)
                label = getattr(n.target, "__name__", repr(n.target))
            else:
                fn = METHODS.get(str(n.target))
                label = f".{n.target}()"
            if fn is None:
                raise CaptureError(f"calls {label}, which has no expression form")
            args = [conv(a) for a in n.args]
            kwargs = {k: None if v is None else conv(v) for k, v in n.kwargs.items()}
            try:
                env[n] = fn(*args, **kwargs)
            except TypeError as err:
                why = f"calls {label} with arguments it cannot capture: {err}"
                raise CaptureError(why) from err
        else:
            raise CaptureError(f"contains an fx {n.op} node ({n.target})")
    if isinstance(result, fx.Proxy):
        return env[result.node]
    return conv(result)


def capture_charge(node: Any, base: NeuronDynamics) -> Expr:
    """The charge of ``type(node).neuronal_charge`` as an expression (see the module docstring).

    Raises :class:`CaptureError` naming why it cannot be captured.
    """
    graph = fx.Graph()
    tracer = fx.proxy.GraphAppendingTracer(graph)
    states = {n: fx.Proxy(graph.placeholder(n), tracer) for n in base.state_names}
    x = fx.Proxy(graph.placeholder("x"), tracer)
    shadow = _Self(node, tracer, graph, dict(states))
    try:
        type(node).neuronal_charge(shadow, x)
    except CaptureError:
        raise
    except Exception as err:  # control flow on proxies, super() on the stand-in, ...
        raise CaptureError(f"tracing it failed: {type(err).__name__}: {err}") from err
    written = shadow._states
    for n in base.state_names[1:]:
        if written[n] is not states[n]:
            raise CaptureError(f"writes the extra state {n!r} (only v may be charged)")
    if written["v"] is states["v"]:
        raise CaptureError("does not assign self.v")
    return _to_expr(graph, written["v"])


def _check(node: Any, d: NeuronDynamics) -> None:
    """Compare the captured charge with the method on random float32 values (bit-identical)."""
    from snncompile.codegen.render import evaluate

    gen = torch.Generator().manual_seed(0)
    n = 512
    values = {s: torch.randn(n, generator=gen) * 0.7 for s in d.state_names}
    x = torch.randn(n, generator=gen) * 1.5
    env: dict[str, Any] = {**values, "x": x}
    for p in d.param_names:
        env[p] = getattr(node, p)
    saved = dict(node._memories)
    try:
        for s, value in values.items():
            setattr(node, s, value)
        with torch.no_grad():
            node.neuronal_charge(x)
            eager = node.v
            got = evaluate({"h": d.charge}, env)["h"]
    finally:
        node._memories.update(saved)
    if not torch.equal(torch.as_tensor(got), eager):
        raise CaptureError(
            "its captured charge differs from the method on random inputs "
            f"(max |diff| {float((torch.as_tensor(got) - eager).abs().max()):.3g})"
        )


def captured_dynamics(node: Any) -> NeuronDynamics:
    """The node's dynamics with its overridden ``neuronal_charge`` captured (cached on the node
    until an attribute changes). Raises :class:`CaptureError` with the reason otherwise."""
    base = node.neuron_dynamics()
    cached = node.__dict__.get("_captured")
    if cached is not None and cached[0] == base:
        if isinstance(cached[1], CaptureError):
            raise cached[1]
        return cached[1]
    try:
        charge = capture_charge(node, base)
        name = f"{base.name}_{type(node).__name__.lower()}"
        d = dataclasses.replace(base, name=name, charge=charge)
        _check(node, d)
    except CaptureError as err:
        err = CaptureError(f"{type(node).__name__}.neuronal_charge cannot be fused: {err}")
        node.__dict__["_captured"] = (base, err)
        raise err from None
    except ValueError as err:  # the captured charge is not valid dynamics
        err = CaptureError(f"{type(node).__name__}.neuronal_charge cannot be fused: {err}")
        node.__dict__["_captured"] = (base, err)
        raise err from None
    node.__dict__["_captured"] = (base, d)
    return d
