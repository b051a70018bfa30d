"""The synapse op table of the ONNX export: IR op -> function emitting its ONNX nodes.

Each entry takes the :class:`~snncompile.export.onnx_emitter.Emitter` and the IR node and
returns the name of the ONNX value it computes (one time step, ``[N, *]``). A new op is
exported by adding an entry to :data:`SYNAPSE_OPS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from snncompile.export.onnx_builder import GraphBuilder, OnnxExportError
from snncompile.export.onnx_emitter import Emitter
from snncompile.export.onnx_functions import function_call
from snncompile.ir.graph import Node
from snncompile.ir.ops import Op


# -- the synapse op table: IR op -> emitter --------------------------------------------------------
def _pair(value: Any, n: int) -> list[int]:
    if isinstance(value, (tuple, list)):
        return [int(v) for v in value]
    return [int(value)] * n


def effective_weight(m: nn.Module) -> torch.Tensor:
    """The weight a conv/linear layer computes with: ``m.weight``, or, for a layer that
    re-parametrises it at run time (SpikingJelly's weight-standardised ``WSConv2d`` and
    ``WSLinear``: ``get_weight()``, ``(W - mean) / sqrt(var * fan_in + eps) * gain``), that
    weight, computed with PyTorch exactly as the layer's forward does."""
    get_weight = getattr(m, "get_weight", None)
    with torch.no_grad():
        return (get_weight() if callable(get_weight) else m.weight).detach()


def conv_node(
    b: GraphBuilder,
    m: nn.Module,
    x: str,
    hint: str,
    fail: Callable[[str], OnnxExportError],
) -> str:
    """One ONNX ``Conv`` computing the ``nn.Conv1d/2d/3d`` module ``m`` on ``x``.

    ``fail(why)`` builds the error for a configuration that is not exported (it names the
    node). ``padding='same'`` puts the extra pixel of an odd total at the end, like PyTorch.
    """
    if m.padding_mode != "zeros":
        raise fail(f"padding_mode={m.padding_mode!r} is not exported; use 'zeros'")
    k = list(m.kernel_size)
    nd = len(k)
    dil = _pair(m.dilation, nd)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            pads = [0] * (2 * nd)
        else:  # 'same': torch puts the extra pixel of an odd total at the end
            total = [d * (kk - 1) for d, kk in zip(dil, k, strict=True)]
            pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    else:
        p = _pair(m.padding, nd)
        pads = p + p
    w = b.inits.add(effective_weight(m).cpu().float().numpy(), f"{hint}.weight")
    ins = [x, w]
    if m.bias is not None:
        ins.append(b.inits.add(m.bias.detach().cpu().float().numpy(), f"{hint}.bias"))
    return b.node(
        "Conv",
        ins,
        hint,
        kernel_shape=k,
        strides=_pair(m.stride, nd),
        pads=pads,
        dilations=dil,
        group=int(m.groups),
    )


def _conv(e: Emitter, node: Node) -> str:
    m = node.module
    if m is None or not isinstance(m, (nn.Conv1d, nn.Conv2d)):
        raise e.fail(node, "functional convolutions have no ONNX rendering; use nn.Conv1d/2d")
    return conv_node(e.b, m, e.data(node), node.name, lambda why: e.fail(node, why))


def gemm_node(b: GraphBuilder, m: nn.Module, x: str, hint: str) -> str:
    """The ``nn.Linear`` ``m`` on ``x: [N, F]`` as one ONNX ``Gemm``, like torch's ``addmm``."""
    ins = [x, b.inits.add(effective_weight(m).cpu().float().numpy(), f"{hint}.weight")]
    if m.bias is not None:
        ins.append(b.inits.add(m.bias.detach().cpu().float().numpy(), f"{hint}.bias"))
    return b.node("Gemm", ins, hint, transB=1)


