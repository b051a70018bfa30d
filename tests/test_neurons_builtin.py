"""The neurons of ``snncompile.neurons`` (QIF, EIF, Izhikevich, CUBA-LIF, ALIF).

* vs SpikingJelly 2.0.0's class of the same name over a parameter grid: spikes and every state
  bit-identical, input gradients within 1e-5 relative (EIF: libm's vs PyTorch's ``exp`` can differ
  in the last ulp, so its states are compared to 1e-6 there too).
* fused C kernel (``backend='cpu'``) vs the module's own torch loop, forward and backward.
* ``optimize`` of a SpikingJelly model with these neurons fuses them and matches SpikingJelly.
* ONNX step and sequence exports vs the module under onnxruntime.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import snncompile
from snncompile import functional, neuron, surrogate
from snncompile.codegen import build
from snncompile.ir.ops import Op

sj_neuron = pytest.importorskip(
    "spikingjelly.activation_based.neuron", reason="SpikingJelly 2.0.0 is the oracle"
)
from spikingjelly.activation_based import surrogate as sj_surrogate  # noqa: E402

needs_cc = pytest.mark.skipif(build.find_compiler() is None, reason="no C compiler installed")

STATES = {
    "QIFNode": ("v",),
    "EIFNode": ("v",),
    "IzhikevichNode": ("v", "w"),
    "CUBALIFNode": ("v", "c"),
}

# (class name, kwargs) grid; floats as SpikingJelly asserts them
GRID: list[tuple[str, dict]] = [
    ("QIFNode", {}),
    ("QIFNode", {"tau": 3.0, "v_c": 0.6, "a0": 0.5, "v_reset": None}),
    ("QIFNode", {"tau": 1.5, "v_rest": 0.1, "v_reset": -0.2, "detach_reset": True}),
    ("EIFNode", {}),
    ("EIFNode", {"tau": 4.0, "delta_T": 0.5, "theta_rh": 0.6, "v_reset": None}),
    ("EIFNode", {"v_rest": 0.05, "detach_reset": True}),
    ("IzhikevichNode", {}),
    ("IzhikevichNode", {"a": 0.3, "b": 0.2, "tau_w": 3.0, "w_rest": 0.1}),
    ("IzhikevichNode", {"a": 0.1, "b": 0.5, "v_reset": None, "detach_reset": True}),
    ("CUBALIFNode", {}),
    ("CUBALIFNode", {"c_decay": 0.3, "v_decay": 0.9, "v_threshold": 1.0, "v_reset": None}),
]
SURROGATES = ["Sigmoid", "ATan"]


def _pair(name: str, kw: dict, sg: str | None):
    sj_kw, sc_kw = dict(kw), dict(kw)
    if sg is not None:
        sj_kw["surrogate_function"] = getattr(sj_surrogate, sg)()
        sc_kw["surrogate_function"] = getattr(surrogate, sg)()
    ref = getattr(sj_neuron, name)(**sj_kw)
    ours = getattr(neuron, name)(**sc_kw)
    ref.step_mode = "m"
    ours.step_mode = "m"
    return ref, ours


def _input(seed: int, shape=(16, 3, 40)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 1.2 + 0.3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize(("name", "kw"), GRID, ids=[f"{n}-{i}" for i, (n, _) in enumerate(GRID)])
@pytest.mark.parametrize("sg", SURROGATES)
def test_matches_spikingjelly(name: str, kw: dict, sg: str):
    ref, ours = _pair(name, kw, sg)
    x = _input(len(kw))
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    sr, so = ref(xr), ours(xo)
    assert torch.equal(so, sr)
    assert 0.0 < so.mean().item() < 1.0
    for state in STATES[name]:
        assert torch.equal(getattr(ours, state), getattr(ref, state)), state
    g = torch.randn_like(sr)
    (gr,) = torch.autograd.grad((sr * g).sum() + ref.v.sum(), xr)
    (go,) = torch.autograd.grad((so * g).sum() + ours.v.sum(), xo)
    assert _rel(go, gr) <= 1e-5


@needs_cc
@pytest.mark.parametrize(("name", "kw"), GRID, ids=[f"{n}-{i}" for i, (n, _) in enumerate(GRID)])
def test_fused_cpu_matches_the_torch_loop(name: str, kw: dict):
    _, ours = _pair(name, kw, "ATan")
    _, fused = _pair(name, kw, "ATan")
    fused.backend = "cpu"
    x = _input(7 + len(kw))
    xo, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    so, sf = ours(xo), fused(xf)
    assert torch.equal(sf, so)
    for state in STATES[name]:
        a, b = getattr(fused, state), getattr(ours, state)
        if name == "EIFNode":
            assert _rel(a, b) <= 1e-6, state  # expf (libm) vs torch.exp: last-ulp differences
        else:
            assert torch.equal(a, b), state
    g = torch.randn_like(so)
    loss = [(s * g).sum() + sum(getattr(m, n).sum() for n in STATES[name]) for s, m in
            ((so, ours), (sf, fused))]
    (go,) = torch.autograd.grad(loss[0], xo)
    (gf,) = torch.autograd.grad(loss[1], xf)
    assert _rel(gf, go) <= 1e-5


ALIF_GRID = list(
    itertools.product([2.0, 5.0], [0.0, 1.8], [True, False], [None, 0.0], [False, True])
)


@needs_cc
@pytest.mark.parametrize(("tau", "beta", "decay_input", "v_reset", "detach_reset"), ALIF_GRID)
def test_alif_fused_matches_its_formula_and_the_torch_loop(
    tau, beta, decay_input, v_reset, detach_reset
):
    kw = dict(tau=tau, tau_a=10.0, beta=beta, decay_input=decay_input, v_reset=v_reset,
              detach_reset=detach_reset, surrogate_function=surrogate.ATan(), step_mode="m")
    eager, fused = neuron.ALIFNode(**kw), neuron.ALIFNode(**kw, backend="cpu")
    x = _input(3, (20, 2, 50)) * 2.0
    # The documented formula, written out by hand.
    v = torch.zeros(2, 50) if v_reset is None else torch.full((2, 50), v_reset)
    a = torch.zeros(2, 50)
    rho, vr = torch.exp(torch.tensor(-1.0 / 10.0, dtype=torch.float64)).item(), v_reset or 0.0
    spikes = []
    for xt in x:
        h = v + (xt - (v - vr)) / tau if decay_input else v - (v - vr) / tau + xt
        theta = 1.0 + beta * a
        s = (h - theta >= 0).float()
        v = h - s * theta if v_reset is None else s * v_reset + (1.0 - s) * h
        a = rho * a + s
        spikes.append(s)
    ref = torch.stack(spikes)
    assert torch.equal(eager(x), ref) and torch.equal(eager.a, a) and torch.equal(eager.v, v)
    assert 0.0 < ref.mean().item() < 1.0
    xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager.reset()
    se, sf = eager(xe), fused(xf)
    assert torch.equal(sf, se) and torch.equal(fused.a, eager.a) and torch.equal(fused.v, eager.v)
    g = torch.randn_like(se)
    (ge,) = torch.autograd.grad((se * g).sum() + eager.v.sum() + eager.a.sum(), xe)
    (gf,) = torch.autograd.grad((sf * g).sum() + fused.v.sum() + fused.a.sum(), xf)
    assert _rel(gf, ge) <= 1e-5
    if beta == 0.0:  # no adaptation: a LIF neuron
        lif = neuron.LIFNode(tau, decay_input, v_reset=v_reset, step_mode="m",
                             surrogate_function=surrogate.ATan(), detach_reset=detach_reset)
        assert torch.equal(lif(x), ref)


@needs_cc
@pytest.mark.parametrize("name", ["QIFNode", "EIFNode", "IzhikevichNode", "CUBALIFNode"])
def test_optimize_fuses_spikingjelly_neurons(name: str):
    kw = {"a": 0.2, "b": 0.3} if name == "IzhikevichNode" else {}
    kw["surrogate_function"] = sj_surrogate.ATan()
    ref = getattr(sj_neuron, name)(**kw)
    ref.step_mode = "m"
    model = nn.Sequential(nn.Linear(8, 32), ref)
    x = _input(5, (12, 4, 8))
    compiled = snncompile.optimize(model, x, backend="cpu")
    assert compiled.graph.find(Op.FUSED_NEURON), compiled.records
    with torch.no_grad():
        functional.reset_net(model)
        expect = model(x)
        got = compiled(x)
    assert torch.equal(got, expect)


@pytest.mark.parametrize("name", ["QIFNode", "IzhikevichNode", "CUBALIFNode", "ALIFNode"])
def test_onnx_step_and_sequence_match_the_module(tmp_path, name: str):
    ort = pytest.importorskip("onnxruntime")  # noqa: F841
    from snncompile.export.onnx import export_onnx
    from snncompile.onnx_runtime import run_sequence_model, run_step_model

    kw = {"a": 0.2, "b": 0.3} if name == "IzhikevichNode" else {}
    cell = getattr(neuron, name)(**kw, step_mode="m")
    model = nn.Sequential(nn.Linear(8, 16), cell).eval()
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    example = _input(1, (4, 2, 8))
    x = _input(2, (11, 3, 8))
    functional.reset_net(model)
    with torch.no_grad():
        expect = model(x).numpy()
    seq, step = tmp_path / "seq.onnx", tmp_path / "step.onnx"
    export_onnx(model, example, seq, mode="sequence")
    m = export_onnx(model, example, step, mode="step")
    n_states = len(cell._extra_state_names()) + 1
    assert len(m.graph.input) == 1 + n_states and len(m.graph.output) == 1 + n_states
    assert (run_sequence_model(seq, x.numpy()) == expect).all()
    assert (run_step_model(step, x.numpy()) == expect).all()
    assert 0.0 < expect.mean() < 1.0


def test_nir_pattern_table_recognises_the_builtins_by_their_dynamics():
    from snncompile.dynamics import if_dynamics, lif_dynamics, plif_dynamics
    from snncompile.export.nir_patterns import classify

    assert classify(if_dynamics())[0] == "if"
    assert classify(lif_dynamics(3.0, True, v_reset=-0.1)) == (
        "lif",
        {"v_r": -0.1, "tau": 3.0, "decay_input": 1.0},
    )
    assert classify(lif_dynamics(3.0, False, v_reset=None))[1]["decay_input"] == 0.0
    assert classify(plif_dynamics(False))[0] == "plif"
    assert classify(neuron.CUBALIFNode(surrogate_function=surrogate.ATan()).neuron_dynamics()) == (
        "cubalif",
        {"v_decay": 0.75, "c_decay": 0.5},
    )
    for name in ("QIFNode", "IzhikevichNode", "ALIFNode"):
        cell = getattr(neuron, name)(surrogate_function=surrogate.ATan())
        assert classify(cell.neuron_dynamics()) is None, name


def test_nir_export_refuses_neurons_without_a_nir_form(tmp_path):
    pytest.importorskip("nir")
    model = nn.Sequential(nn.Linear(4, 4), neuron.QIFNode(step_mode="m"))
    with pytest.raises(Exception, match="match no NIR neuron pattern"):
        snncompile.export_nir(model, torch.randn(3, 2, 4), path=tmp_path / "m.nir")


@pytest.mark.parametrize("v_reset", [0.0, -0.2])
def test_cubalif_round_trips_through_nir_cubalif(tmp_path, v_reset):
    pytest.importorskip("nir")
    cell = neuron.CUBALIFNode(0.3, 0.8, 0.6, v_reset, surrogate.ATan(), step_mode="m")
    model = nn.Sequential(nn.Linear(4, 8), cell).eval()
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    x = _input(9, (20, 3, 4))
    functional.reset_net(model)
    with torch.no_grad():
        expect = model(x)
    graph = snncompile.export_nir(model, x[:2], path=tmp_path / "cuba.nir")
    assert any(type(n).__name__ == "CubaLIF" for n in graph.nodes.values())
    back = snncompile.import_nir(tmp_path / "cuba.nir")
    functional.reset_net(back)
    with torch.no_grad():
        assert torch.equal(back(x), expect)
    assert 0.0 < expect.mean().item() < 1.0


@pytest.mark.parametrize("name", ["QIFNode", "EIFNode", "IzhikevichNode", "CUBALIFNode"])
def test_default_arguments_match_spikingjelly(name: str):
    """Each class with its defaults (CUBA-LIF: the Rect surrogate, run by the torch loop)."""
    ref, ours = _pair(name, {}, None)
    x = _input(11)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    sr, so = ref(xr), ours(xo)
    assert torch.equal(so, sr)
    (gr,) = torch.autograd.grad(sr.sum() + ref.v.sum(), xr)
    (go,) = torch.autograd.grad(so.sum() + ours.v.sum(), xo)
    assert _rel(go, gr) <= 1e-5
