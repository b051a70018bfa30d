"""Multi-state dynamics: extra states, adaptive thresholds, their kernels and BPTT backward.

Every check compares the fused C kernel against the torch renderer (autograd through the same
expressions): spikes and every final state bit-exact, gradients of the input, every initial state
and every parameter within 1e-5 relative. The CUDA sources of the same neurons compile with nvcc.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from snncompile.codegen import build
from snncompile.codegen.kernels import generate
from snncompile.codegen.torch_backend import torch_multi_step_states
from snncompile.dynamics import NeuronDynamics, SurrogateExpr, param, var
from snncompile.dynamics.neuron import State
from snncompile.runtime.fused import fused_multi_step, fused_multi_step_states

needs_cc = pytest.mark.skipif(build.find_compiler() is None, reason="no C compiler installed")

v, x, h, spike = var("v"), var("x"), var("h"), var("spike")
a, w, c = var("a"), var("w"), var("c")


def _neurons() -> dict[str, NeuronDynamics]:
    return {
        # adaptive threshold (LSNN): theta = b0 + beta * a, a <- rho * a + s, soft reset
        "alif": NeuronDynamics(
            "alif",
            v + (x - v) / 2.0,
            v_reset=None,
            surrogate=SurrogateExpr("ATan", (2.0,)),
            states=(State("a", 0.0, 0.9 * a + spike),),
            threshold=1.0 + 0.5 * a,
        ),
        # Izhikevich-style adaptation current updated from h and the spike
        "izh": NeuronDynamics(
            "izh",
            v + (x + 1.0 * (v - (-0.1)) * (v - 0.8) - w) / 2.0,
            states=(State("w", 0.0, w + (0.3 * (h - (-0.1)) - w) / 2.0 + 0.2 * spike),),
        ),
        # current-based LIF: the current is charged first, then the membrane
        "cuba": NeuronDynamics(
            "cuba",
            v * 0.75 + (c * 0.5 + x),
            v_threshold=0.5,
            states=(State("c", 0.0, c * 0.5 + x),),
        ),
        # learnable decay, rho and beta; detach_reset; two params in the threshold/update
        "plif_adaptive": NeuronDynamics(
            "plif_adaptive",
            v + (x - v) * param("k"),
            v_reset=None,
            detach_reset=True,
            states=(State("a", 0.1, a * param("rho") + spike),),
            threshold=1.0 + param("beta") * a,
        ),
    }


NEURONS = _neurons()


def test_program_saves_only_what_the_backward_reads():
    assert NEURONS["alif"].step_program().saved_states == ("a",)  # theta(a) in the surrogate
    assert NEURONS["izh"].step_program().saved_states == ()  # v is recomputed from h
    assert NEURONS["cuba"].step_program().saved_states == ()  # linear: only h
    assert NEURONS["cuba"].step_program().backward_needs == ()


def test_bad_state_definitions_are_refused_with_the_name():
    with pytest.raises(ValueError, match="unknown variables"):
        NeuronDynamics("bad", v + var("q"))
    with pytest.raises(ValueError, match="used by the generated kernels"):
        NeuronDynamics("bad", v + x, states=(State("gs", 0.0, v),))
    with pytest.raises(ValueError, match="threshold uses unknown variables"):
        NeuronDynamics("bad", v + x, threshold=1.0 + v)


@needs_cc
@pytest.mark.parametrize("name", sorted(NEURONS))
@pytest.mark.parametrize("store_v_seq", [False, True])
def test_fused_matches_torch_renderer_over_every_state(name: str, store_v_seq: bool):
    d = NEURONS[name]
    torch.manual_seed(0)
    x_seq = (torch.randn(12, 3, 70) * 1.5).requires_grad_()
    st = {n: (torch.rand(3, 70) * 0.3).requires_grad_() for n in d.state_names}
    params = {n: torch.tensor(0.4, requires_grad=True) for n in d.param_names}
    s1, l1, vs1 = fused_multi_step_states(d, x_seq, st, params or None, store_v_seq)
    s2, l2, vs2 = torch_multi_step_states(d, x_seq, st, params or None, store_v_seq)
    assert torch.equal(s1, s2)
    assert 0.0 < s1.mean().item() < 1.0
    for n in d.state_names:
        assert torch.equal(l1[n], l2[n]), n
    if store_v_seq:
        assert torch.equal(vs1, vs2)
    g = torch.randn_like(s1)
    inputs = [x_seq, *st.values(), *params.values()]

    def loss(s, last):
        return (s * g).sum() + sum((last[n] * (i + 1)).sum() for i, n in enumerate(d.state_names))

    g1 = torch.autograd.grad(loss(s1, l1), inputs)
    g2 = torch.autograd.grad(loss(s2, l2), inputs)
    for got, ref in zip(g1, g2, strict=True):
        err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
        assert err < 1e-5


@needs_cc
def test_single_state_entry_point_starts_extra_states_from_their_init():
    d = NEURONS["plif_adaptive"]
    x_seq = torch.randn(6, 40)
    params = {n: torch.tensor(0.4) for n in d.param_names}
    s1, v1, _ = fused_multi_step(d, x_seq, 0.0, params)
    s2, last, _ = torch_multi_step_states(d, x_seq, {"v": 0.0, "a": 0.1}, params)
    assert torch.equal(s1, s2) and torch.equal(v1, last["v"])


def test_single_state_kernel_source_has_no_state_loops():
    from snncompile.dynamics import lif_dynamics

    src = generate(lif_dynamics(), "c").source
    assert "st_" not in src and "carry_" not in src and "sv_" not in src


def test_cuda_sources_of_multistate_neurons_compile_with_nvcc(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found on PATH: CUDA sources are not compiled in this environment")
    for d in NEURONS.values():
        cu, cc = generate(d, "cuda"), generate(d, "c")
        assert cu.forward_body == cc.forward_body and cu.backward_body == cc.backward_body
    src = tmp_path / "multi.cu"
    src.write_text("\n".join(generate(d, "cuda").source for d in NEURONS.values()))
    from snncompile.codegen.cuda import nvcc_command

    out = subprocess.run(
        nvcc_command(str(src), str(tmp_path / "multi.ptx")), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]


@needs_cc
def test_cuda_kernels_of_multistate_neurons_run_on_the_host(monkeypatch):
    """The exact CUDA sources, compiled for the host (codegen.cuda_host), agree with C."""
    from snncompile.codegen.cuda_host import find_cxx, host_kernels
    from snncompile.runtime import fused

    if find_cxx() is None:
        pytest.skip("no host C++ compiler to emulate the CUDA kernels")
    ds = list(NEURONS.values())
    kernels = host_kernels(ds)
    torch.manual_seed(1)
    for d in ds:
        x_seq = (torch.randn(9, 300) * 1.5).requires_grad_()
        st = {n: (torch.rand(300) * 0.3).requires_grad_() for n in d.state_names}
        params = {n: torch.tensor(0.4, requires_grad=True) for n in d.param_names} or None
        inputs = [x_seq, *st.values(), *(params or {}).values()]
        outs = []
        for host in (False, True):
            with monkeypatch.context() as m:
                if host:
                    m.setattr(fused, "_kernel", lambda kid, device: kernels[fused._dynamics(kid)])
                s, last, _ = fused_multi_step_states(d, x_seq, st, params)
                loss = s.sum() + sum(last[n].sum() * (i + 2) for i, n in enumerate(last))
                outs.append((s, last, torch.autograd.grad(loss, inputs)))
        (s1, l1, g1), (s2, l2, g2) = outs
        assert torch.equal(s1, s2), d.name
        assert all(torch.equal(l1[n], l2[n]) for n in l1), d.name
        for a_, b_ in zip(g1, g2, strict=True):
            assert ((a_ - b_).abs().max() / b_.abs().max().clamp_min(1e-12)).item() < 1e-6


def test_input_gain_scales_every_read_of_the_input():
    from snncompile.runtime.scaled_neuron import scaled_dynamics

    d = scaled_dynamics(NEURONS["cuba"], True, False)
    x_seq = torch.randn(5, 30)
    gain = torch.tensor(0.7)
    s1, l1, _ = torch_multi_step_states(d, x_seq, None, {"in_gain": gain})
    s2, l2, _ = torch_multi_step_states(NEURONS["cuba"], x_seq * gain, None)
    assert torch.equal(s1, s2) and torch.equal(l1["c"], l2["c"])


@needs_cc
def test_custom_op_opcheck_with_extra_states():
    """The torch.library custom op takes and returns the [S, N] states of multi-state neurons."""
    from snncompile.codegen.cpu import prebuild
    from snncompile.runtime.fused import register_dynamics

    d = NEURONS["alif"]
    prebuild([d])
    kid = register_dynamics(d)
    x = torch.randn(4, 16, requires_grad=True)
    states = torch.zeros(2, 16, requires_grad=True)
    torch.library.opcheck(
        torch.ops.snncompile.neuron_forward.default,
        (kid, x, states, torch.zeros(0), True, False),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    s1, l1, _ = fused_multi_step_states(d, x, {"v": 0.0, "a": 0.0}, use_custom_op=True)
    s2, l2, _ = fused_multi_step_states(d, x, {"v": 0.0, "a": 0.0}, use_custom_op=False)
    assert torch.equal(s1, s2) and torch.equal(l1["a"], l2["a"])
    g1 = torch.autograd.grad(s1.sum() + l1["a"].sum(), x)[0]
    g2 = torch.autograd.grad(s2.sum() + l2["a"].sum(), x)[0]
    assert torch.equal(g1, g2)
