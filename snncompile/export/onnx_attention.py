"""ONNX renderings of SpikingJelly's attention layers that mix time steps, on whole sequences.

SpikingJelly 2.0.0's ``MultiDimensionalAttention`` (MASNN, AttMSResNet) and
``TemporalWiseAttention`` (MASNN's fully connected blocks) are stateless multi-step modules whose
output at step ``t`` depends on every step of the sequence ``x: [T, N, *]``:

* ``TemporalWiseAttention``: ``s = sigmoid(MLP(mean_{*} x) + MLP(max_{*} x))`` with the
  pooling over each step's features and the two-layer ``Linear`` MLP over ``T``; the output is
  ``x * s`` (``s: [N, T]`` broadcast over the features).
* ``MultiDimensionalAttention``: on ``u = x.transpose(0, 1)`` (``[N, T, C, H, W]``), in turn
  ``u <- a(u) * u`` for the enabled axes: temporal ``a = sigmoid(MLP(avg_{C,H,W} u) +
  MLP(max_{C,H,W} u))`` with 1x1x1 ``Conv3d`` MLPs over the ``T`` channels; channel, the same
  with ``T`` and ``C`` swapped (pooling over ``T, H, W``); spatial ``a = sigmoid(conv2d([mean_1
  v, max_1 v])).unsqueeze(1)`` with ``v = u.flatten(1, 2)`` (``[N, T*C, H, W]``: mean and max
  over ``T*C``). The output is ``relu(u).transpose(0, 1)``. Every variant pools over ``T``
  (channel attention over ``(T, H, W)``, spatial over ``T*C``), so none is causal.

**Where they run.** In a sequence export these layers run in the main graph on the stacked
``[T, N, *]`` values, between the ``Scan`` time loops of the per-step parts before and after
them (:mod:`snncompile.export.onnx_scan`). A step export refuses them: one step cannot see
the steps after it.

**Why a rendering at export time, not tracing at compile time.** The compiled module keeps
these layers as opaque leaves that run SpikingJelly's own forward, so training and inference
in PyTorch stay exactly SpikingJelly's (no frontend change, the zoo's train/eval equality is
untouched), and their forwards cannot be traced symbolically anyway (``assert x.dim() == 5``,
``view(*scores.shape, *((1,) * (x.ndim - 2)))``). The export is the only place that needs
another form: each rendering below writes the layer's forward as ONNX nodes from its
submodules (weights read from the module at export time), one entry per class in
:data:`SEQUENCE_MODULES`, and the submodules it calls (pools, 1x1 ``Conv3d``/``Conv2d``,
``Linear``, ``ReLU``) come from the small table :data:`LAYERS`. Only the exact classes are
rendered: a subclass may override ``forward`` and is refused rather than exported with its
parent's math.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from torch import nn

from snncompile.export.onnx_builder import GraphBuilder, OnnxExportError
from snncompile.export.onnx_ops import conv_node, gemm_node, loaded_class
from snncompile.ir.graph import Node
from snncompile.ir.ops import Op


@dataclasses.dataclass
class Ctx:
    """What a rendering needs: the graph builder, the opset and a name hint."""

    b: GraphBuilder
    opset: int
    hint: str

    def fail(self, why: str) -> OnnxExportError:
        """An export error naming the layer being rendered."""
        return OnnxExportError(f"export_onnx: IR node %{self.hint}: {why}")

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: bool) -> str:
        """``ReduceMean``/``ReduceMax`` over ``axes`` (axes are an input from opset 18)."""
        if self.opset >= 18:
            ins = [x, self.b.inits.int64(list(axes), f"{self.hint}_axes")]
            return self.b.node(op_type, ins, self.hint, keepdims=int(keepdims))
        return self.b.node(op_type, [x], self.hint, axes=list(axes), keepdims=int(keepdims))

    def transpose(self, x: str, a: int, b: int, rank: int) -> str:
        """``x.transpose(a, b)`` of a rank-``rank`` value."""
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return self.b.node("Transpose", [x], self.hint, perm=perm)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        """``Unsqueeze`` at ``axes`` (an input since opset 13, the export's minimum)."""
        return self.b.node("Unsqueeze", [x, self.b.inits.int64(list(axes), f"{self.hint}_unsq")])


# -- the submodules the attention layers call -----------------------------------------------------
def _conv(c: Ctx, m: nn.Module, x: str) -> str:
    return conv_node(c.b, m, x, c.hint, lambda why: c.fail(f"{type(m).__name__}: {why}"))


def _linear(c: Ctx, m: nn.Module, x: str) -> str:
    """``nn.Linear`` on ``[N, F]``."""
    return gemm_node(c.b, m, x, c.hint)


def _relu(c: Ctx, m: nn.Module, x: str) -> str:
    return c.b.node("Relu", [x], c.hint)


def _sequential(c: Ctx, m: nn.Module, x: str) -> str:
    for child in m:
        x = layer(c, child, x)
    return x


#: ``module class -> rendering(ctx, module, input) -> output`` for the layers inside attention.
LAYERS: dict[type, Callable[[Ctx, nn.Module, str], str]] = {
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.Linear: _linear,
    nn.ReLU: _relu,
    nn.Sequential: _sequential,
}


def layer(c: Ctx, m: nn.Module, x: str) -> str:
    """Render one submodule from :data:`LAYERS` (exact class), or fail naming it."""
    entry = LAYERS.get(type(m))
    if entry is None:
        raise c.fail(f"the attention calls {type(m).__name__}, which has no ONNX rendering here")
    return entry(c, m, x)


def _global_pools(c: Ctx, m: nn.Module, x: str, axes: Sequence[int], keepdims: bool) -> tuple:
    """``m.avg_pool(x)``, ``m.max_pool(x)`` (adaptive pools to size 1: mean/max over ``axes``)."""
    for pool, kinds in (
        (m.avg_pool, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool3d)),
        (m.max_pool, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool3d)),
    ):
        size = pool.output_size if type(pool) in kinds else None
        if size not in (1, (1,), (1, 1, 1)) or getattr(pool, "return_indices", False):
            raise c.fail(f"expected a global adaptive pool (output size 1), got {pool}")
    avg = c.reduce("ReduceMean", x, axes, keepdims)
    return avg, c.reduce("ReduceMax", x, axes, keepdims)


