"""Run the generated CUDA kernels on the CPU: the exact CUDA source, compiled as C++ for the host.

No GPU is needed to execute the CUDA kernels' loop structure (indexing, the ``n >= N`` guard of
the last block, the time loops, the per-neuron parameter-gradient partial sums): a small shim
header (:data:`HOST_SHIM`) gives the CUDA keywords and built-ins a host meaning, and the
unchanged text that :class:`snncompile.codegen.cuda.CudaKernel` hands to CuPy's ``RawModule``
is compiled after it with the host C++ compiler into a shared library:

* ``__global__``, ``__device__``, ``__host__`` are empty; ``__forceinline__`` is ``inline``;
  ``__restrict__`` is a GNU C++ keyword already.
* ``blockIdx``, ``threadIdx``, ``blockDim``, ``gridDim`` are ``thread_local`` ``dim3`` globals.
* The CUDA single-precision math functions the renderer emits (``expf``, ``logf``, ``erff``, ...)
  have the same names in libm; the intrinsics (``__expf``, ``__fdividef``, ``rsqrtf``, ...) are
  mapped to their libm equivalents; ``__ldg`` is a plain load; ``atomicAdd`` is a plain
  read-modify-write (correct because the launcher runs the threads one after another).
  ``__syncthreads`` and ``__shared__`` are deliberately not defined: a kernel that needs them
  cannot be emulated by running threads sequentially, and the build fails instead.
* For every ``extern "C" __global__`` kernel a launcher ``<kernel>__host_launch(grid, block,
  args...)`` is generated: it sets ``gridDim``/``blockDim`` and calls the kernel once per
  ``(blockIdx.x, threadIdx.x)`` of the grid, like the device does.

:class:`HostCudaKernel` is a :class:`~snncompile.codegen.cuda.CudaKernel` whose two device-specific
parts (loading and launching) are replaced by this library; its ``forward``/``backward`` are the
CUDA launcher's own (same output allocation, same argument order, same launch configuration from
:func:`~snncompile.codegen.cuda.launch_config`), on CPU tensors. The tests use it to compare the
CUDA kernels with the C kernels and the torch path. Host floating point is IEEE float32 without
FMA contraction (``-ffp-contract=off``, like ``--fmad=false`` on the device); libm's ``expf`` and
the device's may differ in the last ulp, so gradients involving transcendental surrogates match
to float rounding, not bit for bit, on a real GPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from snncompile.codegen.build import cache_dir
from snncompile.codegen.cuda import THREADS_PER_BLOCK, CudaKernel, launch_config
from snncompile.codegen.kernels import KernelSource, generate
from snncompile.dynamics.neuron import NeuronDynamics

HOST_SHIM = """\
/* snncompile: CUDA keywords and built-ins for running CUDA kernels on the host (C++). */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
struct dim3 {
    unsigned int x, y, z;
};
typedef dim3 uint3;
static thread_local dim3 gridDim = {1, 1, 1};
static thread_local dim3 blockDim = {1, 1, 1};
static thread_local uint3 blockIdx = {0, 0, 0};
static thread_local uint3 threadIdx = {0, 0, 0};
template <class T> static inline T __ldg(const T *p) { return *p; }
/* Threads run one after another on the host, so a plain read-modify-write is atomic. */
static inline float atomicAdd(float *p, float v) { const float old = *p; *p = old + v; return old; }
static inline double atomicAdd(double *p, double v) { const double old = *p; *p = old + v;
                                                      return old; }
