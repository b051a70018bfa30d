"""The CUDA kernels on a GPU (``pytest -m cuda``; skipped without a CUDA GPU and CuPy).

* The neuron grid (IF/LIF/PLIF x decay_input x v_reset x detach_reset x surrogates; the covering
  subset, ``SNNCOMPILE_FULL_GRID=1`` for all) on the GPU vs the torch path on the GPU: spikes and
  ``v`` identical, gradients within 1e-6 relative (PLIF ``w`` vs a float64 reference, 1e-5), and
  vs the same CUDA source run on the host (:mod:`snncompile.codegen.cuda_host`).
* The modules with ``backend='cuda'`` / ``'auto'``, float16/bfloat16 inputs, a side stream.
* The fused op under ``torch.compile(fullgraph=True)``.
* Compiled training steps on the GPU equal to eager: a residual spiking CNN, and SpikingJelly's
  zoo ``spiking_resnet18`` (SpikingJelly's zoo imports torchvision only for
  ``load_state_dict_from_url``; a stub stands in when torchvision is missing).

``SNNCOMPILE_CUDA_TESTS_DEVICE=cpu`` runs the same test bodies on the CPU with ``backend='cpu'``
(a dry run of the tests' own logic on machines without a GPU); ``scripts/gpu_check.sh`` runs them
on a GPU.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from neuron_grid import CONFIGS, config_id, dynamics_for

DEVICE = os.environ.get("SNNCOMPILE_CUDA_TESTS_DEVICE", "cuda")
BACKEND = "cuda" if DEVICE == "cuda" else "cpu"


def _gpu_missing() -> str | None:
    if DEVICE != "cuda":
        return None
    from snncompile.runtime.fused_backends import unavailable_reason

    return unavailable_reason("cuda")


_MISSING = _gpu_missing()
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(_MISSING is not None, reason=f"CUDA tests: {_MISSING}"),
]

# [T, *]: odd N, several blocks, a partly idle last block, T from 1 to 64.
SHAPES = [(7, 3, 100), (1, 1), (17, 31), (64, 4099), (3, 2, 70001)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


@pytest.fixture(autouse=True)
def _exact_math():
    """No TF32 and deterministic cuDNN, so eager and compiled models do the same arithmetic."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    yield
    (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    ) = saved


def _run(run, d, x, v0, w, gs, gv, store_v_seq=False):
    xf = x.clone().requires_grad_()
    vf = v0.clone().requires_grad_()
    wf = w.clone().requires_grad_() if w is not None else None
    params = {"w": wf} if wf is not None else None
    s, v, v_seq = run(d, xf, vf, params, store_v_seq)
    loss = (s * gs).sum() + (v * gv).sum()
    if store_v_seq:
        loss = loss + (v_seq * gs.flip(0)).sum()
    wrt = [xf, vf] + ([wf] if wf is not None else [])
    return s, v, v_seq, torch.autograd.grad(loss, wrt)


def _w64(d, x, v0, w, gs, gv) -> float:
    from snncompile.codegen.torch_backend import torch_multi_step

    w64 = w.detach().double().cpu().requires_grad_()
    s, v, _ = torch_multi_step(d, x.detach().double().cpu(), v0.detach().double().cpu(),
                               {"w": w64})  # fmt: skip
    (g,) = torch.autograd.grad((s * gs.double().cpu()).sum() + (v * gv.double().cpu()).sum(), [w64])
    return g.item()


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_neuron_grid_on_gpu_matches_torch(config):
    from snncompile.codegen.torch_backend import torch_multi_step
    from snncompile.runtime.fused import fused_multi_step

    kind = config[0]
    d = dynamics_for(*config)
    i = CONFIGS.index(config)
    for j, shape in enumerate([SHAPES[0], SHAPES[1 + i % (len(SHAPES) - 1)]]):
        g = torch.Generator().manual_seed(i * 10 + j)
        x = (torch.randn(shape, generator=g) * 1.2 + 0.4).to(DEVICE)
        v0 = (torch.randn(shape[1:], generator=g) * 0.4).to(DEVICE)
        gs = torch.randn(shape, generator=g).to(DEVICE)
        gv = torch.randn(shape[1:], generator=g).to(DEVICE)
        w = torch.tensor(-0.3, device=DEVICE) if kind == "plif" else None
        store = (i + j) % 2 == 1

        def fused(d, x, v, p, store):
            return fused_multi_step(d, x, v, p, store_v_seq=store)

        cu = _run(fused, d, x, v0, w, gs, gv, store)
        ref = _run(torch_multi_step, d, x, v0, w, gs, gv, store)
        where = f"{config_id(config)} shape={shape}"
        assert cu[0].device.type == DEVICE
        assert torch.equal(cu[0], ref[0]), f"{where}: spikes differ from the torch path"
        assert torch.equal(cu[1], ref[1].detach()), f"{where}: v differs from the torch path"
        if store:
            assert torch.equal(cu[2], ref[2].detach()), f"{where}: v_seq differs"
        for k, what in enumerate(("x", "v_init")):
            err = _rel(cu[3][k], ref[3][k])
            assert err <= 1e-6, f"{where}: grad {what} relative error {err:.2e}"
        if kind == "plif":
            if store:  # the float64 reference below has no v_seq term
                continue
            truth = _w64(d, x, v0, w, gs, gv)
            got = cu[3][2].item()
            assert abs(got - truth) <= 1e-5 * max(abs(truth), 1.0), f"{where}: grad w {got} {truth}"


