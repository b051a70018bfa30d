"""Helpers shared by the chain-kernel tests: a batchnorm with random statistics and the
fused-vs-unfused call of one chain with its input gradients."""

from __future__ import annotations

import copy

import torch
from torch import nn

from snncompile.runtime.fused_chain import FusedChain


def random_bn(C: int) -> nn.BatchNorm2d:
    """A ``BatchNorm2d(C)`` with random affine parameters and running statistics."""
    bn = nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def fused_and_unfused(
    chain: FusedChain, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``chain`` fused and a deep copy of it unfused on ``x``, backpropagate the same random
    output gradient through both; return ``(y, y_unfused, grad_x, grad_x_unfused)``."""
    ref = copy.deepcopy(chain)
    x = x.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = chain(x), ref.unfused(x_ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    return y, y_ref, x.grad, x_ref.grad
