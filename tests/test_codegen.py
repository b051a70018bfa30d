"""Code generation: renderer tables, CUDA sources (nvcc -ptx), the C builder and its cache."""

from __future__ import annotations

import itertools
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from snncompile.codegen import build
from snncompile.codegen.cpu import CpuKernel, prebuild
from snncompile.codegen.cuda import nvcc_command
from snncompile.codegen.kernels import generate
from snncompile.codegen.render import C_OPS, CUDA_OPS, f32_literal
from snncompile.codegen.torch_backend import torch_multi_step
from snncompile.dynamics import (
    Op,
    SurrogateExpr,
    if_dynamics,
    lif_dynamics,
    plif_dynamics,
)
from snncompile.runtime import fused

SURROGATES = [
    "Sigmoid",
    "ATan",
    "PiecewiseQuadratic",
    "PiecewiseExp",
    "SoftSign",
    "SuperSpike",
    "Erf",
]
FULL = os.environ.get("SNNCOMPILE_FULL_GRID") == "1"


def _grid(full: bool):
    base = [
        (kind, di, vr, dr)
        for kind, di, vr, dr in itertools.product(
            ["if", "lif", "plif"], [True, False], [0.0, None, -0.3], [False, True]
        )
        if not (kind == "if" and not di)
    ]
    combos = (
        [(*b, sg) for b in base for sg in SURROGATES]
        if full
        else [(*b, SURROGATES[i % 7]) for i, b in enumerate(base)]
    )
    out = []
    for kind, di, vr, dr, sg in combos:
        s = SurrogateExpr(sg, (2.0,))
        if kind == "if":
            out.append(if_dynamics(v_reset=vr, detach_reset=dr, surrogate=s))
        elif kind == "lif":
            out.append(lif_dynamics(2.0, di, v_reset=vr, detach_reset=dr, surrogate=s))
        else:
            out.append(plif_dynamics(di, v_reset=vr, detach_reset=dr, surrogate=s))
    return out


def test_every_op_has_c_and_cuda_rendering():
    leaves = {Op.VAR, Op.PARAM, Op.CONST}
    for op in Op:
        if op not in leaves:
            assert op in C_OPS and op in CUDA_OPS, op


@pytest.mark.parametrize("value", [0.1, -0.3, 2.0, 1e-8, 3.4e38, 1.0 / 3.0, 0.0])
def test_float_literal_round_trips_float32(value):
    lit = f32_literal(value)
    assert lit.endswith("f")
    expect = struct.unpack("f", struct.pack("f", value))[0]
    assert struct.unpack("f", struct.pack("f", float(lit[:-1])))[0] == expect


def test_cuda_bodies_are_the_c_bodies_for_the_full_grid():
    """The per-neuron step bodies of every CUDA source are the ones the C kernels run."""
    for d in _grid(full=True):
        c = generate(d, "c")
        cu = generate(d, "cuda")
        assert cu.forward_body == c.forward_body
        assert cu.backward_body == c.backward_body
        assert c.forward_body in c.source and cu.forward_body in cu.source
        assert c.backward_body in c.source and cu.backward_body in cu.source
        assert 'extern "C" __global__' in cu.source


