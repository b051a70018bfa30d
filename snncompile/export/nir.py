r"""NIR interop: :func:`export_nir` (snncompile IR -> ``nir.NIRGraph``) and :func:`import_nir`.

`NIR <https://neuroir.org>`_ describes neurons as continuous-time ODEs; snncompile (like
SpikingJelly) runs discrete steps. The bridge is the forward-Euler step ``dt`` (seconds), an
explicit argument of both functions (default ``1e-4``, the value SpikingJelly and snnTorch use).
The exported graph stores it in ``graph.metadata['snncompile.dt']``; :func:`import_nir` reads it
back when ``dt`` is not given.

**LIF.** NIR: ``tau dv/dt = (v_leak - v) + r I``. One Euler step of length ``dt`` gives
``v' = v + (dt/tau) (v_leak - v) + (r dt / tau) I``: membrane retention ``beta = 1 - dt/tau``
and input gain ``r dt / tau``. SpikingJelly's ``decay_input=True`` step
``H = V + (X - (V - v_reset)) / tau_sj`` is that update with ``dt/tau = 1/tau_sj`` and gain
``1/tau_sj``, so it exports as ``tau = tau_sj * dt``, ``r = 1``, ``v_leak = v_reset``.
``decay_input=False`` (``H = V - (V - v_reset)/tau_sj + X``, gain 1) exports as
``r = tau / dt = tau_sj``. ``ParametricLIFNode`` exports as a LIF with its current
``tau_sj = 1 / sigmoid(w)``. Soft reset leaks towards 0, so ``v_leak = 0`` there.

**IF.** NIR: ``C dv/dt = r I`` (``C = 1``); an Euler step adds ``r dt I``. We export ``IF``
with ``r = 1/dt`` (gain 1), as SpikingJelly's exporter does. snnTorch and Sinabs read and write
IF/I nodes with ``r = 1`` meaning "add ``r * I`` per step" (``dt`` ignored); import those with
``import_nir(..., integrator='unit')``. The default ``integrator='euler'`` uses gain ``r * dt``.

**Firing ties.** SpikingJelly (and snncompile) fire at ``H >= v_threshold``; the NIR text,
snnTorch and Norse fire at ``H > v_threshold``. Both directions keep *our* rule: an imported
graph fires on an exact tie where its source library would not. With continuous-valued inputs
ties have probability zero; with spike inputs and thresholds that are sums of weights they do
occur, and then results differ at those steps.

**Soft reset.** NIR's neurons reset hard to ``v_reset``. Soft reset (``v_reset=None``,
``V = H - S * v_threshold``) is written as ``v_reset = 0`` plus node metadata
``{'snncompile.reset': 'subtract'}``, which ``nir.write`` / ``nir.read`` round-trip; we read it
back and never turn soft into hard reset. A tool that ignores the metadata will run the node with
a hard reset, so :func:`export_nir` warns (or refuses, ``soft_reset='error'``). A foreign node
without the key is a hard reset, as the NIR spec says. Other ``v_reset`` values (e.g. ``-0.3``)
travel in NIR's own ``v_reset`` field. Further metadata keys (``snncompile.neuron``,
``snncompile.tau``, ``snncompile.plif_w``, ``snncompile.decay_input``, ``snncompile.surrogate``,
``snncompile.detach_reset``) restore the exact module; they are checked against the NIR fields.

**Converted SNNs.** ``ann2snn.convert`` wraps each IF neuron in ``VoltageScale`` layers; they
export as NIR ``Scale`` nodes (the scale broadcast to the feature shape). Its half-threshold
neurons start (and are reset by ``reset_net``) at ``v_init = v_threshold / 2``; NIR has no
initial-state field, so the value travels as metadata ``{'snncompile.v_init': 0.5}``, which
:func:`import_nir` reads back (an ``ann2snn.HalfThresholdIFNode``). A tool that ignores it
starts the membrane at ``v_reset`` (0 for soft reset), like the zero-init conversion, so
:func:`export_nir` warns.

**Untrusted files.** :func:`import_nir` sums the sizes the file's datasets declare (shape times
item size) before reading any data and refuses more than ``max_bytes`` (default 1 GiB; a tiny
compressed file can declare gigabytes), refuses HDF5 soft/external links, and validates every
field as snncompile's modules validate their arguments (finite values, ``tau > dt`` so that
``beta = 1 - dt/tau`` lies in ``(0, 1)``, bias lengths, integer strides); each error is a
:class:`NIRImportError` naming the NIR node and the field or metadata key. Surrogates travel as
``snncompile.surrogate`` plus ``snncompile.surrogate_<param>`` keys, written only for snncompile's
(and SpikingJelly's) own classes, matched by identity.

**Recurrence.** A cycle in an imported graph becomes a
:class:`snncompile.nir_modules.RecurrentBlock`: its nodes are stepped together, and the edges
that leave a neuron inside the cycle carry that neuron's output of the *previous* step (zeros
at the first step). A cycle without a neuron (an algebraic loop) is refused. See
``docs/nir.md``.
"""

from __future__ import annotations

import keyword
import math
import operator
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from snncompile.dynamics.surrogates import SPIKINGJELLY_SURROGATE_MODULE
from snncompile.ir.graph import Graph, Node
from snncompile.ir.ops import Layout, Op

__all__ = [
    "DEFAULT_DT",
    "DEFAULT_MAX_BYTES",
    "NIRExportError",
    "NIRImportError",
    "export_nir",
    "import_nir",
]

#: The Euler step used when none is given (what SpikingJelly's and snnTorch's exporters use).
DEFAULT_DT = 1e-4
#: Relative tolerance when recognising ``r == 1``, ``r == tau/dt`` or a gain of 1 in a file:
#: float32 storage plus a few float32 operations in the writer give errors around 1e-6.
RTOL = 1e-5

_RESET_KEY = "snncompile.reset"
_SURROGATE_KEY = "snncompile.surrogate"
#: Default limit on the total declared size of the datasets of a NIR file (1 GiB).
DEFAULT_MAX_BYTES = 2**30
_MAX_DEPTH = 64
# The node types nir.read knows (NIR 1.0).
_NIR_NODE_TYPES = (
    "Input", "Output", "NIRGraph", "Affine", "Linear", "Scale", "Conv1d", "Conv2d", "SumPool2d",
    "AvgPool2d", "Flatten", "Delay", "Threshold", "I", "IF", "LI", "LIF", "CubaLI", "CubaLIF",
)
# Module attribute names a NIR node name must not take (fx.GraphModule's and nn.Module's own).
_RESERVED_NAMES = frozenset(dir(fx.GraphModule)) | frozenset(vars(nn.Module())) | {"self"}
_V_INIT_KEY = "snncompile.v_init"
_NEURON_TYPES = ("IF", "LIF", "LI", "I", "CubaLIF", "CubaLI")


class NIRExportError(ValueError):
    """The model cannot be written as NIR; the message names the IR node and what to do."""


class NIRImportError(ValueError):
    """The NIR graph cannot be imported; the message names the NIR node and what to do."""


def _require_nir() -> Any:
    try:
        import nir
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "snncompile's NIR interop needs the 'nir' package: pip install snncompile[nir]"
        ) from err
    return nir


def _check_dt(dt: Any, who: str) -> float:
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not dt > 0:
        raise ValueError(f"{who}: dt must be a positive number of seconds, got {dt!r}")
    if not math.isfinite(float(dt)):
        raise ValueError(f"{who}: dt must be finite, got {dt!r}")
    return float(dt)


# =================================================================================================
# export
# =================================================================================================
def _export_graph(model_or_compiled: nn.Module, example_input: torch.Tensor) -> Graph:
    """The optimized inference IR (BN folded, dropout gone, neurons as plain NEURON nodes)."""
    from snncompile.api import optimize
    from snncompile.runtime.compiled import CompiledModule

    if isinstance(model_or_compiled, CompiledModule):
        return model_or_compiled.graph
    if not isinstance(model_or_compiled, nn.Module):
        raise NIRExportError(
            "export_nir: expected an nn.Module or a snncompile CompiledModule, got "
            f"{type(model_or_compiled).__name__}"
        )
    return optimize(model_or_compiled, example_input, mode="inference", backend="torch").graph


