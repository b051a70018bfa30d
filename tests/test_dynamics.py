"""The dynamics expression IR: building, folding, symbolic gradients, surrogate expressions,
neuron definitions, and user-defined neurons getting fused kernels."""

from __future__ import annotations

import math

import pytest
import torch

from snncompile.codegen.render import evaluate
from snncompile.codegen.torch_backend import torch_multi_step
from snncompile.dynamics import (
    SURROGATE_EXPRESSIONS,
    NeuronDynamics,
    Op,
    SurrogateExpr,
    abs_,
    atan,
    const,
    erf,
    exp,
    from_spec,
    grad,
    if_dynamics,
    lif_dynamics,
    log,
    maximum,
    param,
    plif_dynamics,
    sigmoid,
    sqrt,
    surrogate_expr,
    tanh,
    var,
    where,
)
from snncompile.dynamics.expr import erfc, minimum, toposort
from snncompile.runtime.fused import compiler_available, fused_multi_step

v, x = var("v"), var("x")


def test_constant_subtrees_fold_in_double_like_python_scalars():
    alpha = 2.0
    e = (alpha / 2) / (1.0 + x * (math.pi / 2 * alpha))
    consts = [n.arg for n in toposort([e]) if n.op is Op.CONST]
    assert alpha / 2 in consts and math.pi / 2 * alpha in consts
    assert (const(3.0) * 2.0).arg == 6.0
    assert (const(0.1) + const(0.2)).arg == 0.1 + 0.2


def test_equal_subtrees_are_one_node():
    a = (v - 0.3) / 2.0
    b = (v - 0.3) / 2.0
    assert a == b and hash(a) == hash(b)
    nodes = toposort([a + b])
    assert len([n for n in nodes if n.op is Op.DIV]) == 1


def test_expressions_have_no_truth_value():
    with pytest.raises(TypeError, match="no truth value"):
        bool(v > 0.0)
    with pytest.raises(TypeError, match="cannot use"):
        v + "1"  # type: ignore[operator]


def _random_env(n: int = 50) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "v": torch.rand(n, generator=g, dtype=torch.float64) + 0.5,
        "x": torch.randn(n, generator=g, dtype=torch.float64),
        "w": torch.tensor(0.3, dtype=torch.float64),
    }


EXPRESSIONS = {
    "poly": v * v * 0.5 - x / v + 3.0,
    "transcendental": exp(-x * x) * sigmoid(v) + tanh(x) * atan(v / 2.0) + log(v + 1.0),
    "errors": erf(x) * 0.3 + erfc(v) + sqrt(v),
    "piecewise": where(x > 0.0, x * v, -x) + maximum(x, v - 1.0) + minimum(x, 0.2) + abs_(x),
    "param": v + (x - v) * sigmoid(param("w")),
}


@pytest.mark.parametrize("name", list(EXPRESSIONS))
def test_symbolic_gradient_matches_torch_autograd(name):
    expr = EXPRESSIONS[name]
    env = _random_env()
    leaves = {k: t.clone().requires_grad_() for k, t in env.items()}
    out = evaluate({"y": expr}, leaves)["y"]
    seed = torch.linspace(-1, 1, env["v"].numel(), dtype=torch.float64)
    wrt = [var("v"), var("x"), param("w")]
    auto = torch.autograd.grad((out * seed).sum(), list(leaves.values()), allow_unused=True)
    sym = grad({expr: var("g")}, wrt)
    for leaf, a in zip(wrt, auto, strict=True):
        g = evaluate({"d": sym[leaf]}, {**env, "g": seed})["d"]
        g = torch.as_tensor(g, dtype=torch.float64).expand_as(seed)
        if leaf.arg == "w":
            g = g.sum()
        expect = torch.zeros_like(g) if a is None else a
        torch.testing.assert_close(g, expect, rtol=1e-10, atol=1e-12)


def test_heaviside_gradient_is_the_surrogate_and_detach_stops_it():
    from snncompile.dynamics import detach, heaviside

    sg = SurrogateExpr("Sigmoid", (4.0,))
    s = heaviside(x - 1.0, sg)
    g = grad({s: const(1.0)}, [x])[x]
    assert g == sg.derivative(x - 1.0)
    assert grad({detach(s) * 2.0: const(1.0)}, [x])[x] == const(0.0)


@pytest.mark.parametrize("name", list(SURROGATE_EXPRESSIONS))
def test_surrogate_expressions_match_spikingjelly_and_snncompile(sj, name):
    z = torch.linspace(-3, 3, 601)
    alpha = {"Sigmoid": 4.0, "ATan": 2.0, "SoftSign": 2.0, "Erf": 2.0}.get(name, 1.0) * 1.5
    expr = SurrogateExpr(name, (alpha,))
    ours = evaluate({"d": expr.derivative(var("z"))}, {"z": z})["d"]
    # SpikingJelly: the gradient of its spiking surrogate.
    zz = z.clone().requires_grad_()
    getattr(sj.surrogate, name)(alpha=alpha)(zz).sum().backward()
    torch.testing.assert_close(ours, zz.grad, rtol=1e-6, atol=1e-7)
    # snncompile.surrogate: the same derivative, and our primitive matches its primitive.
    from snncompile import surrogate as sc

    cls = getattr(sc, name)
    torch.testing.assert_close(ours, cls.derivative(z, alpha), rtol=1e-6, atol=1e-7)
    prim = evaluate({"p": expr.primitive(var("z"))}, {"z": z})["p"]
    torch.testing.assert_close(prim, cls.primitive(z, alpha), rtol=1e-5, atol=1e-6)


