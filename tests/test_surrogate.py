"""Tests of snncompile.surrogate: differential against SpikingJelly 2.0.0 and self-consistency."""

from __future__ import annotations

import pytest
import torch

from snncompile import surrogate

# name -> (SpikingJelly-style kwargs to try, besides the defaults)
CASES: dict[str, list[dict[str, float]]] = {
    "Sigmoid": [{"alpha": 0.5}, {"alpha": 7.0}],
    "ATan": [{"alpha": 0.5}, {"alpha": 5.0}],
    "PiecewiseQuadratic": [{"alpha": 0.5}, {"alpha": 4.0}],
    "PiecewiseExp": [{"alpha": 0.5}, {"alpha": 3.0}],
    "SoftSign": [{"alpha": 0.5}, {"alpha": 5.0}],
    "SuperSpike": [{"alpha": 0.5}, {"alpha": 3.0}],
    "Erf": [{"alpha": 0.5}, {"alpha": 4.0}],
    "PiecewiseLeakyReLU": [{"w": 0.5, "c": 0.1}, {"w": 2.0, "c": 0.0}],
    "QPseudoSpike": [{"alpha": 1.5}, {"alpha": 4.0}],
    "LeakyKReLU": [{"leak": 0.1, "k": 2.0}],
    "S2NN": [{"alpha": 2.0, "beta": 0.5}],
    "NonzeroSignLogAbs": [{"alpha": 0.5}, {"alpha": 3.0}],
    "Rect": [{"alpha": 0.5}, {"alpha": 2.0}],
}
MAIN7 = ["Sigmoid", "ATan", "PiecewiseQuadratic", "PiecewiseExp", "SoftSign", "SuperSpike", "Erf"]
DEFAULTS = {
    "Sigmoid": {"alpha": 4.0},
    "ATan": {"alpha": 2.0},
    "PiecewiseQuadratic": {"alpha": 1.0},
    "PiecewiseExp": {"alpha": 1.0},
    "SoftSign": {"alpha": 2.0},
    "SuperSpike": {"alpha": 1.0},
    "Erf": {"alpha": 2.0},
}
PARAMS = [(name, kw) for name, kws in CASES.items() for kw in [{}, *kws]]


def _inputs(kw: dict[str, float]) -> torch.Tensor:
    """Random points plus the special points: 0, +-1/alpha, +-1/(2 alpha), +-w."""
    x = torch.randn(4000) * 2.0
    special = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1e-30, -1e-30]
    for value in kw.values():
        if value:
            special += [1 / value, -1 / value, 0.5 / value, -0.5 / value, value, -value]
    return torch.cat([x, torch.tensor(special)])


@pytest.mark.parametrize(("name", "kw"), PARAMS, ids=[f"{n}-{k}" for n, k in PARAMS])
def test_spiking_matches_spikingjelly(sj, name: str, kw: dict[str, float]) -> None:
    ours = getattr(surrogate, name)(**kw)
    ref = getattr(sj.surrogate, name)(**kw)
    x = _inputs(kw)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    assert torch.equal(ya, yb)
    assert torch.equal(ya, (x >= 0).float())
    g = torch.randn_like(x)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("name", "kw"), PARAMS, ids=[f"{n}-{k}" for n, k in PARAMS])
def test_primitive_matches_spikingjelly(sj, name: str, kw: dict[str, float]) -> None:
    ours = getattr(surrogate, name)(**kw, spiking=False)
    ref = getattr(sj.surrogate, name)(**kw, spiking=False)
    x = _inputs(kw)
    try:
        yb = ref(x)
    except NotImplementedError:
        assert name == "SuperSpike", "only SuperSpike lacks a primitive in SpikingJelly"
        pytest.skip("SpikingJelly 2.0.0 defines no SuperSpike primitive")
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-7)
    g = torch.randn_like(x)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("name", "kw"), PARAMS, ids=[f"{n}-{k}" for n, k in PARAMS])
def test_derivative_is_derivative_of_primitive(name: str, kw: dict[str, float]) -> None:
    """``derivative`` is d``primitive``/dx (float64 autograd), away from the kinks."""
    cls = surrogate.SURROGATES[name]
    module = cls(**kw)
    x = torch.randn(2000, dtype=torch.float64) * 2.0
    # Stay away from kinks and from x = 0 where piecewise forms switch branches.
    kinks = [0.0] + [s * v for v in module.params if v for s in (1, -1, 0.5, -0.5)]
    kinks += [s / v for v in module.params if v for s in (1, -1, 0.5, -0.5)]
    for kink in kinks:
        x = x[(x - kink).abs() > 1e-3]
    x.requires_grad_()
    (auto,) = torch.autograd.grad(cls.primitive(x, *module.params).sum(), x)
    manual = cls.derivative(x.detach(), *module.params)
    # S2NN's primitive has a +1e-5 inside the log (SpikingJelly's definition).
    tol = 2e-5 if name == "S2NN" else 1e-9
    torch.testing.assert_close(manual, auto, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", MAIN7)
def test_defaults_and_signature(sj, name: str) -> None:
    cls = getattr(surrogate, name)
    module = cls()
    assert module.params == (DEFAULTS[name]["alpha"],)
    assert module.spiking is True
    assert getattr(sj.surrogate, name)().alpha == DEFAULTS[name]["alpha"]
    positional = cls(0.75, False)  # SpikingJelly order: (alpha, spiking)
    assert positional.alpha == 0.75 and positional.spiking is False
    assert repr(module) == f"{name}(alpha={DEFAULTS[name]['alpha']}, spiking=True)"


def test_heaviside_tie_rule_and_dtype() -> None:
    x = torch.tensor([-1.0, -0.0, 0.0, 1e-38, 2.0], dtype=torch.float16)
    y = surrogate.heaviside(x)
    assert y.dtype == torch.float16
    assert y.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]