@pytest.mark.parametrize("config", CONFIGS[::4], ids=config_id)
def test_device_kernels_match_their_host_emulation(config):
    """The same CUDA source on the GPU and compiled for the host (the CPU tests' stand-in)."""
    from snncompile.codegen.cuda import cuda_kernel
    from snncompile.codegen.cuda_host import HostCudaKernel, find_cxx

    if DEVICE != "cuda":
        pytest.skip("compares the device with its host emulation")
    if find_cxx() is None:
        pytest.skip("no host C++ compiler")
    d = dynamics_for(*config)
    dev, host = cuda_kernel(d), HostCudaKernel(d)
    T, N = 9, 1001
    x, v0 = torch.randn(T, N) + 0.5, torch.randn(N) * 0.3
    u = torch.tensor([0.45])[: dev.num_uniforms]
    gs, gvs, gvl = torch.randn(T, N), torch.randn(T, N), torch.randn(N)
    out_d = dev.forward(x.cuda(), v0.cuda(), u.cuda(), True, True)
    out_h = host.forward(x, v0, u, True, True)
    for a, b in zip(out_d, out_h, strict=True):
        assert torch.equal(a.cpu(), b)
    g_d = dev.backward(gs.cuda(), gvs.cuda(), gvl.cuda(), out_d[1], x.cuda(), v0.cuda(), u.cuda())
    g_h = host.backward(gs, gvs, gvl, out_h[1], x, v0, u)
    for a, b in zip(g_d, g_h, strict=True):
        if b.numel():
            assert _rel(a, b) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_modules_with_the_gpu_backend_match_torch(dtype):
    """Fused kernels keep float32 state for half inputs: the reference is the torch path on the
    float32 copy of the input (spikes equal, gradients to the input dtype's precision)."""
    from snncompile import neuron

    x = (torch.randn(16, 4, 333) * 1.2 + 0.4).to(DEVICE, dtype)
    results = {}
    for backend in (BACKEND, "auto", "torch"):
        node = neuron.ParametricLIFNode(step_mode="m", backend=backend).to(DEVICE)
        xr = (x.float() if backend == "torch" else x).clone().requires_grad_()
        s = node(xr)
        s.float().sum().backward()
        results[backend] = (s, node.v, xr.grad, node.w.grad)
    ref = results.pop("torch")
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for backend, (s, v, gx, gw) in results.items():
        assert s.dtype == dtype and s.device.type == DEVICE and v.dtype == torch.float32
        assert torch.equal(s.float(), ref[0]), backend
        assert torch.equal(v, ref[1]), backend
        assert gx.dtype == dtype
        assert _rel(gx.float(), ref[2]) <= tol, backend
        assert abs(gw.item() - ref[3].item()) <= max(tol, 1e-5) * max(abs(ref[3].item()), 1.0)


def test_kernels_run_on_the_current_stream():
    from snncompile.codegen.torch_backend import torch_multi_step
    from snncompile.dynamics import lif_dynamics
    from snncompile.runtime.fused import fused_multi_step

    if DEVICE != "cuda":
        pytest.skip("streams are a GPU matter")
    d = lif_dynamics(2.0)
    side = torch.cuda.Stream()
    x = torch.randn(32, 1 << 18, device="cuda") + 0.5
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = x * 1.5  # queued on the side stream; the kernel must run after it, on it
        s, v, _ = fused_multi_step(d, y, 0.0)
    torch.cuda.current_stream().wait_stream(side)
    s_ref, v_ref, _ = torch_multi_step(d, x * 1.5, torch.zeros(1 << 18, device="cuda"))
    assert torch.equal(s, s_ref) and torch.equal(v, v_ref)


