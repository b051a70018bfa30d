"""Layers that save their binary-spike input for backward packed 1 bit per spike.

A conv/linear layer's weight gradient needs its input (``dW = g^T x`` for linear, the
correlation of ``g`` with ``x`` for conv), and max pooling needs its input (or int64 indices) to
route the gradient, so autograd keeps the input alive until backward: 4 bytes per element for
float32 (plus 8 bytes per output element of int64 indices for max pooling). When the IR knows
the input is a binary spike tensor (values exactly 0 or 1, see
:mod:`snncompile.passes.pack_spikes`), it is saved as bits instead: ``pack_bits`` stores 8
spikes per ``uint8`` byte (``byte = sum_k s_k 2^k``), 32x less than float32, and backward
unpacks them (``s_k = (byte >> k) & 1``) into the very same 0/1 tensor. Max pooling saves no
indices: backward recomputes them from the unpacked input (the argmax of the same values is the
same), so its gradient is the same too.

The backward formulas are the ones autograd uses for these ops (``aten.convolution_backward``,
``aten.max_pool2d_with_indices_backward``, the ``addmm``/``mm`` products of linear), called on
the same values, so gradients are bit-equal to the unpacked layers (``tests/test_pack_spikes.py``
checks it). :func:`packed_call` runs a module with its input treated as binary; the compiled
graph calls it for the nodes that :mod:`snncompile.passes.pack_spikes` marked.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PackedBits", "pack_bits", "packable", "packed_call", "unpack_bits"]

_SHIFTS_CACHE: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    s = _SHIFTS_CACHE.get(device)
    if s is None:
        s = _SHIFTS_CACHE[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return s


class PackedBits:
    """A binary tensor stored 8 values per byte, with the shape and dtype to restore."""

    __slots__ = ("bits", "dtype", "shape")

    def __init__(self, bits: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> None:
        self.bits = bits
        self.shape = shape
        self.dtype = dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed form."""
        return self.bits.numel()


def pack_bits(x: torch.Tensor) -> PackedBits:
    """Pack ``x`` (values exactly 0 or 1) into bytes: bit ``k`` of byte ``i`` is ``x[8i + k]``."""
    flat = x.detach().reshape(-1)
    pad = (-flat.numel()) % 8
    b = flat.to(torch.uint8)
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    bits = torch.bitwise_left_shift(b.view(-1, 8), _shifts(b.device)).sum(1, dtype=torch.uint8)
    return PackedBits(bits, x.shape, x.dtype)


def unpack_bits(p: PackedBits) -> torch.Tensor:
    """The tensor :func:`pack_bits` packed, with its shape and dtype."""
    n = 1
    for d in p.shape:
        n *= d
    shifted = torch.bitwise_right_shift(p.bits.unsqueeze(1), _shifts(p.bits.device))
    bits = torch.bitwise_and(shifted, 1)
    return bits.reshape(-1)[:n].to(p.dtype).reshape(p.shape)


def _needs(ctx: Any, i: int) -> bool:
    return bool(ctx.needs_input_grad[i])


