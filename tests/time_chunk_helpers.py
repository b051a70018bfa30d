"""One training step of a model, run as is or in chunks of time, for the time-chunk tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def train_step(
    model: nn.Module,
    reset: Callable[[], None],
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    grad_x: bool = True,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None], list[torch.Tensor]]:
    """``(output, x.grad, parameter grads, buffers after)`` of one step of ``run`` on ``x``
    (loss: the outputs weighted by a ramp over the last axis); ``reset`` clears the neurons'
    states before and after. The model's buffers and gradients are put back afterwards, so
    several steps compare from the same start."""
    saved = [b.clone() for b in model.buffers()]
    reset()
    for p in model.parameters():
        p.grad = None
    xx = x.clone().requires_grad_(grad_x)
    torch.manual_seed(seed)
    y = run(xx)
    (y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    after = [b.clone() for b in model.buffers()]
    with torch.no_grad():
        for b, v in zip(model.buffers(), saved, strict=True):
            b.copy_(v)
    for p in model.parameters():
        p.grad = None
    reset()
    return y.detach(), xx.grad, grads, after