def _features(node: Node) -> tuple[int, ...]:
    """Per-sample feature shape of a node's value (time and batch dims dropped)."""
    if node.shape is None:
        raise NIRExportError(f"export_nir: IR node %{node.name} has no recorded shape")
    lead = 2 if node.layout is Layout.SEQ else 1
    return tuple(int(d) for d in node.shape[lead:])


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float32).numpy().copy()


class _Exporter:
    """Walks the IR in order and builds NIR nodes and edges (mirrors the ONNX emitter)."""

    def __init__(self, graph: Graph, dt: float, soft_reset: str) -> None:
        self.nir = _require_nir()
        self.graph = graph
        self.dt = dt
        self.soft_reset = soft_reset
        self.nodes: dict[str, Any] = {}
        self.edges: list[tuple[str, str]] = []
        # IR value -> the NIR nodes whose outputs sum to it (NIR sums fan-in edges).
        self.alias: dict[str, list[str]] = {}
        self.soft_nodes: list[str] = []
        self.v_init_nodes: list[str] = []
        self.unknown_surrogates: list[str] = []

    def fail(self, node: Node, why: str) -> NIRExportError:
        what = node.attrs.get("path") or (type(node.module).__name__ if node.module else "")
        where = f"%{node.name} (op {node.op.name}{', ' + str(what) if what else ''})"
        return NIRExportError(f"export_nir: IR node {where}: {why}")

    def emit(self, node: Node, nir_node: Any, data_inputs: tuple[str, ...] | None = None) -> None:
        name = node.name
        self.nodes[name] = nir_node
        for inp in node.inputs if data_inputs is None else data_inputs:
            for src in self.alias[inp]:
                self.edges.append((src, name))
        self.alias[name] = [name]

    def run(self) -> Any:
        inputs = self.graph.input_nodes
        if len(inputs) != 1:
            raise NIRExportError(
                f"export_nir: the model takes {len(inputs)} inputs; only single-input models "
                "can be exported."
            )
        for node in self.graph:
            entry = _EXPORT_OPS.get(node.op)
            if entry is None:
                raise self.fail(
                    node,
                    "has no NIR equivalent. Supported: "
                    + ", ".join(sorted(o.name for o in _EXPORT_OPS))
                    + " (Linear/Conv1d/Conv2d/AvgPool2d/SumPool via divisor_override=1/Flatten, "
                    "IF/LIF/PLIF neurons). Replace the layer or leave it out of the exported "
                    "model.",
                )
            entry(self, node)
        if self.soft_nodes and self.soft_reset == "warn":
            warnings.warn(
                "export_nir: soft-reset neurons "
                + ", ".join(self.soft_nodes)
                + " are stored as NIR nodes with v_reset=0 and metadata "
                "{'snncompile.reset': 'subtract'}; snncompile.import_nir restores them, but a "
                "tool that ignores node metadata will run them with a hard reset to 0.",
                stacklevel=3,
            )
        if self.v_init_nodes:
            warnings.warn(
                "export_nir: neurons "
                + ", ".join(self.v_init_nodes)
                + f" start from a membrane other than v_reset; NIR has no initial-state field, "
                f"so it is stored as node metadata {_V_INIT_KEY!r}. snncompile.import_nir "
                "restores it; a tool that ignores node metadata starts them at v_reset.",
                stacklevel=3,
            )
        if self.unknown_surrogates:
            warnings.warn(
                "export_nir: the surrogates of neurons "
                + ", ".join(self.unknown_surrogates)
                + " are not snncompile's or SpikingJelly's own surrogate classes, so they are "
                "not recorded; import_nir gives those neurons the default Sigmoid surrogate "
                "(same spikes, different training gradients).",
                stacklevel=3,
            )
        return self.nir.NIRGraph(
            nodes=self.nodes,
            edges=self.edges,
            metadata={"snncompile.format": "1", "snncompile.dt": self.dt},
            type_check=True,
        )

    def surrogate_meta(self, node: Node, sg: Any, meta: dict[str, Any]) -> None:
        """Record the surrogate as ``snncompile.surrogate`` (+ ``snncompile.surrogate_<param>``).

        Only snncompile's own surrogate classes and SpikingJelly's classes of the same name (the
        same math) are recorded, matched by class identity; another class (a user's, or a
        subclass) cannot travel in NIR, so it is left out with a warning (the imported neuron
        gets the default Sigmoid surrogate; spikes are unaffected, training gradients differ).
        """
        from snncompile import surrogate

        cls = type(sg)
        ours = surrogate.SURROGATES.get(cls.__name__)
        sj = sys.modules.get(SPIKINGJELLY_SURROGATE_MODULE)
        known = ours is not None and (
            cls is ours or (sj is not None and getattr(sj, cls.__name__, None) is cls)
        )
        values = [getattr(sg, p, None) for p in ours.param_names] if known else []
        if not known or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in values
        ):
            self.unknown_surrogates.append(f"%{node.name} ({cls.__module__}.{cls.__qualname__})")
            return
        meta[_SURROGATE_KEY] = cls.__name__
        for pname, value in zip(ours.param_names, values, strict=True):
            meta[f"{_SURROGATE_KEY}_{pname}"] = float(value)

    # -- op handlers --
    def input(self, node: Node) -> None:
        self.nodes["input"] = self.nir.Input(input_type=np.array(_features(node)))
        self.alias[node.name] = ["input"]

    def output(self, node: Node) -> None:
        args = node.attrs.get("args") or ()
        if len(node.inputs) != 1 or (args and not hasattr(args[0], "index")):
            raise self.fail(node, "the model must return a single tensor to be exported to NIR")
        src = self.graph[node.inputs[0]]
        self.nodes["output"] = self.nir.Output(output_type=np.array(_features(src)))
        for s in self.alias[src.name]:
            self.edges.append((s, "output"))

    def passthrough(self, node: Node) -> None:
        if len(node.inputs) != 1:
            raise self.fail(node, "expected one input")
        self.alias[node.name] = list(self.alias[node.inputs[0]])

    def constant(self, node: Node) -> None:
        self.alias[node.name] = []  # only meaningful as an operand of an op we refuse anyway

    def add(self, node: Node) -> None:
        srcs = [self.graph[i] for i in node.inputs]
        if len(srcs) != 2 or any(s.op is Op.CONSTANT or not s.is_tensor for s in srcs):
            raise self.fail(node, "only the sum of two computed tensors maps to NIR (fan-in)")
        if any(_features(s) != _features(node) for s in srcs):
            raise self.fail(node, "a broadcasting addition has no NIR form")
        merged = self.alias[srcs[0].name] + self.alias[srcs[1].name]
        if len(set(merged)) != len(merged):
            raise self.fail(node, "adds a value to itself; NIR edges cannot express x + x")
        self.alias[node.name] = merged

    def elementwise(self, node: Node) -> None:
        from snncompile.ann2snn.modules import VoltageScale

        m = node.module
        if not isinstance(m, VoltageScale):
            what = node.attrs.get("fn") or node.op.name
            raise self.fail(
                node, f"{what} has no NIR equivalent (of the elementwise ops, only ann2snn's "
                "VoltageScale maps to NIR Scale)"
            )
        shape = _features(node)
        scale = np.broadcast_to(_np(m.scale.detach().float()), shape).astype(np.float32)
        self.emit(node, self.nir.Scale(scale=np.ascontiguousarray(scale)))

    def linear(self, node: Node) -> None:
        m = node.module
        if not isinstance(m, nn.Linear):
            raise self.fail(node, "functional linear layers are not exported; use nn.Linear")
        if len(_features(self.graph[node.inputs[0]])) != 1:
            raise self.fail(node, "NIR Affine/Linear takes a flat [features] input; flatten first")
        if m.bias is None:
            self.emit(node, self.nir.Linear(weight=_np(m.weight)))
        else:
            self.emit(node, self.nir.Affine(weight=_np(m.weight), bias=_np(m.bias)))

    def conv(self, node: Node) -> None:
        m = node.module
        if not isinstance(m, (nn.Conv1d, nn.Conv2d)):
            raise self.fail(node, "functional convolutions are not exported; use nn.Conv1d/2d")
        if m.padding_mode != "zeros":
            raise self.fail(node, f"padding_mode={m.padding_mode!r} has no NIR form; use 'zeros'")
        spatial = _features(self.graph[node.inputs[0]])[1:]
        bias = _np(m.bias) if m.bias is not None else np.zeros(m.out_channels, np.float32)
        pad = m.padding
        if isinstance(m, nn.Conv1d):
            self.emit(
                node,
                self.nir.Conv1d(
                    input_shape=int(spatial[0]),
                    weight=_np(m.weight),
                    stride=int(m.stride[0]),
                    padding=pad if isinstance(pad, str) else int(pad[0]),
                    dilation=int(m.dilation[0]),
                    groups=int(m.groups),
                    bias=bias,
                ),
            )
            return
        self.emit(
            node,
            self.nir.Conv2d(
                input_shape=(int(spatial[0]), int(spatial[1])),
                weight=_np(m.weight),
                stride=tuple(int(s) for s in m.stride),
                padding=pad if isinstance(pad, str) else tuple(int(p) for p in pad),
                dilation=tuple(int(d) for d in m.dilation),
                groups=int(m.groups),
                bias=bias,
            ),
        )

    def avgpool(self, node: Node) -> None:
        m = node.module
        if not isinstance(m, nn.AvgPool2d):
            raise self.fail(node, "only nn.AvgPool2d (2-d average/sum pooling) maps to NIR")
        k = _pair(m.kernel_size)
        s = _pair(m.stride if m.stride is not None else m.kernel_size)
        p = _pair(m.padding)
        if m.ceil_mode or (any(p) and not m.count_include_pad):
            raise self.fail(node, "ceil_mode / count_include_pad=False have no NIR form")
        kw = dict(kernel_size=np.array(k), stride=np.array(s), padding=np.array(p))
        if m.divisor_override is None:
            self.emit(node, self.nir.AvgPool2d(**kw))
        elif m.divisor_override == 1:
            self.emit(node, self.nir.SumPool2d(**kw))
        else:
            raise self.fail(node, f"divisor_override={m.divisor_override} has no NIR form")

    def flatten(self, node: Node) -> None:
        src = self.graph[node.inputs[0]]
        fin, fout = _features(src), _features(node)
        lead_in = 2 if src.layout is Layout.SEQ else 1
        lead_out = 2 if node.layout is Layout.SEQ else 1
        if src.shape is None or node.shape is None or (
            src.shape[:lead_in] != node.shape[:lead_out]
        ):
            raise self.fail(node, "reshapes the time/batch dims; only feature flattening is NIR")
        start = 0
        while start < min(len(fin), len(fout)) and fin[start] == fout[start]:
            start += 1
        end = len(fin) - (len(fout) - start)
        flat = fin[:start] + (int(np.prod(fin[start : end + 1])),) + fin[end + 1 :]
        if start >= len(fin) or flat != fout:
            if fin == fout:
                self.passthrough(node)
                return
            raise self.fail(node, f"{list(fin)} -> {list(fout)} is not a flatten of feature dims")
        self.emit(
            node,
            self.nir.Flatten(input_type={"input": np.array(fin)}, start_dim=start, end_dim=end),
            data_inputs=(node.inputs[0],),
        )

    def _dynamics_kind(self, node: Node) -> tuple[str, dict[str, float]]:
        """The NIR form of a snncompile neuron and its bound values, from its dynamics (the
        pattern table)."""
        from snncompile.dynamics.surrogates import SurrogateExpr
        from snncompile.export.nir_patterns import classify
        from snncompile.runtime.fused_backends import dynamics_for

        m = node.module
        dyn = dynamics_for(m) or m.define_dynamics(SurrogateExpr("Sigmoid", (4.0,)))
        found = classify(dyn)
        if found is None:
            raise self.fail(
                node,
                f"its dynamics ({dyn.describe()}) match no NIR neuron pattern (IF, LIF, PLIF; "
                "snncompile.export.nir_patterns.PATTERNS)",
            )
        return found

    def neuron(self, node: Node) -> None:
        if node.op is Op.FUSED_NEURON:
            raise self.fail(
                node,
                "is a fused neuron kernel; export the model itself or a module compiled with "
                "backend='torch'",
            )
        m = node.module
        a = node.attrs
        kind, binds = a.get("kind"), {}
        if callable(getattr(m, "define_dynamics", None)):
            kind, binds = self._dynamics_kind(node)
        if kind not in ("if", "lif", "plif", "cubalif"):
            raise self.fail(node, f"neuron kind {kind!r} has no NIR form (IF, LIF, PLIF do)")
        shape = _features(node)
        thr = float(a["v_threshold"])
        v_reset = a["v_reset"]
        soft = v_reset is None
        if soft and self.soft_reset == "error":
            raise self.fail(
                node,
                "uses soft reset (v_reset=None), which NIR cannot express without metadata; "
                "pass soft_reset='warn' to export it with {'snncompile.reset': 'subtract'}",
            )
        v_r = 0.0 if soft else float(v_reset)
        meta: dict[str, Any] = {
            "snncompile.neuron": kind,
            _RESET_KEY: "subtract" if soft else "hard",
            "snncompile.detach_reset": int(bool(a.get("detach_reset", False))),
        }
        sg = getattr(m, "surrogate_function", None)
        if sg is not None:
            if not getattr(sg, "spiking", True):
                raise self.fail(
                    node,
                    f"its surrogate {type(sg).__name__}(spiking=False) makes it emit the smooth "
                    "primitive instead of spikes; NIR neurons spike. Export with spiking=True",
                )
            self.surrogate_meta(node, sg, meta)
        if soft:
            self.soft_nodes.append(node.name)
        v_init = a.get("v_init")
        if v_init is not None and float(v_init) != v_r:
            if kind != "if" or not soft or float(v_init) != 0.5 * thr:
                raise self.fail(
                    node, f"starts at v_init={v_init}; only ann2snn's half-threshold IF neurons "
                    "(soft reset, v_init = v_threshold / 2) can be exported with their start"
                )
            meta[_V_INIT_KEY] = float(v_init)
            self.v_init_nodes.append(node.name)

        def full(v: float) -> np.ndarray:
            return np.full(shape, v, dtype=np.float64)

        if kind == "cubalif":
            # c <- c_decay c + x, h = v_decay v + c: NIR's CubaLIF with retentions
            # 1 - dt/tau = decay and unit gains (w_in dt/tau_syn = r dt/tau_mem = 1), v_leak 0.
            decays = {k: binds[k] for k in ("c_decay", "v_decay")}
            bad = {k: d for k, d in decays.items() if not 0.0 < d < 1.0}
            if bad:
                raise self.fail(node, f"CUBA-LIF decays {bad} have no NIR time constant")
            tau_syn = self.dt / (1.0 - decays["c_decay"])
            tau_mem = self.dt / (1.0 - decays["v_decay"])
            nir_node = self.nir.CubaLIF(
                tau_syn=full(tau_syn),
                tau_mem=full(tau_mem),
                r=full(tau_mem / self.dt),
                v_leak=full(0.0),
                v_threshold=full(thr),
                v_reset=full(v_r),
                w_in=full(tau_syn / self.dt),
                metadata=meta,
            )
        elif kind == "if":
            nir_node = self.nir.IF(
                r=full(1.0 / self.dt),
                v_threshold=full(thr),
                v_reset=full(v_r),
                metadata=meta,
            )
        else:
            if kind == "plif":
                w = getattr(m, "w", None)
                if not isinstance(w, torch.Tensor):
                    raise self.fail(node, "parametric LIF without its parameter w")
                tau_sj = 1.0 / float(torch.sigmoid(w.detach().float().cpu()))
                meta["snncompile.plif_w"] = float(w.detach().float().cpu())
            else:
                tau_sj = float(a["tau"])
            decay_input = bool(a.get("decay_input", True))
            meta["snncompile.tau"] = tau_sj
            meta["snncompile.decay_input"] = int(decay_input)
            nir_node = self.nir.LIF(
                tau=full(tau_sj * self.dt),
                r=full(1.0 if decay_input else tau_sj),
                v_leak=full(v_r),
                v_threshold=full(thr),
                v_reset=full(v_r),
                metadata=meta,
            )
        self.emit(node, nir_node, data_inputs=(node.inputs[0],))


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


