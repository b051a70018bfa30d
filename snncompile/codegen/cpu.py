"""The CPU kernel of a neuron: generated C, built and loaded by :mod:`snncompile.codegen.build`,
called through ctypes on float32 contiguous ``[T, N]`` tensors.

:func:`cpu_kernel` returns the (cached per process) :class:`CpuKernel` of a
:class:`~snncompile.dynamics.neuron.NeuronDynamics`. Its methods take and return torch tensors and
leave dtype conversion and autograd to :mod:`snncompile.runtime.fused`.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from snncompile.codegen.build import load_library
from snncompile.codegen.kernels import KernelSource, generate
from snncompile.dynamics.neuron import NeuronDynamics

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_I32 = ctypes.c_int32
_lock = threading.Lock()
_kernels: dict[NeuronDynamics, CpuKernel] = {}


# Below this many neuron-steps per thread a parallel region costs more than it saves (waking
# a passive OpenMP pool is tens of microseconds; much more on a loaded machine).
MIN_WORK_PER_THREAD = 1 << 15


def num_threads(work: int) -> int:
    """Threads for a kernel call over ``work`` neuron-steps: torch's setting, fewer when small."""
    return max(1, min(torch.get_num_threads(), work // MIN_WORK_PER_THREAD))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuKernel:
    """Forward and backward C kernels of one neuron configuration."""

    def __init__(self, dynamics: NeuronDynamics) -> None:
        self.dynamics = dynamics
        self.source: KernelSource = generate(dynamics, "c")
        lib = load_library(self.source.source)
        self._lib = lib
        self._fwd = getattr(lib, f"{self.source.name}_forward")
        self._fwd.argtypes = [_P] * 7 + [_I64, _I64, _I32]
        self._fwd.restype = None
        self._bwd = getattr(lib, f"{self.source.name}_backward")
        self._bwd.argtypes = [_P] * 10 + [_I64, _I64, _I32]
        self._bwd.restype = None

    @property
    def num_uniforms(self) -> int:
        """How many per-call scalars (``u0, u1, ...``) the kernels read."""
        return self.source.num_uniforms

    def forward(
        self,
        x_seq: torch.Tensor,
        v_init: torch.Tensor,
        uniforms: torch.Tensor,
        need_h: bool,
        store_v_seq: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """Run ``x_seq`` ``[T, N]`` from ``v_init`` ``[N]`` (both float32 contiguous).

        Returns ``(spike_seq, h_seq or None, v_seq or None, v_last)``, all float32.
        """
        T, N = x_seq.shape
        spikes = torch.empty_like(x_seq)
        h_seq = torch.empty_like(x_seq) if need_h else None
        v_seq = torch.empty_like(x_seq) if store_v_seq else None
        v_last = torch.empty_like(v_init)
        self._fwd(
            _ptr(x_seq),
            _ptr(v_init),
            _ptr(uniforms),
            _ptr(spikes),
            _ptr(h_seq),
            _ptr(v_seq),
            _ptr(v_last),
            T,
            N,
            num_threads(T * N),
        )
        return spikes, h_seq, v_seq, v_last

    def backward(
        self,
        grad_spike_seq: torch.Tensor,
        grad_v_seq: torch.Tensor | None,
        grad_v_last: torch.Tensor,
        h_seq: torch.Tensor,
        x_seq: torch.Tensor | None,
        v_init: torch.Tensor,
        uniforms: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BPTT through the whole sequence. Returns ``(grad_x_seq, grad_v_init,
        grad_uniforms [U, N])``, all float32."""
        T, N = h_seq.shape
        if "x" in self.source.backward_needs and x_seq is None:
            raise ValueError(
                f"{self.source.name}: this neuron's backward needs x_seq; pass the input."
            )
        grad_x = torch.empty_like(h_seq)
        grad_v0 = torch.empty_like(v_init)
        grad_u = torch.empty((self.num_uniforms, N), dtype=torch.float32)
        self._bwd(
            _ptr(grad_spike_seq),
            _ptr(grad_v_seq),
            _ptr(grad_v_last),
            _ptr(h_seq),
            _ptr(x_seq),
            _ptr(v_init),
            _ptr(uniforms),
            _ptr(grad_x),
            _ptr(grad_v0),
            _ptr(grad_u) if self.num_uniforms else None,
            T,
            N,
            num_threads(T * N),
        )
        return grad_x, grad_v0, grad_u


def cpu_kernel(dynamics: NeuronDynamics) -> CpuKernel:
    """The :class:`CpuKernel` of ``dynamics`` (built once per process, then from the disk cache)."""
    with _lock:
        k = _kernels.get(dynamics)
    if k is None:
        k = CpuKernel(dynamics)
        with _lock:
            k = _kernels.setdefault(dynamics, k)
    return k


def prebuild(dynamics: Iterable[NeuronDynamics], workers: int | None = None) -> list[CpuKernel]:
    """Build the CPU kernels of many neurons at once, compiling in parallel (one compiler process
    per core); a model with many neuron layers, or a test grid, pays the build latency once."""
    items = list(dict.fromkeys(dynamics))
    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(cpu_kernel, items))
