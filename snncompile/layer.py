"""Step-mode aware layers with SpikingJelly 2.0.0 semantics.

Every layer here is the matching ``torch.nn`` layer plus a ``step_mode`` (see
:class:`snncompile.base.StepModule`):

- ``step_mode='s'`` (default): the input is one time step ``[N, *]`` and the layer behaves exactly
  like its ``torch.nn`` parent.
- ``step_mode='m'``: the input is a sequence ``[T, N, *]``. Stateless layers fold time into the
  batch, run the parent layer once over ``[T*N, *]`` and unfold the result back to ``[T, N, *]``.
  For :class:`BatchNorm1d` / :class:`BatchNorm2d` this means that training statistics are pooled
  over ``T*N`` samples, as in SpikingJelly.

:class:`Dropout` is stateful: it draws its mask on the first step after :meth:`Dropout.reset` and
keeps it for every following step (and for all ``T`` steps of a multi-step call) until the next
reset, so the same units stay dropped during one simulation.

The containers :class:`SeqToANNContainer`, :class:`MultiStepContainer` and
:class:`StepModeContainer` wrap ordinary single-step modules.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.common_types import _size_1_t, _size_2_t, _size_3_t

from snncompile import functional
from snncompile.base import MemoryModule, StepModule, check_multi_step_input

__all__ = [
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Linear",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "MaxPool1d",
    "MaxPool2d",
    "AvgPool1d",
    "AvgPool2d",
    "AdaptiveAvgPool1d",
    "AdaptiveAvgPool2d",
    "Flatten",
    "Dropout",
    "Dropout2d",
    "SeqToANNContainer",
    "MultiStepContainer",
    "StepModeContainer",
]


class _StatelessStepLayer(StepModule):
    """Mixin for stateless ``torch.nn`` layers: multi-step runs the parent once over ``[T*N, *]``.

    ``_seq_dims`` lists the numbers of dimensions a multi-step input may have (time included);
    ``_seq_layout`` names that layout for error messages. An empty ``_seq_dims`` accepts any input
    with at least a time and a batch dimension.
    """

    _seq_dims: tuple[int, ...] = ()
    _seq_layout: str = "[T, N, *]"

    def _check_seq(self, x_seq: Tensor) -> None:
        owner = type(self).__name__
        min_dim = min(self._seq_dims) if self._seq_dims else 2
        check_multi_step_input(x_seq, owner, min_dim=min_dim)
        if self._seq_dims and x_seq.dim() not in self._seq_dims:
            raise ValueError(
                f"{owner} is in multi-step mode (step_mode='m') and expects input of shape "
                f"{self._seq_layout}, got shape {tuple(x_seq.shape)}."
            )

    def forward(self, x: Tensor) -> Any:  # type: ignore[override]
        parent_forward = super().forward  # type: ignore[misc]
        if self.step_mode == "s":
            return parent_forward(x)
        self._check_seq(x)
        return functional.seq_to_ann_forward(x, parent_forward)

    def extra_repr(self) -> str:
        parent = super().extra_repr()  # type: ignore[misc]
        return f"{parent}, step_mode={self.step_mode}" if parent else f"step_mode={self.step_mode}"


# -- convolutions ---------------------------------------------------------------------------------
class Conv1d(_StatelessStepLayer, nn.Conv1d):
    """:class:`torch.nn.Conv1d` with a ``step_mode``; multi-step input is ``[T, N, C, L]``."""

    _seq_dims = (4,)
    _seq_layout = "[T, N, C, L]"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_1_t,
        stride: _size_1_t = 1,
        padding: str | _size_1_t = 0,
        dilation: _size_1_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        step_mode: str = "s",
    ) -> None:
        """Create the convolution; all arguments but ``step_mode`` are those of torch's."""
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode,
        )
        self.step_mode = step_mode


class Conv2d(_StatelessStepLayer, nn.Conv2d):
    """:class:`torch.nn.Conv2d` with a ``step_mode``; multi-step input is ``[T, N, C, H, W]``."""

    _seq_dims = (5,)
    _seq_layout = "[T, N, C, H, W]"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: str | _size_2_t = 0,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        step_mode: str = "s",
    ) -> None:
        """Create the convolution; all arguments but ``step_mode`` are those of torch's."""
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode,
        )
        self.step_mode = step_mode


class Conv3d(_StatelessStepLayer, nn.Conv3d):
    """:class:`torch.nn.Conv3d` with a ``step_mode``; multi-step input is ``[T, N, C, D, H, W]``."""

    _seq_dims = (6,)
    _seq_layout = "[T, N, C, D, H, W]"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_3_t,
        stride: _size_3_t = 1,
        padding: str | _size_3_t = 0,
        dilation: _size_3_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        step_mode: str = "s",
    ) -> None:
        """Create the convolution; all arguments but ``step_mode`` are those of torch's."""
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode,
        )
        self.step_mode = step_mode


