"""ONNX export of compiled SNNs for inference (:func:`export_onnx`, :func:`onnx_initial_states`).

**Route.** We emit ONNX ourselves by walking the optimized SNN IR (after the inference passes:
BN folded, dropout gone) instead of re-tracing the model with ``torch.onnx.export``. Reasons:
the neuron state must become explicit graph inputs/outputs (SpikingJelly's own neurons export
with their membrane frozen as a constant under the dynamo exporter); each neuron must come from
its dynamics definition through one renderer table (:mod:`snncompile.codegen.onnx_renderer`),
the same expressions the torch/C/CUDA kernels render, so a new neuron type exports with no
exporter change; and the exact node list is ours (no unrolling, no dependence on onnxscript or
on which torch ops the dynamo exporter decomposes to). The ``torch._higher_order_ops.scan``
route of ``torch.onnx.export(dynamo=True)`` would give a ``Scan`` too, but only for code written
as a scan body, i.e. not for the IR we already have.

**One step, two wrappers.** Every IR layout collapses to one time step ``[N, *]``: ``flat``
values (``[T*N, *]``) and ``seq`` values (``[T, N, *]``) are both ``[N, *]`` at a single step,
``MERGE_TIME``/``SPLIT_TIME`` become no-ops, and a dimension argument ``d >= 1`` of a
sequence-level op becomes ``d - 1`` (``d = 0`` would mix time steps and is refused). The step
graph reads the input ``x_t`` and every state of every neuron (the membrane ``v``, and the extra
states of multi-state neurons), and returns the output ``y_t`` and the next states.

* ``mode='step'``: the step graph is the model. Inputs: the data input (``[N, *]``) then one
  input ``<neuron node>.<state>`` per neuron state (``.v``, then e.g. ``.w``); outputs: the model
  output(s) then ``<neuron node>.<state>_next`` in the same order.
* ``mode='sequence'``: the step graph is the body of one ONNX ``Scan`` over axis 0 of
  ``x: [T, N, *]`` (dynamic ``T`` and ``N``; the node count does not depend on ``T``). Initial
  states are built inside the graph (``ConstantOfShape`` with the batch size read from ``x``).
  Reductions over time (``x.mean(0)``, ``x.sum(0)``: a firing-rate readout) and every node that
  depends on them run after the ``Scan`` on the stacked per-step values.

**Metadata** (``model.metadata_props``), so runtimes without Python can build the states:

* ``snncompile.format``: ``"1"``; ``snncompile.mode``: ``"step"`` or ``"sequence"``;
* ``snncompile.states``: a JSON list, one object per neuron state in input order (``v``, then a
  multi-state neuron's extra states, e.g. Izhikevich's ``w``):
  ``{"node": IR node name, "state": state name, "input": state input name, "output": next-state
  output name, "shape": [-1, C, H, W] (-1 = batch), "dtype": "float32", "init": initial
  value}``. An extra state's ``init`` is the value its module registers; ``v``'s is
  the neuron's ``NeuronSpec.v_init`` when it has one (ann2snn's half-threshold IF neurons start
  at ``v_threshold / 2``), else ``v_reset`` (hard reset) or ``0.0`` (soft reset); the initial
  state is that value broadcast to ``shape`` with the batch size filled in. Sequence-mode models
  list their (internal) states too and start their ``Scan`` from the same values.

**Versions.** The opset defaults to :data:`DEFAULT_OPSET` (capped by what the installed
onnxruntime implements) and the IR version is the smallest one that declares that opset
(``onnx.helper.find_min_ir_version_for``), capped by the onnxruntime limit table
:data:`ORT_LIMITS` -- never onnx's own (newer) default, which onnxruntime may reject.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from snncompile.codegen.onnx_renderer import OnnxRenderError, render_onnx
from snncompile.codegen.render import evaluate
from snncompile.dynamics.neuron import NeuronDynamics, from_spec
from snncompile.export.onnx_builder import GraphBuilder, Initializers, NameSource
from snncompile.ir.graph import Graph, Node, Ref
from snncompile.ir.ops import Layout, Op, OpGroup

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "ORT_LIMITS",
    "OnnxExportError",
    "OnnxMetadataError",
    "export_onnx",
    "onnx_initial_states",
    "ort_limits",
    "pick_versions",
    "read_states",
]

#: The opset written by default: old enough for every onnxruntime of the last years, new enough
#: for everything we emit (GreaterOrEqual: 12, Scan with axes: 11, Clip with inputs: 11).
DEFAULT_OPSET = 17
#: The oldest opset we can emit (Scan/Clip/Reshape forms we use exist since 13).
MIN_OPSET = 13

#: ``(onnxruntime major, minor) -> (max IR version, max ai.onnx opset)`` it loads, from ORT's
#: version matrix; 1.31 was measured here (IR 14 is rejected, opset 26 is the last official).
#: A newer ORT than the last row gets the last row (ORT stays backward compatible).
ORT_LIMITS: list[tuple[tuple[int, int], tuple[int, int]]] = [
    ((1, 6), (7, 13)),
    ((1, 8), (7, 14)),
    ((1, 10), (8, 15)),
    ((1, 12), (8, 17)),
    ((1, 14), (8, 18)),
    ((1, 15), (9, 19)),
    ((1, 17), (9, 20)),
    ((1, 18), (10, 21)),
    ((1, 20), (10, 21)),
    ((1, 31), (13, 26)),
]

_STATES_KEY = "snncompile.states"
_DTYPES = {
    "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "bool": TensorProto.BOOL,
}


class OnnxExportError(ValueError):
    """The model cannot be exported; the message names the IR node/op and what to do."""


# -- versions -------------------------------------------------------------------------------------
def ort_limits(version: str | None = None) -> tuple[int, int]:
    """``(max IR version, max opset)`` that onnxruntime ``version`` (default: installed) loads."""
    if version is None:
        import onnxruntime

        version = onnxruntime.__version__
    parts = version.split(".")
    key = (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0))
    if key < ORT_LIMITS[0][0]:
        raise OnnxExportError(
            f"onnxruntime {version} is too old for snncompile's ONNX export (needs >= "
            f"{ORT_LIMITS[0][0][0]}.{ORT_LIMITS[0][0][1]}); upgrade onnxruntime."
        )
    limits = ORT_LIMITS[0][1]
    for ver, lim in ORT_LIMITS:
        if key >= ver:
            limits = lim
    return limits


def _min_ir(opset: int) -> int:
    return int(helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))


def pick_versions(opset: int | None = None, ort_version: str | None = None) -> tuple[int, int]:
    """Return ``(opset, ir_version)`` to write for the installed (or given) onnxruntime.

    ``opset=None`` picks ``min(DEFAULT_OPSET, ORT max)``; the IR version is the smallest that
    declares the opset (what ``onnx.helper.find_min_ir_version_for`` says), capped by ORT's limit.
    """
    max_ir, max_opset = ort_limits(ort_version)
    onnx_max = onnx.defs.onnx_opset_version()
    if opset is None:
        opset = min(DEFAULT_OPSET, max_opset, onnx_max)
        # Step down until the opset's IR version is one the runtime loads.
        while opset > MIN_OPSET and _min_ir(opset) > max_ir:
            opset -= 1
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise OnnxExportError(f"export_onnx: opset must be an int or None, got {opset!r}")
    if opset < MIN_OPSET or opset > min(max_opset, onnx_max):
        raise OnnxExportError(
            f"export_onnx: opset {opset} is outside what can be written and loaded here "
            f"([{MIN_OPSET}, {min(max_opset, onnx_max)}] for onnxruntime/onnx installed); "
            "pass opset=None for the default."
        )
    ir = _min_ir(opset)
    if ir > max_ir:
        raise OnnxExportError(
            f"export_onnx: opset {opset} needs ONNX IR version {ir}, but the installed "
            f"onnxruntime loads IR <= {max_ir}; pick a lower opset."
        )
    return opset, ir


# -- getting the inference IR ---------------------------------------------------------------------
def _inference_graph(model_or_compiled: nn.Module, example_input: torch.Tensor) -> Graph:
    """The optimized inference IR of a model or of an already compiled module."""
    from snncompile.api import optimize
    from snncompile.runtime.compiled import CompiledModule

    if isinstance(model_or_compiled, CompiledModule):
        compiled = model_or_compiled
        graph = compiled.graph.copy()
        # Scales merged into fused neurons (fuse_elementwise) are exported as the ops they were.
        # So are batchnorms and poolings merged into them (fuse_chains, which ran last).
        from snncompile.passes.fuse_chains import unfuse_chains
        from snncompile.passes.fuse_elementwise import unfuse_elementwise

        graph = unfuse_elementwise(unfuse_chains(graph).graph).graph
        if compiled.mode != "inference" or compiled.training:
            warnings.warn(
                "export_onnx: the compiled module was built for training; exporting it with "
                "inference semantics (eval-mode batchnorm with running statistics, no dropout). "
                "Compile with mode='inference' to fold batchnorms too.",
                stacklevel=3,
            )
            from snncompile.passes.base import PassManager
            from snncompile.passes.fold_batchnorm import fold_batchnorm
            from snncompile.passes.remove_dead_ops import remove_dead_ops

            graph.meta["mode"] = "inference"
            graph = PassManager([remove_dead_ops, fold_batchnorm]).run(graph)
        return graph
    if not isinstance(model_or_compiled, nn.Module):
        raise OnnxExportError(
            "export_onnx: expected an nn.Module or a snncompile CompiledModule, got "
            f"{type(model_or_compiled).__name__}"
        )
    model = model_or_compiled
    if model.training:
        warnings.warn(
            f"export_onnx: {type(model).__name__} is in training mode; exporting it in "
            "inference mode (BN folded with running statistics, dropout removed). Call "
            "model.eval() before exporting to silence this warning.",
            stacklevel=3,
        )
    # optimize(mode='inference') copies a training-mode model into eval mode itself; the torch
    # backend keeps neurons as NEURON nodes (the fused ones carry the same dynamics anyway).
    return optimize(model, example_input, mode="inference", backend="torch").graph


# -- the step emitter -----------------------------------------------------------------------------
@dataclasses.dataclass
class _T:
    """An ONNX tensor value in the environment (distinguishes names from Python strings)."""

    name: str


@dataclasses.dataclass
class _Stacked:
    """A per-step value stacked over time by the ``Scan`` (``[T, N, *]``), after the loop."""

    name: str


@dataclasses.dataclass
class _Unknown:
    """A non-tensor IR value (e.g. ``x.size(0)``) that the export does not compute."""

    node: Node


@dataclasses.dataclass
class StateInfo:
    """One neuron state of an exported model (see the module docstring, metadata)."""

    node: str
    input: str
    output: str
    shape: tuple[int, ...]  # per-step shape without the batch dimension
    init: float
    dynamics: NeuronDynamics
    uniforms: tuple[float, ...]
    state: str = "v"  # which state of the neuron ('v', or an extra state such as 'w')


def state_key(node: str, state: str) -> str:
    """The key of one neuron state in the exporter's tables: the node name for ``v``,
    ``node/state`` for an extra state."""
    return node if state == "v" else f"{node}/{state}"


def _time_shift(node: Node) -> int:
    """1 when the node's own dims are ``[T, N, *]`` (a sequence-level op), else 0."""
    return 1 if node.layout is Layout.SEQ and not node.attrs.get("per_step") else 0


