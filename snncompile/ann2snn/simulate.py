"""Run a converted SNN on static inputs for ``T`` steps in bounded memory."""

from __future__ import annotations

import torch
from torch import nn

from snncompile.ann2snn.encoders import ConstantEncoder, Encoder
from snncompile.runtime.chunked import stream

__all__ = ["simulate"]


def simulate(
    snn: nn.Module,
    x: torch.Tensor,
    T: int,
    *,
    encoder: Encoder | None = None,
    chunk_size: int = 64,
    reduce: str = "mean",
    progress: bool = True,
) -> torch.Tensor:
    """Reset ``snn``, drive it with ``encoder``'s ``T``-step encoding of ``x`` and reduce over time.

    ``x`` is a static batch ``[N, *]``; the encoding (default :class:`ConstantEncoder`) is generated
    ``chunk_size`` steps at a time and fed through :func:`snncompile.runtime.chunked.stream`, so
    neither the ``[T, N, *]`` input nor the output is ever stored. Returns the time-mean
    (``reduce='mean'``, the rate output that approximates the ANN) or time-sum (``'sum'``) of the
    output, shape ``[N, *]``. A progress bar over the ``T`` steps appears on long runs when
    stderr is a terminal; ``progress=False`` turns it off.
    """
    if T < 1:
        raise ValueError(f"simulate: T must be >= 1, got {T}.")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"simulate: reduce must be 'mean' or 'sum', got {reduce!r}.")
    encoder = encoder if encoder is not None else ConstantEncoder()
    out = stream(
        snn, encoder.chunks(x, T, chunk_size), reduce=reduce, reset=True, progress=progress,
        total_steps=T,
    )
    assert isinstance(out, torch.Tensor)
    return out