# -- linear / flatten -----------------------------------------------------------------------------
class Linear(_StatelessStepLayer, nn.Linear):
    """:class:`torch.nn.Linear` with a ``step_mode``; multi-step input is ``[T, N, *, in]``."""

    _seq_layout = "[T, N, *, in_features]"

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, step_mode: str = "s"
    ) -> None:
        """Create the layer; all arguments but ``step_mode`` are those of torch's."""
        super().__init__(in_features, out_features, bias)
        self.step_mode = step_mode

    def _check_seq(self, x_seq: Tensor) -> None:
        # [T, N, in_features] is the smallest multi-step input: 2-D lacks a batch or a time dim.
        check_multi_step_input(x_seq, type(self).__name__, min_dim=3)


class Flatten(_StatelessStepLayer, nn.Flatten):
    """:class:`torch.nn.Flatten` with a ``step_mode``.

    In multi-step mode ``start_dim``/``end_dim`` refer to the per-step tensor ``[N, *]`` (time is
    folded into the batch first), so the default ``Flatten()`` maps ``[T, N, C, H, W]`` to
    ``[T, N, C*H*W]``.
    """

    def __init__(self, start_dim: int = 1, end_dim: int = -1, step_mode: str = "s") -> None:
        """Create the layer; all arguments but ``step_mode`` are those of torch's."""
        super().__init__(start_dim, end_dim)
        self.step_mode = step_mode


# -- normalization --------------------------------------------------------------------------------
class BatchNorm1d(_StatelessStepLayer, nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` with a ``step_mode``.

    Multi-step input is ``[T, N, C]`` or ``[T, N, C, L]``; training statistics are pooled over the
    ``T*N`` (times ``L``) samples, so the running statistics move once per call, not once per step.
    """

    _seq_dims = (3, 4)
    _seq_layout = "[T, N, C] or [T, N, C, L]"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        step_mode: str = "s",
    ) -> None:
        """Create the layer; all arguments but ``step_mode`` are those of torch's."""
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.step_mode = step_mode


class BatchNorm2d(_StatelessStepLayer, nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` with a ``step_mode``.

    Multi-step input is ``[T, N, C, H, W]``; training statistics are pooled over ``T*N*H*W``.
    """

    _seq_dims = (5,)
    _seq_layout = "[T, N, C, H, W]"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        step_mode: str = "s",
    ) -> None:
        """Create the layer; all arguments but ``step_mode`` are those of torch's."""
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.step_mode = step_mode


class BatchNorm3d(_StatelessStepLayer, nn.BatchNorm3d):
    """:class:`torch.nn.BatchNorm3d` with a ``step_mode``; multi-step ``[T, N, C, D, H, W]``."""

    _seq_dims = (6,)
    _seq_layout = "[T, N, C, D, H, W]"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        step_mode: str = "s",
    ) -> None:
        """Create the layer; all arguments but ``step_mode`` are those of torch's."""
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.step_mode = step_mode


# -- pooling --------------------------------------------------------------------------------------
class MaxPool1d(_StatelessStepLayer, nn.MaxPool1d):
    """:class:`torch.nn.MaxPool1d` with a ``step_mode``; multi-step input is ``[T, N, C, L]``."""

    _seq_dims = (4,)
    _seq_layout = "[T, N, C, L]"

    def __init__(
        self,
        kernel_size: _size_1_t,
        stride: _size_1_t | None = None,
        padding: _size_1_t = 0,
        dilation: _size_1_t = 1,
        return_indices: bool = False,
        ceil_mode: bool = False,
        step_mode: str = "s",
    ) -> None:
        """Create the layer; all arguments but ``step_mode`` are those of torch's."""
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
        self.step_mode = step_mode