def _step_shape(node: Node) -> tuple[int, ...] | None:
    """The per-step feature shape (without batch) of a node's value, or ``None``."""
    if node.shape is None:
        return None
    if node.layout is Layout.SEQ:
        return tuple(node.shape[2:])
    if node.layout is Layout.NONE:
        return None
    return tuple(node.shape[1:])


def _sj_spec(node: Node) -> Any:
    """A ``NeuronSpec``-like record for a SpikingJelly neuron (from the IR attrs)."""
    m = node.module
    a = node.attrs
    return dataclasses.make_dataclass(
        "SJSpec",
        ["kind", "v_threshold", "v_reset", "tau", "decay_input", "detach_reset", "surrogate", "w"],
    )(
        a["kind"],
        float(a["v_threshold"]),
        a["v_reset"],
        a.get("tau"),
        bool(a.get("decay_input", False)),
        bool(a.get("detach_reset", False)),
        getattr(m, "surrogate_function", None),
        getattr(m, "w", None),
    )


def _module_dynamics(node: Node) -> NeuronDynamics:
    """The dynamics a snncompile neuron module defines (its captured charge for a subclass
    that overrides ``neuronal_charge``). A spiking neuron whose surrogate has no expression form
    exports all the same: its forward is the Heaviside step whatever the surrogate."""
    from snncompile.dynamics.surrogates import SurrogateExpr
    from snncompile.runtime.fused_backends import (
        REASONS,
        dynamics_for,
        overridden_step_methods,
    )

    m = node.module
    dyn = dynamics_for(m)
    if dyn is not None:
        return dyn
    why = REASONS.get(type(m), "no expression form")
    if not getattr(m.surrogate_function, "spiking", True):
        raise OnnxExportError(
            f"export_onnx: neuron node %{node.name} ({type(m).__name__}): {why} (a non-spiking "
            "surrogate's forward must be rendered)."
        )
    try:
        stand_in = m.define_dynamics(SurrogateExpr("Sigmoid", (4.0,)))
    except NotImplementedError as err:
        raise OnnxExportError(
            f"export_onnx: neuron node %{node.name} ({type(m).__name__}) has no dynamics "
            f"definition: {err}"
        ) from err
    if overridden_step_methods(type(m)):
        raise OnnxExportError(
            f"export_onnx: neuron node %{node.name} ({type(m).__name__}): {why}; it has no ONNX "
            "rendering."
        )
    return stand_in


