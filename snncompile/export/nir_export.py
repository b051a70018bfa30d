"""NIR export: the optimized inference IR of an SNN -> ``nir.NIRGraph`` (:func:`export_nir`).

The IR is walked in order (as the ONNX emitter does); each IR op has an entry in
:data:`_EXPORT_OPS`. Neurons are mapped by their dynamics pattern
(:mod:`snncompile.export.nir_patterns`): one forward-Euler step of length ``dt`` of NIR's
ODE is our per-step update (the conversions are in :mod:`snncompile.export.nir`).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from snncompile.dynamics.surrogates import SPIKINGJELLY_SURROGATE_MODULE
from snncompile.export.nir_format import (
    DEFAULT_DT,
    RESET_KEY,
    SURROGATE_KEY,
    V_INIT_KEY,
    NIRExportError,
    check_dt,
    require_nir,
)
from snncompile.ir.graph import Graph, Node
from snncompile.ir.ops import Layout, Op


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
        self.nir = require_nir()
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
                f"so it is stored as node metadata {V_INIT_KEY!r}. snncompile.import_nir "
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
        if not known or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            self.unknown_surrogates.append(f"%{node.name} ({cls.__module__}.{cls.__qualname__})")
            return
        meta[SURROGATE_KEY] = cls.__name__
        for pname, value in zip(ours.param_names, values, strict=True):
            meta[f"{SURROGATE_KEY}_{pname}"] = float(value)

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
                node,
                f"{what} has no NIR equivalent (of the elementwise ops, only ann2snn's "
                "VoltageScale maps to NIR Scale)",
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
        if (
            src.shape is None
            or node.shape is None
            or (src.shape[:lead_in] != node.shape[:lead_out])
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
            RESET_KEY: "subtract" if soft else "hard",
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
                    node,
                    f"starts at v_init={v_init}; only ann2snn's half-threshold IF neurons "
                    "(soft reset, v_init = v_threshold / 2) can be exported with their start",
                )
            meta[V_INIT_KEY] = float(v_init)
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
    nir = require_nir()
    dt = check_dt(dt, "export_nir")
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