def test_set_spiking_mode_and_aliases() -> None:
    module = surrogate.ATan(alpha=3.0)
    x = torch.linspace(-2, 2, 9)
    assert torch.equal(module(x), surrogate.heaviside(x))
    module.set_spiking_mode(False)
    assert torch.equal(module(x), surrogate.ATan.primitive(x, 3.0))
    assert torch.equal(surrogate.ATan.primitive_function(x, 3.0), surrogate.ATan.primitive(x, 3.0))
    xg = x.clone().requires_grad_()
    surrogate.ATan.spiking_function(xg, 3.0).sum().backward()
    torch.testing.assert_close(xg.grad, surrogate.ATan.derivative(x, 3.0))


def test_gradient_only_flows_through_x() -> None:
    x = torch.randn(10, requires_grad=True)
    with torch.no_grad():
        y = surrogate.Sigmoid()(x)
    assert not y.requires_grad
    y = surrogate.Sigmoid()(x * 2)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, 2 * surrogate.Sigmoid.derivative(x.detach() * 2, 4.0))


def test_half_precision_keeps_dtype() -> None:
    x = torch.randn(16, dtype=torch.bfloat16, requires_grad=True)
    y = surrogate.Erf()(x)
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="SoftSign: alpha must be > 0"):
        surrogate.SoftSign(alpha=0.0)
    with pytest.raises(ValueError, match="QPseudoSpike: alpha must be > 1"):
        surrogate.QPseudoSpike(alpha=1.0)
    with pytest.raises(TypeError, match="Sigmoid: alpha must be a real number"):
        surrogate.Sigmoid(alpha="4")
    with pytest.raises(TypeError, match="spiking must be a bool"):
        surrogate.Sigmoid(4.0, "yes")


def test_registry_lists_every_class() -> None:
    assert set(MAIN7) <= set(surrogate.SURROGATES)
    assert set(CASES) == set(surrogate.SURROGATES)
    for name, cls in surrogate.SURROGATES.items():
        assert cls.__name__ == name
        assert issubclass(cls, surrogate.SurrogateFunctionBase)


# -- the fusable surrogates are their expressions --------------------------------------------------
# SpikingJelly defines no SuperSpike primitive.
EXACT_PRIMITIVE = [n for n in MAIN7 if n != "SuperSpike"]
# SpikingJelly multiplies grad_output in last for these, so the gradients are equal bit for bit.
EXACT_GRADIENT = ["ATan", "PiecewiseExp"]


@pytest.mark.parametrize("name", EXACT_PRIMITIVE)
@pytest.mark.parametrize("alpha", [0.3, 1.0, 3.7])
def test_expression_primitive_bit_identical_to_spikingjelly(sj, name: str, alpha: float) -> None:
    x = _inputs({"alpha": alpha})
    ours = surrogate.SURROGATES[name](alpha=alpha, spiking=False)(x)
    theirs = getattr(sj.surrogate, name)(alpha=alpha, spiking=False)(x)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", EXACT_GRADIENT)
@pytest.mark.parametrize("alpha", [0.3, 1.0, 3.7])
def test_expression_gradient_bit_identical_to_spikingjelly(sj, name: str, alpha: float) -> None:
    x = _inputs({"alpha": alpha})
    g = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    surrogate.SURROGATES[name](alpha=alpha)(xa).backward(g)
    getattr(sj.surrogate, name)(alpha=alpha)(xb).backward(g)
    assert torch.equal(xa.grad, xb.grad)


def test_fusable_surrogates_come_from_their_expressions(monkeypatch) -> None:
    """Changing a form's expression changes the eager surrogate: there is one definition."""
    from snncompile.dynamics import surrogates as forms

    for name in MAIN7:
        cls = surrogate.SURROGATES[name]
        assert issubclass(cls, surrogate.ExpressionSurrogate) and cls.form == name
        assert forms.registered_form(cls) == (name, ("alpha",))
    prim, der = forms.SURROGATE_EXPRESSIONS["ATan"]
    monkeypatch.setitem(forms.SURROGATE_EXPRESSIONS, "ATan", (prim, lambda x, a: der(x, a) * 2.0))
    surrogate._rendered.cache_clear()
    try:
        x = torch.randn(64, requires_grad=True)
        surrogate.ATan(alpha=1.5)(x).sum().backward()
        z = x.detach() * (torch.pi / 2 * 1.5)
        torch.testing.assert_close(x.grad, 2.0 * (1.5 / 2) / (1 + z * z))
    finally:
        surrogate._rendered.cache_clear()


def test_expression_surrogate_parameters_must_be_numbers() -> None:
    with pytest.raises(TypeError, match=r"ATan.derivative: parameters must be Python numbers"):
        surrogate.ATan.derivative(torch.zeros(3), torch.tensor(2.0))