def neuron_dynamics(node: Node) -> tuple[NeuronDynamics, tuple[float, ...]]:
    """The dynamics of a neuron IR node and the float32 values of its per-call uniforms.

    Uniforms (parameter-only sub-expressions such as PLIF's ``sigmoid(w)``) are evaluated once
    with PyTorch, exactly as the module computes them, and baked into the model as constants.
    """
    dyn = node.attrs.get("dynamics")
    m = node.module
    spec = None
    if not isinstance(dyn, NeuronDynamics) and callable(getattr(m, "define_dynamics", None)):
        dyn = _module_dynamics(node)
    if not isinstance(dyn, NeuronDynamics):
        spec_fn = getattr(m, "dynamics_spec", None)
        spec = spec_fn() if callable(spec_fn) else node.attrs.get("_spec")
        if spec is None and node.attrs.get("source") == "spikingjelly":
            spec = _sj_spec(node)
        if spec is None:
            raise OnnxExportError(
                f"export_onnx: neuron node %{node.name} ({type(m).__name__}) has no dynamics "
                "definition (no dynamics_spec()); it has no ONNX rendering."
            )
        try:
            dyn = from_spec(spec)
        except ValueError as err:
            if not getattr(spec.surrogate, "spiking", True):
                raise OnnxExportError(
                    f"export_onnx: neuron node %{node.name}: {err} (a non-spiking surrogate's "
                    "forward must be rendered)."
                ) from err
            # A spiking neuron's forward is the Heaviside step whatever its surrogate: swap in a
            # registered one (only gradients, which are not exported, would differ).
            from snncompile import surrogate as sg

            dyn = from_spec(dataclasses.replace(spec, surrogate=sg.Sigmoid()))
    program = dyn.step_program()
    env: dict[str, Any] = {}
    for pname in dyn.param_names:
        value = getattr(spec, pname, None) if spec is not None else None
        if value is None:
            value = getattr(m, pname, None)
        if value is None:
            raise OnnxExportError(
                f"export_onnx: neuron node %{node.name}: no value for dynamics parameter "
                f"{pname!r} (looked at its spec and module attributes)."
            )
        env[pname] = torch.as_tensor(value).detach().to("cpu", torch.float32)
    with torch.no_grad():
        got = evaluate({f"u{i}": u for i, u in enumerate(program.uniforms)}, env)
    values = tuple(float(torch.as_tensor(got[f"u{i}"]).float()) for i in range(len(got)))
    return dyn, values