def _linear(e: Emitter, node: Node) -> str:
    m = node.module
    if m is None or not isinstance(m, nn.Linear):
        raise e.fail(node, "functional linear layers have no ONNX rendering; use nn.Linear")
    x = e.data(node)
    shape = e.in_shape(node)
    wt = effective_weight(m).cpu().float().numpy()
    bias = None if m.bias is None else m.bias.detach().cpu().float().numpy()
    if shape is not None and len(shape) == 1:  # [N, F]: one Gemm, like torch's addmm
        return gemm_node(e.b, m, x, node.name)
    y = e.b.node("MatMul", [x, e.b.inits.add(wt.T.copy(), f"{node.name}.weight_t")], node.name)
    if bias is not None:
        y = e.b.node("Add", [y, e.b.inits.add(bias, f"{node.name}.bias")], node.name)
    return y


def _batchnorm(e: Emitter, node: Node) -> str:
    m = node.module
    if m is None or getattr(m, "running_mean", None) is None:
        raise e.fail(
            node,
            "batchnorm without running statistics normalises with batch statistics even in "
            "eval mode; it cannot be exported for inference (use track_running_stats=True)",
        )
    c = m.num_features
    gamma = m.weight.detach().float() if m.weight is not None else torch.ones(c)
    beta = m.bias.detach().float() if m.bias is not None else torch.zeros(c)
    ins = [e.data(node)]
    for t, suffix in (
        (gamma, "scale"),
        (beta, "bias"),
        (m.running_mean.detach().float(), "mean"),
        (m.running_var.detach().float(), "var"),
    ):
        ins.append(e.b.inits.add(t.cpu().numpy(), f"{node.name}.{suffix}"))
    return e.b.node("BatchNormalization", ins, node.name, epsilon=float(m.eps))


def _pool(e: Emitter, node: Node) -> str:
    m = node.module
    if m is None:
        raise e.fail(node, "functional pooling has no ONNX rendering; use nn.MaxPool/AvgPool")
    shape = e.in_shape(node)
    nd = 2 if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) else 1
    k = _pair(m.kernel_size, nd)
    s = _pair(m.stride if m.stride is not None else m.kernel_size, nd)
    p = _pair(m.padding, nd)
    attrs: dict[str, Any] = dict(kernel_shape=k, strides=s, pads=p + p, ceil_mode=int(m.ceil_mode))
    if shape is not None and len(shape) != nd + 1:
        raise e.fail(node, f"expects a [N, C, ...] input with {nd} spatial dims, got {shape}")
    if node.op is Op.MAXPOOL:
        if getattr(m, "return_indices", False):
            raise e.fail(node, "return_indices=True is not exported")
        attrs["dilations"] = _pair(m.dilation, nd)
        return e.b.node("MaxPool", [e.data(node)], node.name, **attrs)
    if getattr(m, "divisor_override", None) is not None:
        raise e.fail(node, "divisor_override is not exported")
    attrs["count_include_pad"] = int(m.count_include_pad)
    return e.b.node("AveragePool", [e.data(node)], node.name, **attrs)


