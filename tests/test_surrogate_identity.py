"""Surrogates are recognised by class identity (and parameters), never by class name.

A user's own ``class ATan`` (or a subclass of ours that changes the gradient) must run as written:
compiled gradients equal eager ones and the compile report says why the neuron was not fused.
snncompile's and SpikingJelly's own classes are still fused.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import snncompile
from snncompile import layer, neuron, surrogate
from snncompile.dynamics import (
    SurrogateExpr,
    register_surrogate,
    surrogate_expr,
    unfusable_reason,
)
from snncompile.ir import Op
from snncompile.runtime.fused import compiler_available

needs_cc = pytest.mark.skipif(not compiler_available(), reason="no C compiler installed")


class _StraightThrough(torch.autograd.Function):
    """Heaviside forward, identity backward (a straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return (x >= 0).to(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class ATan(nn.Module):
    """An impostor: a user's class that shares snncompile's ATan name and attributes."""

    def __init__(self, alpha: float = 2.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.spiking = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(x)


def _subclass_named_atan() -> type:
    class ATan(surrogate.ATan):  # noqa: N801 - the point is the shared name
        """Our ATan with a rectangular gradient instead of the arctangent one."""

        @staticmethod
        def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:
            return (x.abs() < 0.5).to(x) * alpha

    return ATan


class _Wide(surrogate.Sigmoid):
    """A subclass with another name that doubles Sigmoid's gradient."""

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return 2.0 * surrogate.Sigmoid.derivative(x, alpha)


def _model(sg: nn.Module) -> nn.Module:
    return nn.Sequential(
        layer.Linear(8, 16, step_mode="m"),
        neuron.LIFNode(tau=2.0, surrogate_function=sg, step_mode="m"),
        layer.Linear(16, 4, step_mode="m"),
    )


def _grads_eager_and_compiled(sg: nn.Module, backend: str = "cpu"):
    torch.manual_seed(0)
    model = _model(sg)
    eager = copy.deepcopy(model)
    x = torch.randn(6, 4, 8) * 2.0
    compiled = snncompile.optimize(model, x, backend=backend)
    eager(x).square().sum().backward()
    compiled(x).square().sum().backward()
    ours = dict(compiled.named_parameters())
    pairs = []
    for name, p in eager.named_parameters():
        match = [q for k, q in ours.items() if k.endswith("._" + name)]
        assert len(match) == 1, (name, list(ours))
        pairs.append((name, p.grad, match[0].grad))
    return compiled, pairs


@needs_cc
@pytest.mark.parametrize("make", [ATan, _subclass_named_atan(), _Wide], ids=lambda c: c.__name__)
def test_lookalike_surrogate_runs_as_written_with_a_reason(make: type) -> None:
    compiled, pairs = _grads_eager_and_compiled(make())
    for name, g_eager, g_compiled in pairs:
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-6, msg=name)
    graph = compiled.graph
    assert not graph.find(Op.FUSED_NEURON)
    report = compiled.report()
    assert "fused 0 neuron(s)" in report
    assert "class identity" in report or "no expression form" in report
    assert "runs the torch loop" in report


def test_impostor_named_atan_has_no_expression_form() -> None:
    why = unfusable_reason(ATan())
    assert why is not None and "class identity" in why and "ATan" in why
    with pytest.raises(ValueError, match="not snncompile's or SpikingJelly's ATan"):
        surrogate_expr(ATan())
    with pytest.raises(ValueError, match="class identity"):
        surrogate_expr(_subclass_named_atan()())
    assert unfusable_reason(_Wide()) is not None
    # Our own classes keep their forms, with their parameters.
    assert unfusable_reason(surrogate.ATan(alpha=3.0)) is None
    assert surrogate_expr(surrogate.ATan(alpha=3.0)) == SurrogateExpr("ATan", (3.0,))


def test_non_finite_surrogate_parameters_are_not_fused() -> None:
    why = unfusable_reason(surrogate.ATan(alpha=math.nan))
    assert why is not None and "not finite" in why and "alpha" in why


@needs_cc
def test_direct_backend_cpu_with_impostor_warns_and_matches_eager() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 3, 7, requires_grad=True)
    fused = neuron.LIFNode(surrogate_function=ATan(), step_mode="m", backend="cpu")
    ref = neuron.LIFNode(surrogate_function=ATan(), step_mode="m")
    with pytest.warns(RuntimeWarning, match="class identity"):
        s = fused(x)
    s.sum().backward()
    g = x.grad.clone()
    x.grad = None
    s_ref = ref(x)
    s_ref.sum().backward()
    assert torch.equal(s, s_ref)
    assert torch.equal(g, x.grad)


@needs_cc
@pytest.mark.parametrize("alpha", [2.0, 3.5])
def test_our_atan_is_still_fused(alpha: float) -> None:
    compiled, pairs = _grads_eager_and_compiled(surrogate.ATan(alpha=alpha))
    assert len(compiled.graph.find(Op.FUSED_NEURON)) == 1
    for name, g_eager, g_compiled in pairs:
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-5, msg=name)