class _Emitter:
    """Emits one time step of an IR graph into a :class:`GraphBuilder`."""

    def __init__(
        self,
        graph: Graph,
        b: GraphBuilder,
        *,
        opset: int = DEFAULT_OPSET,
        post: frozenset[str] = frozenset(),
        passthrough: frozenset[str] = frozenset(),
    ) -> None:
        self.graph = graph
        self.b = b
        self.opset = opset
        self.post = post  # nodes computed after the time loop, on [N, *] values
        self.passthrough = passthrough  # nodes that are the identity at one step (a repeat)
        self.env: dict[str, Any] = {}

    def shift(self, node: Node) -> int:
        """1 when the node's own dims are ``[T, N, *]`` (a sequence-level op), else 0."""
        return 0 if node.name in self.post else _time_shift(node)

    def step_shape(self, node: Node) -> tuple[int, ...] | None:
        """Per-step feature shape (without batch) of a node's value."""
        if node.name in self.post and node.shape is not None:
            return tuple(node.shape[1:])
        return _step_shape(node)

    def lead(self, node: Node) -> int:
        """How many leading (time/batch) dims the node's recorded shape has."""
        return 2 if node.layout is Layout.SEQ and node.name not in self.post else 1

    # -- helpers for the op table --
    def fail(self, node: Node, why: str) -> OnnxExportError:
        """An error naming the node and its op."""
        what = node.attrs.get("path") or (
            getattr(node.target, "__name__", None) or (node.target if node.target else "")
        )
        where = f"%{node.name} (op {node.op.name}{', ' + str(what) if what else ''})"
        return OnnxExportError(f"export_onnx: IR node {where}: {why}")

    def resolve(self, node: Node, template: Any) -> Any:
        """An argument template with ``Ref``s replaced by environment values."""
        if isinstance(template, Ref):
            return self.env[node.inputs[template.index]]
        if isinstance(template, tuple):
            return tuple(self.resolve(node, t) for t in template)
        if isinstance(template, list):
            return [self.resolve(node, t) for t in template]
        if isinstance(template, dict):
            return {k: self.resolve(node, v) for k, v in template.items()}
        return template

    def arg(self, node: Node, pos: int, kw: str, default: Any = None) -> Any:
        """Argument ``pos``/``kw`` of the node's recorded call, resolved (or ``default``)."""
        args = node.attrs.get("args") or ()
        kwargs = node.attrs.get("kwargs") or {}
        if kw in kwargs:
            return self.resolve(node, kwargs[kw])
        if pos < len(args):
            return self.resolve(node, args[pos])
        return default

    def tensor(self, node: Node, value: Any) -> str:
        """The ONNX name of a tensor-valued argument (numbers become float32 constants)."""
        if isinstance(value, _T):
            return value.name
        if isinstance(value, torch.Tensor):
            return self.b.inits.add(value.detach().cpu().numpy(), f"{node.name}_const")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return self.b.scalar(float(value))
        if isinstance(value, _Stacked):
            raise self.fail(
                node,
                "mixes a whole-sequence value [T, N, ...] with values reduced over time; only "
                "time reductions (mean/sum over dim 0) may read the per-step results",
            )
        if isinstance(value, _Unknown):
            raise self.fail(
                node,
                f"reads %{value.node.name}, a non-tensor value computed at run time "
                f"({value.node.op.name}), which the ONNX export does not compute",
            )
        raise self.fail(node, f"argument {value!r} has no ONNX form")

    def data(self, node: Node) -> str:
        """The node's first (data) input as an ONNX name."""
        value = self.arg(node, 0, "input", _T_missing)
        if value is _T_missing:
            raise self.fail(node, "has no recorded data input (no call arguments)")
        return self.tensor(node, value)

    def dim(self, node: Node, d: int) -> int:
        """A dimension argument of the node, in per-step terms."""
        shift = self.shift(node)
        if d >= 0 and shift:
            if d == 0:
                raise self.fail(
                    node,
                    "operates over the time dimension (dim 0 of a [T, N, ...] value); only "
                    "per-time-step computations can be exported",
                )
            return d - shift
        return d

    def in_shape(self, node: Node, i: int = 0) -> tuple[int, ...] | None:
        """Per-step feature shape of input ``i``."""
        return self.step_shape(self.graph[node.inputs[i]]) if node.inputs else None

    # -- the walk --
    def run(
        self, x_name: str, states: dict[str, str], infos: dict[str, StateInfo]
    ) -> tuple[list[tuple[str, Node]], dict[str, str]]:
        """Emit the step; return ``[(output value, producing IR node)]`` and next states."""
        inputs = self.graph.input_nodes
        if len(inputs) != 1:
            raise OnnxExportError(
                f"export_onnx: the model takes {len(inputs)} inputs; only single-input models "
                "can be exported."
            )
        next_states: dict[str, str] = {}
        outputs: list[tuple[str, Node]] = []
        for node in self.graph:
            if node.name in self.post:
                continue  # computed after the time loop (see run_post)
            if node.op is Op.INPUT:
                self.env[node.name] = _T(x_name)
            elif node.op is Op.CONSTANT:
                value = node.attrs.get("_value")
                self.env[node.name] = value
            elif node.op is Op.OUTPUT:
                outputs = self._outputs(node) if not self.post else []
            elif node.op.group is OpGroup.NEURON:
                spike, nxt = self._neuron(node, states, infos[node.name])
                self.env[node.name] = _T(spike)
                next_states.update(nxt)
            elif node.op in (Op.MERGE_TIME, Op.SPLIT_TIME) or node.name in self.passthrough:
                self.env[node.name] = self.env[node.inputs[0]]
            else:
                self._synapse(node)
        return outputs, next_states

    def _synapse(self, node: Node) -> None:
        if _is_time_reduction(node):
            raise self.fail(
                node,
                "reduces over time; in step mode each call sees one time step. Export with "
                "mode='sequence' (time reductions run after the Scan) or leave the reduction "
                "out of the exported model.",
            )
        entry = SYNAPSE_OPS.get(node.op)
        if entry is None:
            if not node.is_tensor and node.op in (Op.FUNCTION, Op.OPAQUE_FUNCTION):
                self.env[node.name] = _Unknown(node)  # e.g. x.size(0) for a view
                return
            raise self.fail(
                node,
                "has no ONNX rendering. Supported ops: "
                + ", ".join(sorted(o.name for o in SYNAPSE_OPS))
                + ", neurons, MERGE_TIME/SPLIT_TIME, mean/sum over time (sequence mode). "
                "Replace it by a supported layer or register a rendering in "
                "snncompile.export.onnx.SYNAPSE_OPS.",
            )
        self.env[node.name] = _T(entry(self, node))

    def crossing(self) -> list[Node]:
        """Per-step values that nodes after the loop read, plus per-step graph outputs."""
        out: dict[str, Node] = {}
        for node in self.graph:
            if node.name not in self.post:
                continue
            for name in node.inputs:
                src = self.graph[name]
                if name not in self.post and src.is_tensor and src.layout is not Layout.NONE:
                    out.setdefault(name, src)
        for name in self.graph.output_node.inputs:
            if name not in self.post:
                out.setdefault(name, self.graph[name])
        return list(out.values())

    def run_post(self, stacked: dict[str, str]) -> list[tuple[str, Node]]:
        """Emit the nodes after the time loop; ``stacked`` maps IR names to ``[T, N, *]`` values.

        Returns the graph outputs as ``[(value, IR node)]``.
        """
        for name, value in stacked.items():
            self.env[name] = _Stacked(value)
        for node in self.graph:
            if node.name not in self.post:
                continue
            if node.op.group is OpGroup.NEURON:
                raise self.fail(node, "a neuron after a reduction over time cannot be exported")
            if _is_time_reduction(node):
                self.env[node.name] = _T(_time_reduce(self, node))
            else:
                self._synapse(node)
        outs = []
        for value, src in self._outputs(self.graph.output_node):
            outs.append((value, src))
        return outs

    def _outputs(self, node: Node) -> list[tuple[str, Node]]:
        args = node.attrs.get("args") or (Ref(0),)
        value = args[0] if len(args) == 1 else args
        # Ref is a NamedTuple: test it before treating the value as a tuple of outputs.
        refs = (
            [value]
            if isinstance(value, Ref) or not isinstance(value, (tuple, list))
            else list(value)
        )
        out: list[tuple[str, Node]] = []
        for r in refs:
            if not isinstance(r, Ref):
                raise self.fail(node, f"the model returns {r!r}; only tensors can be exported")
            src = self.graph[node.inputs[r.index]]
            value = self.env[src.name]
            name = value.name if isinstance(value, _Stacked) else self.tensor(node, value)
            out.append((name, src))
        return out

    def _neuron(
        self, node: Node, states: dict[str, str], info: StateInfo
    ) -> tuple[str, dict[str, str]]:
        """Emit one neuron step; return the spike and ``{state key: next-state value}``."""
        args = node.attrs.get("args") or (Ref(0),)
        if len(args) != 1 or node.attrs.get("kwargs"):
            raise self.fail(node, "a neuron must be called with exactly one input tensor")
        x = self.tensor(node, self.resolve(node, args[0]))
        program = info.dynamics.step_program()
        names = {"x": x}
        names.update({s: states[state_key(node.name, s)] for s in program.state_names})
        names.update({f"u{i}": self.b.scalar(u) for i, u in enumerate(info.uniforms)})
        outputs = {"spike": program.spike, "v": program.v_next}
        outputs.update(dict(zip(program.extra_states, program.state_next, strict=True)))
        try:
            h = render_onnx(self.b, {"h": program.h}, names)["h"]
            out = render_onnx(self.b, outputs, {**names, "h": h})
        except OnnxRenderError as err:
            raise self.fail(node, str(err)) from err
        return out["spike"], {state_key(node.name, s): out[s] for s in program.state_names}


_T_missing = object()


# -- a sequence built inside forward: x.unsqueeze(0).repeat(T, 1, ...) --------------------------
@dataclasses.dataclass
class _RepeatOverTime:
    """``x.unsqueeze(0).repeat(T, 1, ...)`` (or ``.expand(T, -1, ...)``) of the model input."""

    names: tuple[str, str]  # the unsqueeze node and the repeat node
    repeats: tuple[int, ...]  # ONNX Tile repeats: (T, 1, ..., 1)