_EXPORT_OPS: dict[Op, Callable[[_Exporter, Node], None]] = {
    Op.INPUT: _Exporter.input,
    Op.OUTPUT: _Exporter.output,
    Op.CONSTANT: _Exporter.constant,
    Op.MERGE_TIME: _Exporter.passthrough,
    Op.SPLIT_TIME: _Exporter.passthrough,
    Op.IDENTITY: _Exporter.passthrough,
    Op.DROPOUT: _Exporter.passthrough,
    Op.ADD: _Exporter.add,
    Op.LINEAR: _Exporter.linear,
    Op.CONV1D: _Exporter.conv,
    Op.CONV2D: _Exporter.conv,
    Op.AVGPOOL: _Exporter.avgpool,
    Op.FLATTEN: _Exporter.flatten,
    Op.RESHAPE: _Exporter.flatten,
    Op.NEURON: _Exporter.neuron,
    Op.ELEMENTWISE: _Exporter.elementwise,
    Op.FUSED_NEURON: _Exporter.neuron,
}


def export_nir(
    model_or_compiled: nn.Module,
    example_input: torch.Tensor,
    *,
    dt: float = DEFAULT_DT,
    path: str | Path | None = None,
    soft_reset: str = "warn",
) -> Any:
    """Export an SNN (or a compiled module) to a ``nir.NIRGraph``.

    Args:
        model_or_compiled: A SpikingJelly-style model (single- or multi-step) or the result of
            :func:`snncompile.optimize`. A model is compiled for inference first (batchnorm
            folded into the convolutions, dropout removed).
        example_input: A ``[T, N, ...]`` example; it fixes the per-sample shapes of the graph.
        dt: Euler step in seconds that relates our per-step dynamics to NIR's time constants
            (see the module docstring; stored in ``graph.metadata['snncompile.dt']``).
        path: If given, the graph is also written there with ``nir.write``.
        soft_reset: ``'warn'`` (default) writes soft-reset neurons with the metadata
            ``{'snncompile.reset': 'subtract'}`` and warns that other tools will read a hard
            reset; ``'ignore'`` does the same silently; ``'error'`` refuses them.

    Returns:
        The ``nir.NIRGraph`` (node names are the IR node names, plus ``input`` and ``output``).

    Raises:
        NIRExportError: an IR op has no NIR form (the message names the node), or the model
            does not have a single input and a single tensor output.
        ImportError: the ``nir`` package is missing (``pip install snncompile[nir]``).
    """
    nir = _require_nir()
    dt = _check_dt(dt, "export_nir")
    if soft_reset not in ("warn", "ignore", "error"):
        raise ValueError(
            f"export_nir: soft_reset must be 'warn', 'ignore' or 'error', got {soft_reset!r}"
        )
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise NIRExportError("export_nir: example_input must be a [T, N, ...] tensor")
    graph = _export_graph(model_or_compiled, example_input)
    nir_graph = _Exporter(graph, dt, soft_reset).run()
    if path is not None:
        nir.write(str(path), nir_graph)
    return nir_graph


