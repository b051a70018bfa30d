"""Fused neuron kernels vs the torch renderer vs SpikingJelly 2.0.0.

Grid: IF/LIF/PLIF x decay_input x v_reset {0.0, None, -0.3} x detach_reset x 7 surrogates, multi-
step and single-step: spikes and membrane identical, gradients (x, v_init, PLIF w) within 1e-5
relative. Every distinct neuron configuration is its own C source; compiling the full grid (210
sources) costs ~1 min of compiler time on 2 cores, so the default run uses a covering subset:
every (kind, decay_input, v_reset, detach_reset) combination once, with the surrogate rotating
through all 7 (each surrogate meets every neuron kind). ``SNNCOMPILE_FULL_GRID=1`` runs the
full cross product. Kernels are built once per session, in parallel, and cached on disk.
"""

from __future__ import annotations

import pytest
import torch
from neuron_grid import ALPHAS, CONFIGS, FULL, config_id, dynamics_for

from snncompile.codegen.cpu import prebuild
from snncompile.codegen.torch_backend import torch_multi_step
from snncompile.dynamics import (
    SurrogateExpr,
    lif_dynamics,
    plif_dynamics,
)
from snncompile.runtime.fused import compiler_available, fused_multi_step

pytestmark = pytest.mark.skipif(not compiler_available(), reason="no C compiler installed")


def _sj_node(sj, kind: str, di: bool, vr: float | None, dr: bool, sg: str, step_mode: str):
    sgf = getattr(sj.surrogate, sg)(alpha=ALPHAS[sg])
    common = dict(v_reset=vr, detach_reset=dr, surrogate_function=sgf, step_mode=step_mode)
    if kind == "if":
        return sj.neuron.IFNode(**common)
    if kind == "lif":
        return sj.neuron.LIFNode(tau=2.0, decay_input=di, **common)
    return sj.neuron.ParametricLIFNode(init_tau=2.0, decay_input=di, **common)


@pytest.fixture(scope="module", autouse=True)
def _built():
    # One parallel build of every kernel the module uses (disk-cached across sessions).
    prebuild([dynamics_for(*c) for c in CONFIGS])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / max(scale, 1e-12)


def _inputs(T: int, N: int, dtype=torch.float32):
    x = (torch.randn(T, N) * 1.2 + 0.4).to(dtype)
    v0 = torch.randn(N) * 0.4
    gs = torch.randn(T, N)
    gv = torch.randn(N)
    return x, v0, gs, gv


def _w64_reference(d, x, v0, w, gs, gv) -> float:
    """The PLIF w-gradient in float64 (the sum over T*N terms cancels; compare to truth)."""
    w64 = w.detach().double().requires_grad_()
    s, v, _ = torch_multi_step(d, x.detach().double(), v0.detach().double(), {"w": w64})
    loss = (s * gs.double()).sum() + (v * gv.double()).sum()
    (g,) = torch.autograd.grad(loss, [w64])
    return g.item()


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_multi_step_matches_spikingjelly_and_torch_renderer(sj, config):
    kind, di, vr, dr, sg = config
    T, N = 6, 200
    d = dynamics_for(*config)
    x, v0, gs, gv = _inputs(T, N)

    node = _sj_node(sj, *config, step_mode="m")
    xs = x.clone().requires_grad_()
    vs = v0.clone().requires_grad_()
    node.v = vs
    s_sj = node(xs)
    v_sj = node.v
    wrt_sj = [xs, vs] + ([node.w] if kind == "plif" else [])
    g_sj = torch.autograd.grad((s_sj * gs).sum() + (v_sj * gv).sum(), wrt_sj)

    results = {}
    for name in ("fused", "torch"):
        xf = x.clone().requires_grad_()
        vf = v0.clone().requires_grad_()
        w = torch.tensor(node.w.item(), requires_grad=True) if kind == "plif" else None
        params = {"w": w} if w is not None else None
        run = fused_multi_step if name == "fused" else torch_multi_step
        s, v, _ = run(d, xf, vf, params)
        wrt = [xf, vf] + ([w] if w is not None else [])
        g = torch.autograd.grad((s * gs).sum() + (v * gv).sum(), wrt)
        results[name] = (s, v, g)

    for name, (s, v, g) in results.items():
        assert torch.equal(s, s_sj), f"{name}: spikes differ from SpikingJelly"
        assert torch.equal(v, v_sj.detach()), f"{name}: final v differs from SpikingJelly"
        assert _rel(g[0], g_sj[0]) < 1e-5, f"{name}: grad x"
        assert _rel(g[1], g_sj[1]) < 1e-5, f"{name}: grad v_init"
        if kind == "plif":
            ref = _w64_reference(d, x, v0, node.w, gs, gv)
            assert abs(g[2].item() - ref) <= 1e-5 * max(abs(ref), 1.0), f"{name}: grad w"
            # SpikingJelly sums the same T*N terms in float32 in another order.
            assert abs(g_sj[2].item() - ref) <= 1e-3 * max(abs(ref), 1.0)