/* Bit casts between float and int (the kernels' own exp/log build exponents with them). */
static inline int __float_as_int(float f) { int i; memcpy(&i, &f, sizeof i); return i; }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, sizeof f); return f; }
/* Fast-math intrinsics as macros (glibc already declares some of these names). */
#define __expf(x) expf(x)
#define __logf(x) logf(x)
#define __fdividef(a, b) ((a) / (b))
#define rsqrtf(x) (1.0f / sqrtf(x))
#define __saturatef(x) fminf(fmaxf((x), 0.0f), 1.0f)
/* Run kernel once per (blockIdx.x, threadIdx.x) of a one-dimensional grid. */
template <class... P, class... A>
static inline void snn_host_launch(void (*kernel)(P...), unsigned int grid, unsigned int block,
                                   A... args)
{
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned int b = 0; b < grid; ++b) {
        for (unsigned int t = 0; t < block; ++t) {
            blockIdx = {b, 0, 0};
            threadIdx = {t, 0, 0};
            kernel(args...);
        }
    }
}
"""

CXXFLAGS: tuple[str, ...] = (
    "-O1",
    "-fPIC",
    "-shared",
    "-std=c++14",
    "-ffp-contract=off",  # like --fmad=false on the device: no FMA contraction
    "-fno-fast-math",
)

_KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\((.*?)\)\s*\{', re.S)
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


class HostCompilerNotFound(RuntimeError):
    """Raised when no host C++ compiler exists to emulate the CUDA kernels."""


def find_cxx() -> str | None:
    """The host C++ compiler: ``$SNNCOMPILE_CXX``, ``$CXX``, else ``c++``/``g++``/``clang++``."""
    for candidate in (os.environ.get("SNNCOMPILE_CXX"), os.environ.get("CXX")):
        if candidate:
            return shutil.which(candidate)
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def kernel_signatures(cuda_source: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """Every ``extern "C" __global__`` kernel of ``cuda_source``: ``(name, [(type, param)])``."""
    out = []
    for m in _KERNEL_RE.finditer(cuda_source):
        params = []
        for decl in (p.strip() for p in m.group(2).split(",")):
            if not decl:
                continue
            name = re.findall(r"\w+", decl)[-1]
            params.append((decl[: decl.rindex(name)].strip(), name))
        out.append((m.group(1), params))
    return out


def _ctype(decl_type: str) -> Any:
    if "*" in decl_type:
        return ctypes.c_void_p
    words = decl_type.replace("const", "").split()
    table = {
        ("long", "long"): ctypes.c_longlong,
        ("int",): ctypes.c_int,
        ("unsigned", "int"): ctypes.c_uint,
        ("float",): ctypes.c_float,
        ("double",): ctypes.c_double,
    }
    try:
        return table[tuple(words)]
    except KeyError:
        raise NotImplementedError(
            f"snncompile.codegen.cuda_host: no host argument type for kernel parameter type "
            f"{decl_type!r}."
        ) from None


def host_source(cuda_sources: Iterable[str]) -> str:
    """The C++ translation unit: the shim, each CUDA source unchanged, and the launchers."""
    parts = [HOST_SHIM]
    launchers = []
    for src in cuda_sources:
        parts.append(src)
        for name, params in kernel_signatures(src):
            decls = ", ".join(f"{t} {p}" for t, p in params)
            names = ", ".join(p for _, p in params)
            launchers.append(
                f'extern "C" void {name}__host_launch(unsigned int grid, unsigned int block, '
                f"{decls})\n{{\n    snn_host_launch({name}, grid, block, {names});\n}}\n"
            )
    return "\n".join(parts + launchers)


def _library_path(source: str, cxx: str) -> Path:
    h = hashlib.sha256()
    for part in (source, "\0".join(CXXFLAGS), cxx):
        h.update(part.encode())
        h.update(b"\0\0")
    folder = cache_dir() / "cuda_host"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"snnhost_{h.hexdigest()[:32]}.so"


def load_host_library(cuda_sources: Iterable[str]) -> ctypes.CDLL:
    """Compile ``cuda_sources`` for the host (or reuse the cached build) and load the library."""
    cxx = find_cxx()
    if cxx is None:
        raise HostCompilerNotFound(
            "snncompile.codegen.cuda_host: no C++ compiler found (install g++ or set "
            "SNNCOMPILE_CXX); the CUDA kernels cannot be run on the host."
        )
    source = host_source(cuda_sources)
    path = _library_path(source, cxx)
    key = str(path)
    with _lock:
        lib = _loaded.get(key)
        if lib is None:
            if not path.exists():
                _compile(source, cxx, path)
            lib = ctypes.CDLL(key)
            _loaded[key] = lib
    return lib


def _compile(source: str, cxx: str, target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="snncompile_host_cuda_") as tmp:
        src = Path(tmp) / "kernels.cpp"
        src.write_text(source)
        partial = target.with_name(f"{target.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        cmd = [cxx, *CXXFLAGS, str(src), "-o", str(partial), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(
                "snncompile.codegen.cuda_host: compiling CUDA kernels for the host failed "
                f"({' '.join(cmd)}):\n{proc.stderr[-4000:]}"
            )
        os.replace(partial, target)


class HostCudaKernel(CudaKernel):
    """The CUDA kernels of one neuron configuration, run on the CPU (see the module docstring).

    ``threads_per_block`` is the block size of the emulated launch (the device launcher's by
    default); ``library`` is a host library already holding this configuration's kernels (from
    :func:`host_kernels`), else one is built for it alone.
    """

    def __init__(
        self,
        dynamics: NeuronDynamics,
        threads_per_block: int = THREADS_PER_BLOCK,
        library: ctypes.CDLL | None = None,
    ) -> None:
        self.threads_per_block = threads_per_block
        self._library = library
        super().__init__(dynamics)

    def _load(self, source: KernelSource) -> tuple[Any, Any]:
        lib = self._library if self._library is not None else load_host_library([source.source])
        funcs = []
        for name, params in kernel_signatures(source.source):
            fn = getattr(lib, f"{name}__host_launch")
            fn.argtypes = [ctypes.c_uint, ctypes.c_uint] + [_ctype(t) for t, _ in params]
            fn.restype = None
            funcs.append((name, fn))
        table = dict(funcs)
        return table[f"{source.name}_forward"], table[f"{source.name}_backward"]

    def _launch(self, fn: Any, n: int, args: list[Any]) -> None:
        for a in args:
            if isinstance(a, torch.Tensor) and (a.device.type != "cpu" or a.dtype != torch.float32):
                raise ValueError(
                    "snncompile.codegen.cuda_host: host-emulated CUDA kernels take float32 CPU "
                    f"tensors, got {a.dtype} on {a.device}."
                )
        blocks, threads = launch_config(n, self.threads_per_block)
        fn(blocks, threads, *(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args))


def host_kernels(
    dynamics: Iterable[NeuronDynamics], threads_per_block: int = THREADS_PER_BLOCK
) -> dict[NeuronDynamics, HostCudaKernel]:
    """Host-emulated CUDA kernels of many neuron configurations, compiled as one library."""
    items = list(dict.fromkeys(dynamics))
    lib = load_host_library(generate(d, "cuda").source for d in items)
    return {d: HostCudaKernel(d, threads_per_block, lib) for d in items}
