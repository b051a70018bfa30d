"""ANN-to-SNN conversion: trace a ReLU network with torch.fx and turn it into an IF-neuron SNN.

Steps of :func:`convert`:

1. ``torch.fx.symbolic_trace`` a deep copy of the ANN in eval mode (the user's model is untouched).
2. Drop dropout (identity at inference) and fold every BatchNorm that directly follows a
   Conv/Linear whose only user it is: ``W' = W * g / sqrt(var + eps)`` (per output channel),
   ``b' = (b - mean) * g / sqrt(var + eps) + beta``.
3. Find the activations: ``nn.ReLU`` modules, ``F.relu``/``torch.relu`` calls and ``x.relu()``
   methods. Any other non-linear activation (GELU, sigmoid, tanh, SiLU, softmax...) raises a
   ``ValueError`` naming the fx node: rate coding only represents ReLU.
4. Calibrate: insert an :class:`~snncompile.ann2snn.calibration.ActivationObserver` after each
   ReLU, run the calibration data (with a tqdm progress bar) and compute one scale ``s`` per ReLU
   (or per channel).
5. Rebuild the graph for sequences: the input ``[T, N, *]`` is flattened to ``[T*N, *]`` so every
   stateless op (conv, linear, pooling, flatten, add, ``x.view(x.size(0), -1)``...) runs once for
   all steps, and each ReLU becomes ``VoltageScale(1/s) -> IF neuron -> VoltageScale(s)`` where the
   neuron (soft reset, ``v_threshold=1``, ``step_mode='m'``) sees ``[T, N, *]``. Outputs are
   returned as ``[T, N, *]``; their mean over ``T`` approximates the ANN's output.

MaxPool after a ReLU is kept and applied to the (rescaled) spikes of each step: the pooled output
spikes whenever any input in the window spikes, so its rate is at least the largest input rate
(it over-estimates the ANN's max, most at small ``T`` and with many active inputs per window;
prefer AvgPool, which is linear and therefore exact for rates, when designing a model for
conversion).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from snncompile.ann2snn.calibration import (
    ActivationObserver,
    iter_calibration_batches,
    parse_mode,
)
from snncompile.ann2snn.modules import HalfThresholdIFNode, VoltageScale
from snncompile.neuron import IFNode

__all__ = ["convert", "fold_batchnorm", "find_activations"]

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}

_UNSUPPORTED_MODULES: tuple[type[nn.Module], ...] = (
    nn.GELU, nn.Sigmoid, nn.Tanh, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.PReLU,
    nn.RReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Softmax, nn.LogSoftmax, nn.GLU, nn.Threshold,
    nn.Softmin, nn.Hardshrink, nn.Softshrink,
)
_UNSUPPORTED_FUNCTIONS = {
    F.gelu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.silu, F.leaky_relu, F.elu, F.selu,
    F.celu, F.prelu, F.rrelu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.mish,
    F.softplus, F.softsign, F.logsigmoid, F.softmax, F.log_softmax, torch.softmax,
    torch.log_softmax, F.glu, F.threshold, F.softmin, F.tanhshrink, F.hardshrink, F.softshrink,
    torch.selu, torch.celu, torch.rrelu, torch.prelu,
}
_UNSUPPORTED_METHODS = {
    "sigmoid", "sigmoid_", "tanh", "tanh_", "softmax", "log_softmax", "relu6", "hardtanh",
}
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None)
    if name is None:
        return repr(target)
    if getattr(F, name, None) is target:
        return f"torch.nn.functional.{name}"
    if getattr(torch, name, None) is target:
        return f"torch.{name}"
    return name


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in _RELU_METHODS
    return False


def _check_supported(node: fx.Node, modules: dict[str, nn.Module]) -> None:
    bad = None
    if node.op == "call_module" and isinstance(modules[node.target], _UNSUPPORTED_MODULES):
        bad = type(modules[node.target]).__name__
    elif node.op == "call_function" and node.target in _UNSUPPORTED_FUNCTIONS:
        bad = _target_name(node)
    elif node.op == "call_method" and node.target in _UNSUPPORTED_METHODS:
        bad = f"Tensor.{node.target}"
    if bad is not None:
        raise ValueError(
            f"ann2snn.convert: unsupported activation {bad} at fx node {node.name!r} "
            f"(target {_target_name(node)!r}). Rate-coded IF neurons can only represent ReLU: "
            f"replace it with ReLU and retrain, or remove it (a final softmax does not change "
            f"the argmax)."
        )


def find_activations(gm: fx.GraphModule) -> list[fx.Node]:
    """Return the ReLU nodes of ``gm`` in graph order; raise on unsupported activations."""
    modules = dict(gm.named_modules())
    relus = []
    for node in gm.graph.nodes:
        _check_supported(node, modules)
        if _is_relu(node, modules):
            relus.append(node)
    return relus


def _relu_input(node: fx.Node) -> fx.Node:
    arg = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    if not isinstance(arg, fx.Node):
        raise ValueError(f"ann2snn.convert: ReLU node {node.name!r} has no tensor input.")
    return arg


def _remove_dropout(gm: fx.GraphModule) -> None:
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        is_dropout = (
            node.op == "call_module" and isinstance(modules[node.target], _DROPOUT_MODULES)
        ) or (node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS)
        if is_dropout:
            node.replace_all_uses_with(_relu_input(node))
            gm.graph.erase_node(node)


def _fold_pair(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    factor = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_var)
    shift = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    gain = factor * inv_std
    weight = layer.weight.detach()
    new_weight = weight * gain.reshape(-1, *([1] * (weight.dim() - 1)))
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * gain + shift
    layer.weight = nn.Parameter(new_weight.to(weight.dtype))
    layer.bias = nn.Parameter(new_bias.to(weight.dtype))


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold each BatchNorm that directly follows a Conv/Linear into its weights; return the count.

    ``W' = W * gamma / sqrt(var + eps)`` per output channel and
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``, using the running statistics. Only a BN
    whose input is a ``Conv1d/2d/3d`` or ``Linear`` module used by nothing else is folded; other
    BNs stay (in eval mode they are affine, which rate coding represents exactly). The Conv/Linear
    modules of ``gm`` are edited in place (a traced module shares them with the original model:
    trace a copy).
    """
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _BATCHNORMS):
            continue
        bn = modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            raise ValueError(
                f"ann2snn.convert: BatchNorm at fx node {node.name!r} has no running statistics "
                f"(track_running_stats=False), so it normalises with per-batch statistics that "
                f"an SNN cannot reproduce; train it with running statistics."
            )
        prev = node.args[0]
        if not (
            isinstance(prev, fx.Node)
            and prev.op == "call_module"
            and isinstance(modules[prev.target], _FOLDABLE)
            and len(prev.users) == 1
        ):
            continue
        _fold_pair(modules[prev.target], bn)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


