"""One time step of an IR graph as ONNX nodes (:class:`Emitter`).

Every IR layout collapses to one time step ``[N, *]``: ``flat`` values (``[T*N, *]``) and
``seq`` values (``[T, N, *]``) are both ``[N, *]`` at a single step, ``MERGE_TIME``/
``SPLIT_TIME`` become no-ops, and a dimension argument ``d >= 1`` of a sequence-level op
becomes ``d - 1`` (``d = 0`` would mix time steps and is refused). A neuron node is rendered
from its dynamics (:func:`neuron_dynamics`) by
:func:`~snncompile.codegen.onnx_renderer.render_onnx`: ``h = charge(x, v, ...)``, then the
spike and the next value of every state. Synapse ops are looked up in an op table
(:mod:`snncompile.export.onnx_ops`). Reductions over time (``x.mean(0)``, ``x.sum(0)``) are
emitted after the time loop on stacked values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from snncompile.codegen.onnx_renderer import OnnxRenderError, render_onnx
from snncompile.codegen.render import evaluate
from snncompile.dynamics.neuron import NeuronDynamics, from_spec
from snncompile.export.onnx_builder import GraphBuilder, OnnxExportError
from snncompile.ir.graph import Graph, Node, Ref
from snncompile.ir.ops import Layout, Op, OpGroup


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


_NOT_STATIC = object()  # static_value's answer for a value the export does not compute


@dataclasses.dataclass
class StateInfo:
    """One neuron state of an exported model (see the module docstring, metadata)."""

    node: str
    input: str
    output: str
    shape: tuple[int, ...]  # per-step shape without the batch dimension
    init: float
    dynamics: NeuronDynamics | None  # None: the running sum/step count of a time reduction
    uniforms: tuple[float, ...]
    state: str = "v"  # which state of the neuron ('v', or an extra state such as 'w')


def state_key(node: str, state: str) -> str:
    """The key of one neuron state in the exporter's tables: the node name for ``v``,
    ``node/state`` for an extra state."""
    return node if state == "v" else f"{node}/{state}"


def _time_shift(node: Node) -> int:
    """1 when the node's own dims are ``[T, N, *]`` (a sequence-level op), else 0."""
    return 1 if node.layout is Layout.SEQ and not node.attrs.get("per_step") else 0


def per_step_shape(node: Node) -> tuple[int, ...] | None:
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


#: An op table entry: emits the ONNX nodes of one IR node, returns the value it computes.
OpEmitter = Callable[["Emitter", Node], str]