# -- the attention layers (on [T, N, *]) ---------------------------------------------------------
def _temporal_wise(c: Ctx, m: nn.Module, x: str, shape: Sequence[int]) -> str:
    """``TemporalWiseAttention.forward`` on ``x: [T, N, L]`` or ``[T, N, C, H, W]``."""
    rank = len(shape)
    xs = c.transpose(x, 0, 1, rank)  # [N, T, *]
    avg, mx = _global_pools(c, m, xs, range(2, rank), keepdims=False)  # [N, T] (the .view)
    b = c.b
    mlp = m.sharedMLP
    scores = b.node("Sigmoid", [b.node("Add", [layer(c, mlp, avg), layer(c, mlp, mx)])], c.hint)
    scores = c.unsqueeze(scores, range(2, rank))  # [N, T, 1, ...]
    return c.transpose(b.node("Mul", [xs, scores], c.hint), 0, 1, rank)


def _axis_attention(c: Ctx, m: nn.Module, u: str) -> str:
    """``_AxisAttention.forward`` on ``u: [N, T, C, H, W]`` (``channel_axis``: T and C swapped)."""
    z = c.transpose(u, 1, 2, 5) if m.channel_axis else u
    avg, mx = _global_pools(c, m, z, (2, 3, 4), keepdims=True)
    b = c.b
    mlp = m.sharedMLP
    score = b.node("Sigmoid", [b.node("Add", [layer(c, mlp, avg), layer(c, mlp, mx)])], c.hint)
    return c.transpose(score, 1, 2, 5) if m.channel_axis else score


def _spatial_attention(c: Ctx, m: nn.Module, u: str, shape: Sequence[int]) -> str:
    """``_SpatialAttention.forward`` on ``u: [N, T, C, H, W]`` (``T`` may be dynamic)."""
    b = c.b
    h, w = (int(s) for s in shape[-2:])
    v = b.node("Reshape", [u, b.inits.int64([0, -1, h, w], f"{c.hint}_flat")], c.hint)
    pooled = [c.reduce("ReduceMean", v, [1], True), c.reduce("ReduceMax", v, [1], True)]
    score = layer(c, m.conv, b.node("Concat", pooled, c.hint, axis=1))
    return c.unsqueeze(b.node("Sigmoid", [score], c.hint), [1])


