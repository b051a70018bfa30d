"""Network-wide helpers, forward wrappers, losses and utilities (SpikingJelly 2.0.0 compatible).

The functions follow ``spikingjelly.activation_based.functional``:

- network configuration: :func:`reset_net`, :func:`detach_net`, :func:`set_step_mode`,
  :func:`set_backend`;
- forward wrappers: :func:`multi_step_forward`, :func:`chunk_multi_step_forward`,
  :func:`seq_to_ann_forward`;
- conv-BN fusion: :func:`fused_conv2d_weight_of_convbn2d`, :func:`fused_conv2d_bias_of_convbn2d`,
  :func:`scale_fused_conv2d_weight_of_convbn2d`, :func:`scale_fused_conv2d_bias_of_convbn2d`,
  :func:`fuse_convbn2d`;
- losses: :func:`temporal_efficient_training_cross_entropy`, :func:`spike_similar_loss`,
  :func:`kernel_dot_product`;
- misc: :func:`set_threshold_margin`, :func:`redundant_one_hot`, :func:`first_spike_index`,
  :func:`delay`, :func:`kaiming_normal_conv_linear_weight`.

The online-training loops (FPTT, OTTT) live with the runtime, not here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snncompile.base import StepModule, check_step_mode

__all__ = [
    "reset_net",
    "detach_net",
    "set_step_mode",
    "set_backend",
    "multi_step_forward",
    "chunk_multi_step_forward",
    "seq_to_ann_forward",
    "fused_conv2d_weight_of_convbn2d",
    "fused_conv2d_bias_of_convbn2d",
    "scale_fused_conv2d_weight_of_convbn2d",
    "scale_fused_conv2d_bias_of_convbn2d",
    "fuse_convbn2d",
    "temporal_efficient_training_cross_entropy",
    "spike_similar_loss",
    "kernel_dot_product",
    "set_threshold_margin",
    "redundant_one_hot",
    "first_spike_index",
    "delay",
    "kaiming_normal_conv_linear_weight",
]

ModuleLike = nn.Module | Sequence[Callable[..., Any]] | Callable[..., Any]


# -- network configuration ------------------------------------------------------------------------
def reset_net(net: nn.Module) -> None:
    """Reset the state of every module in ``net`` that has a ``reset()`` method.

    This restores neuron membranes, Dropout masks, monitors' records and so on to their initial
    values; call it between independent input samples (batches).
    """
    for module in net.modules():
        reset = getattr(module, "reset", None)
        if callable(reset):
            reset()


def detach_net(net: nn.Module) -> None:
    """Cut every stateful module of ``net`` from the autograd graph of earlier time steps.

    Every module with a ``detach()`` method is detached (truncated BPTT).
    """
    for module in net.modules():
        detach = getattr(module, "detach", None)
        if callable(detach):
            detach()


def _keeps_own_step_mode(module: nn.Module) -> bool:
    # Containers drive their children themselves; their children stay single-step.
    from snncompile.layer import MultiStepContainer, SeqToANNContainer, StepModeContainer

    return isinstance(module, (MultiStepContainer, SeqToANNContainer, StepModeContainer))


def set_step_mode(net: nn.Module, step_mode: str) -> None:
    """Set ``step_mode`` (``'s'`` or ``'m'``) on every module of ``net`` that has one.

    The walk does not enter :class:`~snncompile.layer.SeqToANNContainer`,
    :class:`~snncompile.layer.MultiStepContainer` or :class:`~snncompile.layer.StepModeContainer`:
    their children must stay single-step. A multi-step-only container raises when asked for
    ``'s'``.
    """
    check_step_mode(step_mode, "functional.set_step_mode")
    stack: list[nn.Module] = [net]
    while stack:
        module = stack.pop()
        if isinstance(module, StepModule) or hasattr(module, "step_mode"):
            module.step_mode = step_mode
        if not _keeps_own_step_mode(module):
            stack.extend(reversed(list(module.children())))


def set_backend(
    net: nn.Module,
    backend: str,
    instance: type | tuple[type, ...] = (nn.Module,),
) -> None:
    """Set ``backend`` on every module of ``net`` that is an ``instance`` and has a ``backend``.

    Modules that list ``supported_backends`` are validated first; if any of them does not support
    ``backend`` a ValueError naming them is raised and nothing is changed. Narrow the modules
    concerned with ``instance`` (a class or tuple of classes), e.g. ``instance=neuron.LIFNode``.
    """
    if not isinstance(backend, str):
        raise TypeError(f"functional.set_backend: backend must be a str, got {type(backend)!r}.")
    targets = [
        (name, m) for name, m in net.named_modules()
        if isinstance(m, instance) and hasattr(m, "backend")
    ]
    bad = []
    for name, module in targets:
        supported = getattr(module, "supported_backends", None)
        if supported is not None and backend not in tuple(supported):
            bad.append(f"{name or '<net>'} ({type(module).__name__}, supports {tuple(supported)})")
    if bad:
        raise ValueError(
            f"functional.set_backend: backend {backend!r} is not supported by: "
            + "; ".join(bad)
            + ". Choose a supported backend or restrict the modules with `instance=`."
        )
    for _, module in targets:
        module.backend = backend


# -- forward wrappers -----------------------------------------------------------------------------
def _apply(x: Any, fn: ModuleLike) -> Any:
    """Call ``fn`` on ``x``; a list/tuple of callables is applied in order."""
    args = x if isinstance(x, tuple) else (x,)
    if isinstance(fn, (list, tuple)):
        for f in fn:
            x = f(*args)
            args = (x,)
        return x
    return fn(*args)


def multi_step_forward(x_seq: Tensor, single_step_module: ModuleLike) -> Tensor:
    """Run a single-step module (or list of modules) over each step of ``x_seq`` ``[T, *]``.

    Returns the outputs stacked along a new leading time dimension, ``[T, *out]``.
    """
    if not isinstance(x_seq, Tensor) or x_seq.dim() < 1:
        raise ValueError(
            "functional.multi_step_forward expects x_seq of shape [T, N, *] with a leading time "
            f"dimension, got {type(x_seq).__name__} {getattr(x_seq, 'shape', '')}."
        )
    # unbind keeps backward linear in T (indexing x_seq[t] would make it quadratic).
    return torch.stack([_apply(x, single_step_module) for x in x_seq.unbind(0)])


def chunk_multi_step_forward(
    split_size: int, x_seq: Tensor, multi_step_module: nn.Module
) -> Tensor:
    """Feed ``x_seq`` ``[T, *]`` to a multi-step module in chunks of ``split_size`` steps.

    The outputs are concatenated back to ``[T, *out]``. Stateful modules keep their state across
    chunks, so the result equals one full call while the peak memory of an inference with a large
    ``T`` is bounded by the chunk size.
    """
    if isinstance(split_size, bool) or not isinstance(split_size, int) or split_size < 1:
        raise ValueError(
            f"functional.chunk_multi_step_forward: split_size must be a positive int, got "
            f"{split_size!r}."
        )
    if not isinstance(x_seq, Tensor) or x_seq.dim() < 1:
        raise ValueError(
            "functional.chunk_multi_step_forward expects x_seq with a leading time dimension."
        )
    return torch.cat([multi_step_module(chunk) for chunk in torch.split(x_seq, split_size)], 0)


def seq_to_ann_forward(
    x_seq: Tensor | tuple[Tensor, ...], stateless_module: ModuleLike
) -> Tensor | tuple[Tensor, ...]:
    """Run stateless module(s) once over ``x_seq`` ``[T, N, *]`` with time folded into the batch.

    The input is reshaped to ``[T*N, *]``, passed through ``stateless_module`` (a module, a
    callable, or a list/tuple of them applied in order) and the output is reshaped back to
    ``[T, N, *out]``. ``x_seq`` may also be a tuple of tensors sharing ``[T, N]``; a tuple output
    is unfolded element-wise.
    """
    items = x_seq if isinstance(x_seq, tuple) else (x_seq,)
    for item in items:
        if not isinstance(item, Tensor) or item.dim() < 2:
            raise ValueError(
                "functional.seq_to_ann_forward expects input of shape [T, N, *], got "
                f"{tuple(getattr(item, 'shape', ()))}. Add the time dimension or use the module "
                "in single-step mode."
            )
    lead = items[0].shape[:2]
    if any(item.shape[:2] != lead for item in items[1:]):
        raise ValueError(
            "functional.seq_to_ann_forward: all inputs must share the leading [T, N] dims, got "
            f"{[tuple(item.shape) for item in items]}."
        )
    flat = tuple(item.flatten(0, 1) for item in items)
    y = _apply(flat if isinstance(x_seq, tuple) else flat[0], stateless_module)
    if isinstance(y, tuple):
        return tuple(item.unflatten(0, lead) for item in y)
    return y.unflatten(0, lead)


# -- conv-BN fusion -------------------------------------------------------------------------------
def _check_convbn(conv2d: nn.Module, bn2d: nn.Module, owner: str) -> None:
    if not isinstance(conv2d, nn.Conv2d):
        raise TypeError(
            f"functional.{owner}: conv2d must be a Conv2d, got {type(conv2d).__name__}."
        )
    if not isinstance(bn2d, nn.BatchNorm2d):
        raise TypeError(
            f"functional.{owner}: bn2d must be a BatchNorm2d, got {type(bn2d).__name__}."
        )
    if bn2d.num_features != conv2d.out_channels:
        raise ValueError(
            f"functional.{owner}: bn2d.num_features ({bn2d.num_features}) must equal "
            f"conv2d.out_channels ({conv2d.out_channels})."
        )
    if bn2d.running_mean is None or bn2d.running_var is None:
        raise ValueError(
            f"functional.{owner}: bn2d has no running statistics (track_running_stats=False); "
            "only a BatchNorm2d with running mean/var can be folded into a convolution."
        )


def _bn_scale(bn2d: nn.BatchNorm2d) -> Tensor:
    """Per-channel factor ``gamma / sqrt(running_var + eps)`` (``gamma = 1`` if not affine)."""
    inv_std = torch.rsqrt(bn2d.running_var + bn2d.eps)
    return inv_std if bn2d.weight is None else bn2d.weight * inv_std


def fused_conv2d_weight_of_convbn2d(conv2d: nn.Conv2d, bn2d: nn.BatchNorm2d) -> Tensor:
    """Return the weight of the single Conv2d equivalent to ``conv2d`` followed by ``bn2d`` (eval).

    ``W' = W * gamma / sqrt(running_var + eps)`` per output channel.
    """
    _check_convbn(conv2d, bn2d, "fused_conv2d_weight_of_convbn2d")
    return conv2d.weight * _bn_scale(bn2d).reshape(-1, 1, 1, 1)


def fused_conv2d_bias_of_convbn2d(conv2d: nn.Conv2d, bn2d: nn.BatchNorm2d) -> Tensor:
    """Return the bias of the single Conv2d equivalent to ``conv2d`` followed by ``bn2d`` (eval).

    ``b' = beta + (b - running_mean) * gamma / sqrt(running_var + eps)``, where ``b`` is the
    convolution's bias. Unlike SpikingJelly (which requires ``conv2d.bias is None``) a biased
    convolution is accepted and folded exactly; ``b = 0`` without a bias, ``beta = 0`` and
    ``gamma = 1`` for a BatchNorm without affine parameters.
    """
    _check_convbn(conv2d, bn2d, "fused_conv2d_bias_of_convbn2d")
    shifted = -bn2d.running_mean if conv2d.bias is None else conv2d.bias - bn2d.running_mean
    fused = shifted * _bn_scale(bn2d)
    return fused if bn2d.bias is None else fused + bn2d.bias


def scale_fused_conv2d_weight_of_convbn2d(
    conv2d: nn.Conv2d,
    bn2d: nn.BatchNorm2d,
    k: float | Tensor | None = None,
    b: float | Tensor | None = None,
) -> Tensor:
    """Apply ``W' <- k * W' + b`` to the *fused* weight of ``conv2d``-``bn2d``, in place.

    The convolution's weight is changed so that :func:`fused_conv2d_weight_of_convbn2d` afterwards
    returns ``k * old + b`` (``k``, ``b`` floats or tensors broadcastable to the weight). Adding
    ``b`` needs every ``gamma`` to be non-zero. Returns the new fused weight. (SpikingJelly applies
    ``b`` to the raw convolution weight, which is only the documented transform when the BN
    factor is one.)
    """
    _check_convbn(conv2d, bn2d, "scale_fused_conv2d_weight_of_convbn2d")
    with torch.no_grad():
        if k is not None:
            conv2d.weight.mul_(k)
        if b is not None:
            scale = _bn_scale(bn2d).reshape(-1, 1, 1, 1)
            if bool((scale == 0).any()):
                raise ValueError(
                    "functional.scale_fused_conv2d_weight_of_convbn2d: cannot add b because "
                    "bn2d.weight (gamma) has zeros, so the fused weight is fixed at 0 there."
                )
            conv2d.weight.add_(torch.as_tensor(b, dtype=scale.dtype, device=scale.device) / scale)
    return fused_conv2d_weight_of_convbn2d(conv2d, bn2d)


def scale_fused_conv2d_bias_of_convbn2d(
    conv2d: nn.Conv2d,
    bn2d: nn.BatchNorm2d,
    k: float | Tensor | None = None,
    b: float | Tensor | None = None,
) -> Tensor:
    """Apply ``b' <- k * b' + b`` to the *fused* bias of ``conv2d``-``bn2d``, in place.

    ``k`` scales ``beta``, ``running_mean`` and the convolution's bias; ``b`` is added to
    ``beta`` (or, for a BatchNorm without affine parameters, folded into ``running_mean``). Returns
    the new fused bias.
    """
    _check_convbn(conv2d, bn2d, "scale_fused_conv2d_bias_of_convbn2d")
    with torch.no_grad():
        if k is not None:
            bn2d.running_mean.mul_(k)
            if bn2d.bias is not None:
                bn2d.bias.mul_(k)
            if conv2d.bias is not None:
                conv2d.bias.mul_(k)
        if b is not None:
            if bn2d.bias is not None:
                bn2d.bias.add_(b)
            else:
                bn2d.running_mean.sub_(
                    torch.as_tensor(b, dtype=bn2d.running_mean.dtype) / _bn_scale(bn2d)
                )
    return fused_conv2d_bias_of_convbn2d(conv2d, bn2d)


def fuse_convbn2d(conv2d: nn.Conv2d, bn2d: nn.BatchNorm2d) -> nn.Conv2d:
    """Return one Conv2d (with bias) computing ``bn2d(conv2d(x))`` with ``bn2d`` in eval mode.

    A convolution that has its own bias is folded correctly (SpikingJelly rejects it). If
    ``conv2d`` is a step-mode aware :class:`snncompile.layer.Conv2d` the result is one too, with the
    same ``step_mode``; otherwise it is a :class:`torch.nn.Conv2d`. Parameters are copies (no
    autograd link to the originals).
    """
    from snncompile import layer

    _check_convbn(conv2d, bn2d, "fuse_convbn2d")
    kwargs: dict[str, Any] = dict(
        in_channels=conv2d.in_channels,
        out_channels=conv2d.out_channels,
        kernel_size=conv2d.kernel_size,
        stride=conv2d.stride,
        padding=conv2d.padding,
        dilation=conv2d.dilation,
        groups=conv2d.groups,
        bias=True,
        padding_mode=conv2d.padding_mode,
    )
    if isinstance(conv2d, StepModule):
        fused: nn.Conv2d = layer.Conv2d(**kwargs, step_mode=conv2d.step_mode)
    else:
        fused = nn.Conv2d(**kwargs)
    fused = fused.to(device=conv2d.weight.device, dtype=conv2d.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(fused_conv2d_weight_of_convbn2d(conv2d, bn2d))
        fused.bias.copy_(fused_conv2d_bias_of_convbn2d(conv2d, bn2d))
    return fused


# -- losses ---------------------------------------------------------------------------------------
def temporal_efficient_training_cross_entropy(x_seq: Tensor, target: Tensor) -> Tensor:
    """TET loss: the mean over time steps of the cross entropy of each step.

    ``x_seq`` has shape ``[T, N, C, *]`` (logits), ``target`` holds class indices of shape
    ``[N, *]``. Equals ``mean_t F.cross_entropy(x_seq[t], target)``.
    """
    if x_seq.dim() < 3:
        raise ValueError(
            "functional.temporal_efficient_training_cross_entropy expects x_seq of shape "
            f"[T, N, C, *], got {tuple(x_seq.shape)}."
        )
    expected = (x_seq.shape[1], *x_seq.shape[3:])
    if tuple(target.shape) != expected or target.is_floating_point():
        raise ValueError(
            "functional.temporal_efficient_training_cross_entropy expects target of class "
            f"indices (integer dtype) with shape {expected} for x_seq {tuple(x_seq.shape)}, got "
            f"{target.dtype} {tuple(target.shape)}."
        )
    steps = x_seq.shape[0]
    # Every step has the same number of targets, so the pooled mean is the mean of step means.
    return F.cross_entropy(x_seq.flatten(0, 1), target.repeat(steps, *([1] * (target.dim() - 1))))


_KERNELS = ("linear", "polynomial", "sigmoid", "gaussian")


def kernel_dot_product(x: Tensor, y: Tensor, kernel: str = "linear", *args: Any) -> Tensor:
    """Return the ``[N, K]`` matrix of kernel inner products of rows of ``x`` ``[N, M]`` and ``y``.

    Kernels: ``'linear'`` ``x_i . y_j``; ``'polynomial'`` ``(x_i . y_j) ** d`` with ``d = args[0]``;
    ``'sigmoid'`` ``sigmoid(alpha * x_i . y_j)`` with ``alpha = args[0]``; ``'gaussian'``
    ``exp(-|x_i - y_j|^2 / (2 sigma^2))`` with ``sigma = args[0] > 0``.
    """
    if kernel not in _KERNELS:
        raise ValueError(
            f"functional.kernel_dot_product: unknown kernel {kernel!r}; use one of {_KERNELS}."
        )
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            "functional.kernel_dot_product expects x [N, M] and y [K, M], got "
            f"{tuple(x.shape)} and {tuple(y.shape)}."
        )
    if kernel != "linear" and len(args) < 1:
        name = {"polynomial": "d", "sigmoid": "alpha", "gaussian": "sigma"}[kernel]
        raise ValueError(
            f"functional.kernel_dot_product: the {kernel!r} kernel needs its parameter {name} "
            f"as the first extra argument, e.g. kernel_dot_product(x, y, {kernel!r}, 1.0)."
        )
    xy = x.mm(y.t())
    if kernel == "linear":
        return xy
    if kernel == "polynomial":
        return xy.pow(args[0])
    if kernel == "sigmoid":
        return torch.sigmoid(args[0] * xy)
    sigma = args[0]
    if sigma <= 0:
        raise ValueError(
            "functional.kernel_dot_product: sigma must be > 0 for the gaussian kernel, "
            f"got {sigma}."
        )
    sq_dist = x.square().sum(1).unsqueeze(1) + y.square().sum(1).unsqueeze(0) - 2 * xy
    return torch.exp(-sq_dist / (2 * sigma * sigma))


_SIM_LOSSES = ("mse", "l1", "bce")


def spike_similar_loss(
    spikes: Tensor,
    labels: Tensor,
    kernel_type: str = "linear",
    loss_type: str = "mse",
    *args: Any,
) -> Tensor:
    """Loss between label similarity and output-spike similarity of a batch.

    ``spikes`` ``[N, M, T]`` (any ``[N, *]``) are flattened per sample; ``sim_p`` is their
    :func:`kernel_dot_product` (the linear kernel is normalized by the product of norms, plus
    ``1e-8``). ``sim[i, j]`` is 1 when ``labels[i]`` and ``labels[j]`` (``[N, C]`` multi-hot)
    share a class, else 0. ``loss_type`` picks MSE, L1 or binary cross entropy between them.

    For ``'bce'`` ``sim_p`` is clamped to ``[0, 1]``: the normalized linear kernel of a spike
    vector with itself rounds to slightly above 1, on which SpikingJelly's BCE raises (in most
    batches); the clamp changes nothing else.
    """
    if loss_type not in _SIM_LOSSES:
        raise ValueError(
            f"functional.spike_similar_loss: unknown loss_type {loss_type!r}; use one of "
            f"{_SIM_LOSSES}."
        )
    if kernel_type not in _KERNELS:
        raise ValueError(
            f"functional.spike_similar_loss: unknown kernel_type {kernel_type!r}; use one of "
            f"{_KERNELS}."
        )
    if spikes.dim() < 2 or labels.dim() != 2 or spikes.shape[0] != labels.shape[0]:
        raise ValueError(
            "functional.spike_similar_loss expects spikes [N, M, T] and labels [N, C] with the "
            f"same N, got {tuple(spikes.shape)} and {tuple(labels.shape)}."
        )
    flat = spikes.flatten(1)
    sim_p = kernel_dot_product(flat, flat, kernel_type, *args)
    if kernel_type == "linear":
        norms = flat.norm(p=2, dim=1, keepdim=True)
        sim_p = sim_p / (norms.mm(norms.t()) + 1e-8)
    labels = labels.float()
    sim = labels.mm(labels.t()).clamp_max(1)
    if loss_type == "mse":
        return F.mse_loss(sim_p, sim)
    if loss_type == "l1":
        return F.l1_loss(sim_p, sim)
    return F.binary_cross_entropy(sim_p.clamp(0.0, 1.0), sim)


# -- misc -----------------------------------------------------------------------------------------
def set_threshold_margin(
    output_layer: nn.Module,
    label_one_hot: Tensor,
    eval_threshold: float = 1.0,
    threshold0: float = 0.9,
    threshold1: float = 1.1,
) -> None:
    """Give the output neurons a per-class threshold margin while training.

    In training mode ``output_layer.v_threshold`` becomes a tensor shaped like ``label_one_hot``
    (``[N, C]``): ``threshold1`` where the label is 1, ``threshold0`` elsewhere. In eval mode it
    is set back to the float ``eval_threshold``.
    """
    if not hasattr(output_layer, "v_threshold"):
        raise TypeError(
            "functional.set_threshold_margin: output_layer must be a spiking neuron with a "
            f"v_threshold attribute, got {type(output_layer).__name__}."
        )
    if output_layer.training:
        threshold = torch.full_like(label_one_hot, threshold0, dtype=torch.get_default_dtype())
        threshold[label_one_hot == 1] = threshold1
        output_layer.v_threshold = threshold
    else:
        output_layer.v_threshold = eval_threshold


def redundant_one_hot(labels: Tensor, num_classes: int, n: int) -> Tensor:
    """Encode each label as ``n`` ones in its class block: ``[batch] -> [batch, num_classes * n]``.

    The result has the default float dtype.
    """
    if n < 1 or num_classes < 1:
        raise ValueError(
            "functional.redundant_one_hot: num_classes and n must be >= 1, got "
            f"num_classes={num_classes}, n={n}."
        )
    return F.one_hot(labels, num_classes).repeat_interleave(n, dim=-1).to(torch.get_default_dtype())


def first_spike_index(spikes: Tensor) -> Tensor:
    """Return a bool tensor, shaped like ``spikes`` ``[*, T]``, true at each neuron's first spike.

    Any non-zero value counts as a spike.
    """
    fired = spikes != 0
    return fired & (fired.cumsum(dim=-1) == 1)


def kaiming_normal_conv_linear_weight(net: nn.Module) -> None:
    """Re-initialize the weights (not biases) of all convolutions and linear layers in ``net``.

    Uses :func:`torch.nn.init.kaiming_normal_` with ``a = sqrt(5)``, in ``net.modules()`` order.
    """
    for module in net.modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, a=math.sqrt(5))


def delay(x_seq: Tensor, delay_steps: int) -> Tensor:
    """Delay ``x_seq`` ``[T, *]`` by ``delay_steps``: ``y[t] = x[t - delay_steps]``, zeros first."""
    if isinstance(delay_steps, bool) or not isinstance(delay_steps, int) or delay_steps < 0:
        raise ValueError(
            f"functional.delay: delay_steps must be a non-negative int, got {delay_steps!r}."
        )
    if x_seq.dim() < 1:
        raise ValueError("functional.delay expects x_seq with a leading time dimension [T, *].")
    if delay_steps == 0:
        return x_seq
    if delay_steps >= x_seq.shape[0]:
        return torch.zeros_like(x_seq)
    return torch.cat((x_seq.new_zeros((delay_steps, *x_seq.shape[1:])), x_seq[:-delay_steps]))


# Online training loops (FPTT, OTTT/SLTT), defined in snncompile.online.
from snncompile.online import (  # noqa: E402
    fptt_online_training,
    fptt_online_training_init_w_ra,
    ottt_online_training,
)

__all__ += ["fptt_online_training", "fptt_online_training_init_w_ra", "ottt_online_training"]