def _adaptive_avgpool(e: Emitter, node: Node) -> str:
    m = node.module
    shape = e.in_shape(node)
    if m is None or shape is None:
        raise e.fail(node, "needs an nn.AdaptiveAvgPool module and a known input shape")
    spatial = list(shape[1:])
    size = m.output_size
    out = list(size) if isinstance(size, (tuple, list)) else [size] * len(spatial)
    out = [int(sp if o is None else o) for o, sp in zip(out, spatial, strict=True)]
    x = e.data(node)
    if all(o == 1 for o in out):
        return e.b.node("GlobalAveragePool", [x], node.name)
    if any(sp % o for sp, o in zip(spatial, out, strict=True)):
        return _adaptive_avgpool_matmul(e, node, x, spatial, out)
    k = [sp // o for sp, o in zip(spatial, out, strict=True)]
    return e.b.node(
        "AveragePool", [x], node.name, kernel_shape=k, strides=k, pads=[0] * (2 * len(k))
    )


def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``[size_out, size_in]``: row ``i`` averages PyTorch's adaptive window ``i``.

    Window ``i`` is ``[floor(i * in / out), ceil((i + 1) * in / out))``, as in
    ``torch.nn.functional.adaptive_avg_pool*d``; windows may overlap and differ in size.
    """
    a = np.zeros((size_out, size_in), dtype=np.float32)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        a[i, start:end] = np.float32(1.0) / np.float32(end - start)
    return a


def _adaptive_avgpool_matmul(
    e: Emitter, node: Node, x: str, spatial: list[int], out: list[int]
) -> str:
    """Adaptive average pooling with sizes that do not divide, as separable matrix products.

    ``y = A_h x A_w^T`` per channel (2-D; ``x A^T`` in 1-D) with the averaging matrices of
    :func:`adaptive_pool_matrix`. Windows of one element (e.g. 1x1 -> 7x7 upsampling in a VGG
    head) have weight 1 and are exact; larger windows round like a dot product, not like
    PyTorch's window sum (about 1e-7 relative).
    """
    b = e.b
    y = x
    if spatial[-1] != out[-1]:
        aw = adaptive_pool_matrix(spatial[-1], out[-1]).T.copy()
        y = b.node("MatMul", [y, b.inits.add(aw, f"{node.name}_pool_w")], node.name)
    if len(spatial) == 2 and spatial[0] != out[0]:
        ah = adaptive_pool_matrix(spatial[0], out[0])
        y = b.node("MatMul", [b.inits.add(ah, f"{node.name}_pool_h"), y], node.name)
    if len(spatial) > 2:
        raise e.fail(node, "adaptive pooling over more than 2 spatial dims is not exported")
    return y if y != x else b.node("Identity", [x], node.name)


def _voting(e: Emitter, node: Node) -> str:
    """SpikingJelly's ``VotingLayer``: the mean of each group of ``voting_size`` features.

    ``avg_pool1d(x.unsqueeze(1), v, v).squeeze(1)`` on ``[N, F]``: ``Reshape [N, F//v, v]``
    (a remainder of ``F mod v`` features is dropped, like the pooling) then ``ReduceMean``.
    """
    shape = e.in_shape(node)
    v = int(node.module.voting_size)
    if shape is None or len(shape) != 1:
        raise e.fail(node, f"VotingLayer expects [N, F] per step, got features {shape}")
    f = int(shape[0])
    x = e.data(node)
    b = e.b
    if f % v:
        x = b.node(
            "Slice",
            [
                x,
                b.inits.int64([0], "voting_start"),
                b.inits.int64([f - f % v], "voting_end"),
                b.inits.int64([1], "voting_axis"),
            ],
            node.name,
        )
    grouped = b.node("Reshape", [x, b.inits.int64([0, f // v, v], f"{node.name}_groups")])
    if e.opset >= 18:
        axes = b.inits.int64([2], "voting_axes")
        return b.node("ReduceMean", [grouped, axes], node.name, keepdims=0)
    return b.node("ReduceMean", [grouped], node.name, axes=[2], keepdims=0)


def loaded_class(module_path: str, name: str) -> type | None:
    """Class ``name`` of module ``module_path`` if that module is already imported (a model
    holding SpikingJelly layers has imported it), else None; never imports anything."""
    import sys

    mod = sys.modules.get(module_path)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) else None


#: ``(module, class name) -> emitter`` for opaque modules (SpikingJelly layers without a
#: frontend rule) that have a per-step inference form. Layers that mix time steps
#: (``MultiDimensionalAttention``, ...) are in
#: :data:`snncompile.export.onnx_attention.SEQUENCE_MODULES` instead.
OPAQUE_MODULES: dict[tuple[str, str], Callable[[Emitter, Node], str]] = {
    ("spikingjelly.activation_based.layer", "VotingLayer"): _voting,
}


def _opaque_module(e: Emitter, node: Node) -> str:
    """Opaque modules with a known inference form (see :data:`OPAQUE_MODULES`)."""
    m = node.module
    for (module_path, name), emit in OPAQUE_MODULES.items():
        cls = loaded_class(module_path, name)
        if cls is not None and isinstance(m, cls):
            return emit(e, node)
    from snncompile.export.onnx_attention import sequence_module, step_refusal

    entry = sequence_module(node)
    if entry is not None:  # reached only in a step export: the sequence export runs it apart
        raise step_refusal(node, entry)
    raise e.fail(
        node,
        f"opaque module {type(m).__name__} (it runs as written in PyTorch) has no ONNX rendering; "
        "replace it by supported layers or register a rendering in "
        "snncompile.export.onnx_ops.OPAQUE_MODULES.",
    )


def _reshape(e: Emitter, node: Node) -> str:
    """flatten/view/reshape: the output shape from the IR's shapes, batch copied (Reshape 0)."""
    src = e.graph[node.inputs[0]] if node.inputs else None
    if src is None or node.shape is None or src.shape is None:
        raise e.fail(node, "needs known input and output shapes")
    lead, src_lead = e.lead(node), e.lead(src)
    if (
        node.shape[:lead] != src.shape[:src_lead]
        or lead != src_lead
        or node.meta.get("batch_aligned") is False
    ):
        raise e.fail(
            node,
            f"changes the time/batch dimensions ({list(src.shape)} -> {list(node.shape)}); "
            "only reshapes of the per-sample features can be exported",
        )
    target = e.b.inits.int64([0, *node.shape[lead:]], f"{node.name}_shape")
    return e.b.node("Reshape", [e.data(node), target], node.name)


def _binary_op(op_type: str) -> Callable[[Emitter, Node], str]:
    def emit(e: Emitter, node: Node) -> str:
        a = e.arg(node, 0, "input")
        b = e.arg(node, 1, "other")
        alpha = e.arg(node, 2, "alpha", 1)
        if alpha != 1:
            raise e.fail(node, "alpha != 1 is not exported")
        return e.b.node(op_type, [e.tensor(node, a), e.tensor(node, b)], node.name)

    return emit


def _cat(e: Emitter, node: Node) -> str:
    tensors = e.arg(node, 0, "tensors")
    dim = e.arg(node, 1, "dim", 0)
    names = [e.tensor(node, t) for t in tensors]
    return e.b.node("Concat", names, node.name, axis=e.dim(node, int(dim)))


def _identity(e: Emitter, node: Node) -> str:
    # Dropout is the identity at inference; Identity that survived the passes is too.
    return e.b.node("Identity", [e.data(node)], node.name)


def _clip(e: Emitter, node: Node, x: str, lo: float | None, hi: float | None) -> str:
    ins = [x, e.b.scalar(lo) if lo is not None else "", e.b.scalar(hi) if hi is not None else ""]
    while ins and ins[-1] == "":
        ins.pop()
    return e.b.node("Clip", ins, node.name)


def _gelu(e: Emitter, node: Node, x: str, approximate: str) -> str:
    if approximate != "none":
        raise e.fail(node, f"GELU(approximate={approximate!r}) is not exported")
    b = e.b
    z = b.node("Div", [x, b.scalar(2.0**0.5)], node.name)
    inner = b.node("Add", [b.node("Erf", [z], node.name), b.scalar(1.0)], node.name)
    return b.node("Mul", [b.node("Mul", [x, b.scalar(0.5)], node.name), inner], node.name)


def _elementwise(e: Emitter, node: Node) -> str:
    b = e.b
    m = node.module
    if m is not None:
        x = e.data(node)
        from snncompile.ann2snn.modules import VoltageScale

        if isinstance(m, VoltageScale):
            # x * scale; a per-channel scale [C, 1, ..., 1] broadcasts from the right over the
            # per-step [N, C, *] value exactly as over [T*N, C, *] in PyTorch.
            scale = m.scale.detach().to("cpu", torch.float32).numpy()
            return b.node("Mul", [x, b.inits.add(scale, f"{node.name}_scale")], node.name)
        if isinstance(m, nn.ReLU):
            return b.node("Relu", [x], node.name)
        if isinstance(m, nn.ReLU6):
            return _clip(e, node, x, 0.0, 6.0)
        if isinstance(m, nn.Hardtanh):
            return _clip(e, node, x, float(m.min_val), float(m.max_val))
        if isinstance(m, nn.LeakyReLU):
            return b.node("LeakyRelu", [x], node.name, alpha=float(m.negative_slope))
        if isinstance(m, nn.Sigmoid):
            return b.node("Sigmoid", [x], node.name)
        if isinstance(m, nn.Tanh):
            return b.node("Tanh", [x], node.name)
        if isinstance(m, nn.ELU):
            return b.node("Elu", [x], node.name, alpha=float(m.alpha))
        if isinstance(m, nn.SiLU):
            return b.node("Mul", [x, b.node("Sigmoid", [x], node.name)], node.name)
        if isinstance(m, nn.GELU):
            return _gelu(e, node, x, m.approximate)
        if isinstance(m, nn.Softplus) and float(m.beta) == 1.0:
            return b.node("Softplus", [x], node.name)
        raise e.fail(node, f"elementwise module {type(m).__name__} has no ONNX rendering")
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    name = name.rstrip("_")
    unary = {
        "relu": "Relu",
        "sigmoid": "Sigmoid",
        "tanh": "Tanh",
        "neg": "Neg",
        "abs": "Abs",
        "exp": "Exp",
        "sign": "Sign",
    }
    if name in unary:
        return b.node(unary[name], [e.data(node)], node.name)
    if name in ("sub", "isub", "truediv", "div", "itruediv"):
        if name.endswith("div") and e.arg(node, 2, "rounding_mode", None) is not None:
            raise e.fail(node, "division with a rounding_mode is not exported")
        op_type = "Sub" if "sub" in name else "Div"
        return _binary_op(op_type)(e, node)
    if name == "leaky_relu":
        slope = float(e.arg(node, 1, "negative_slope", 0.01))
        return b.node("LeakyRelu", [e.data(node)], node.name, alpha=slope)
    if name == "silu":
        x = e.data(node)
        return b.node("Mul", [x, b.node("Sigmoid", [x], node.name)], node.name)
    if name == "gelu":
        return _gelu(e, node, e.data(node), e.arg(node, 1, "approximate", "none"))
    if name in ("clamp", "clip"):
        lo, hi = e.arg(node, 1, "min", None), e.arg(node, 2, "max", None)
        if not all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
            raise e.fail(node, "clamp with tensor bounds is not exported")
        return _clip(e, node, e.data(node), lo, hi)
    raise e.fail(node, f"elementwise function {name!r} has no ONNX rendering")


#: ``IR op -> emitter(emitter, node) -> ONNX value name`` for the stateless (synapse) ops.
SYNAPSE_OPS: dict[Op, Callable[[Emitter, Node], str]] = {
    Op.CONV1D: _conv,
    Op.CONV2D: _conv,
    Op.LINEAR: _linear,
    Op.BATCHNORM: _batchnorm,
    Op.MAXPOOL: _pool,
    Op.AVGPOOL: _pool,
    Op.ADAPTIVE_AVGPOOL: _adaptive_avgpool,
    Op.FLATTEN: _reshape,
    Op.RESHAPE: _reshape,
    Op.ADD: _binary_op("Add"),
    Op.MUL: _binary_op("Mul"),
    Op.CAT: _cat,
    Op.DROPOUT: _identity,
    Op.IDENTITY: _identity,
    Op.ELEMENTWISE: _elementwise,
    Op.OPAQUE_MODULE: _opaque_module,
    Op.FUNCTION: function_call,
}