def _prepare(ann: nn.Module) -> fx.GraphModule:
    model = copy.deepcopy(ann).eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; re-raise with the remedy
        raise ValueError(
            f"ann2snn.convert: torch.fx could not trace {type(ann).__name__} ({exc}). Conversion "
            f"needs a traceable forward (no data-dependent Python control flow)."
        ) from exc
    _remove_dropout(gm)
    fold_batchnorm(gm)
    gm.eval()
    return gm


def _calibrate(
    gm: fx.GraphModule,
    relus: list[fx.Node],
    data: Any,
    mode: str | float,
    channel_wise: bool,
    progress: bool,
) -> list[torch.Tensor]:
    from snncompile.progress import progress_bar

    calib = copy.deepcopy(gm)
    nodes = {n.name: n for n in calib.graph.nodes}
    observers = []
    for i, relu in enumerate(relus):
        node = nodes[relu.name]
        obs = ActivationObserver(relu.name, mode, channel_wise)
        name = f"_ann2snn_observer_{i}"
        calib.add_submodule(name, obs)
        with calib.graph.inserting_after(node):
            obs_node = calib.graph.call_module(name, (node,))
        node.replace_all_uses_with(
            obs_node, delete_user_cb=lambda user, keep=obs_node: user is not keep
        )
        observers.append(obs)
    calib.recompile()
    calib.eval()
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    batches = iter_calibration_batches(data)
    total = None
    if hasattr(data, "__len__") and not isinstance(data, torch.Tensor):
        total = len(data)
    with torch.no_grad():
        bar = progress_bar(batches, desc="ann2snn calibration", total=total, unit="batch",
                           progress=progress)
        for batch in bar:
            calib(batch.to(device))
    return [obs.scale() for obs in observers]


