"""The generated CUDA kernels, run on the CPU, vs the C kernels and the torch path.

The exact CUDA source that CuPy's ``RawModule`` compiles is built for the host with a shim header
(:mod:`snncompile.codegen.cuda_host`) and launched over the same grid as on the device (blocks of
:data:`~snncompile.codegen.cuda.THREADS_PER_BLOCK` threads, the last one partly idle), through
:class:`~snncompile.codegen.cuda.CudaKernel`'s own ``forward``/``backward``. This runs the CUDA
templates' indexing, guards and time loops, not only the per-neuron bodies the C kernels share.

Grid: the covering subset of test_fused (every IF/LIF/PLIF x decay_input x v_reset x
detach_reset combination, the 7 surrogates rotating; ``SNNCOMPILE_FULL_GRID=1`` for the full
product), each at two shapes (odd N, several T, multi-dimensional ``[T, *]``): spikes, ``v`` and
``v_seq`` identical to the C kernel and to the torch renderer; gradients (x, v_init, PLIF w)
within the C-vs-torch tolerances, and within 1e-6 relative of the C kernel.
"""

from __future__ import annotations

import pytest
import torch
from neuron_grid import CONFIGS, config_id, dynamics_for

from snncompile.codegen.cpu import cpu_kernel, prebuild
from snncompile.codegen.cuda import THREADS_PER_BLOCK, launch_config
from snncompile.codegen.cuda_host import (
    find_cxx,
    host_kernels,
    host_source,
    kernel_signatures,
    load_host_library,
)
from snncompile.codegen.kernels import generate
from snncompile.codegen.torch_backend import torch_multi_step
from snncompile.dynamics import plif_dynamics
from snncompile.runtime import fused
from snncompile.runtime.fused import compiler_available, fused_multi_step

pytestmark = pytest.mark.skipif(
    find_cxx() is None or not compiler_available(), reason="no host C/C++ compiler installed"
)

# [T, *] shapes: N = prod(*) is odd or not a multiple of the block size; T from 1 to 17.
SHAPES = [(7, 3, 100), (1, 1), (17, 31), (3, 257), (4, 2, 256), (2, 513)]


@pytest.fixture(scope="module")
def kernels():
    """Host-emulated CUDA kernels of every configuration (one C++ library, disk-cached)."""
    ds = [dynamics_for(*c) for c in CONFIGS]
    prebuild(ds)
    return host_kernels(ds)


@pytest.fixture
def on_host_cuda(kernels, monkeypatch):
    """A context in which fused_multi_step runs the CUDA kernels (host-emulated) on CPU tensors."""

    def use():
        ctx = monkeypatch.context()
        m = ctx.__enter__()
        m.setattr(fused, "_kernel", lambda kid, device: kernels[fused._dynamics(kid)])
        return ctx

    return use


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def _run(run, d, x, v0, w, gs, gv, gvs, store_v_seq):
    xf = x.clone().requires_grad_()
    vf = v0.clone().requires_grad_()
    wf = w.clone().requires_grad_() if w is not None else None
    params = {"w": wf} if wf is not None else None
    if run is fused_multi_step:
        s, v, v_seq = run(d, xf, vf, params, store_v_seq=store_v_seq)
    else:
        s, v, v_seq = run(d, xf, vf, params, store_v_seq)
    loss = (s * gs).sum() + (v * gv).sum()
    if store_v_seq:
        loss = loss + (v_seq * gvs).sum()
    wrt = [xf, vf] + ([wf] if wf is not None else [])
    return s, v, v_seq, torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_cuda_kernel_on_host_matches_c_kernel_and_torch(config, on_host_cuda):
    kind = config[0]
    d = dynamics_for(*config)
    i = CONFIGS.index(config)
    for j, shape in enumerate([SHAPES[0], SHAPES[1 + i % (len(SHAPES) - 1)]]):
        store_v_seq = (i + j) % 2 == 1
        x = torch.randn(shape) * 1.2 + 0.4
        v0 = torch.randn(shape[1:]) * 0.4
        gs, gv, gvs = torch.randn(shape), torch.randn(shape[1:]), torch.randn(shape)
        w = torch.tensor(-0.3) if kind == "plif" else None
        args = (d, x, v0, w, gs, gv, gvs, store_v_seq)
        ref = _run(torch_multi_step, *args)
        c = _run(fused_multi_step, *args)
        ctx = on_host_cuda()
        try:
            cu = _run(fused_multi_step, *args)
        finally:
            ctx.__exit__(None, None, None)
        where = f"{config_id(config)} shape={shape} store_v_seq={store_v_seq}"
        for name, other in (("C kernel", c), ("torch", ref)):
            assert torch.equal(cu[0], other[0]), f"{where}: spikes differ from the {name}"
            assert torch.equal(cu[1], other[1].detach()), f"{where}: v differs from the {name}"
            if store_v_seq:
                assert torch.equal(cu[2], other[2].detach()), f"{where}: v_seq vs the {name}"
        for k, what in enumerate(["x", "v_init", "w"][: len(cu[3])]):
            assert _rel(cu[3][k], c[3][k]) <= 1e-6, f"{where}: grad {what} vs the C kernel"
            assert _rel(cu[3][k], ref[3][k]) <= 1e-5, f"{where}: grad {what} vs torch"