class MaxPool2d(_StatelessStepLayer, nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` with a ``step_mode``; multi-step input is ``[T, N, C, H, W]``.

    With ``return_indices=True`` the multi-step output is a pair ``(values, indices)``, both of
    shape ``[T, N, C, H', W']``.
    """

    _seq_dims = (5,)
    _seq_layout = "[T, N, C, H, W]"

    def __init__(
        self,
        kernel_size: _size_2_t,
        stride: _size_2_t | None = None,
        padding: _size_2_t = 0,
        dilation: _size_2_t = 1,
        return_indices: bool = False,
        ceil_mode: bool = False,
        step_mode: str = "s",
    ) -> None:
        """Create the layer; all arguments but ``step_mode`` are those of torch's."""
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
        self.step_mode = step_mode


class AvgPool1d(_StatelessStepLayer, nn.AvgPool1d):
    """:class:`torch.nn.AvgPool1d` with a ``step_mode``; multi-step input is ``[T, N, C, L]``."""

    _seq_dims = (4,)
    _seq_layout = "[T, N, C, L]"

    def __init__(
        self,
        kernel_size: _size_1_t,
        stride: _size_1_t | None = None,
        padding: _size_1_t = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        step_mode: str = "s",
    ) -> None:
        """Create the layer; all arguments but ``step_mode`` are those of torch's."""
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad)
        self.step_mode = step_mode


class AvgPool2d(_StatelessStepLayer, nn.AvgPool2d):
    """:class:`torch.nn.AvgPool2d` with a ``step_mode``; multi-step input is ``[T, N, C, H, W]``."""

    _seq_dims = (5,)
    _seq_layout = "[T, N, C, H, W]"

    def __init__(
        self,
        kernel_size: _size_2_t,
        stride: _size_2_t | None = None,
        padding: _size_2_t = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
        step_mode: str = "s",
    ) -> None:
        """Create the layer; all arguments but ``step_mode`` are those of torch's."""
        super().__init__(
            kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
        )
        self.step_mode = step_mode


class AdaptiveAvgPool1d(_StatelessStepLayer, nn.AdaptiveAvgPool1d):
    """:class:`torch.nn.AdaptiveAvgPool1d` with a ``step_mode``; multi-step ``[T, N, C, L]``."""

    _seq_dims = (4,)
    _seq_layout = "[T, N, C, L]"

    def __init__(self, output_size: _size_1_t, step_mode: str = "s") -> None:
        """Create the layer; ``output_size`` is torch's."""
        super().__init__(output_size)
        self.step_mode = step_mode


class AdaptiveAvgPool2d(_StatelessStepLayer, nn.AdaptiveAvgPool2d):
    """:class:`torch.nn.AdaptiveAvgPool2d` with a ``step_mode``; multi-step ``[T, N, C, H, W]``."""

    _seq_dims = (5,)
    _seq_layout = "[T, N, C, H, W]"

    def __init__(self, output_size: Any, step_mode: str = "s") -> None:
        """Create the layer; ``output_size`` is torch's (an int, a pair, or ``None`` entries)."""
        super().__init__(output_size)
        self.step_mode = step_mode


# -- dropout --------------------------------------------------------------------------------------
class Dropout(MemoryModule):
    """Dropout whose mask stays fixed for a whole simulation (until :meth:`reset`).

    In training mode the first call after a reset draws a mask of zeros and ``1/(1-p)`` (the same
    scaling as :func:`torch.nn.functional.dropout`) shaped like one time step ``[N, *]``; every
    later step, in single-step mode, and all ``T`` steps of a multi-step call, are multiplied by
    that same mask. Resetting (``functional.reset_net``) forgets the mask. In eval mode the input
    is returned unchanged and no mask is drawn. The mask is the memory ``mask``.
    """

    def __init__(self, p: float = 0.5, step_mode: str = "s") -> None:
        """Create the layer; ``p`` in ``[0, 1)`` is the probability of zeroing an element."""
        super().__init__(step_mode)
        if not 0.0 <= p < 1.0:
            raise ValueError(
                f"{type(self).__name__}: p must be in [0, 1) (the probability of dropping an "
                f"element), got {p!r}."
            )
        self.p = p
        self.register_memory("mask", None)

    def extra_repr(self) -> str:
        return f"p={self.p}, step_mode={self.step_mode}"

    def create_mask(self, x: Tensor) -> Tensor:
        """Return a fresh mask shaped like ``x``: zeros with probability ``p``, else ``1/(1-p)``."""
        return F.dropout(torch.ones_like(x), self.p, training=True)

    def _check_mask(self, step_shape: torch.Size) -> None:
        if self.mask.shape != step_shape:
            raise ValueError(
                f"{type(self).__name__}: the dropout mask of this simulation has shape "
                f"{tuple(self.mask.shape)} but a step of the input has shape {tuple(step_shape)}; "
                "call functional.reset_net(net) between samples (e.g. before a smaller batch)."
            )

    def single_step_forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Apply the simulation's mask (drawing it on the first training step) to ``x``."""
        if not self.training:
            return x
        if self.mask is None:
            self.mask = self.create_mask(x)
        self._check_mask(x.shape)
        return x * self.mask

    def multi_step_forward(self, x_seq: Tensor) -> Tensor:  # type: ignore[override]
        """Apply one mask, shaped like a single step, to all ``T`` steps of ``x_seq``."""
        check_multi_step_input(x_seq, type(self).__name__)
        if not self.training:
            return x_seq
        if self.mask is None:
            self.mask = self.create_mask(x_seq[0])
        self._check_mask(x_seq.shape[1:])
        return x_seq * self.mask


class Dropout2d(Dropout):
    """Channel-wise :class:`Dropout`: whole ``[H, W]`` maps are dropped (default ``p=0.2``)."""

    def __init__(self, p: float = 0.2, step_mode: str = "s") -> None:
        """Create the layer; ``p`` in ``[0, 1)`` is the probability of zeroing a channel."""
        super().__init__(p, step_mode)

    def create_mask(self, x: Tensor) -> Tensor:
        """Return a channel mask shaped like ``x`` (``[N, C, H, W]``), scaled by ``1/(1-p)``."""
        return F.dropout2d(torch.ones_like(x), self.p, training=True)


# -- containers -----------------------------------------------------------------------------------
def _require_single_step_children(container: nn.Sequential) -> None:
    for index, child in enumerate(container):
        mode = getattr(child, "step_mode", "s")
        if mode != "s":
            raise ValueError(
                f"{type(container).__name__}: child {index} ({type(child).__name__}) has "
                f"step_mode={mode!r}; modules inside this container must be single-step ('s') "
                f"because the container itself handles the time dimension."
            )


class SeqToANNContainer(nn.Sequential, StepModule):
    """Run stateless single-step modules once over ``[T*N, *]`` and return ``[T, N, *]``.

    Construct it like :class:`torch.nn.Sequential`. The children must be stateless (the time steps
    are processed as one batch) and single-step. The container is multi-step only.
    """

    def __init__(self, *args: nn.Module) -> None:
        """Wrap ``args`` (single-step modules) as a sequence."""
        super().__init__(*args)
        _require_single_step_children(self)
        self._step_mode = "m"

    @property
    def supported_step_mode(self) -> tuple[str, ...]:
        """Only multi-step (``'m'``)."""
        return ("m",)

    def forward(self, x_seq: Tensor) -> Any:  # type: ignore[override]
        """Apply the children to ``x_seq`` of shape ``[T, N, *]``."""
        check_multi_step_input(x_seq, type(self).__name__)
        return functional.seq_to_ann_forward(x_seq, super().forward)

    def extra_repr(self) -> str:
        return f"step_mode={self.step_mode}"


class MultiStepContainer(nn.Sequential, StepModule):
    """Run single-step modules (stateful ones included) step by step over ``[T, N, *]``.

    Construct it like :class:`torch.nn.Sequential`; the children must be single-step. The
    container is multi-step only.
    """

    def __init__(self, *args: nn.Module) -> None:
        """Wrap ``args`` (single-step modules) as a sequence."""
        super().__init__(*args)
        _require_single_step_children(self)
        self._step_mode = "m"

    @property
    def supported_step_mode(self) -> tuple[str, ...]:
        """Only multi-step (``'m'``)."""
        return ("m",)

    def forward(self, x_seq: Tensor) -> Tensor:  # type: ignore[override]
        """Apply the children to each step of ``x_seq`` (``[T, N, *]``) and stack the results."""
        check_multi_step_input(x_seq, type(self).__name__)
        return functional.multi_step_forward(x_seq, super().forward)

    def extra_repr(self) -> str:
        return f"step_mode={self.step_mode}"


class StepModeContainer(nn.Sequential, StepModule):
    """A sequence of single-step modules that follows its own ``step_mode``.

    In single-step mode the children run on ``[N, *]``. In multi-step mode they run step by step
    over ``[T, N, *]`` when ``stateful`` is true, else once over ``[T*N, *]``. Note SpikingJelly's
    argument order: ``StepModeContainer(stateful, step_mode, *modules)``.
    """

    def __init__(self, stateful: bool, step_mode: str = "s", *args: nn.Module) -> None:
        """Wrap ``args`` (single-step modules); ``stateful`` chooses the multi-step strategy."""
        super().__init__(*args)
        self.stateful = stateful
        _require_single_step_children(self)
        self.step_mode = step_mode

    def forward(self, x: Tensor) -> Any:  # type: ignore[override]
        """Apply the children according to ``step_mode`` and ``stateful``."""
        if self.step_mode == "s":
            return super().forward(x)
        check_multi_step_input(x, type(self).__name__)
        if self.stateful:
            return functional.multi_step_forward(x, super().forward)
        return functional.seq_to_ann_forward(x, super().forward)

    def extra_repr(self) -> str:
        return f"stateful={self.stateful}, step_mode={self.step_mode}"


# Online-learning (OTTT) containers and wrappers, defined in snncompile.online.
from snncompile.online import (  # noqa: E402
    GradwithTrace,
    OTTTSequential,
    ReplaceforGrad,
    SpikeTraceOp,
)

__all__ += ["GradwithTrace", "OTTTSequential", "ReplaceforGrad", "SpikeTraceOp"]