def _int_sizes(node: Node) -> list[Any]:
    args = list(node.attrs.get("args") or ())[1:]
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = list(args[0])
    return args


def _repeat_over_time(graph: Graph) -> _RepeatOverTime | None:
    """Find a sequence built from an ``[N, *]`` input inside ``forward`` (SpikingJelly tutorials).

    At one time step ``x.unsqueeze(0).repeat(T, 1, ...)[t]`` is ``x``: both nodes are the
    identity in the step graph, and the sequence export tiles the input ``T`` times before its
    ``Scan`` (``T`` is the model's own constant). Other uses of the input are refused.
    """
    inputs = graph.input_nodes
    if len(inputs) != 1:
        return None
    users = graph.users_map()
    for node in graph:
        if node.op is not Op.FUNCTION or _call_name(node) not in ("repeat", "expand"):
            continue
        src = graph[node.inputs[0]] if node.inputs else None
        if src is None or src.op is not Op.FUNCTION or _call_name(src) != "unsqueeze":
            continue
        s_args = src.attrs.get("args") or ()
        s_dim = (src.attrs.get("kwargs") or {}).get("dim", s_args[1] if len(s_args) > 1 else None)
        if s_dim != 0 or not src.inputs or src.inputs[0] != inputs[0].name:
            continue
        sizes = _int_sizes(node)
        keep = 1 if _call_name(node) == "repeat" else -1
        if (
            not sizes
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes)
            or sizes[0] < 1
            or any(v != keep for v in sizes[1:])
            or (src.shape is not None and len(sizes) != len(src.shape))
        ):
            raise OnnxExportError(
                f"export_onnx: IR node %{node.name} ({_call_name(node)}) builds a sequence from "
                f"the input with sizes {sizes}; only x.unsqueeze(0).repeat(T, 1, ...) or "
                ".expand(T, -1, ...) with a constant T can be exported."
            )
        others = [u.name for u in users[inputs[0].name] if u.name != src.name] + [
            u.name for u in users[src.name] if u.name != node.name
        ]
        if others:
            raise OnnxExportError(
                f"export_onnx: the model input is repeated over time by %{node.name} and also "
                f"read directly by {sorted(others)}; only the repeated sequence can be exported."
            )
        return _RepeatOverTime((src.name, node.name), (sizes[0], *[1] * (len(sizes) - 1)))
    return None