def _multi_dimensional(c: Ctx, m: nn.Module, x: str, shape: Sequence[int]) -> str:
    """``MultiDimensionalAttention.forward`` on ``x: [T, N, C, H, W]``."""
    if len(shape) != 5:
        raise c.fail(f"MultiDimensionalAttention expects [T, N, C, H, W], got {list(shape)}")
    b = c.b
    u = c.transpose(x, 0, 1, 5)
    for name in ("ta", "ca", "sa"):
        sub = getattr(m, name)
        if sub is None:
            continue
        score = _spatial_attention(c, sub, u, shape) if name == "sa" else _axis_attention(c, sub, u)
        u = b.node("Mul", [score, u], c.hint)
    return c.transpose(b.node("Relu", [u], c.hint), 0, 1, 5)


@dataclasses.dataclass(frozen=True)
class SequenceModule:
    """The whole-sequence rendering of one layer class, and why it has no one-step form."""

    render: Callable[[Ctx, nn.Module, str, Sequence[int]], str]
    mixes: Callable[[nn.Module], str]  # "it pools ...": why step mode refuses this layer
    #: The number of time steps the layer is built for (an MLP over ``T``), or None when it
    #: runs at any ``T``; the export then declares that ``T`` on its input.
    steps: Callable[[nn.Module], int | None] = lambda m: None


def _twa_steps(m: nn.Module) -> int | None:
    first = m.sharedMLP[0]
    return int(first.in_features) if isinstance(first, nn.Linear) else None


def _mda_steps(m: nn.Module) -> int | None:
    ta = getattr(m, "ta", None)
    if ta is None:
        return None
    first = ta.sharedMLP[0]
    return int(first.in_channels) if isinstance(first, nn.Conv3d) else None


def _mda_mixes(m: nn.Module) -> str:
    parts = {
        "ta": "temporal attention runs an MLP over the T pooled steps",
        "ca": "channel attention pools over (T, H, W)",
        "sa": "spatial attention takes the mean and max over T*C",
    }
    enabled = [why for name, why in parts.items() if getattr(m, name, None) is not None]
    return f"over the time axis ({'; '.join(enabled)})"


_ATTENTION = "spikingjelly.activation_based.layer.attention"

#: ``(module, class name) -> SequenceModule``: layers rendered on the whole ``[T, N, *]``
#: sequence, between the time loops of a sequence export.
SEQUENCE_MODULES: dict[tuple[str, str], SequenceModule] = {
    (_ATTENTION, "TemporalWiseAttention"): SequenceModule(
        _temporal_wise, lambda m: "over the time axis (an MLP over the T pooled steps)", _twa_steps
    ),
    (_ATTENTION, "MultiDimensionalAttention"): SequenceModule(
        _multi_dimensional, _mda_mixes, _mda_steps
    ),
}


def sequence_module(node: Node) -> SequenceModule | None:
    """The whole-sequence rendering of an ``OPAQUE_MODULE`` node's layer, if it has one."""
    if node.op is not Op.OPAQUE_MODULE or node.module is None:
        return None
    for (module_path, name), entry in SEQUENCE_MODULES.items():
        cls = loaded_class(module_path, name)
        if cls is not None and type(node.module) is cls:
            return entry
    return None


def _where(node: Node) -> str:
    path = node.attrs.get("path")
    return f"%{node.name} (op {node.op.name}{', ' + str(path) if path else ''})"


def step_refusal(node: Node, entry: SequenceModule) -> OnnxExportError:
    """The step-mode error for a layer that mixes time steps."""
    layer_name = type(node.module).__name__
    return OnnxExportError(
        f"export_onnx: IR node {_where(node)}: {layer_name} pools {entry.mixes(node.module)}, "
        "so its output at step t needs the steps after t; it has no one-step form. Export "
        "with mode='sequence' (the layer then runs on the whole sequence between the time "
        "loops)."
    )


def render_sequence_module(
    b: GraphBuilder, node: Node, x: str, opset: int, entry: SequenceModule
) -> str:
    """Emit ``node``'s layer on the stacked ``x: [T, N, *]``; return the ``[T, N, *]`` output."""
    args = node.attrs.get("args")
    if len(node.inputs) != 1 or node.attrs.get("kwargs") or (args is not None and len(args) != 1):
        raise OnnxExportError(
            f"export_onnx: IR node {_where(node)}: {type(node.module).__name__} must be called "
            "with exactly one input tensor"
        )
    shape = node.shape
    if shape is None:
        raise OnnxExportError(
            f"export_onnx: IR node {_where(node)} has no recorded shape; trace it with an "
            "example input."
        )
    return entry.render(Ctx(b, opset, node.name), node.module, x, tuple(shape))