# =================================================================================================
# import
# =================================================================================================
def _arr(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float64)


def _uniform(value: Any) -> float | None:
    """The single value of an array whose entries are all equal, else ``None``."""
    a = _arr(value)
    if a.size == 0:
        return None
    first = float(a.reshape(-1)[0])
    return first if bool(np.all(a == first)) else None


def _close(a: float, b: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= RTOL * max(abs(a), abs(b))


def _snap_one(x: np.ndarray) -> np.ndarray:
    """Entries within :data:`RTOL` of 1 become exactly 1 (a gain of 1 stored in float32)."""
    x = np.array(x, dtype=np.float64)
    x[np.abs(x - 1.0) <= RTOL] = 1.0
    return x


def _tidy(x: float) -> float:
    """``x`` rounded to 12 significant digits when that moves it by at most a few ulps."""
    y = float(f"{x:.12g}")
    return y if abs(y - x) <= 8 * np.spacing(abs(x)) else x


def _meta(node: Any) -> dict[str, Any]:
    md = getattr(node, "metadata", None) or {}
    out: dict[str, Any] = {}
    for k, v in md.items():
        if isinstance(v, bytes):
            v = v.decode("utf8")
        elif isinstance(v, np.ndarray) and v.shape == ():
            v = v.item()
        elif isinstance(v, np.generic):
            v = v.item()
        out[str(k)] = v
    return out


class _Importer:
    """Maps NIR nodes to modules and wires them into an ``fx.GraphModule``.

    Every parameter field is validated the way snncompile's modules validate their arguments
    (finite values, a per-step retention ``beta = 1 - dt / tau`` in ``(0, 1)``, matching
    shapes), and every error names the NIR node and the field.
    """

    def __init__(self, graph: Any, dt: float, integrator: str) -> None:
        self.nir = _require_nir()
        self.graph = graph
        self.dt = dt
        self.integrator = integrator

    def fail(self, name: str, node: Any, why: str) -> NIRImportError:
        return NIRImportError(f"import_nir: NIR node {name!r} ({type(node).__name__}): {why}")

    # -- validated field access --
    def field(self, name: str, node: Any, fld: str, *, finite: bool = True) -> np.ndarray:
        """Field ``fld`` of the node as a float64 array, checked to be numeric and finite."""
        value = getattr(node, fld, None)
        if value is None:
            raise self.fail(name, node, f"field {fld!r} is missing")
        try:
            a = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise self.fail(name, node, f"field {fld!r} is not numeric ({err})") from err
        if finite and a.size and not bool(np.all(np.isfinite(a))):
            idx = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
            at = f" at index {idx}" if a.ndim else ""
            raise self.fail(
                name,
                node,
                f"field {fld!r} has the non-finite value {float(a[idx])!r}{at}; snncompile's "
                "modules need finite parameters (as SpikingJelly's neurons do)",
            )
        return a

    def retention(self, name: str, node: Any, fld: str) -> np.ndarray:
        """``beta = 1 - dt / tau`` of time-constant field ``fld``, checked to lie in ``(0, 1)``."""
        tau = self.field(name, node, fld)
        bad = ~(tau > self.dt)
        if bool(np.any(bad)):
            idx = tuple(int(i) for i in np.argwhere(bad)[0]) if tau.ndim else ()
            t = float(tau[idx])
            beta = 1.0 - self.dt / t if t != 0 else -math.inf
            at = f" at index {idx}" if tau.ndim else ""
            raise self.fail(
                name,
                node,
                f"field {fld!r} = {t!r} s{at} with dt = {self.dt} s gives a per-step retention "
                f"beta = 1 - dt/{fld} = {beta:.6g}, outside (0, 1); snncompile's neurons need "
                f"{fld} > dt (SpikingJelly: tau > 1 step). Pass a smaller dt, or fix {fld}.",
            )
        return 1.0 - self.dt / tau

    def meta_float(self, name: str, node: Any, key: str, default: float | None = None) -> float:
        """Metadata ``key`` as a finite float (``default`` when absent; absent and no default:
        an error naming the key)."""
        md = _meta(node)
        if key not in md:
            if default is None:
                raise self.fail(
                    name,
                    node,
                    f"metadata {key!r} is missing (its 'snncompile.neuron' metadata needs it); "
                    "drop the 'snncompile.*' metadata to import the NIR fields as they are",
                )
            return default
        value = md[key]
        try:
            out = float(value)
        except (TypeError, ValueError) as err:
            raise self.fail(name, node, f"metadata {key!r}={value!r} is not a number") from err
        if not math.isfinite(out):
            raise self.fail(name, node, f"metadata {key!r}={value!r} is not finite")
        return out

    def meta_flag(self, name: str, node: Any, key: str, default: bool) -> bool:
        value = self.meta_float(name, node, key, float(default))
        if value not in (0.0, 1.0):
            raise self.fail(name, node, f"metadata {key!r}={value!r} must be 0 or 1")
        return bool(value)

    # -- neurons --
    def _reset(self, name: str, node: Any) -> str:
        mode = _meta(node).get(_RESET_KEY, "hard")
        if mode not in ("hard", "zero", "subtract"):
            raise self.fail(
                name, node, f"metadata {_RESET_KEY}={mode!r} is unknown (use 'hard' or 'subtract')"
            )
        return "subtract" if mode == "subtract" else "hard"

    def _surrogate(self, name: str, node: Any) -> nn.Module | None:
        """The surrogate recorded in our metadata (``snncompile.surrogate`` and its parameters
        ``snncompile.surrogate_<param>``), or ``None`` (the module's default) without it."""
        from snncompile import surrogate

        md = _meta(node)
        param_keys = sorted(k for k in md if k.startswith(_SURROGATE_KEY + "_"))
        if _SURROGATE_KEY not in md:
            if param_keys:
                raise self.fail(
                    name, node, f"metadata {param_keys[0]!r} without {_SURROGATE_KEY!r}"
                )
            return None
        sg_name = str(md[_SURROGATE_KEY])
        cls = surrogate.SURROGATES.get(sg_name)
        if cls is None:
            raise self.fail(
                name,
                node,
                f"metadata {_SURROGATE_KEY!r}={sg_name!r} is not a snncompile surrogate "
                f"({', '.join(surrogate.SURROGATES)}); remove the key to use the default "
                "Sigmoid(alpha=4)",
            )
        kwargs: dict[str, float] = {}
        for key in param_keys:
            pname = key[len(_SURROGATE_KEY) + 1 :]
            if pname not in cls.param_names:
                raise self.fail(
                    name,
                    node,
                    f"metadata {key!r}: {sg_name} has no parameter {pname!r} (its parameters: "
                    f"{', '.join(cls.param_names)})",
                )
            kwargs[pname] = self.meta_float(name, node, key)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            keys = ", ".join(repr(k) for k in param_keys) or repr(_SURROGATE_KEY)
            raise self.fail(name, node, f"metadata {keys}: {err}") from err

    def _sj_kwargs(
        self, name: str, node: Any, soft: bool, thr: float, v_reset: float
    ) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            v_threshold=thr,
            v_reset=None if soft else v_reset,
            detach_reset=self.meta_flag(name, node, "snncompile.detach_reset", False),
            step_mode="m",
        )
        sg = self._surrogate(name, node)
        if sg is not None:
            kw["surrogate_function"] = sg
        return kw

    def _spiking_fields(self, name: str, node: Any, soft: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(v_threshold, v_reset)``, finite; a soft reset needs ``v_reset == 0``."""
        thr = self.field(name, node, "v_threshold")
        v_reset = self.field(name, node, "v_reset")
        if soft and np.any(v_reset != 0.0):
            raise self.fail(
                name, node, "soft reset (metadata 'subtract') with a nonzero v_reset field"
            )
        return thr, v_reset

    def map_if(self, name: str, node: Any) -> nn.Module:
        from snncompile import neuron
        from snncompile.nir_modules import NIRNeuron

        soft = self._reset(name, node) == "subtract"
        thr_a, v_reset_a = self._spiking_fields(name, node, soft)
        r = self.field(name, node, "r")
        ours = _meta(node).get("snncompile.neuron") == "if"
        gain = _snap_one(r * self.dt if (self.integrator == "euler" or ours) else r)
        thr, v_r = _uniform(thr_a), _uniform(v_reset_a)
        if _V_INIT_KEY in _meta(node):
            v_init = self.meta_float(name, node, _V_INIT_KEY)
            return self._half_threshold_if(name, node, soft, gain, thr, v_init)
        if _uniform(gain) == 1.0 and thr is not None and v_r is not None:
            return neuron.IFNode(**self._sj_kwargs(name, node, soft, thr, v_r))
        return NIRNeuron(
            beta=1.0,
            gain=gain,
            v_leak=0.0,
            v_threshold=thr_a,
            v_reset=None if soft else v_reset_a,
            surrogate_function=self._surrogate(name, node),
        )

    def _half_threshold_if(
        self, name: str, node: Any, soft: bool, gain: np.ndarray, thr: float | None, v_init: float
    ) -> nn.Module:
        """ann2snn's IF neuron that starts at half threshold (metadata ``snncompile.v_init``)."""
        from snncompile.ann2snn.modules import HalfThresholdIFNode

        if not (soft and thr is not None and _uniform(gain) == 1.0 and v_init == 0.5 * thr):
            raise self.fail(
                name,
                node,
                f"metadata {_V_INIT_KEY}={v_init} is only understood for soft-reset IF neurons "
                "with gain 1 and v_init = v_threshold / 2 (ann2snn's half-threshold neurons); "
                "remove the key to start at v_reset",
            )
        return HalfThresholdIFNode(v_threshold=thr, step_mode="m")

    def _ours_lif(self, name: str, node: Any, soft: bool) -> nn.Module | None:
        """The exact snncompile neuron recorded in our metadata (checked against the fields)."""
        from snncompile import neuron

        md = _meta(node)
        kind = md.get("snncompile.neuron")
        if kind not in ("lif", "plif"):
            return None
        tau_sj = self.meta_float(name, node, "snncompile.tau")
        decay_input = self.meta_flag(name, node, "snncompile.decay_input", True)
        tau, r = _uniform(node.tau), _uniform(node.r)
        thr, v_r, v_leak = _uniform(node.v_threshold), _uniform(node.v_reset), _uniform(node.v_leak)
        ok = (
            None not in (tau, r, thr, v_r, v_leak)
            and _close(tau / self.dt, tau_sj)
            and _close(r, 1.0 if decay_input else tau_sj)
            and v_leak == (0.0 if soft else v_r)
        )
        if not ok:
            raise self.fail(
                name,
                node,
                "its snncompile metadata does not match its LIF fields (edited after export, or "
                f"imported with a different dt than the export's {self.dt}?); pass the export's "
                "dt or drop the 'snncompile.neuron' metadata to import the fields as they are",
            )
        kw = self._sj_kwargs(name, node, soft, thr, v_r)
        if kind == "plif":
            w = self.meta_float(name, node, "snncompile.plif_w")
            m = neuron.ParametricLIFNode(init_tau=2.0, decay_input=decay_input, **kw)
            with torch.no_grad():
                m.w.fill_(w)
            return m
        if not tau_sj > 1.0:
            raise self.fail(
                name, node, f"metadata 'snncompile.tau'={tau_sj!r}: LIFNode needs tau > 1 step"
            )
        return neuron.LIFNode(tau=tau_sj, decay_input=decay_input, **kw)

    def map_lif(self, name: str, node: Any) -> nn.Module:
        from snncompile import neuron

        soft = self._reset(name, node) == "subtract"
        thr_a, v_reset_a = self._spiking_fields(name, node, soft)
        self.retention(name, node, "tau")
        tau, r, v_leak = (self.field(name, node, f) for f in ("tau", "r", "v_leak"))
        ours = self._ours_lif(name, node, soft)
        if ours is not None:
            return ours
        ut, ur, ul = _uniform(tau), _uniform(r), _uniform(v_leak)
        thr, v_r = _uniform(thr_a), _uniform(v_reset_a)
        if None not in (ut, ur, ul, thr, v_r) and ut / self.dt > 1.0:
            tau_sj = _tidy(ut / self.dt)
            leak_ok = ul == (0.0 if soft else v_r)
            for decay_input, want in ((True, 1.0), (False, ut / self.dt)):
                if leak_ok and _close(ur, want) and tau_sj > 1.0:
                    kw = self._sj_kwargs(name, node, soft, thr, v_r)
                    return neuron.LIFNode(tau=tau_sj, decay_input=decay_input, **kw)
        return self._general(name, node, spiking=True, soft=soft)

    def _general(self, name: str, node: Any, spiking: bool, soft: bool) -> nn.Module:
        from snncompile.nir_modules import NIRNeuron

        beta = self.retention(name, node, "tau")
        ratio = self.dt / self.field(name, node, "tau")
        r, v_leak = self.field(name, node, "r"), self.field(name, node, "v_leak")
        thr = self.field(name, node, "v_threshold") if spiking else None
        v_reset = self.field(name, node, "v_reset") if spiking and not soft else None
        return NIRNeuron(
            beta=beta,
            gain=_snap_one(r * ratio),
            v_leak=v_leak,
            v_threshold=thr,
            v_reset=v_reset,
            surrogate_function=self._surrogate(name, node) if spiking else None,
        )

    def map_li(self, name: str, node: Any) -> nn.Module:
        return self._general(name, node, spiking=False, soft=False)

    def map_i(self, name: str, node: Any) -> nn.Module:
        from snncompile.nir_modules import NIRNeuron

        r = self.field(name, node, "r")
        gain = _snap_one(r * self.dt if self.integrator == "euler" else r)
        return NIRNeuron(beta=1.0, gain=gain, v_leak=0.0, v_threshold=None)

    def map_cuba(self, name: str, node: Any) -> nn.Module:
        from snncompile.nir_modules import NIRCubaNeuron

        spiking = hasattr(node, "v_threshold")
        soft = spiking and self._reset(name, node) == "subtract"
        thr = v_reset = None
        if spiking:
            thr, v_reset = self._spiking_fields(name, node, soft)
        alpha = self.retention(name, node, "tau_syn")
        beta = self.retention(name, node, "tau_mem")
        tau_syn, tau_mem = self.field(name, node, "tau_syn"), self.field(name, node, "tau_mem")
        return NIRCubaNeuron(
            alpha=alpha,
            syn_gain=_snap_one(self.field(name, node, "w_in") * self.dt / tau_syn),
            beta=beta,
            gain=_snap_one(self.field(name, node, "r") * self.dt / tau_mem),
            v_leak=self.field(name, node, "v_leak"),
            v_threshold=thr,
            v_reset=None if soft else v_reset,
            surrogate_function=self._surrogate(name, node) if spiking else None,
        )

    # -- synapses --
    def weight(self, name: str, node: Any, fld: str = "weight") -> torch.Tensor:
        return torch.as_tensor(self.field(name, node, fld).astype(np.float32))

    def bias(self, name: str, node: Any, out_features: int) -> torch.Tensor:
        b = self.weight(name, node, "bias").reshape(-1)
        if b.numel() != out_features:
            raise self.fail(
                name,
                node,
                f"field 'bias' has {b.numel()} entries, but the weight has {out_features} "
                "outputs",
            )
        return b

    def ints(self, name: str, node: Any, fld: str, n: int, low: int) -> Any:
        """Integer field ``fld`` (one value or ``n``), each ``>= low``."""
        a = self.field(name, node, fld).reshape(-1)
        if a.size not in (1, n) or not bool(np.all(a == np.round(a))) or bool(np.any(a < low)):
            raise self.fail(
                name,
                node,
                f"field {fld!r} = {a.tolist()} must be 1 or {n} integers >= {low}",
            )
        return _ints(a.astype(np.int64), n)

    def map_affine(self, name: str, node: Any) -> nn.Module:
        from snncompile import layer

        w = self.weight(name, node)
        if w.dim() != 2:
            raise self.fail(
                name, node, f"field 'weight' must be 2-d [out, in], got shape {tuple(w.shape)}"
            )
        has_bias = hasattr(node, "bias")
        bias = self.bias(name, node, int(w.shape[0])) if has_bias else None
        m = layer.Linear(w.shape[1], w.shape[0], bias=has_bias, step_mode="m")
        with torch.no_grad():
            m.weight.copy_(w)
            if bias is not None:
                m.bias.copy_(bias)
        return m

    def map_conv(self, name: str, node: Any) -> nn.Module:
        from snncompile import layer

        w = self.weight(name, node)
        if w.dim() not in (3, 4) or 0 in w.shape:
            raise self.fail(
                name,
                node,
                f"field 'weight' must be [out, in/groups, *kernel] with 1 or 2 kernel dims, got "
                f"shape {tuple(w.shape)}",
            )
        two_d = w.dim() == 4
        cls = layer.Conv2d if two_d else layer.Conv1d
        nd = 2 if two_d else 1
        pad = node.padding
        if isinstance(pad, (str, bytes, np.str_)):
            pad = pad.decode("utf8", "replace") if isinstance(pad, bytes) else str(pad)
            if pad not in ("same", "valid"):
                raise self.fail(name, node, f"padding {pad!r} is not 'same', 'valid' or integers")
        else:
            pad = self.ints(name, node, "padding", nd, 0)
        groups = int(self.ints(name, node, "groups", 1, 1))
        if int(w.shape[0]) % groups:
            raise self.fail(
                name, node, f"field 'groups' = {groups} does not divide the {w.shape[0]} outputs"
            )
        bias = self.bias(name, node, int(w.shape[0]))
        m = cls(
            int(w.shape[1]) * groups,
            int(w.shape[0]),
            tuple(int(k) for k in w.shape[2:]),
            stride=self.ints(name, node, "stride", nd, 1),
            padding=pad,
            dilation=self.ints(name, node, "dilation", nd, 1),
            groups=groups,
            bias=True,
            step_mode="m",
        )
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(bias)
        return m

    def map_pool(self, name: str, node: Any) -> nn.Module:
        from snncompile import layer

        divisor = 1 if type(node).__name__ == "SumPool2d" else None
        kernel = self.ints(name, node, "kernel_size", 2, 1)
        padding = self.ints(name, node, "padding", 2, 0)
        if any(2 * p > k for p, k in zip(padding, kernel, strict=True)):
            raise self.fail(
                name, node, f"field 'padding' {padding} is more than half the kernel {kernel}"
            )
        return layer.AvgPool2d(
            kernel,
            stride=self.ints(name, node, "stride", 2, 1),
            padding=padding,
            divisor_override=divisor,
            step_mode="m",
        )

    def map_flatten(self, name: str, node: Any) -> nn.Module:
        from snncompile import layer

        start = int(self.ints(name, node, "start_dim", 1, -(2**31)))
        end = int(self.ints(name, node, "end_dim", 1, -(2**31)))
        return layer.Flatten(
            start + 1 if start >= 0 else start, end + 1 if end >= 0 else end, step_mode="m"
        )

    def map_scale(self, name: str, node: Any) -> nn.Module:
        from snncompile.nir_modules import Scale

        return Scale(self.field(name, node, "scale"))

    def map_threshold(self, name: str, node: Any) -> nn.Module:
        from snncompile.nir_modules import Threshold

        return Threshold(self.field(name, node, "threshold"))

    def module_for(self, name: str, node: Any) -> nn.Module:
        table: dict[str, Callable[[str, Any], nn.Module]] = {
            "Affine": self.map_affine,
            "Linear": self.map_affine,
            "Conv1d": self.map_conv,
            "Conv2d": self.map_conv,
            "SumPool2d": self.map_pool,
            "AvgPool2d": self.map_pool,
            "Flatten": self.map_flatten,
            "IF": self.map_if,
            "LIF": self.map_lif,
            "LI": self.map_li,
            "I": self.map_i,
            "CubaLIF": self.map_cuba,
            "CubaLI": self.map_cuba,
            "Scale": self.map_scale,
            "Threshold": self.map_threshold,
        }
        kind = type(node).__name__
        fn = table.get(kind)
        if fn is None:
            raise self.fail(
                name,
                node,
                "has no snncompile equivalent. Supported: Input, Output, "
                + ", ".join(table)
                + ". Replace it in the source model (nested NIRGraph subgraphs: flatten them "
                "first; Delay: not supported).",
            )
        try:
            return fn(name, node)
        except NIRImportError:
            raise
        except (ValueError, TypeError, RuntimeError, IndexError, KeyError, AttributeError) as err:
            # A module refused a value the checks above did not anticipate: still name the node.
            raise self.fail(name, node, f"{type(err).__name__}: {err}") from err

    # -- wiring --
    def build(self) -> fx.GraphModule:
        from snncompile.nir_modules import RecurrentBlock

        g = self.graph
        names = list(g.nodes)
        preds: dict[str, list[str]] = {n: [] for n in names}
        succs: dict[str, list[str]] = {n: [] for n in names}
        for a, b in g.edges:
            if a not in preds or b not in preds:
                raise NIRImportError(f"import_nir: edge ({a!r}, {b!r}) names a missing node")
            preds[b].append(a)
            succs[a].append(b)
        inputs = [n for n in names if type(g.nodes[n]).__name__ == "Input"]
        outputs = [n for n in names if type(g.nodes[n]).__name__ == "Output"]
        if not inputs or not outputs:
            raise NIRImportError("import_nir: the graph needs at least one Input and one Output")
        comps = _sccs(names, succs)
        root = nn.Module()
        fxg = fx.Graph()
        values: dict[str, fx.Node] = {}
        used: set[str] = set()

        def attr_name(base: str) -> str:
            # An ASCII identifier that is no attribute of nn.Module / fx.GraphModule (a node
            # called 'forward', 'graph' or 'training' must not shadow them) and not yet used.
            key = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in base)
            key = key or "node"
            if key[0].isdigit() or keyword.iskeyword(key) or key in _RESERVED_NAMES:
                key = "n_" + key
            while key in used or key in _RESERVED_NAMES:
                key += "_"
            used.add(key)
            return key

        def summed(srcs: list[str]) -> fx.Node:
            total = values[srcs[0]]
            for s in srcs[1:]:
                total = fxg.call_function(operator.add, (total, values[s]))
            return total

        for n in inputs:
            values[n] = fxg.placeholder(attr_name(n))
        # Components come out of Tarjan's algorithm in reverse topological order.
        for comp in reversed(comps):
            first = comp[0]
            node = g.nodes[first]
            kind = type(node).__name__
            cyclic = len(comp) > 1 or first in succs[first]
            if not cyclic:
                if kind == "Input":
                    continue
                if not preds[first]:
                    raise self.fail(first, node, "has no incoming edge")
                if kind == "Output":
                    values[first] = summed(preds[first])
                    continue
                key = attr_name(first)
                root.add_module(key, self.module_for(first, node))
                values[first] = fxg.call_module(key, (summed(preds[first]),))
                continue
            members = set(comp)
            for n in comp:
                if type(g.nodes[n]).__name__ in ("Input", "Output"):
                    raise self.fail(n, g.nodes[n], "Input/Output nodes cannot be part of a cycle")
            delayed = {
                (a, b)
                for b in comp
                for a in preds[b]
                if a in members and type(g.nodes[a]).__name__ in _NEURON_TYPES
            }
            order = _toposort_within(comp, preds, members, delayed)
            if order is None:
                raise NIRImportError(
                    "import_nir: the cycle through nodes "
                    + ", ".join(repr(c) for c in sorted(comp))
                    + " contains no neuron, so it is an algebraic loop without a state to delay; "
                    "NIR gives it no meaning. Put a neuron in the loop."
                )
            cells = []
            for n in order:
                cell = self.module_for(n, g.nodes[n])
                for sub in cell.modules():
                    if hasattr(sub, "step_mode") and "s" in getattr(
                        sub, "supported_step_mode", ("s",)
                    ):
                        sub.step_mode = "s"
                cells.append((n, cell))
            sources = {b: [(a, (a, b) in delayed) for a in preds[b] if a in members] for b in comp}
            ext_args: list[fx.Node] = []
            entries: list[str] = []
            for b in order:
                outside = [a for a in preds[b] if a not in members]
                if outside:
                    ext_args.append(summed(outside))
                    entries.append(b)
            if not entries:
                raise NIRImportError(
                    f"import_nir: the cycle through {sorted(comp)} receives no input from the rest "
                    "of the graph"
                )
            outs = [n for n in order if any(s not in members for s in succs[n])]
            shapes = {}
            for a, _ in delayed:
                out_t = g.nodes[a].output_type.get("output")
                if out_t is None:
                    raise self.fail(a, g.nodes[a], "needs a known output shape inside a cycle")
                shapes[a] = tuple(int(d) for d in np.asarray(out_t).reshape(-1))
            block = RecurrentBlock(cells, sources, entries, outs, shapes, step_mode="m")
            key = attr_name("recurrent_" + "_".join(order))
            root.add_module(key, block)
            res = fxg.call_module(key, tuple(ext_args))
            if len(outs) == 1:
                values[outs[0]] = res
            else:
                for i, n in enumerate(outs):
                    values[n] = fxg.call_function(operator.getitem, (res, i))
        result = [values[n] for n in outputs]
        fxg.output(result[0] if len(result) == 1 else tuple(result))
        gm = fx.GraphModule(root, fxg, class_name="NIRImported")
        gm.meta_nir = {"dt": self.dt, "inputs": inputs, "outputs": outputs}  # type: ignore[attr-defined]
        return gm