@pytest.mark.parametrize("config", CONFIGS[:: 3 if not FULL else 1], ids=config_id)
def test_single_step_matches_spikingjelly(sj, config):
    """Single-step: T=1 fused calls carrying the state vs SpikingJelly in step_mode='s'."""
    kind = config[0]
    T, N = 4, 64
    d = dynamics_for(*config)
    x, v0, gs, gv = _inputs(T, N)
    node = _sj_node(sj, *config, step_mode="s")
    xs = x.clone().requires_grad_()
    vs = v0.clone().requires_grad_()
    node.v = vs
    s_sj = torch.stack([node(xt) for xt in xs.unbind(0)])
    wrt = [xs, vs] + ([node.w] if kind == "plif" else [])
    g_sj = torch.autograd.grad((s_sj * gs).sum() + (node.v * gv).sum(), wrt)

    xf = x.clone().requires_grad_()
    vf = v0.clone().requires_grad_()
    w = torch.tensor(node.w.item(), requires_grad=True) if kind == "plif" else None
    params = {"w": w} if w is not None else None
    v = vf
    spikes = []
    for xt in xf.unbind(0):
        s, v, _ = fused_multi_step(d, xt.unsqueeze(0), v, params)
        spikes.append(s[0])
    s_f = torch.stack(spikes)
    wrt_f = [xf, vf] + ([w] if w is not None else [])
    g_f = torch.autograd.grad((s_f * gs).sum() + (v * gv).sum(), wrt_f)
    assert torch.equal(s_f, s_sj)
    assert torch.equal(v, node.v.detach())
    assert _rel(g_f[0], g_sj[0]) < 1e-5
    assert _rel(g_f[1], g_sj[1]) < 1e-5
    if kind == "plif":
        assert abs(g_f[2].item() - g_sj[2].item()) <= 1e-4 * max(abs(g_sj[2].item()), 1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [CONFIGS[8], CONFIGS[20]], ids=config_id)
def test_half_inputs_compute_in_float32(sj, config, dtype):
    """fp16/bf16 inputs: float32 state and arithmetic; spikes and grad_x in the input dtype."""
    kind = config[0]
    T, N = 5, 128
    d = dynamics_for(*config)
    x, v0, gs, gv = _inputs(T, N, dtype)
    node = _sj_node(sj, *config, step_mode="m")
    xs = x.float().requires_grad_()
    node.v = v0.clone()
    s_sj = node(xs)
    (g_sj,) = torch.autograd.grad((s_sj * gs).sum() + (node.v * gv).sum(), [xs])

    xf = x.clone().requires_grad_()
    params = {"w": node.w.detach().clone()} if kind == "plif" else None
    s, v, v_seq = fused_multi_step(d, xf, v0, params, store_v_seq=True)
    assert s.dtype == dtype and v_seq.dtype == dtype and v.dtype == torch.float32
    assert torch.equal(s.float(), s_sj)
    assert torch.equal(v, node.v)
    (g,) = torch.autograd.grad((s.float() * gs).sum() + (v * gv).sum(), [xf])
    assert g.dtype == dtype
    assert torch.equal(g, g_sj.to(dtype)) or _rel(g.float(), g_sj.to(dtype).float()) < 1e-2


