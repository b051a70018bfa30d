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

from snncompile.codegen.build import load_library, march
from snncompile.codegen.kernels import KernelSource, generate, saved_shape
from snncompile.dynamics.neuron import NeuronDynamics

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_I32 = ctypes.c_int32
_lock = threading.Lock()
_kernels: dict[tuple[NeuronDynamics, str], CpuKernel] = {}


# Below this many neuron-steps per thread a parallel region costs more than it saves (waking
# a passive OpenMP pool is tens of microseconds; much more on a loaded machine).
MIN_WORK_PER_THREAD = 1 << 15


def num_threads(work: int) -> int:
    """Threads for a kernel call over ``work`` neuron-steps: torch's setting, fewer when small."""
    return max(1, min(torch.get_num_threads(), work // MIN_WORK_PER_THREAD))


class WorkspacePool:
    """Reuses the storage of large kernel outputs once nothing else references it.

    A fresh multi-megabyte tensor page-faults on first touch (the kernel zero-fills every page),
    which on the issue's shapes cost more than the neuron kernel itself. The pool keeps the
    storages of large outputs it handed out and hands one out again when its use count shows
    that only the pool still holds it (the caller dropped the spikes, autograd freed ``h`` after
    backward, the optimizer cleared ``.grad``). Reused tensors are new tensors over the old
    storage, never aliases of anything alive. :func:`release_workspaces` frees the idle ones.
    """

    MIN_BYTES = 1 << 20  # smaller allocations are cheap: the allocator reuses them anyway
    PER_SIZE = 6  # a training step holds about three outputs of one size (spikes, h, grad_x)

    def __init__(self) -> None:
        self._free: dict[tuple[int, str], list[torch.UntypedStorage]] = {}
        self._lock = threading.Lock()
        self.enabled = hasattr(torch._C, "_storage_Use_Count")

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialized CPU tensor of ``shape`` (from the pool when one is idle)."""
        nbytes = dtype.itemsize
        for n in shape:
            nbytes *= n
        if not self.enabled or nbytes < self.MIN_BYTES:
            return torch.empty(shape, dtype=dtype)
        key = (nbytes, str(dtype))
        with self._lock:
            slots = self._free.setdefault(key, [])
            for st in slots:
                if torch._C._storage_Use_Count(st._cdata) == 1:  # only the pool holds it
                    return torch.empty(0, dtype=dtype).set_(st, 0, shape)
            t = torch.empty(shape, dtype=dtype)
            slots.append(t.untyped_storage())
            if len(slots) > self.PER_SIZE:
                slots.pop(0)  # the pool forgets it; its current user keeps it alive
            return t

    def release(self) -> None:
        """Forget every pooled storage (idle ones are freed now, busy ones when dropped)."""
        with self._lock:
            self._free.clear()


WORKSPACES = WorkspacePool()


def release_workspaces() -> None:
    """Free the idle output buffers the CPU kernels keep for reuse."""
    WORKSPACES.release()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuKernel:
    """Forward and backward C kernels of one neuron configuration."""

    def __init__(self, dynamics: NeuronDynamics, arch: str | None = None) -> None:
        """Build (or load from the cache) the kernels of ``dynamics`` for ``-march=arch``
        (default ``$SNNCOMPILE_MARCH`` or ``native``)."""
        self.dynamics = dynamics
        self.source: KernelSource = generate(dynamics, "c")
        symbols = (f"{self.source.name}_forward", f"{self.source.name}_backward")
        lib = load_library(self.source.source, symbols=symbols, arch=arch)
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
        """Run ``x_seq`` ``[T, N]`` from the states ``v_init`` (``[N]``, or ``[S, N]`` for a
        neuron with extra states; float32 contiguous).

        Returns ``(spike_seq, saved or None, v_seq or None, v_last)``, all float32: ``saved`` is
        ``h`` ``[T, N]`` (``[1 + K, T, N]`` with the saved extra states), ``v_last`` has
        ``v_init``'s shape.
        """
        T, N = x_seq.shape
        spikes = WORKSPACES.empty((T, N))
        h_seq = WORKSPACES.empty(saved_shape(self.source, T, N)) if need_h else None
        v_seq = WORKSPACES.empty((T, N)) if store_v_seq else None
        v_last = WORKSPACES.empty(tuple(v_init.shape))
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
        grad_v_last: torch.Tensor | None,
        h_seq: torch.Tensor,
        x_seq: torch.Tensor | None,
        v_init: torch.Tensor,
        uniforms: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BPTT through the whole sequence (``grad_v_seq``/``grad_v_last`` None mean zero;
        ``grad_v_last`` and ``v_init`` have the states' shape, ``h_seq`` is the saved array).

        Returns ``(grad_x_seq, grad_v_init, grad_uniforms [U, N])``, all float32.
        """
        T, N = h_seq.shape[-2:]
        if "x" in self.source.backward_needs and x_seq is None:
            raise ValueError(
                f"{self.source.name}: this neuron's backward needs x_seq; pass the input."
            )
        grad_x = WORKSPACES.empty((T, N))
        grad_v0 = WORKSPACES.empty(tuple(v_init.shape))
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
    """The :class:`CpuKernel` of ``dynamics`` for the current ``$SNNCOMPILE_MARCH`` (built once
    per process, then from the disk cache)."""
    key = (dynamics, march())
    with _lock:
        k = _kernels.get(key)
    if k is None:
        k = CpuKernel(dynamics, key[1])
        with _lock:
            k = _kernels.setdefault(key, k)
    return k


def prebuild(dynamics: Iterable[NeuronDynamics], workers: int | None = None) -> list[CpuKernel]:
    """Build the CPU kernels of many neurons at once, compiling in parallel (one compiler process
    per core); a model with many neuron layers, or a test grid, pays the build latency once."""
    items = list(dict.fromkeys(dynamics))
    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(cpu_kernel, items))