def _ints(value: Any, n: int) -> Any:
    a = np.asarray(value).reshape(-1)
    vals = tuple(int(v) for v in a)
    if len(vals) == 1:
        vals = vals * n
    return vals[0] if n == 1 else vals


def _sccs(names: list[str], succs: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative), in reverse topological order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in names:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack.add(v)
            recurse = False
            nbrs = succs[v]
            while i < len(nbrs):
                w = nbrs[i]
                i += 1
                if w not in index:
                    work.append((v, i))
                    work.append((w, 0))
                    recurse = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if recurse:
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                order = {n: k for k, n in enumerate(names)}
                out.append(sorted(comp, key=order.__getitem__))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return out


def _toposort_within(
    comp: list[str],
    preds: dict[str, list[str]],
    members: set[str],
    delayed: set[tuple[str, str]],
) -> list[str] | None:
    """Order the members along the non-delayed edges, or ``None`` if those still form a cycle."""
    deps = {b: {a for a in preds[b] if a in members and (a, b) not in delayed} for b in comp}
    order: list[str] = []
    ready = [n for n in comp if not deps[n]]
    while ready:
        n = ready.pop(0)
        order.append(n)
        for b in comp:
            if n in deps[b]:
                deps[b].discard(n)
                if not deps[b] and b not in order and b not in ready:
                    ready.append(b)
    return order if len(order) == len(comp) else None