def test_surrogate_expr_from_modules_and_errors(sj):
    from snncompile import surrogate as sc

    assert surrogate_expr(sc.ATan(alpha=3.0)) == SurrogateExpr("ATan", (3.0,))
    assert surrogate_expr(sj.surrogate.Erf()) == SurrogateExpr("Erf", (2.0,))
    with pytest.raises(ValueError, match="no expression form"):
        surrogate_expr(sc.Rect())
    with pytest.raises(ValueError, match="no expression form"):
        SurrogateExpr("Nope", ())


def test_neuron_definition_errors_name_the_neuron():
    with pytest.raises(ValueError, match="'bad'.*unknown variables"):
        NeuronDynamics("bad", v + var("y"))
    with pytest.raises(TypeError, match="'bad2'.*charge must be an expression"):
        NeuronDynamics("bad2", 1.0)  # type: ignore[arg-type]


def test_step_program_saves_only_h_and_reads_what_it_needs():
    lif = lif_dynamics().step_program()
    assert lif.backward_needs == ()  # linear charge: gradients need only h
    plif = plif_dynamics().step_program()
    assert plif.uniforms == (sigmoid(param("w")),)
    assert set(plif.backward_needs) == {"v", "x"}  # d h / d sigmoid(w) = x - (v - v_r)


def test_from_spec_maps_snncompile_neurons():
    from snncompile import neuron as sn
    from snncompile import surrogate as sc

    node = sn.LIFNode(
        tau=3.0,
        decay_input=False,
        v_reset=None,
        detach_reset=True,
        surrogate_function=sc.SoftSign(alpha=3.0),
    )
    d = from_spec(node.dynamics_spec())
    assert d == lif_dynamics(
        3.0, False, v_reset=None, detach_reset=True, surrogate=SurrogateExpr("SoftSign", (3.0,))
    )
    assert from_spec(sn.IFNode().dynamics_spec()) == if_dynamics()
    assert from_spec(sn.ParametricLIFNode().dynamics_spec()) == plif_dynamics()


# -- user-defined neurons get fused kernels without writing C ------------------------------------
def _qif() -> NeuronDynamics:
    # Quadratic integrate-and-fire: tau dv/dt = a (v - v_rest)(v - v_c) + x, Euler step.
    return NeuronDynamics(
        "qif",
        v + (x + 0.5 * (v - 0.0) * (v - 0.8)) / 2.0,
        v_threshold=1.0,
        v_reset=0.0,
        surrogate=SurrogateExpr("ATan", (2.0,)),
    )


def _eif() -> NeuronDynamics:
    # Exponential integrate-and-fire with a learnable input gain g.
    return NeuronDynamics(
        "eif",
        v + (x * param("g") - (v - 0.0) + 0.1 * exp((v - 0.8) / 0.25)) / 2.0,
        v_threshold=1.0,
        v_reset=None,
        surrogate=SurrogateExpr("Sigmoid", (4.0,)),
        detach_reset=True,
    )


@pytest.mark.skipif(not compiler_available(), reason="no C compiler installed")
@pytest.mark.parametrize("make", [_qif, _eif], ids=["qif", "eif"])
def test_user_defined_neuron_fused_matches_torch_renderer(make):
    d = make()
    prog = d.step_program()
    assert "v" in prog.backward_needs  # the non-linear charge needs v, recomputed from h
    T, N = 8, 96
    x_seq = torch.randn(T, N) * 0.8 + 0.3
    v0 = torch.rand(N) * 0.5
    gs = torch.randn(T, N)
    gv = torch.randn(N)
    outs = []
    for run in (fused_multi_step, torch_multi_step):
        xs = x_seq.clone().requires_grad_()
        vs = v0.clone().requires_grad_()
        params = {"g": torch.tensor(1.3, requires_grad=True)} if d.param_names else None
        s, vl, _ = run(d, xs, vs, params)
        wrt = [xs, vs] + (list(params.values()) if params else [])
        g = torch.autograd.grad((s * gs).sum() + (vl * gv).sum(), wrt)
        outs.append((s, vl, g))
    (s1, v1, g1), (s2, v2, g2) = outs
    assert s1.sum() > 0  # the test exercises firing
    assert torch.equal(s1, s2)
    if any(n.op is Op.EXP for n in toposort([d.charge])):
        # exp: the kernel's (SIMD) expf and PyTorch's exp may differ in the last ulp.
        torch.testing.assert_close(v1, v2, rtol=1e-6, atol=1e-6)
    else:  # + - * / only: bit-exact
        assert torch.equal(v1, v2)
    for a, b in zip(g1, g2, strict=True):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