def test_store_v_seq_and_grad_through_v_seq(sj):
    d = lif_dynamics(2.0, True, v_reset=None, surrogate=SurrogateExpr("ATan", (2.0,)))
    prebuild([d])
    x, v0, gs, _ = _inputs(7, 50)
    node = sj.neuron.LIFNode(
        v_reset=None, surrogate_function=sj.surrogate.ATan(), step_mode="m", store_v_seq=True
    )
    xs = x.clone().requires_grad_()
    s_sj = node(xs)
    gvs = torch.randn_like(x)
    (g_sj,) = torch.autograd.grad((s_sj * gs).sum() + (node.v_seq * gvs).sum(), [xs])
    xf = x.clone().requires_grad_()
    s, v, v_seq = fused_multi_step(d, xf, 0.0, store_v_seq=True)
    assert torch.equal(v_seq, node.v_seq.detach())
    (g,) = torch.autograd.grad((s * gs).sum() + (v_seq * gvs).sum(), [xf])
    assert _rel(g, g_sj) < 1e-5


def test_custom_op_path_matches_autograd_function():
    d = plif_dynamics(True, v_reset=0.0, surrogate=SurrogateExpr("Sigmoid", (4.0,)))
    prebuild([d])
    x, v0, gs, gv = _inputs(5, 3 * 40)
    x = x.reshape(5, 3, 40)
    v0 = v0.reshape(3, 40)
    outs = []
    for use_custom_op in (False, True):
        xf = x.clone().requires_grad_()
        vf = v0.clone().requires_grad_()
        w = torch.tensor(0.3, requires_grad=True)
        s, v, _ = fused_multi_step(d, xf, vf, {"w": w}, use_custom_op=use_custom_op)
        g = torch.autograd.grad(
            (s * gs.reshape(5, 3, 40)).sum() + (v * gv.reshape(3, 40)).sum(), [xf, vf, w]
        )
        outs.append((s, v, g))
    (s1, v1, g1), (s2, v2, g2) = outs
    assert s1.shape == (5, 3, 40) and v1.shape == (3, 40)
    assert torch.equal(s1, s2) and torch.equal(v1, v2)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)


