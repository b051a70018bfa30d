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
            "snncompile: backend='cuda' needs CuPy (pip install cupy-cuda12x) and a CUDA GPU; "
            "use backend='cpu' or 'torch' instead."
        ) from exc
    if not torch.cuda.is_available():
        raise RuntimeError(
            "snncompile: backend='cuda' needs a CUDA GPU, and torch.cuda.is_available() is "
            "False; use backend='cpu' or 'torch'."
        )
    return cupy


class CudaKernel:
    """Forward and backward CUDA kernels of one neuron configuration (CuPy ``RawModule``)."""

    def __init__(self, dynamics: NeuronDynamics) -> None:
        cupy = _import_cupy()
        self._cupy = cupy
        self.dynamics = dynamics
        self.source: KernelSource = generate(dynamics, "cuda")
        module = cupy.RawModule(code=self.source.source, options=NVRTC_OPTIONS)
        self._fwd = module.get_function(f"{self.source.name}_forward")
        self._bwd = module.get_function(f"{self.source.name}_backward")

    @property
    def num_uniforms(self) -> int:
        """How many per-call scalars (``u0, u1, ...``) the kernels read."""
        return self.source.num_uniforms

    def _launch(self, fn: Any, n: int, args: list[Any]) -> None:
        np = __import__("numpy")
        packed = [
            np.uint64(0 if a is None else a.data_ptr())
            if (a is None or isinstance(a, torch.Tensor))
            else np.int64(a)
            for a in args
        ]
        stream = self._cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        blocks = (n + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
        with stream:
            fn((max(blocks, 1),), (THREADS_PER_BLOCK,), tuple(packed))

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
