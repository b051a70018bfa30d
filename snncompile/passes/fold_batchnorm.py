"""Conv/Linear + BatchNorm folding (inference only).

An eval-mode batchnorm computes ``y = (z - mean) * gamma / sqrt(var + eps) + beta`` per channel
with its running statistics. When ``z = W * x + b`` comes from a convolution or linear layer whose
only reader is that batchnorm, both collapse into one layer with

    ``s = gamma / sqrt(var + eps)``,  ``W' = W * s`` (scaled along the output-channel dim 0),
    ``b' = (b - mean) * s + beta``  (``b = 0`` when the layer has no bias).

``gamma = 1`` and ``beta = 0`` when the batchnorm is not affine. Handled: Conv1d + BatchNorm1d,
Conv2d + BatchNorm2d, Linear + BatchNorm1d on ``[N, F]``. Skipped: training graphs, batchnorms
without running statistics, per-step or sequence-level (``seq``) nodes, and layers read by
anything else. The folded layer is a new module (computed in float64, stored in the layer's
dtype); the user's modules are not modified.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from snncompile.ir.graph import Graph, Node
from snncompile.ir.ops import FOLDABLE_INTO_BN, Layout, Op
from snncompile.passes.base import PassResult
from snncompile.passes.options import options_of

_PAIRS = (
    (nn.Conv1d, nn.BatchNorm1d, 3),
    (nn.Conv2d, nn.BatchNorm2d, 4),
    (nn.Linear, nn.BatchNorm1d, 2),
)


def fold_tensors(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` of the module doc, computed in float64 and returned in ``weight``'s dtype."""
    with torch.no_grad():
        w = weight.detach().double()
        mean = running_mean.detach().double()
        var = running_var.detach().double()
        g = gamma.detach().double() if gamma is not None else torch.ones_like(mean)
        bt = beta.detach().double() if beta is not None else torch.zeros_like(mean)
        b = bias.detach().double() if bias is not None else torch.zeros_like(mean)
        s = g / torch.sqrt(var + eps)
        w2 = w * s.reshape(-1, *([1] * (w.dim() - 1)))
        b2 = (b - mean) * s + bt
    return w2.to(weight.dtype), b2.to(weight.dtype)


def fold_conv_bn(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """Return a new layer equal to ``bn(layer(x))`` for an eval-mode ``bn`` (see module doc)."""
    folded = copy.deepcopy(layer)
    w2, b2 = fold_tensors(
        layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
    )
    folded.weight = nn.Parameter(w2, requires_grad=False)
    folded.bias = nn.Parameter(b2, requires_grad=False)
    return folded


def _foldable(layer_node: Node, bn_node: Node) -> bool:
    layer, bn = layer_node.module, bn_node.module
    if layer is None or bn is None or bn.training or bn.running_mean is None:
        return False
    if callable(getattr(layer, "get_weight", None)):
        return False  # WSConv2d standardises its weight at run time: a folded .weight is undone
    if layer_node.layout is not bn_node.layout or bn_node.layout not in (Layout.STEP, Layout.FLAT):
        return False
    if layer_node.attrs.get("per_step") or bn_node.attrs.get("per_step"):
        return False
    if len(layer_node.inputs) != 1 or len(bn_node.inputs) != 1:
        return False
    for layer_type, bn_type, rank in _PAIRS:
        if isinstance(layer, layer_type) and isinstance(bn, bn_type):
            if layer_node.shape is not None and len(layer_node.shape) != rank:
                return False
            out = layer.out_channels if hasattr(layer, "out_channels") else layer.out_features
            return out == bn.num_features
    return False


def fold_batchnorm(graph: Graph) -> PassResult:
    """Fold eval-mode batchnorms into the conv/linear layer before them; see the module doc."""
    if options_of(graph).mode != "inference":
        return PassResult(graph, False)
    notes: list[str] = []
    users = graph.users_map()
    for bn_node in graph:
        if bn_node.op is not Op.BATCHNORM or not bn_node.inputs:
            continue
        layer_node = graph[bn_node.inputs[0]]
        if layer_node.op not in FOLDABLE_INTO_BN or users[layer_node.name] != [bn_node]:
            continue
        if not _foldable(layer_node, bn_node):
            continue
        layer_node.module = fold_conv_bn(layer_node.module, bn_node.module)
        layer_node.attrs["bias"] = True
        layer_node.attrs["folded_bn"] = bn_node.attrs.get("path", bn_node.name)
        graph.replace_all_uses(bn_node.name, layer_node.name)
        graph.remove(bn_node.name)
        users = graph.users_map()
        notes.append(f"folded %{bn_node.name} into %{layer_node.name}")
    return PassResult(graph, bool(notes), notes)
