"""Activation-scale calibration for ANN-to-SNN conversion.

An :class:`ActivationObserver` is inserted after every ReLU of the traced ANN; running calibration
batches through the model records each ReLU's activations, and :meth:`ActivationObserver.scale`
turns them into the scale ``s`` that maps the activation range onto the IF neuron's rate range
``[0, 1]``:

- ``mode='max'``: ``s = max(a)`` over all calibration activations (no clipping, but one outlier
  makes every other activation use only a small part of the rate range, so more steps are needed);
- ``mode='99.9%'`` (any ``'<p>%'``): ``s`` = the ``p``-th percentile of the activations (clips the
  rare outliers, usually the better trade-off at small ``T``);
- ``mode=<float f in (0, 1]>``: ``s = f * max(a)``.

``channel_wise=True`` computes one scale per channel (dimension 1 of the ANN activation).
Percentiles are computed over all calibration activations, kept as an evenly thinned sample when
they exceed ``max_samples`` values per observer (or per channel).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["ActivationObserver", "iter_calibration_batches", "parse_mode"]


def parse_mode(mode: str | float) -> tuple[str, float]:
    """Validate a normalisation mode; return ``('max', 1.0)``, ``('percentile', q)`` or
    ``('fraction', f)`` with ``q`` in ``[0, 1]`` and ``f`` in ``(0, 1]``."""
    if isinstance(mode, str):
        text = mode.strip().lower()
        if text == "max":
            return "max", 1.0
        if text.endswith("%"):
            try:
                q = float(text[:-1]) / 100.0
            except ValueError:
                q = -1.0
            if 0.0 <= q <= 1.0:
                return "percentile", q
    elif isinstance(mode, (int, float)) and not isinstance(mode, bool):
        if 0.0 < float(mode) <= 1.0:
            return "fraction", float(mode)
    raise ValueError(
        f"ann2snn.convert: unknown normalisation mode {mode!r}; use 'max', a percentile string "
        f"such as '99.9%', or a fraction of the maximum in (0, 1] such as 0.9."
    )


def iter_calibration_batches(data: Any, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """Yield input tensors from calibration data.

    ``data`` may be a tensor ``[M, *]`` (split into batches of ``batch_size``), or an iterable
    (e.g. a ``DataLoader``) of tensors, of ``(input, target, ...)`` tuples/lists (the first element
    is used), or of dicts with an ``'input'``/``'image'``/``'x'`` entry.
    """
    if isinstance(data, torch.Tensor):
        yield from data.split(batch_size, 0)
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            f"ann2snn.convert: calibration_data must be a tensor or an iterable of batches, got "
            f"{type(data).__name__}."
        )
    for batch in data:
        if isinstance(batch, (tuple, list)) and batch:
            batch = batch[0]
        elif isinstance(batch, dict):
            key = next((k for k in ("input", "image", "images", "x") if k in batch), None)
            if key is None:
                raise ValueError(
                    f"ann2snn.convert: a calibration batch is a dict without an 'input', 'image' "
                    f"or 'x' key (keys: {sorted(batch)})."
                )
            batch = batch[key]
        if not isinstance(batch, torch.Tensor):
            batch = torch.as_tensor(batch)
        yield batch


class ActivationObserver(nn.Module):
    """Records the activations flowing through it (identity forward) to compute a scale.

    Args:
        name: the fx node this observer watches (used in messages).
        mode: normalisation mode, see :func:`parse_mode`.
        channel_wise: one scale per channel (dimension 1) instead of one per layer.
        max_samples: cap on the number of values kept for percentiles (per channel when
            ``channel_wise``).
        eps: lower bound of the returned scales (a ReLU that never fired gets ``eps``).
    """

    def __init__(
        self,
        name: str,
        mode: str | float = "max",
        channel_wise: bool = False,
        max_samples: int = 4_000_000,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.name = name
        self.kind, self.q = parse_mode(mode)
        self.channel_wise = channel_wise
        self.max_samples = max_samples
        self.eps = eps
        self.batches = 0
        self.ndim: int | None = None
        self._max: torch.Tensor | None = None
        self._samples: list[torch.Tensor] = []
        self._kept = 0

    def _values(self, x: torch.Tensor) -> torch.Tensor:
        # [C, M] per channel, or [M] for a layer-wise scale.
        x = x.detach().float()
        if not self.channel_wise:
            return x.reshape(-1)
        if x.dim() < 2:
            raise ValueError(
                f"ann2snn.convert: channel_wise=True needs activations with a channel dimension "
                f"(dim 1) at node {self.name!r}, got shape {tuple(x.shape)}."
            )
        return x.transpose(0, 1).reshape(x.shape[1], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record ``x`` and return it unchanged."""
        values = self._values(x)
        self.batches += 1
        self.ndim = x.dim()
        batch_max = values.amax(dim=-1)
        self._max = batch_max if self._max is None else torch.maximum(self._max, batch_max)
        if self.kind == "percentile":
            self._samples.append(values)
            self._kept += values.shape[-1]
            if self._kept > 2 * self.max_samples:
                self._thin()
        return x

    def _thin(self) -> None:
        # Keep an evenly strided subsample: deterministic and representative enough for a
        # percentile of a large calibration set.
        values = torch.cat(self._samples, dim=-1)
        stride = max(1, values.shape[-1] // self.max_samples)
        values = values[..., ::stride]
        self._samples = [values]
        self._kept = values.shape[-1]

    def scale(self) -> torch.Tensor:
        """Return the calibrated scale: a 0-d tensor, or ``[C, 1, ..., 1]`` when channel-wise."""
        if self._max is None:
            raise RuntimeError(
                f"ann2snn.convert: the activation at node {self.name!r} was never reached by the "
                f"calibration data; check that the data feeds this branch of the model."
            )
        if self.kind == "percentile":
            if self._kept > self.max_samples:
                self._thin()
            values = torch.cat(self._samples, dim=-1)
            if values.shape[-1] > 16_000_000:  # torch.quantile's input limit
                values = values[..., :: values.shape[-1] // 16_000_000 + 1]
            s = torch.quantile(values, self.q, dim=-1)
        elif self.kind == "fraction":
            s = self._max * self.q
        else:
            s = self._max.clone()
        s = s.clamp_min(self.eps)
        if self.channel_wise:
            assert self.ndim is not None
            s = s.reshape(-1, *([1] * (self.ndim - 2)))
        return s
