"""The CUDA kernel of a neuron: the same per-neuron bodies as the C kernel, one thread per neuron,
compiled at run time by CuPy's ``RawModule`` (NVRTC) and launched on PyTorch's current stream.

CuPy is imported lazily; :func:`cuda_kernel` raises a clear error when CuPy or a GPU is missing.
Sources are compiled with ``--fmad=false`` so the device performs the same float32 operations as
PyTorch (no fused multiply-add contraction). :func:`nvcc_command` is the offline ``nvcc -ptx``
command the tests use to check every generated source compiles.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from snncompile.codegen.kernels import KernelSource, generate, saved_shape
from snncompile.dynamics.neuron import NeuronDynamics

NVRTC_OPTIONS: tuple[str, ...] = ("--fmad=false", "--std=c++14")
THREADS_PER_BLOCK = 256
_lock = threading.Lock()
_kernels: dict[NeuronDynamics, CudaKernel] = {}


def nvcc_command(source_file: str, output_file: str) -> list[str]:
    """The ``nvcc`` command line that compiles a generated CUDA source to PTX."""
    return ["nvcc", "-ptx", "--fmad=false", "-o", output_file, source_file]


def _import_cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(
            "snncompile: backend='cuda' needs CuPy (pip install cupy-cuda12x, or the build "
            "matching your CUDA version) and a CUDA GPU; use backend='cpu' or 'torch' instead."
        ) from exc
    if not torch.cuda.is_available():
        raise RuntimeError(
            "snncompile: backend='cuda' needs a CUDA GPU, and torch.cuda.is_available() is "
            "False; use backend='cpu' or 'torch'."
        )
    return cupy


def launch_config(n: int, threads_per_block: int = THREADS_PER_BLOCK) -> tuple[int, int]:
    """``(blocks, threads_per_block)`` of a one-thread-per-neuron launch over ``n`` neurons.

    The last block is partly idle when ``n`` is not a multiple of the block size (the kernels
    return early for ``n >= N``); at least one block is launched.
    """
    return max((n + threads_per_block - 1) // threads_per_block, 1), threads_per_block


def pack_arguments(args: list[Any]) -> tuple[Any, ...]:
    """Kernel arguments as CuPy takes them: tensors (and None) as ``uint64`` device pointers,
    Python ints as ``int64`` (the kernels' ``long long``)."""
    import numpy as np

    return tuple(
        np.uint64(0 if a is None else a.data_ptr())
        if (a is None or isinstance(a, torch.Tensor))
        else np.int64(a)
        for a in args
    )


class CudaKernel:
    """Forward and backward CUDA kernels of one neuron configuration (CuPy ``RawModule``).

    :meth:`forward` / :meth:`backward` allocate the outputs and pass the arguments in the
    kernels' order; :meth:`_load` and :meth:`_launch` are the only CuPy-specific parts (the
    host emulation in :mod:`snncompile.codegen.cuda_host` replaces just those two).
    """

    def __init__(self, dynamics: NeuronDynamics) -> None:
        self.dynamics = dynamics
        self.source: KernelSource = generate(dynamics, "cuda")
        self._fwd, self._bwd = self._load(self.source)

    def _load(self, source: KernelSource) -> tuple[Any, Any]:
        cupy = _import_cupy()
        self._cupy = cupy
        self._module = cupy.RawModule(code=source.source, options=NVRTC_OPTIONS)
        self._per_device: dict[int, tuple[Any, Any]] = {}
        return f"{source.name}_forward", f"{source.name}_backward"

    @property
    def num_uniforms(self) -> int:
        """How many per-call scalars (``u0, u1, ...``) the kernels read."""
        return self.source.num_uniforms

    def _launch(self, fn: Any, n: int, args: list[Any]) -> None:
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        index = device.index if device.index is not None else torch.cuda.current_device()
        cupy = self._cupy
        with cupy.cuda.Device(index):
            # A RawModule is loaded per device: look the function up under the tensors' device.
            funcs = self._per_device.get(index)
            if funcs is None:
                funcs = (
                    self._module.get_function(self._fwd),
                    self._module.get_function(self._bwd),
                )
                self._per_device[index] = funcs
            kernel = funcs[0] if fn == self._fwd else funcs[1]
            blocks, threads = launch_config(n)
            stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
            with stream:
                kernel((blocks,), (threads,), pack_arguments(args))

    def forward(
        self,
        x_seq: torch.Tensor,
        v_init: torch.Tensor,
        uniforms: torch.Tensor,
        need_h: bool,
        store_v_seq: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """Same contract as :meth:`snncompile.codegen.cpu.CpuKernel.forward`, on CUDA tensors."""
        T, N = x_seq.shape
        spikes = torch.empty_like(x_seq)
        h_seq = x_seq.new_empty(saved_shape(self.source, T, N)) if need_h else None
        v_seq = torch.empty_like(x_seq) if store_v_seq else None
        v_last = torch.empty_like(v_init)
        self._launch(self._fwd, N, [x_seq, v_init, uniforms, spikes, h_seq, v_seq, v_last, T, N])
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
        """Same contract as :meth:`snncompile.codegen.cpu.CpuKernel.backward`."""
        T, N = h_seq.shape[-2:]
        grad_x = h_seq.new_empty((T, N))
        grad_v0 = torch.empty_like(v_init)
        grad_u = torch.empty((self.num_uniforms, N), dtype=torch.float32, device=h_seq.device)
        self._launch(
            self._bwd,
            N,
            [
                grad_spike_seq,
                grad_v_seq,
                grad_v_last,
                h_seq,
                x_seq,
                v_init,
                uniforms,
                grad_x,
                grad_v0,
                grad_u if self.num_uniforms else None,
                T,
                N,
            ],
        )
        return grad_x, grad_v0, grad_u


def cuda_kernel(dynamics: NeuronDynamics) -> CudaKernel:
    """The :class:`CudaKernel` of ``dynamics`` (compiled once per process)."""
    with _lock:
        k = _kernels.get(dynamics)
    if k is None:
        k = CudaKernel(dynamics)
        with _lock:
            k = _kernels.setdefault(dynamics, k)
    return k