# -- reductions over time (sequence mode, after the Scan) -----------------------------------------
def _call_name(node: Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def _is_time_reduction(node: Node) -> bool:
    """``x.mean(0)`` / ``x.sum(0)`` / ``torch.mean(x, 0)`` on a ``[T, N, *]`` value."""
    if node.op is not Op.FUNCTION or node.layout is not Layout.SEQ or node.attrs.get("per_step"):
        return False
    if _call_name(node) not in ("mean", "sum"):
        return False
    args = node.attrs.get("args") or ()
    kwargs = dict(node.attrs.get("kwargs") or {})
    dim = kwargs.pop("dim", args[1] if len(args) > 1 else None)
    keepdim = kwargs.pop("keepdim", args[2] if len(args) > 2 else False)
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    return dim == 0 and keepdim is False and not kwargs and len(args) <= 3


def _time_reduce(e: _Emitter, node: Node) -> str:
    value = e.arg(node, 0, "input")
    if not isinstance(value, _Stacked):
        raise e.fail(node, "reduces over time a value that is not a per-step result")
    op_type = "ReduceMean" if _call_name(node) == "mean" else "ReduceSum"
    # ReduceSum takes axes as an input since opset 13, ReduceMean since opset 18.
    if op_type == "ReduceSum" or e.opset >= 18:
        axes = e.b.inits.int64([0], "time_axis")
        return e.b.node(op_type, [value.name, axes], node.name, keepdims=0)
    return e.b.node(op_type, [value.name], node.name, axes=[0], keepdims=0)


def _post_loop_nodes(graph: Graph) -> frozenset[str]:
    """Time reductions and every node that depends on one (they run after the loop)."""
    post: set[str] = set()
    for node in graph:
        if node.op is Op.OUTPUT:
            continue
        if _is_time_reduction(node) or any(i in post for i in node.inputs):
            post.add(node.name)
    return frozenset(post)


# -- the synapse op table: IR op -> emitter --------------------------------------------------------
def _pair(value: Any, n: int) -> list[int]:
    if isinstance(value, (tuple, list)):
        return [int(v) for v in value]
    return [int(value)] * n


def _conv(e: _Emitter, node: Node) -> str:
    m = node.module
    if m is None or not isinstance(m, (nn.Conv1d, nn.Conv2d)):
        raise e.fail(node, "functional convolutions have no ONNX rendering; use nn.Conv1d/2d")
    if m.padding_mode != "zeros":
        raise e.fail(node, f"padding_mode={m.padding_mode!r} is not exported; use 'zeros'")
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
    w = e.b.inits.add(m.weight.detach().cpu().float().numpy(), f"{node.name}.weight")
    ins = [e.data(node), w]
    if m.bias is not None:
        ins.append(e.b.inits.add(m.bias.detach().cpu().float().numpy(), f"{node.name}.bias"))
    return e.b.node(
        "Conv",
        ins,
        node.name,
        kernel_shape=k,
        strides=_pair(m.stride, nd),
        pads=pads,
        dilations=dil,
        group=int(m.groups),
    )


def _linear(e: _Emitter, node: Node) -> str:
    m = node.module
    if m is None or not isinstance(m, nn.Linear):
        raise e.fail(node, "functional linear layers have no ONNX rendering; use nn.Linear")
    x = e.data(node)
    shape = e.in_shape(node)
    wt = m.weight.detach().cpu().float().numpy()
    bias = None if m.bias is None else m.bias.detach().cpu().float().numpy()
    if shape is not None and len(shape) == 1:  # [N, F]: one Gemm, like torch's addmm
        w = e.b.inits.add(wt, f"{node.name}.weight")
        ins = [x, w] + ([e.b.inits.add(bias, f"{node.name}.bias")] if bias is not None else [])
        return e.b.node("Gemm", ins, node.name, transB=1)
    y = e.b.node("MatMul", [x, e.b.inits.add(wt.T.copy(), f"{node.name}.weight_t")], node.name)
    if bias is not None:
        y = e.b.node("Add", [y, e.b.inits.add(bias, f"{node.name}.bias")], node.name)
    return y


def _batchnorm(e: _Emitter, node: Node) -> str:
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


def _pool(e: _Emitter, node: Node) -> str:
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


def _adaptive_avgpool(e: _Emitter, node: Node) -> str:
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
    e: _Emitter, node: Node, x: str, spatial: list[int], out: list[int]
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


def _voting(e: _Emitter, node: Node) -> str:
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


def _sj_class(module_path: str, name: str) -> type | None:
    import sys

    mod = sys.modules.get(module_path)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls if isinstance(cls, type) else None


def _opaque_module(e: _Emitter, node: Node) -> str:
    """Opaque modules with a known inference form (SpikingJelly layers without a rule)."""
    m = node.module
    voting = _sj_class("spikingjelly.activation_based.layer", "VotingLayer")
    if voting is not None and isinstance(m, voting):
        return _voting(e, node)
    raise e.fail(
        node,
        f"opaque module {type(m).__name__} (it runs as written in PyTorch) has no ONNX rendering; "
        "replace it by supported layers or register a rendering in "
        "snncompile.export.onnx.SYNAPSE_OPS.",
    )


def _reshape(e: _Emitter, node: Node) -> str:
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


def _binary_op(op_type: str) -> Callable[[_Emitter, Node], str]:
    def emit(e: _Emitter, node: Node) -> str:
        a = e.arg(node, 0, "input")
        b = e.arg(node, 1, "other")
        alpha = e.arg(node, 2, "alpha", 1)
        if alpha != 1:
            raise e.fail(node, "alpha != 1 is not exported")
        return e.b.node(op_type, [e.tensor(node, a), e.tensor(node, b)], node.name)

    return emit


def _cat(e: _Emitter, node: Node) -> str:
    tensors = e.arg(node, 0, "tensors")
    dim = e.arg(node, 1, "dim", 0)
    names = [e.tensor(node, t) for t in tensors]
    return e.b.node("Concat", names, node.name, axis=e.dim(node, int(dim)))


def _identity(e: _Emitter, node: Node) -> str:
    # Dropout is the identity at inference; Identity that survived the passes is too.
    return e.b.node("Identity", [e.data(node)], node.name)


def _clip(e: _Emitter, node: Node, x: str, lo: float | None, hi: float | None) -> str:
    ins = [x, e.b.scalar(lo) if lo is not None else "", e.b.scalar(hi) if hi is not None else ""]
    while ins and ins[-1] == "":
        ins.pop()
    return e.b.node("Clip", ins, node.name)


def _gelu(e: _Emitter, node: Node, x: str, approximate: str) -> str:
    if approximate != "none":
        raise e.fail(node, f"GELU(approximate={approximate!r}) is not exported")
    b = e.b
    z = b.node("Div", [x, b.scalar(2.0**0.5)], node.name)
    inner = b.node("Add", [b.node("Erf", [z], node.name), b.scalar(1.0)], node.name)
    return b.node("Mul", [b.node("Mul", [x, b.scalar(0.5)], node.name), inner], node.name)


def _elementwise(e: _Emitter, node: Node) -> str:
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
SYNAPSE_OPS: dict[Op, Callable[[_Emitter, Node], str]] = {
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
}


# -- model assembly -------------------------------------------------------------------------------
def _state_infos(graph: Graph, names: NameSource, prefix: str) -> dict[str, StateInfo]:
    infos: dict[str, StateInfo] = {}
    for node in graph:
        if node.op.group is not OpGroup.NEURON:
            continue
        shape = _step_shape(node)
        if shape is None:
            raise OnnxExportError(
                f"export_onnx: neuron node %{node.name} has no recorded shape; trace it with an "
                "example input."
            )
        dyn, uniforms = neuron_dynamics(node)
        for state in dyn.state_names:
            init = _initial_v(node, dyn) if state == "v" else _initial_state(node, dyn, state)
            infos[state_key(node.name, state)] = StateInfo(
                node=node.name,
                input=names.reserve(f"{prefix}{node.name}.{state}"),
                output=names.reserve(f"{prefix}{node.name}.{state}_next"),
                shape=tuple(int(s) for s in shape),
                init=init,
                dynamics=dyn,
                uniforms=uniforms,
                state=state,
            )
    return infos


def _initial_state(node: Node, dyn: NeuronDynamics, state: str) -> float:
    """An extra state's start: the module's registered reset value, else the dynamics' init."""
    reset_values = getattr(node.module, "_memories_rv", None) or {}
    value = reset_values.get(state)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return float(dyn.initial_states[state])


def _initial_v(node: Node, dyn: NeuronDynamics) -> float:
    """The membrane a neuron starts from: ``NeuronSpec.v_init`` if set, else the reset value.

    ``v_init`` differs from the reset value for ann2snn's ``HalfThresholdIFNode`` (half the
    threshold); the dynamics, and therefore ``dyn.reset_value``, are the plain IF ones.
    """
    spec_fn = getattr(node.module, "dynamics_spec", None)
    try:
        spec = spec_fn() if callable(spec_fn) else node.attrs.get("_spec")
    except NotImplementedError:  # a neuron without a NeuronSpec: its registered start
        return _initial_state(node, dyn, "v")
    if spec is not None:
        return float(spec.initial_v)
    v_init = node.attrs.get("v_init")
    return float(dyn.reset_value if v_init is None else v_init)


def _value_info(name: str, dtype: str | None, dims: Sequence[int | str]) -> onnx.ValueInfoProto:
    elem = _DTYPES.get(dtype or "float32")
    if elem is None:
        raise OnnxExportError(f"export_onnx: value {name!r} has dtype {dtype}, not exportable")
    return helper.make_tensor_value_info(name, elem, list(dims))


def _publish(b: GraphBuilder, value: str, public: str, renamed: dict[str, str]) -> str:
    """Make ``value`` available under the graph-output name ``public``.

    The producing node's output is renamed when possible (no extra node); ``renamed`` remembers
    earlier renames so a value published twice (or a graph input) gets an ``Identity`` instead.
    """
    source = renamed.get(value, value)
    if source == value and b.rename_output(value, public):
        renamed[value] = public
        return public
    b.nodes.append(helper.make_node("Identity", [source], [public], name=f"n_{public}"))
    return public


def _build(
    graph: Graph, mode: str, example: torch.Tensor, opset: int
) -> tuple[onnx.GraphProto, list[dict[str, Any]]]:
    """The ONNX graph for ``mode`` and the neuron-state metadata records."""
    names = NameSource()
    inits = Initializers(names)
    x_node = graph.input_nodes[0] if graph.input_nodes else None
    if x_node is None:
        raise OnnxExportError("export_onnx: the model has no input")
    if example.dtype != torch.float32:
        raise OnnxExportError(
            f"export_onnx: the example input is {example.dtype}; the ONNX export computes in "
            "float32 (pass a float32 example and model)."
        )
    repeat = _repeat_over_time(graph)
    # A model that repeats an [N, *] input over time itself takes [N, *] in both modes.
    feat = [int(s) for s in example.shape[1 if repeat else 2 :]]
    through = frozenset(repeat.names) if repeat else frozenset()
    x_public = names.reserve(x_node.name)
    if mode == "step":
        infos = _state_infos(graph, names, "")
        b = GraphBuilder(names, inits)
        emitter = _Emitter(graph, b, opset=opset, passthrough=through)
        outs, nxt = emitter.run(x_public, {k: i.input for k, i in infos.items()}, infos)
        taken: dict[str, str] = {}
        out_vis = []
        for k, (value, src) in enumerate(outs):
            public = names.reserve("output" if len(outs) == 1 else f"output_{k}")
            _publish(b, value, public, taken)
            shape = _step_shape(src) or ()
            out_vis.append(_value_info(public, src.dtype, ["N", *shape]))
        for key, info in infos.items():
            _publish(b, nxt[key], info.output, taken)
            out_vis.append(_value_info(info.output, "float32", ["N", *info.shape]))
        in_vis = [_value_info(x_public, "float32", ["N", *feat])]
        in_vis += [_value_info(i.input, "float32", ["N", *i.shape]) for i in infos.values()]
        g = helper.make_graph(b.nodes, "snncompile_step", in_vis, out_vis, inits.tensors)
        return g, _states_meta(infos)
    # sequence: the step graph as a Scan body; time reductions (and what follows) after it
    post = _post_loop_nodes(graph)
    infos = _state_infos(graph, names, "scan.")
    body = GraphBuilder(names, inits)
    x_t = names.reserve("scan.x_t")
    emitter = _Emitter(graph, body, opset=opset, post=post, passthrough=through)
    _, nxt = emitter.run(x_t, {k: i.input for k, i in infos.items()}, infos)
    taken: dict[str, str] = {}
    body_out_vis = []
    for key, info in infos.items():
        _publish(body, nxt[key], info.output, taken)
        body_out_vis.append(_value_info(info.output, "float32", ["N", *info.shape]))
    per_step = emitter.crossing()  # per-step values the loop stacks over T
    for k, src in enumerate(per_step):
        public = names.reserve(f"scan.y_{k}")
        _publish(body, emitter.tensor(src, emitter.env[src.name]), public, taken)
        body_out_vis.append(_value_info(public, src.dtype, ["N", *(_step_shape(src) or ())]))
    body_in_vis = [_value_info(i.input, "float32", ["N", *i.shape]) for i in infos.values()]
    body_in_vis.append(_value_info(x_t, "float32", ["N", *feat]))
    body_graph = helper.make_graph(body.nodes, "snncompile_step", body_in_vis, body_out_vis)

    main = GraphBuilder(names, inits)
    scan_in = x_public
    if repeat is not None:  # the sequence is built in the graph: Tile(Unsqueeze(x, 0))
        unsq = main.node("Unsqueeze", [x_public, inits.int64([0], "time_axis0")], "x_unsqueeze")
        scan_in = main.node(
            "Tile", [unsq, inits.int64(list(repeat.repeats), "time_repeats")], "x_seq"
        )
    init_states = []
    if infos:
        shape_x = main.node("Shape", [scan_in], "x_shape")
        n = main.node("Gather", [shape_x, inits.int64([1], "batch_index")], "batch", axis=0)
        for info in infos.values():
            dims = inits.int64(list(info.shape), f"{info.node}_dims")
            full = main.node("Concat", [n, dims], f"{info.node}_shape", axis=0)
            value = helper.make_tensor("value", TensorProto.FLOAT, [1], [info.init])
            init_states.append(
                main.node("ConstantOfShape", [full], f"{info.node}_{info.state}0", value=value)
            )
    final = [names.fresh(f"{i.node}_{i.state}_final") for i in infos.values()]
    stacked = [names.fresh(f"{src.name}_seq") for src in per_step]
    main.nodes.append(
        helper.make_node(
            "Scan",
            [*init_states, scan_in],
            [*final, *stacked],
            name="n_time_loop",
            body=body_graph,
            num_scan_inputs=1,
        )
    )
    after = _Emitter(graph, main, opset=opset, post=post)
    outs = after.run_post({src.name: st for src, st in zip(per_step, stacked, strict=True)})
    out_vis = []
    renamed: dict[str, str] = {}
    for k, (value, src) in enumerate(outs):
        public = names.reserve("output" if len(outs) == 1 else f"output_{k}")
        _publish(main, value, public, renamed)
        lead = ["N"] if src.name in post else ["T", "N"]
        out_vis.append(_value_info(public, src.dtype, [*lead, *(after.step_shape(src) or ())]))
    in_vis = [_value_info(x_public, "float32", ["N", *feat] if repeat else ["T", "N", *feat])]
    g = helper.make_graph(main.nodes, "snncompile_sequence", in_vis, out_vis, inits.tensors)
    return g, _states_meta(infos)


def _states_meta(infos: dict[str, StateInfo]) -> list[dict[str, Any]]:
    return [
        {
            "node": i.node,
            "state": i.state,
            "input": i.input,
            "output": i.output,
            "shape": [-1, *i.shape],
            "dtype": "float32",
            "init": i.init,
        }
        for i in infos.values()
    ]


_SIGNATURE = "export_onnx(model, example_input, path=None, *, mode='sequence', opset=None)"


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, Path)) or hasattr(value, "__fspath__")