def test_custom_op_opcheck():
    """torch.library.opcheck validates the schema, fake kernel and autograd registration."""
    from snncompile.runtime.fused import register_dynamics

    d = lif_dynamics(2.0, True, v_reset=0.0)
    prebuild([d])
    kid = register_dynamics(d)
    x = torch.randn(3, 16, requires_grad=True)
    v0 = torch.zeros(16, requires_grad=True)
    u = torch.zeros(0)
    torch.library.opcheck(
        torch.ops.snncompile.neuron_forward.default,
        (kid, x, v0, u, True, True),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_torch_compile_fullgraph():
    d = lif_dynamics(2.0, True, v_reset=0.0)
    prebuild([d])

    def f(x: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
        s, v, _ = fused_multi_step(d, x * 2.0, v0)
        return s.sum() + v.sum()

    x = torch.randn(4, 32)
    v0 = torch.zeros(32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xe = x.clone().requires_grad_()
    xc = x.clone().requires_grad_()
    ye = f(xe, v0)
    yc = compiled(xc, v0)
    assert torch.equal(ye, yc)
    ye.backward()
    yc.backward()
    assert torch.equal(xe.grad, xc.grad)


# -- snncompile.neuron integration (backend='cpu' | 'auto') -------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "auto"])
@pytest.mark.parametrize("kind", ["IFNode", "LIFNode", "ParametricLIFNode"])
def test_neuron_backends_match_spikingjelly(sj, kind, backend):
    from snncompile import neuron as sn
    from snncompile import surrogate as sc

    T, B, N = 8, 4, 160  # T*B*N above AUTO_MIN_ELEMENTS: 'auto' fuses
    x = torch.randn(T, B, N) * 1.2 + 0.3
    ours = getattr(sn, kind)(
        surrogate_function=sc.Erf(), step_mode="m", store_v_seq=True, backend=backend
    )
    ref = getattr(sj.neuron, kind)(
        surrogate_function=sj.surrogate.Erf(), step_mode="m", store_v_seq=True
    )
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    for _ in range(2):  # the state carries over between calls
        sa, sb = ours(xa), ref(xb)
        assert torch.equal(sa, sb)
        assert torch.equal(ours.v, ref.v) and torch.equal(ours.v_seq, ref.v_seq)
    (sa.sum() + ours.v.sum()).backward()
    (sb.sum() + ref.v.sum()).backward()
    assert _rel(xa.grad, xb.grad) < 1e-5
    if kind == "ParametricLIFNode":
        assert abs(ours.w.grad.item() - ref.w.grad.item()) <= 1e-4 * max(abs(ref.w.grad.item()), 1)
    ours.reset()
    assert ours.v == 0.0


def test_neuron_backend_falls_back_for_unsupported_surrogate():
    from snncompile import neuron as sn
    from snncompile import surrogate as sc

    node = sn.LIFNode(surrogate_function=sc.Rect(), step_mode="m", backend="cpu")
    ref = sn.LIFNode(surrogate_function=sc.Rect(), step_mode="m")
    x = torch.randn(4, 2, 8)
    with pytest.warns(RuntimeWarning, match="no fused kernel"):
        s = node(x)
    assert torch.equal(s, ref(x))


@pytest.mark.parametrize("make", [lif_dynamics, plif_dynamics], ids=["lif", "plif"])
def test_backward_keeps_only_h_and_x_when_needed(make):
    """Saved for backward: h (float32 [T, N]); the input only when the gradient reads it."""
    d = make()
    prebuild([d])
    x = torch.randn(6, 300, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    params = {"w": torch.tensor(0.1, requires_grad=True)} if d.param_names else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_multi_step(d, x, 0.0, params)
    big = [t for t in saved if t.numel() == x.numel()]
    keeps_x = any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in big)
    assert keeps_x == ("x" in d.step_program().backward_needs)
    assert len(big) == 1 + int(keeps_x)  # h, plus x for PLIF


@pytest.mark.parametrize("sg", ["Sigmoid", "ATan", "PiecewiseQuadratic", "Erf"])
def test_non_spiking_surrogate_runs_the_primitive(sg):
    """surrogate(spiking=False): the neuron emits the smooth primitive; fused == torch path."""
    from snncompile import neuron as sn
    from snncompile import surrogate as sc

    x = torch.randn(5, 3, 40)
    outs = []
    for backend in ("torch", "cpu"):
        node = sn.LIFNode(
            surrogate_function=getattr(sc, sg)(spiking=False), step_mode="m", backend=backend
        )
        xr = x.clone().requires_grad_()
        y = node(xr)
        (y.sum() + node.v.sum()).backward()
        outs.append((y, node.v, xr.grad))
    (y1, v1, g1), (y2, v2, g2) = outs
    assert not torch.equal(y1, (y1 > 0.5).float())  # really smooth outputs
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v2, v1.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-5)


def test_float64_runs_the_torch_loop():
    """Fused kernels are float32: float64 inputs keep full precision through the torch loop."""
    from snncompile import neuron as sn

    x = torch.randn(6, 4, 50, dtype=torch.float64)
    ref = sn.LIFNode(step_mode="m")(x)
    with pytest.warns(RuntimeWarning, match="float32"):
        out = sn.LIFNode(step_mode="m", backend="cpu")(x)
    assert out.dtype == torch.float64 and torch.equal(out, ref)
    assert torch.equal(sn.LIFNode(step_mode="m", backend="auto")(x), ref)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        fused_multi_step(lif_dynamics(), x, 0.0)