def test_custom_op_path_runs_the_cuda_kernels_on_host(on_host_cuda):
    """The torch.library custom op (what torch.compile sees) with the CUDA kernels."""
    d = dynamics_for(*next(c for c in CONFIGS if c[0] == "plif"))
    x = torch.randn(5, 300) + 0.5
    w = torch.tensor(0.2, requires_grad=True)
    s_ref, v_ref, _ = torch_multi_step(d, x, torch.zeros(300), {"w": w})
    (g_ref,) = torch.autograd.grad(s_ref.sum() + v_ref.sum(), [w])
    ctx = on_host_cuda()
    try:
        s, v, _ = fused_multi_step(d, x, 0.0, {"w": w}, use_custom_op=True)
        (g,) = torch.autograd.grad(s.sum() + v.sum(), [w])
    finally:
        ctx.__exit__(None, None, None)
    assert torch.equal(s, s_ref) and torch.equal(v, v_ref.detach())
    assert abs(g.item() - g_ref.item()) <= 1e-5 * max(abs(g_ref.item()), 1.0)


PAD = 64
CANARY = 12345.0


def _padded(shape: tuple[int, ...], fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    n = 1
    for s in shape:
        n *= s
    buf = torch.full((n + 2 * PAD,), fill)
    return buf, buf[PAD : PAD + n].view(shape)


@pytest.mark.parametrize("threads", [THREADS_PER_BLOCK, 32])
@pytest.mark.parametrize("T,N", [(1, 1), (5, 31), (3, 255), (4, 257), (2, 600)])
def test_kernels_write_only_their_outputs(kernels, threads, T, N):
    """Outputs between canaries: nothing outside [T, N] / [N] / [U, N] is written, every element
    inside is (the last block's idle threads return early), and the per-neuron parameter-gradient
    partial sums equal the C kernel's."""
    from snncompile.codegen.cuda_host import HostCudaKernel

    d = dynamics_for(*next(c for c in CONFIGS if c[0] == "plif"))
    lib_k = kernels[d]
    k = HostCudaKernel(d, threads, library=lib_k._library)
    assert launch_config(N, threads)[0] * threads >= N
    x = torch.randn(T, N) + 0.5
    v0 = torch.randn(N) * 0.3
    u = torch.tensor([0.4])
    outs = [_padded((T, N), CANARY) for _ in range(3)] + [_padded((N,), CANARY)]
    views = [o[1] for o in outs]
    k._launch(k._fwd, N, [x, v0, u, *views, T, N])
    s_c, h_c, vseq_c, vlast_c = cpu_kernel(d).forward(x, v0, u, True, True)
    for (buf, view), ref in zip(outs, (s_c, h_c, vseq_c, vlast_c), strict=True):
        assert torch.equal(view, ref)
        assert (buf[:PAD] == CANARY).all() and (buf[-PAD:] == CANARY).all()
    gs, gvs, gvl = torch.randn(T, N), torch.randn(T, N), torch.randn(N)
    bouts = [_padded((T, N), CANARY), _padded((N,), CANARY), _padded((1, N), CANARY)]
    k._launch(k._bwd, N, [gs, gvs, gvl, h_c, x, v0, u, *(o[1] for o in bouts), T, N])
    refs = cpu_kernel(d).backward(gs, gvs, gvl, h_c, x, v0, u)
    for (buf, view), ref in zip(bouts, refs, strict=True):
        assert _rel(view, ref) <= 1e-6
        assert (buf[:PAD] == CANARY).all() and (buf[-PAD:] == CANARY).all()


def test_forward_without_h_and_v_seq_writes_neither(kernels):
    """need_h=False / store_v_seq=False pass null pointers; spikes and v are still right."""
    d = dynamics_for(*CONFIGS[3])
    k = kernels[d]
    x, v0 = torch.randn(6, 301), torch.zeros(301)
    s, h, v_seq, v_last = k.forward(x, v0, torch.zeros(k.num_uniforms), False, False)
    assert h is None and v_seq is None
    s_c, _, _, v_c = cpu_kernel(d).forward(x, v0, torch.zeros(k.num_uniforms), False, False)
    assert torch.equal(s, s_c) and torch.equal(v_last, v_c)


def test_the_shim_emulates_the_grid_and_cuda_builtins():
    """A hand-written kernel using gridDim/blockDim (grid-stride loop), __ldg and atomicAdd."""
    src = r"""
extern "C" __global__ void probe(const float *__restrict__ x, float *__restrict__ y,
                                 float *__restrict__ total, int *__restrict__ seen,
                                 const long long n)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        y[i] = __expf(__ldg(x + i)) + rsqrtf(4.0f);
        atomicAdd(total, x[i]);
        seen[i] += 1;
    }
}
"""
    assert kernel_signatures(src)[0][0] == "probe"
    assert [p for _, p in kernel_signatures(src)[0][1]] == ["x", "y", "total", "seen", "n"]
    lib = load_host_library([src])
    fn = lib.probe__host_launch
    n = 1000
    x = torch.rand(n)
    y = torch.zeros(n)
    total = torch.zeros(1)
    seen = torch.zeros(n, dtype=torch.int32)
    import ctypes

    P = ctypes.c_void_p
    fn.argtypes = [ctypes.c_uint, ctypes.c_uint, P, P, P, P, ctypes.c_longlong]
    fn(3, 64, x.data_ptr(), y.data_ptr(), total.data_ptr(), seen.data_ptr(), n)
    assert torch.equal(seen, torch.ones(n, dtype=torch.int32))  # each element exactly once
    assert torch.allclose(y, torch.exp(x) + 0.5)
    assert abs(total.item() - x.double().sum().item()) < 1e-3


def test_host_source_contains_the_exact_cuda_source():
    d = plif_dynamics(False, v_reset=None)
    cuda_src = generate(d, "cuda").source
    text = host_source([cuda_src])
    assert cuda_src in text
    names = [n for n, _ in kernel_signatures(cuda_src)]
    assert names == [f"{generate(d, 'cuda').name}_{k}" for k in ("forward", "backward")]
    for n in names:
        assert f"{n}__host_launch" in text


def test_syncthreads_is_refused_not_emulated():
    src = 'extern "C" __global__ void k(float *y) { y[threadIdx.x] = 1.0f; __syncthreads(); }'
    with pytest.raises(RuntimeError, match="compiling CUDA kernels for the host failed"):
        load_host_library([src])


# -- backend='cuda' where it cannot run ----------------------------------------------------------
def _gpu_ready() -> bool:
    from snncompile.runtime import fused_backends

    return fused_backends.unavailable_reason("cuda") is None


no_gpu = pytest.mark.skipif(_gpu_ready(), reason="a CUDA GPU and CuPy are present")


def _small_net():
    from torch import nn

    from snncompile import functional, layer, neuron

    net = nn.Sequential(layer.Linear(8, 16), neuron.LIFNode(tau=2.0), layer.Linear(16, 4))
    functional.set_step_mode(net, "m")
    return net


@no_gpu
def test_cuda_backend_without_a_gpu_fails_at_construction():
    from snncompile import neuron

    with pytest.raises(RuntimeError, match=r"LIFNode: backend='cuda' cannot run here: this "
                       r"machine has no CUDA GPU.*backend='cpu'"):  # fmt: skip
        neuron.LIFNode(tau=2.0, step_mode="m", backend="cuda")
    node = neuron.ParametricLIFNode(step_mode="m", backend="cpu")
    with pytest.raises(RuntimeError, match="ParametricLIFNode: backend='cuda' cannot run here"):
        node.backend = "cuda"
    assert node.backend == "cpu"


@no_gpu
def test_optimize_with_cuda_backend_without_a_gpu_fails_at_compile_time():
    import snncompile

    with pytest.raises(RuntimeError, match="optimize: backend='cuda' cannot run here: this "
                       "machine has no CUDA GPU"):  # fmt: skip
        snncompile.optimize(_small_net(), torch.randn(4, 2, 8), backend="cuda")


def test_cupy_backend_name_suggests_cuda():
    import snncompile
    from snncompile import neuron

    with pytest.raises(ValueError, match=r"unknown backend 'cupy'.*Did you mean backend='cuda'"):
        neuron.LIFNode(backend="cupy")
    with pytest.raises(ValueError, match=r"got 'cupy'\..*Did you mean backend='cuda'"):
        snncompile.optimize(_small_net(), torch.randn(4, 2, 8), backend="cupy")
    with pytest.raises(ValueError, match=r"unknown backend 'triton'; supported backends are "
                       r"\('torch', 'cpu', 'cuda', 'auto'\)\.$"):  # fmt: skip
        neuron.IFNode(backend="triton")


def test_cuda_backend_check_names_what_is_missing(monkeypatch):
    """GPU but no CuPy: the error says CuPy; GPU and CuPy: construction succeeds."""
    from snncompile import neuron
    from snncompile.runtime import fused_backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fused_backends, "_cupy_available", lambda: False)
    with pytest.raises(RuntimeError, match="IFNode: backend='cuda' cannot run here: CuPy is not"):
        neuron.IFNode(step_mode="m", backend="cuda")
    monkeypatch.setattr(fused_backends, "_cupy_available", lambda: True)
    assert neuron.IFNode(step_mode="m", backend="cuda").backend == "cuda"