# =================================================================================================
# reading files: declared sizes first, then the data
# =================================================================================================
def _describe_bytes(n: int) -> str:
    return f"{n} bytes ({n / 2**30:.2f} GiB)" if n >= 2**20 else f"{n} bytes"


def _declared_bytes(group: Any, where: str, depth: int, found: list[tuple[int, str, str]]) -> None:
    """Collect ``(declared bytes, path, what)`` of every dataset under ``group`` (no data read).

    The walk is the one ``nir.read`` makes (every member of every group); soft and external
    links are refused (``nir.write`` writes none, and an external link reads another file), and
    a nesting deeper than :data:`_MAX_DEPTH` (a hard-link cycle) is refused.
    """
    import h5py

    if depth > _MAX_DEPTH:
        raise NIRImportError(
            f"import_nir: {where!r} is nested more than {_MAX_DEPTH} groups deep (a cycle of "
            "HDF5 links?); a file written by nir.write is not"
        )
    for key in group.keys():
        path = f"{where}/{key}"
        link = group.get(key, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise NIRImportError(
                f"import_nir: {path!r} is an HDF5 {type(link).__name__}; NIR files written by "
                "nir.write contain only groups and datasets, and links could read other files"
            )
        item = group[key]
        if isinstance(item, h5py.Group):
            _declared_bytes(item, path, depth + 1, found)
        elif isinstance(item, h5py.Dataset):
            shape = item.shape or ()
            count = 1
            for d in shape:
                count *= int(d)
            found.append((count * int(item.dtype.itemsize), path, f"shape {shape}, {item.dtype}"))
        else:  # pragma: no cover - h5py exposes only groups and datasets through hard links
            raise NIRImportError(f"import_nir: {path!r} is neither a group nor a dataset")


def _read_tree(group: Any) -> dict[str, Any]:
    """The nested dict ``nir.read`` builds from the ``node`` group (after the size check)."""
    import h5py

    out: dict[str, Any] = {}
    for key, item in group.items():
        key = key.decode("utf8") if isinstance(key, bytes) else key
        if isinstance(item, h5py.Group):
            out[key] = _read_tree(item)
        else:
            value = item[()]
            out[key] = value.decode("utf8") if isinstance(value, bytes) else value
    return out


def _node_from_tree(nir: Any, name: str, tree: Any) -> Any:
    """One NIR node from its dict, with errors that name the node (and the field)."""
    if not isinstance(tree, dict):
        raise NIRImportError(f"import_nir: NIR node {name!r}: stored as a dataset, not a group")
    kind = tree.get("type")
    if isinstance(kind, np.ndarray) and kind.shape == ():
        kind = kind.item()
    if isinstance(kind, bytes):
        kind = kind.decode("utf8", "replace")
    known = [n for n in _NIR_NODE_TYPES if hasattr(nir, n)]
    if kind not in known:
        raise NIRImportError(
            f"import_nir: NIR node {name!r}: field 'type' is {kind!r}, not a NIR node type "
            f"({', '.join(known)})"
        )
    if kind == "NIRGraph":
        return _graph_from_tree(nir, tree, f"subgraph {name!r}")
    fields = dict(tree)
    fields["type"] = kind
    try:
        return nir.dict2NIRNode(fields)
    except Exception as err:  # noqa: BLE001 - any failure of the nir constructors
        raise NIRImportError(
            f"import_nir: NIR node {name!r} ({kind}): its fields cannot be read: "
            f"{type(err).__name__}: {err}"
        ) from err


def _graph_from_tree(nir: Any, tree: dict[str, Any], what: str = "the graph") -> Any:
    for key in ("nodes", "edges"):
        if key not in tree:
            raise NIRImportError(f"import_nir: {what} has no {key!r} entry")
    nodes_tree = tree["nodes"]
    if not isinstance(nodes_tree, dict):
        raise NIRImportError(f"import_nir: {what}: 'nodes' must be a group of nodes")
    nodes = {str(k): _node_from_tree(nir, str(k), v) for k, v in nodes_tree.items()}
    raw = np.asarray(tree["edges"], dtype=object)
    if raw.size and (raw.ndim != 2 or raw.shape[1] != 2):
        raise NIRImportError(
            f"import_nir: {what}: 'edges' must be a list of (source, target) pairs, got an array "
            f"of shape {raw.shape}"
        )
    edges = []
    for a, b in raw.reshape(-1, 2):
        a = a.decode("utf8", "replace") if isinstance(a, bytes) else str(a)
        b = b.decode("utf8", "replace") if isinstance(b, bytes) else str(b)
        edges.append((a, b))
    metadata = tree.get("metadata", {})
    if not isinstance(metadata, dict):
        raise NIRImportError(f"import_nir: {what}: 'metadata' must be a group")
    try:
        return nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata, type_check=True)
    except Exception as err:  # noqa: BLE001 - nir's structure and type checks
        raise NIRImportError(
            f"import_nir: {what} fails NIR's structure/type check: {type(err).__name__}: {err}"
        ) from err