class _PackedConv(torch.autograd.Function):
    """``convolution(x, w, b)`` whose binary input ``x`` is saved packed."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        groups: int,
    ) -> torch.Tensor:
        ctx.packed = pack_bits(x)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.save_for_backward(weight)
        return torch.convolution(
            x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups
        )

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (weight,) = ctx.saved_tensors
        x = unpack_bits(ctx.packed)
        stride, padding, dilation, groups = ctx.conf
        mask = [_needs(ctx, 0), _needs(ctx, 1), _needs(ctx, 2) and ctx.bias_sizes is not None]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            ctx.bias_sizes,
            stride,
            padding,
            dilation,
            False,
            [0] * len(stride),
            groups,
            mask,
        )
        return gx, gw, gb, None, None, None, None


class _PackedLinear(torch.autograd.Function):
    """``x @ w.T + b`` on a 2-D binary ``x`` saved packed (the products autograd's addmm uses)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.packed = pack_bits(x)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (weight,) = ctx.saved_tensors
        gx = gw = gb = None
        if _needs(ctx, 0):
            gx = grad.mm(weight)
        if _needs(ctx, 1):
            x = unpack_bits(ctx.packed)
            gw = grad.t().mm(x)
        if ctx.has_bias and _needs(ctx, 2):
            gb = grad.sum(0)
        return gx, gw, gb


class _PackedMaxPool2d(torch.autograd.Function):
    """``max_pool2d`` of a binary ``x`` saved packed; indices are recomputed in backward."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        kernel: list[int],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        ceil_mode: bool,
    ) -> torch.Tensor:
        ctx.packed = pack_bits(x)
        ctx.conf = (kernel, stride, padding, dilation, ceil_mode)
        return F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        kernel, stride, padding, dilation, ceil_mode = ctx.conf
        if kernel == stride and padding == [0, 0] and dilation == [1, 1] and not ceil_mode:
            return _tiled_max_pool_backward(ctx.packed, grad, kernel), None, None, None, None, None
        x = unpack_bits(ctx.packed)
        _, idx = torch.ops.aten.max_pool2d_with_indices(
            x, kernel, stride, padding, dilation, ceil_mode
        )
        gx = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, x, kernel, stride, padding, dilation, ceil_mode, idx
        )
        return gx, None, None, None, None, None


def _tiled_max_pool_backward(
    packed: PackedBits, grad: torch.Tensor, kernel: list[int]
) -> torch.Tensor:
    """Max-pool backward for non-overlapping windows of a binary input, without indices.

    Max pooling routes each window's gradient to the window's first maximum in row-major order
    (the index ``max_pool2d_with_indices`` returns). In a 0/1 window that is the first 1, or the
    first element when the window is all 0. Found with uint8 ops (a running count of ones), so
    backward needs neither float inputs nor int64 indices.
    """
    kh, kw = kernel
    shape = packed.shape
    x = unpack_bits(PackedBits(packed.bits, shape, torch.uint8))
    *lead, h, w = shape
    ho, wo = grad.shape[-2], grad.shape[-1]
    x = x[..., : ho * kh, : wo * kw].reshape(-1, ho, kh, wo, kw).permute(0, 1, 3, 2, 4)
    x = x.reshape(-1, ho, wo, kh * kw)
    count = x.cumsum(-1, dtype=torch.uint8)
    first = (count == 1) & (x == 1)
    first[..., 0] |= count[..., -1] == 0
    del x, count
    g = grad.reshape(-1, ho, wo, 1)
    gx = torch.where(first, g, g.new_zeros(()))
    del first
    gx = gx.reshape(-1, ho, wo, kh, kw).permute(0, 1, 3, 2, 4).reshape(-1, ho * kh, wo * kw)
    if ho * kh != h or wo * kw != w:
        full = grad.new_zeros((gx.shape[0], h, w))
        full[:, : ho * kh, : wo * kw] = gx
        gx = full
    return gx.reshape(*lead, h, w)


def _pair(v: Any, n: int) -> list[int]:
    if isinstance(v, int):
        return [v] * n
    return [int(i) for i in v]


def packable(module: nn.Module | None) -> bool:
    """Whether :func:`packed_call` has a packed form for ``module``."""
    return _base_type(module) is not None


_BASES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.MaxPool2d)


def _step_wrappers() -> dict[type, type]:
    # SpikingJelly's and snncompile's layer.Conv2d / Linear / MaxPool2d subclass the torch layers
    # and add a step mode; in a flat [T*N, ...] graph they run in step mode 's', i.e. as the
    # torch layer.
    from snncompile import layer as sc_layer

    table: dict[type, type] = {
        sc_layer.Conv1d: nn.Conv1d,
        sc_layer.Conv2d: nn.Conv2d,
        sc_layer.Linear: nn.Linear,
        sc_layer.MaxPool2d: nn.MaxPool2d,
    }
    try:
        from spikingjelly.activation_based import layer as sj_layer
    except Exception:  # pragma: no cover - SpikingJelly absent
        return table
    table.update(
        {
            sj_layer.Conv1d: nn.Conv1d,
            sj_layer.Conv2d: nn.Conv2d,
            sj_layer.Linear: nn.Linear,
            sj_layer.MaxPool2d: nn.MaxPool2d,
        }
    )
    return table


def _base_type(module: nn.Module | None) -> type | None:
    """The torch layer ``module`` computes as (exact types only: subclasses may override)."""
    if module is None:
        return None
    kind = type(module)
    if kind in _BASES:
        base: type | None = kind
    else:
        base = _step_wrappers().get(kind)
        if base is None or getattr(module, "step_mode", "s") != "s":
            return None
    if base in (nn.Conv1d, nn.Conv2d) and (
        module.padding_mode != "zeros" or isinstance(module.padding, str)
    ):
        return None
    if base is nn.MaxPool2d and module.return_indices:
        return None
    return base


def packed_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``module`` on the binary tensor ``x``, saving ``x`` packed for backward.

    Without gradients (or when ``x`` has a form the packed layers do not take) this is
    ``module(x)``.
    """
    kind = _base_type(module)
    if not torch.is_grad_enabled() or kind is None:
        return module(x)
    if kind is nn.Linear:
        if x.dim() != 2:
            return module(x)
        return _PackedLinear.apply(x, module.weight, module.bias)
    if kind is nn.MaxPool2d:
        if x.dim() not in (3, 4) or not x.requires_grad:
            return module(x)
        stride = module.stride if module.stride is not None else module.kernel_size
        return _PackedMaxPool2d.apply(
            x,
            _pair(module.kernel_size, 2),
            _pair(stride, 2),
            _pair(module.padding, 2),
            _pair(module.dilation, 2),
            bool(module.ceil_mode),
        )
    n = 1 if kind is nn.Conv1d else 2
    if x.dim() != n + 2:
        return module(x)
    return _PackedConv.apply(
        x,
        module.weight,
        module.bias,
        _pair(module.stride, n),
        _pair(module.padding, n),
        _pair(module.dilation, n),
        int(module.groups),
    )