def export_onnx(
    model_or_compiled: nn.Module,
    example_input: torch.Tensor,
    path: str | Path | None = None,
    *,
    mode: str = "sequence",
    opset: int | None = None,
) -> onnx.ModelProto:
    """Export an SNN (or a compiled module) to ONNX for inference and return the model.

    The argument order is that of :func:`snncompile.export_nir` and ``torch.onnx.export``:
    the model, an example input, then the file. A call in the order of older snncompile
    releases (``export_onnx(model, path, example_input)``) is refused with a ``TypeError`` that
    shows this order.

    Args:
        model_or_compiled: A SpikingJelly-style model (single- or multi-step) or the result of
            :func:`snncompile.optimize`. A model is compiled with ``mode='inference'`` first
            (BN folded, dropout removed); a training-mode model or compiled module is exported
            with inference semantics and a warning.
        example_input: A float32 ``[T, N, ...]`` example (shapes of the per-sample features are
            fixed by it; ``T`` and ``N`` stay dynamic).
        path: Where to write the ``.onnx`` file (``None``, the default: only return the model).
        mode: ``'sequence'`` -- input ``[T, N, ...]``, output like the compiled module, the time
            loop one ONNX ``Scan``; ``'step'`` -- one time step with explicit state inputs and
            outputs (see the module docstring for names, order and metadata).
        opset: ai.onnx opset to write (default: :data:`DEFAULT_OPSET`, capped by the installed
            onnxruntime); the IR version follows from it.

    Raises:
        OnnxExportError: an IR node/op has no ONNX rendering (the message names both), or the
            model/options cannot be exported.
    """
    if _is_path(example_input) or (
        example_input is None and isinstance(path, torch.Tensor)
    ):
        raise TypeError(
            f"export_onnx: the example input comes second and the file path third: {_SIGNATURE} "
            f"(the order of export_nir and torch.onnx.export). Got example_input="
            f"{example_input!r}; call it as export_onnx(model, x, {str(example_input)!r}, "
            f"mode={mode!r})."
        )
    if mode not in ("sequence", "step"):
        raise OnnxExportError(f"export_onnx: mode must be 'sequence' or 'step', got {mode!r}")
    if path is not None and not _is_path(path):
        raise TypeError(
            f"export_onnx: path must be a file path (str or os.PathLike) or None, got "
            f"{type(path).__name__}; the signature is {_SIGNATURE}."
        )
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise OnnxExportError(
            "export_onnx: example_input must be a [T, N, ...] tensor (time, batch, features)"
        )
    opset_v, ir_v = pick_versions(opset)
    graph = _inference_graph(model_or_compiled, example_input)
    g, states = _build(graph, mode, example_input, opset_v)
    model = helper.make_model(
        g,
        opset_imports=[helper.make_opsetid("", opset_v)],
        producer_name="snncompile",
        doc_string=f"snncompile {mode}-mode export",
    )
    model.ir_version = ir_v
    helper.set_model_props(
        model,
        {"snncompile.format": "1", "snncompile.mode": mode, _STATES_KEY: json.dumps(states)},
    )
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save(model, str(path))
    return model