class Emitter:
    """Emits one time step of an IR graph into a :class:`GraphBuilder`.

    ``ops`` is the synapse op table (:data:`snncompile.export.onnx_ops.SYNAPSE_OPS`).
    """

    def __init__(
        self,
        graph: Graph,
        b: GraphBuilder,
        *,
        ops: Mapping[Op, OpEmitter],
        opset: int,
        post: frozenset[str] = frozenset(),
        passthrough: frozenset[str] = frozenset(),
        running: frozenset[str] = frozenset(),
    ) -> None:
        self.graph = graph
        self.b = b
        self.ops = ops
        self.opset = opset
        self.post = post  # nodes computed after the time loop, on [N, *] values
        self.passthrough = passthrough  # nodes that are the identity at one step (a repeat)
        # Step mode: time reductions computed as running sums/means, and the nodes after them
        # (on [N, *] values, like ``post`` in sequence mode, but inside the step).
        self.running = running
        self.env: dict[str, Any] = {}

    def _reduced(self, node: Node) -> bool:
        """Whether the node's value is already reduced over time (its dims are ``[N, *]``)."""
        return node.name in self.post or node.name in self.running

    def shift(self, node: Node) -> int:
        """1 when the node's own dims are ``[T, N, *]`` (a sequence-level op), else 0."""
        return 0 if self._reduced(node) else _time_shift(node)

    def step_shape(self, node: Node) -> tuple[int, ...] | None:
        """Per-step feature shape (without batch) of a node's value."""
        if self._reduced(node) and node.shape is not None:
            return tuple(node.shape[1:])
        return per_step_shape(node)

    def lead(self, node: Node) -> int:
        """How many leading (time/batch) dims the node's recorded shape has."""
        return 2 if node.layout is Layout.SEQ and not self._reduced(node) else 1

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
        self,
        x_name: str,
        states: dict[str, str],
        infos: dict[str, StateInfo],
        include: frozenset[str] | None = None,
    ) -> tuple[list[tuple[str, Node]], dict[str, str]]:
        """Emit the step; return ``[(output value, producing IR node)]`` and next states.

        ``include`` (sequence exports with several time loops): emit only these nodes; the
        values they read from other loops must already be in :attr:`env`.
        """
        inputs = self.graph.input_nodes
        if len(inputs) != 1:
            raise OnnxExportError(
                f"export_onnx: the model takes {len(inputs)} inputs; only single-input models "
                "can be exported."
            )
        next_states: dict[str, str] = {}
        outputs: list[tuple[str, Node]] = []
        for node in self.graph:
            if node.name in self.post or (include is not None and node.name not in include):
                continue  # computed after the time loop (see run_post), or in another loop
            if node.op is Op.INPUT:
                self.env[node.name] = _T(x_name)
            elif node.op is Op.CONSTANT:
                value = node.attrs.get("_value")
                self.env[node.name] = value
            elif node.op is Op.OUTPUT:
                outputs = self._outputs(node) if not self.post else []
            elif node.op.group is OpGroup.NEURON:
                if node.name in self.running:
                    raise self.fail(node, "a neuron after a reduction over time cannot be exported")
                spike, nxt = self._neuron(node, states, infos[node.name])
                self.env[node.name] = _T(spike)
                next_states.update(nxt)
            elif node.op in (Op.MERGE_TIME, Op.SPLIT_TIME) or node.name in self.passthrough:
                self.env[node.name] = self.env[node.inputs[0]]
            elif is_time_reduction(node) and state_key(node.name, RUNNING_SUM) in states:
                value, nxt = self._running_reduction(node, states)
                self.env[node.name] = _T(value)
                next_states.update(nxt)
            else:
                if node.name in self.running:
                    self._check_reduced_inputs(node)
                self._synapse(node)
        return outputs, next_states

    def _running_reduction(self, node: Node, states: dict[str, str]) -> tuple[str, dict[str, str]]:
        """``x.sum(0)`` / ``x.mean(0)`` in step mode: the running sum (mean) up to this step.

        ``acc_t = acc_{t-1} + x_t`` (``acc_0 = 0``); a mean also counts the steps,
        ``n_t = n_{t-1} + 1``, and returns ``acc_t / n_t``. After the last of ``T`` steps this
        is the whole-sequence ``x.sum(0)`` / ``x.mean(0)``.
        """
        x = self.data(node)
        acc_key = state_key(node.name, RUNNING_SUM)
        acc = self.b.node("Add", [states[acc_key], x], f"{node.name}_{RUNNING_SUM}")
        if call_name(node) == "sum":
            return acc, {acc_key: acc}
        steps_key = state_key(node.name, RUNNING_STEPS)
        one = self.b.scalar(1.0)
        steps = self.b.node("Add", [states[steps_key], one], f"{node.name}_{RUNNING_STEPS}")
        mean = self.b.node("Div", [acc, steps], node.name)
        return mean, {acc_key: acc, steps_key: steps}

    def _check_reduced_inputs(self, node: Node) -> None:
        """A node after a time reduction may not also read per-step values (as in sequence
        mode, where such a node would mix ``[T, N, *]`` and ``[N, *]`` values)."""
        for name in node.inputs:
            src = self.graph[name]
            if name not in self.running and src.is_tensor and src.layout is not Layout.NONE:
                raise self.fail(
                    node,
                    f"mixes the per-step value %{name} with values reduced over time; only "
                    "time reductions (mean/sum over dim 0) may read the per-step results",
                )

    def _synapse(self, node: Node) -> None:
        if is_time_reduction(node):
            raise self.fail(
                node,
                "reduces over time; in step mode each call sees one time step. Export with "
                "mode='sequence' (time reductions run after the Scan) or leave the reduction "
                "out of the exported model.",
            )
        entry = self.ops.get(node.op)
        several = node.meta.get("value_kind") == "tensors"  # e.g. x.chunk(2): a list of values
        if not node.is_tensor and not several and node.op in (Op.FUNCTION, Op.OPAQUE_FUNCTION):
            # Sizes of per-sample dimensions (and arithmetic on them) are known constants of
            # the export; anything reading the batch or time size is not computed.
            from snncompile.export.onnx_functions import static_value

            value = static_value(self, node)
            self.env[node.name] = _Unknown(node) if value is _NOT_STATIC else value
            return
        if entry is None:
            raise self.fail(
                node,
                "has no ONNX rendering. Supported ops: "
                + ", ".join(sorted(o.name for o in self.ops))
                + ", neurons, MERGE_TIME/SPLIT_TIME, mean/sum over time (sequence mode). "
                "Replace it by a supported layer or register a rendering in "
                "snncompile.export.onnx_ops.SYNAPSE_OPS.",
            )
        out = entry(self, node)
        self.env[node.name] = [_T(o) for o in out] if isinstance(out, list) else _T(out)

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
            if is_time_reduction(node):
                self.env[node.name] = _T(time_reduce(self, node))
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

#: State names of a time reduction in step mode: its running sum and (a mean) its step count.
RUNNING_SUM = "acc"
RUNNING_STEPS = "steps"


# -- reductions over time (sequence mode, after the Scan) -----------------------------------------
def call_name(node: Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def is_time_reduction(node: Node) -> bool:
    """``x.mean(0)`` / ``x.sum(0)`` / ``torch.mean(x, 0)`` on a ``[T, N, *]`` value."""
    if node.op is not Op.FUNCTION or node.layout is not Layout.SEQ or node.attrs.get("per_step"):
        return False
    if call_name(node) not in ("mean", "sum"):
        return False
    args = node.attrs.get("args") or ()
    kwargs = dict(node.attrs.get("kwargs") or {})
    dim = kwargs.pop("dim", args[1] if len(args) > 1 else None)
    keepdim = kwargs.pop("keepdim", args[2] if len(args) > 2 else False)
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    return dim == 0 and keepdim is False and not kwargs and len(args) <= 3


def time_reduce(e: Emitter, node: Node) -> str:
    value = e.arg(node, 0, "input")
    if not isinstance(value, _Stacked):
        raise e.fail(node, "reduces over time a value that is not a per-step result")
    op_type = "ReduceMean" if call_name(node) == "mean" else "ReduceSum"
    # ReduceSum takes axes as an input since opset 13, ReduceMean since opset 18.
    if op_type == "ReduceSum" or e.opset >= 18:
        axes = e.b.inits.int64([0], "time_axis")
        return e.b.node(op_type, [value.name, axes], node.name, keepdims=0)
    return e.b.node(op_type, [value.name], node.name, axes=[0], keepdims=0)