def _nvcc_batch(sources: list[str], workdir: Path, tag: str) -> subprocess.Popen:
    src = workdir / f"batch_{tag}.cu"
    src.write_text("\n".join(sources))
    cmd = nvcc_command(str(src), str(workdir / f"batch_{tag}.ptx"))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cuda_sources_compile_with_nvcc(tmp_path):
    """nvcc -ptx over every generated CUDA source (covering subset by default, the full grid of
    210 sources with SNNCOMPILE_FULL_GRID=1; ~35 s of nvcc time, split over two processes)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found on PATH: CUDA sources are not compiled in this environment")
    # Plus a quadratic integrate-and-fire neuron: its gradient needs v (recomputed from h).
    custom = [fused_neuron_qif()]
    sources = [generate(d, "cuda").source for d in _grid(FULL) + custom]
    n_batches = 2 if len(sources) > 40 else 1
    size = (len(sources) + n_batches - 1) // n_batches
    procs = [
        _nvcc_batch(sources[i * size : (i + 1) * size], tmp_path, str(i)) for i in range(n_batches)
    ]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    for i in range(n_batches):
        ptx = (tmp_path / f"batch_{i}.ptx").read_text()
        assert ".entry" in ptx


def fused_neuron_qif():
    from snncompile.dynamics import NeuronDynamics, var

    v, x = var("v"), var("x")
    return NeuronDynamics(
        "qif", v + (x + 0.5 * (v - 0.0) * (v - 0.8)) / 2.0, 1.0, 0.0, SurrogateExpr("ATan", (2.0,))
    )


# -- the C builder ------------------------------------------------------------------------------
@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SNNCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    build.forget_loaded()
    yield tmp_path / "cache"
    build.forget_loaded()


needs_cc = pytest.mark.skipif(build.find_compiler() is None, reason="no C compiler installed")


@needs_cc
def test_flags_never_use_fast_math_and_forbid_contraction():
    assert not any("fast-math" in f for f in build.CFLAGS)
    assert "-ffp-contract=off" in build.CFLAGS
    k = prebuild([lif_dynamics()])[0]
    k.forward(torch.randn(2, 8), torch.zeros(8), torch.zeros(0), False, False)
    # Flush-to-zero would turn this subnormal product into 0.
    tiny = torch.tensor([1e-39], dtype=torch.float32) * torch.tensor([1.0])
    assert tiny.item() != 0.0


@needs_cc
def test_cache_is_keyed_by_source_and_rebuilds_corrupt_entries(fresh_cache):
    d = lif_dynamics(tau=3.0, v_reset=None)
    k1 = CpuKernel(d)
    libs = sorted(fresh_cache.glob("snnk_*.so"))
    assert len(libs) == 1
    # Same source -> same entry (a new kernel object reuses it).
    build.forget_loaded()
    CpuKernel(d)
    assert sorted(fresh_cache.glob("snnk_*.so")) == libs
    # A different source -> a new entry.
    CpuKernel(lif_dynamics(tau=4.0, v_reset=None))
    assert len(list(fresh_cache.glob("snnk_*.so"))) == 2
    # A corrupt entry (a foreign writer crashed, a disk error) for a kernel this process has not
    # loaded yet: loading fails, so it is rebuilt and works. (An entry that is already mapped is
    # never rewritten in place: builds go to a temporary name and are moved in with os.replace.)
    d3 = lif_dynamics(tau=6.0, v_reset=None)
    path = build.library_path(generate(d3, "c").source, build.find_compiler())
    path.write_bytes(b"not an ELF file")
    k3 = CpuKernel(d3)
    assert path.read_bytes()[:4] == b"\x7fELF"
    x = torch.randn(4, 10)
    a = k3.forward(x, torch.zeros(10), torch.zeros(0), True, False)
    ref = torch_multi_step(d3, x, torch.zeros(10))
    assert torch.equal(a[0], ref[0]) and torch.equal(a[3], ref[1])
    del k1
    assert not list(fresh_cache.glob("*.tmp"))


@needs_cc
def test_concurrent_processes_build_the_same_kernel_safely(fresh_cache, tmp_path):
    """Three processes build and load the same kernel at once into one cache directory."""
    src = generate(lif_dynamics(tau=5.0, v_reset=-0.1), "c")
    (tmp_path / "kernel.c").write_text(src.source)
    # The child loads build.py alone (stdlib only) so it starts in milliseconds without torch.
    script = textwrap.dedent(
        f"""
        import ctypes, importlib.util, sys
        spec = importlib.util.spec_from_file_location("b", {str(Path(build.__file__))!r})
        b = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(b)
        lib = b.load_library(open({str(tmp_path / "kernel.c")!r}).read())
        fn = getattr(lib, {src.name + "_forward"!r})
        T, N = 3, 5
        F = ctypes.c_float
        x = (F * (T * N))(*([1.0] * (T * N)))
        v0 = (F * N)()
        s = (F * (T * N))()
        v = (F * N)()
        P = ctypes.c_void_p
        fn.argtypes = [P] * 7 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int32]
        fn(x, v0, None, s, None, None, v, T, N, 1)
        print(sum(s))
        """
    )
    env = {**os.environ, "SNNCOMPILE_CACHE_DIR": str(fresh_cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert len({o for o, _ in outs}) == 1
    ref = torch_multi_step(lif_dynamics(tau=5.0, v_reset=-0.1), torch.ones(3, 5), torch.zeros(5))
    assert float(outs[0][0]) == ref[0].sum().item()
    assert len(list(fresh_cache.glob("snnk_*.so"))) == 1
    assert not list(fresh_cache.glob("*.tmp"))


@needs_cc
def test_kernels_share_torchs_openmp_runtime():
    """Our kernels bind to the libgomp torch loaded (one thread pool with torch, no pool fight).

    (Other packages may bring their own OpenMP copies, e.g. scikit-learn's vendored libgomp; the
    point is that ours adds none.)
    """
    import ctypes

    torch_gomp = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if not torch_gomp.exists():
        pytest.skip("this torch build does not ship libgomp")
    k = prebuild([lif_dynamics(tau=2.5)])[0]
    k.forward(torch.randn(2, 1 << 16), torch.zeros(1 << 16), torch.zeros(0), False, False)
    ours = ctypes.cast(k._lib.omp_get_max_threads, ctypes.c_void_p).value
    theirs = ctypes.cast(ctypes.CDLL(str(torch_gomp)).omp_get_max_threads, ctypes.c_void_p).value
    assert ours == theirs


def test_no_compiler_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setenv("SNNCOMPILE_CC", "/nonexistent/cc-for-snncompile-test")
    monkeypatch.setattr(build, "_warned", False)
    assert build.find_compiler() is None
    d = lif_dynamics(tau=2.0, v_reset=0.0)
    x = torch.randn(5, 30)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        s1, v1, _ = fused.fused_multi_step(d, x, 0.0)
        s2, v2, _ = fused.fused_multi_step(d, x, 0.0)
    msgs = [w for w in rec if "no C compiler" in str(w.message)]
    assert len(msgs) == 1
    s_ref, v_ref, _ = torch_multi_step(d, x, torch.zeros(30))
    assert torch.equal(s1, s_ref) and torch.equal(v1, v_ref) and torch.equal(s2, s_ref)
    with pytest.raises(build.CompilerNotFound, match="no C compiler"):
        build.load_library("void f(void) {}")


@needs_cc
def test_compile_errors_are_reported(fresh_cache):
    with pytest.raises(RuntimeError, match="compiling a generated neuron kernel failed"):
        build.load_library("this is not C;")
    assert not list(fresh_cache.glob("*.tmp"))


def test_cuda_backend_without_cupy_or_gpu_raises_clearly():
    from snncompile.codegen import cuda

    try:
        import cupy  # noqa: F401

        has_cupy = True
    except ImportError:
        has_cupy = False
    if has_cupy and torch.cuda.is_available():
        pytest.skip("CuPy and a GPU are present")
    with pytest.raises(RuntimeError, match="backend='cuda' needs"):
        cuda.cuda_kernel(lif_dynamics())


def test_tempdir_builds_leave_nothing_behind(fresh_cache, tmp_path, monkeypatch):
    if build.find_compiler() is None:
        pytest.skip("no C compiler installed")
    # A private temporary root: other processes building kernels at the same time (other test
    # runs on this machine) must not show up as leftovers of this build.
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    CpuKernel(lif_dynamics(tau=7.0))
    assert list(private_tmp.glob("snncompile_build_*")) == []


def test_workspace_pool_reuses_only_unreferenced_storage():
    from snncompile.codegen.cpu import WorkspacePool

    pool = WorkspacePool()
    if not pool.enabled:
        pytest.skip("this torch has no storage use counts")
    shape = (4, 1 << 16)  # 1 MiB
    a = pool.empty(shape)
    a_ptr = a.data_ptr()
    b = pool.empty(shape)
    assert b.data_ptr() != a_ptr  # a is alive: not reused
    view = a[1:]
    del a
    c = pool.empty(shape)
    assert c.data_ptr() != a_ptr  # a view still holds the storage
    del view
    d = pool.empty(shape)
    assert d.data_ptr() == a_ptr and d.shape == shape  # now idle: reused
    small = pool.empty((8,))
    assert small.numel() == 8
    pool.release()
    assert pool.empty(shape).data_ptr() not in (b.data_ptr(), c.data_ptr(), d.data_ptr())


def test_cuda_kernel_signatures_match_the_launcher():
    """The CuPy launcher passes 9 forward / 12 backward arguments (no GPU here to run them)."""
    import re

    src = generate(plif_dynamics(), "cuda").source
    for kind, n_args in (("forward", 9), ("backward", 12)):
        m = re.search(rf"__global__ void \w+_{kind}\((.*?)\)\s*\{{", src, re.S)
        assert m is not None
        params = [p for p in m.group(1).split(",") if p.strip()]
        assert len(params) == n_args, (kind, params)
        assert params[-2].split()[-1] == "T" and params[-1].split()[-1] == "N"