def test_fused_op_under_torch_compile():
    from snncompile.dynamics import plif_dynamics
    from snncompile.runtime.fused import fused_multi_step

    d = plif_dynamics(True, v_reset=None, detach_reset=True)

    def step(x, w):
        s, v, _ = fused_multi_step(d, x, 0.0, {"w": w})
        return s.sum() + (v * v).sum()

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if DEVICE == "cuda"
                             else "aot_eager")  # fmt: skip
    x = torch.randn(12, 2, 513, device=DEVICE) + 0.5
    grads = []
    for fn in (step, compiled):
        xr = x.clone().requires_grad_()
        w = torch.tensor(-0.2, device=DEVICE, requires_grad=True)
        out = fn(xr, w)
        out.backward()
        grads.append((out.detach(), xr.grad, w.grad))
    (o1, gx1, gw1), (o2, gx2, gw2) = grads
    assert torch.allclose(o1, o2, rtol=1e-6, atol=1e-6)
    assert _rel(gx2, gx1) <= 1e-6
    assert abs(gw2.item() - gw1.item()) <= 1e-5 * max(abs(gw1.item()), 1.0)


def _training_step(model, x, y):
    from snncompile import functional

    functional.reset_net(model)
    out = model(x).mean(0)
    loss = torch.nn.functional.cross_entropy(out, y)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return out.detach(), grads


def _assert_step_equal(eager, compiled, x, y, tol: float) -> None:
    out_e, g_e = _training_step(eager, x, y)
    out_c, g_c = _training_step(compiled, x, y)
    assert _rel(out_c, out_e) <= tol, f"outputs: relative error {_rel(out_c, out_e):.2e}"
    assert len(g_e) == len(g_c)
    worst = max(_rel(a, b) for a, b in zip(g_c, g_e, strict=True))
    assert worst <= tol, f"parameter gradients: worst relative error {worst:.2e}"


def test_compiled_residual_snn_training_step_on_gpu_equals_eager():
    """A small spiking ResNet (conv-BN-LIF blocks, residual adds) compiled with the GPU backend."""
    from torch import nn

    import snncompile
    from snncompile import functional, layer, neuron, surrogate

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv1 = layer.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = layer.BatchNorm2d(c)
            self.sn1 = neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan())
            self.conv2 = layer.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = layer.BatchNorm2d(c)
            self.sn2 = neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan(),
                                      detach_reset=True)  # fmt: skip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.sn2(self.bn2(self.conv2(self.sn1(self.bn1(self.conv1(x))))) + x)

    torch.manual_seed(0)
    model = nn.Sequential(
        layer.Conv2d(3, 16, 3, padding=1, bias=False),
        layer.BatchNorm2d(16),
        neuron.ParametricLIFNode(),
        Block(16),
        layer.MaxPool2d(2),
        Block(16),
        layer.AdaptiveAvgPool2d((1, 1)),
        layer.Flatten(),
        layer.Linear(16, 10),
    )
    functional.set_step_mode(model, "m")
    model = model.to(DEVICE)
    eager = copy.deepcopy(model)
    x = torch.rand(4, 8, 3, 16, 16, device=DEVICE)
    y = torch.randint(0, 10, (8,), device=DEVICE)
    compiled = snncompile.optimize(model, x, mode="train", backend=BACKEND)
    fused = [r for r in compiled.records if r.name == "fuse_neurons"]
    assert fused and fused[0].modified, "no neuron was fused"
    _assert_step_equal(eager, compiled, x, y, tol=1e-5)


def _import_zoo():
    """SpikingJelly's zoo (with snncompile's torchvision stand-in where torchvision is missing)."""
    from snncompile.zoo_compat import install_torchvision_stand_in

    install_torchvision_stand_in()
    try:
        from spikingjelly.activation_based import functional, neuron, surrogate
        from spikingjelly.activation_based.model import spiking_resnet
    except Exception as exc:
        pytest.skip(f"SpikingJelly 2.0.0 zoo not importable: {exc!r}")
    return functional, neuron, surrogate, spiking_resnet


def test_compiled_zoo_spiking_resnet18_training_step_on_gpu_equals_eager():
    import snncompile

    functional, neuron, surrogate, spiking_resnet = _import_zoo()
    torch.manual_seed(0)
    model = spiking_resnet.spiking_resnet18(
        spiking_neuron=neuron.LIFNode, surrogate_function=surrogate.ATan(), detach_reset=True,
        num_classes=10,
    )  # fmt: skip
    functional.set_step_mode(model, "m")
    model = model.to(DEVICE)
    eager = copy.deepcopy(model)
    x = torch.rand(2, 4, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 10, (4,), device=DEVICE)
    compiled = snncompile.optimize(model, x, mode="train", backend=BACKEND)
    # Eager is SpikingJelly's own modules (on a GPU, its own CuPy/Triton neuron kernels).
    _assert_step_equal(eager, compiled, x, y, tol=1e-4)