def _read_file(nir: Any, path: str | Path, max_bytes: int | None) -> Any:
    """Read a NIR file like ``nir.read``, after checking its declared dataset sizes."""
    import h5py

    try:
        f = h5py.File(str(path), "r")
    except (OSError, ValueError) as err:
        raise NIRImportError(
            f"import_nir: cannot open {str(path)!r} as a NIR (HDF5) file: {err}"
        ) from err
    with f:
        if "node" not in f or not isinstance(f.get("node", getlink=True), h5py.HardLink):
            raise NIRImportError(
                f"import_nir: {str(path)!r} has no 'node' group; it is not a file written by "
                "nir.write"
            )
        found: list[tuple[int, str, str]] = []
        _declared_bytes(f["node"], "node", 0, found)
        total = sum(n for n, _, _ in found)
        if max_bytes is not None and total > max_bytes:
            size, where, what = max(found)
            raise NIRImportError(
                f"import_nir: {str(path)!r} declares {_describe_bytes(total)} of data in "
                f"{len(found)} datasets, more than max_bytes={max_bytes}; the largest is "
                f"{where!r} ({what}, {_describe_bytes(size)}). Nothing was read. A small file "
                "can declare huge compressed arrays; if you trust this one, pass a larger "
                "import_nir(..., max_bytes=...)."
            )
        tree = _read_tree(f["node"])
    return _graph_from_tree(nir, tree)