class OnnxMetadataError(ValueError):
    """A model's ``snncompile.*`` metadata is missing or malformed; the message names the model
    and the field."""


def describe_model(path_or_model: str | Path | onnx.ModelProto) -> str:
    """How error messages name a model: its path, or its graph's name for a ``ModelProto``."""
    if isinstance(path_or_model, onnx.ModelProto):
        return f"ONNX model (graph {path_or_model.graph.name!r})"
    return f"ONNX model {str(path_or_model)!r}"


def load_metadata(path_or_model: str | Path | onnx.ModelProto) -> dict[str, str]:
    """A model's ``metadata_props`` as a dict (the file is read without external data)."""
    if isinstance(path_or_model, onnx.ModelProto):
        model = path_or_model
    else:
        model = onnx.load(str(path_or_model), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def read_states(
    path_or_model: str | Path | onnx.ModelProto, meta: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """The validated ``snncompile.states`` records of a model (see the module docstring).

    Raises:
        OnnxMetadataError: the key is missing, is not JSON, or a record lacks a field or has a
            field of the wrong type; the message names the model, the record and the field.
    """
    meta = load_metadata(path_or_model) if meta is None else meta
    who = describe_model(path_or_model)
    if _STATES_KEY not in meta:
        raise OnnxMetadataError(
            f"{who} has no {_STATES_KEY!r} metadata; was it written by snncompile.export_onnx?"
        )
    try:
        records = json.loads(meta[_STATES_KEY])
    except json.JSONDecodeError as err:
        raise OnnxMetadataError(
            f"{who}: metadata {_STATES_KEY!r} is not valid JSON ({err}); it must be a JSON list "
            "of state records written by snncompile.export_onnx."
        ) from None
    if not isinstance(records, list):
        raise OnnxMetadataError(
            f"{who}: metadata {_STATES_KEY!r} must be a JSON list of state records, got "
            f"{type(records).__name__}"
        )

    def bad(k: int, field: str, want: str, got: Any) -> OnnxMetadataError:
        return OnnxMetadataError(
            f"{who}: metadata {_STATES_KEY!r} record {k}, field {field!r}: expected {want}, "
            f"got {got!r}"
        )

    out = []
    for k, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise bad(k, "(record)", "a JSON object", rec)
        for field in ("node", "input", "output"):
            if not isinstance(rec.get(field), str) or not rec[field]:
                raise bad(k, field, "a non-empty string", rec.get(field, "<missing>"))
        shape = rec.get("shape", "<missing>")
        if (
            not isinstance(shape, list)
            or not shape
            or shape[0] != -1
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or any(d < 1 for d in shape[1:])
        ):
            raise bad(k, "shape", "a list [-1, d1, d2, ...] of ints (-1: the batch axis)", shape)
        dtype = rec.get("dtype", "float32")
        if dtype not in _DTYPES:
            raise bad(k, "dtype", f"one of {sorted(_DTYPES)}", dtype)
        init = rec.get("init", "<missing>")
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not np.isfinite(init):
            raise bad(k, "init", "a finite number", init)
        out.append({**rec, "dtype": dtype, "init": float(init)})
    return out


def onnx_initial_states(
    path_or_model: str | Path | onnx.ModelProto, batch_size: int
) -> dict[str, np.ndarray]:
    """The initial neuron states of a step-mode export: ``{state input name: array}``.

    Each array is ``[batch_size, *feature shape]`` filled with the neuron's initial membrane
    potential (its ``v_init`` if it has one, e.g. ``v_threshold / 2`` for ann2snn's
    ``HalfThresholdIFNode``; else ``v_reset``, or 0 for soft reset), read from the model's
    metadata (:func:`read_states`).
    """
    meta = load_metadata(path_or_model)
    states = read_states(path_or_model, meta)
    if meta.get("snncompile.mode") != "step":
        raise ValueError(
            f"onnx_initial_states: {describe_model(path_or_model)} is a sequence-mode model; it "
            "builds its initial states inside the graph and takes no state inputs. Export with "
            "mode='step' to stream."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"onnx_initial_states: batch_size must be an int >= 1, got {batch_size}")
    out: dict[str, np.ndarray] = {}
    for s in states:
        shape = [batch_size if d == -1 else int(d) for d in s["shape"]]
        out[s["input"]] = np.full(shape, s["init"], dtype=np.dtype(s["dtype"]))
    return out


def onnx_state_outputs(path_or_model: str | Path | onnx.ModelProto) -> dict[str, str]:
    """``{state input name: next-state output name}`` of a step-mode export (from metadata)."""
    return {s["input"]: s["output"] for s in read_states(path_or_model)}


# -- helpers for the command line ---------------------------------------------------------------
def node_count(model: onnx.ModelProto) -> int:
    """Nodes of ``model``'s graph plus those of its subgraphs one level down (a ``Scan`` body)."""
    graph = model.graph
    return len(graph.node) + sum(
        len(a.g.node) for n in graph.node for a in n.attribute if a.type == a.GRAPH
    )
