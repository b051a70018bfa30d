"""One training step of a model, run as is or in chunks of time, for the time-chunk tests."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def buffers_restored(model: nn.Module) -> Iterator[None]:
    """Put ``model``'s buffers (running statistics, batch counters) back as they were on
    entry when the block ends, so that several runs compare from the same start."""
    saved = [b.clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in zip(model.buffers(), saved, strict=True):
                b.copy_(v)


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
    with buffers_restored(model):
        reset()
        for p in model.parameters():
            p.grad = None
        xx = x.clone().requires_grad_(grad_x)
        torch.manual_seed(seed)
        y = run(xx)
        (y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        after = [b.clone() for b in model.buffers()]
    for p in model.parameters():
        p.grad = None
    reset()
    return y.detach(), xx.grad, grads, after