def convert(
    ann: nn.Module,
    calibration_data: Any,
    mode: str | float = "max",
    channel_wise: bool = False,
    *,
    half_threshold_init: bool = True,
    progress: bool = True,
    backend: str = "auto",
) -> fx.GraphModule:
    """Convert a ReLU ANN into a multi-step IF-neuron SNN taking ``[T, N, *]`` inputs.

    Args:
        ann: the trained ANN (an ``nn.Module`` traceable by ``torch.fx``); it is not modified.
        calibration_data: a tensor of inputs ``[M, *]``, or an iterable of batches (tensors,
            ``(input, target)`` pairs or dicts), used to measure each ReLU's activation scale.
        mode: ``'max'``, a percentile string such as ``'99.9%'``, or a fraction of the maximum
            in ``(0, 1]``; see :mod:`snncompile.ann2snn.calibration`.
        channel_wise: one scale per channel instead of one per ReLU.
        half_threshold_init: start (and reset) every membrane at ``v_threshold / 2`` (default).
            The spike count after ``T`` steps is then ``round(T * rate)`` instead of
            ``floor(T * rate)``; on our digits CNN this reaches the ANN's accuracy by ``T = 16``,
            while zero initialisation lags far behind.
        progress: show a progress bar during calibration (only when stderr is a terminal;
            ``False`` turns it off).
        backend: the neurons' multi-step backend: ``'auto'`` (default: the fused C kernel when
            the problem is large enough, else the torch loop), ``'cpu'``, ``'cuda'`` or
            ``'torch'``; see :mod:`snncompile.neuron`.

    Returns:
        A ``torch.fx.GraphModule`` in eval mode. Call it on ``[T, N, *]`` (e.g. the image repeated
        ``T`` times, see :class:`~snncompile.ann2snn.encoders.ConstantEncoder`) and average the
        ``[T, N, *]`` output over time; call ``functional.reset_net`` (or
        :func:`snncompile.runtime.chunked.reset_states`) between samples. It contains plain
        ``IFNode`` / :class:`HalfThresholdIFNode` modules in ``step_mode='m'`` and can be passed
        to ``snncompile.optimize`` or run with :func:`snncompile.runtime.chunked.stream`. The
        calibrated scales are in ``gm.activation_scales`` (by ReLU node name).
    """
    parse_mode(mode)  # validate before any work
    if backend not in IFNode.supported_backends:
        raise ValueError(
            f"ann2snn.convert: unknown neuron backend {backend!r}; IFNode supports "
            f"{IFNode.supported_backends}."
        )
    gm = _prepare(ann)
    relus = find_activations(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(
            f"ann2snn.convert: the ANN must take exactly one input tensor, its forward takes "
            f"{len(placeholders)} ({[p.name for p in placeholders]})."
        )
    scales = _calibrate(gm, relus, calibration_data, mode, channel_wise, progress)

    graph = fx.Graph()
    x_seq = graph.placeholder("x_seq")
    steps = graph.call_method("size", (x_seq, 0))
    env: dict[fx.Node, fx.Node] = {placeholders[0]: graph.call_method("flatten", (x_seq, 0, 1))}
    relu_index = {node: i for i, node in enumerate(relus)}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            def unflatten(n: fx.Node) -> fx.Node:
                return graph.call_method("unflatten", (env[n], 0, (steps, -1)))

            graph.output(fx.map_arg(node.args[0], unflatten))
            continue
        if node in relu_index:
            i = relu_index[node]
            scale = scales[i]
            base = node.name
            neuron: nn.Module
            if half_threshold_init:
                neuron = HalfThresholdIFNode(v_threshold=1.0, step_mode="m", backend=backend)
            else:
                neuron = IFNode(v_threshold=1.0, v_reset=None, step_mode="m", backend=backend)
            gm.add_submodule(f"{base}_scale_in", VoltageScale(1.0 / scale))
            gm.add_submodule(f"{base}_if", neuron)
            gm.add_submodule(f"{base}_scale_out", VoltageScale(scale))
            h = graph.call_module(f"{base}_scale_in", (env[_relu_input(node)],))
            h = graph.call_method("unflatten", (h, 0, (steps, -1)))
            s = graph.call_module(f"{base}_if", (h,))
            s = graph.call_method("flatten", (s, 0, 1))
            env[node] = graph.call_module(f"{base}_scale_out", (s,))
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    snn = fx.GraphModule(gm, graph, class_name="ConvertedSNN")
    snn.activation_scales = {relu.name: s for relu, s in zip(relus, scales, strict=True)}
    snn.eval()
    return snn