def import_nir(
    graph_or_path: Any,
    *,
    dt: float | None = None,
    integrator: str = "euler",
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> nn.Module:
    """Build a multi-step snncompile model from a NIR graph (or a file written by ``nir.write``).

    The result is an ``fx.GraphModule`` of snncompile modules in ``step_mode='m'``: it takes
    ``[T, N, *input shape]`` (one tensor per NIR ``Input``, in graph order) and returns
    ``[T, N, *output shape]`` (a tuple for several ``Output`` nodes). Reset its state between
    sequences with ``snncompile.functional.reset_net``; compile it with
    ``snncompile.optimize(module, example_input)``.

    Args:
        graph_or_path: A ``nir.NIRGraph`` or the path of a NIR (HDF5) file.
        dt: Euler step in seconds (see the module docstring). ``None`` takes
            ``graph.metadata['snncompile.dt']`` when the graph was written by :func:`export_nir`,
            else :data:`DEFAULT_DT` (``1e-4``, the SpikingJelly/snnTorch default).
        integrator: How ``r`` of ``IF`` and ``I`` nodes is read: ``'euler'`` (default; the
            membrane gains ``r * dt * I`` per step, SpikingJelly's and our convention) or
            ``'unit'`` (gains ``r * I`` per step, snnTorch's and Sinabs' convention).
        max_bytes: For a file: the most bytes its datasets may declare in all (shape times item
            size, summed), checked before any data is read, because a small compressed file
            can declare gigabytes. Default :data:`DEFAULT_MAX_BYTES` (1 GiB); ``None``: no limit.

    Raises:
        NIRImportError: a node type or parameter set has no snncompile equivalent, a parameter
            is invalid (non-finite, ``tau <= dt``, a bias of the wrong length, ...), the file
            declares more than ``max_bytes`` or is malformed, or the graph's structure cannot
            be run; the message names the NIR node and the field.
        ImportError: the ``nir`` package is missing (``pip install snncompile[nir]``).
    """
    nir = _require_nir()
    if integrator not in ("euler", "unit"):
        raise ValueError(f"import_nir: integrator must be 'euler' or 'unit', got {integrator!r}")
    if max_bytes is not None and (
        isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0
    ):
        raise ValueError(
            f"import_nir: max_bytes must be a non-negative int or None, got {max_bytes!r}"
        )
    graph = graph_or_path
    if isinstance(graph_or_path, (str, Path)):
        graph = _read_file(nir, graph_or_path, max_bytes)
    if not isinstance(graph, nir.NIRGraph):
        raise TypeError(
            f"import_nir: expected a nir.NIRGraph or a file path, got {type(graph).__name__}"
        )
    if dt is None:
        md = _meta(graph)
        dt = DEFAULT_DT
        if "snncompile.dt" in md:
            try:
                dt = float(md["snncompile.dt"])
            except (TypeError, ValueError) as err:
                raise NIRImportError(
                    f"import_nir: graph metadata 'snncompile.dt'={md['snncompile.dt']!r} is not "
                    "a number; pass dt= explicitly"
                ) from err
    dt = _check_dt(dt, "import_nir")
    return _Importer(graph, dt, integrator).build()