@needs_cc
@pytest.mark.parametrize("name", ["ATan", "Sigmoid", "Erf"])
def test_spikingjelly_surrogate_classes_are_recognised_by_identity(sj, name: str) -> None:
    sg = getattr(sj.surrogate, name)(alpha=1.5)
    assert surrogate_expr(sg) == SurrogateExpr(name, (1.5,))
    compiled, pairs = _grads_eager_and_compiled(sg)
    assert len(compiled.graph.find(Op.FUSED_NEURON)) == 1
    for pname, g_eager, g_compiled in pairs:
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-5, msg=pname)


def test_subclass_of_spikingjelly_surrogate_is_not_recognised(sj) -> None:
    class ATan(sj.surrogate.ATan):  # noqa: N801
        pass

    assert unfusable_reason(ATan()) is not None
    assert unfusable_reason(sj.surrogate.ATan()) is None


@needs_cc
def test_registered_user_class_is_fused_with_its_own_gradient() -> None:
    from snncompile.dynamics.surrogates import _CLASSES, SURROGATE_EXPRESSIONS

    class Triangle(nn.Module):
        """A user surrogate registered with its expression form: gradient max(0, 1 - |x|)."""

        def __init__(self) -> None:
            super().__init__()
            self.width = 1.0
            self.spiking = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return surrogate.SurrogateSpike.apply(x, Triangle, (self.width,))

        @staticmethod
        def derivative(x: torch.Tensor, width: float) -> torch.Tensor:
            return (width - x.abs()).clamp_min(0.0)

    from snncompile.dynamics import abs_, maximum

    def prim(x, width):  # unused by the spiking backward; any smooth step would do here
        return x * 0.0 + 0.5

    def grad(x, width):
        return maximum(width - abs_(x), 0.0)

    register_surrogate("TestTriangle", prim, grad, surrogate_class=Triangle, param_names=("width",))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            compiled, pairs = _grads_eager_and_compiled(Triangle())
        assert len(compiled.graph.find(Op.FUSED_NEURON)) == 1
        for name, g_eager, g_compiled in pairs:
            torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-5, msg=name)
    finally:
        _CLASSES.pop(Triangle, None)
        SURROGATE_EXPRESSIONS.pop("TestTriangle", None)


def test_register_surrogate_cannot_replace_a_built_in_form() -> None:
    from snncompile.dynamics import SURROGATE_EXPRESSIONS, const

    before = SURROGATE_EXPRESSIONS["ATan"]
    with pytest.raises(ValueError, match="exists already"):
        register_surrogate("ATan", lambda x, a: const(0.5), lambda x, a: const(7.0))
    assert SURROGATE_EXPRESSIONS["ATan"] is before
