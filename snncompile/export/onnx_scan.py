"""Assembly of the exported ONNX graph: the step graph alone, or as the body of one ``Scan``.

* ``mode='step'``: inputs are the data input ``[N, *]`` then one ``<neuron node>.<state>``
  per neuron state; outputs are the model output(s) then ``<neuron node>.<state>_next``.
* ``mode='sequence'``: the step graph is the body of one ``Scan`` over axis 0 of
  ``x: [T, N, *]``; initial states are built in the graph (``ConstantOfShape`` with the batch
  size read from ``x``); time reductions and what depends on them run after the ``Scan``.
  A layer that mixes time steps (:mod:`~snncompile.export.onnx_attention`) runs in the main
  graph on the stacked ``[T, N, *]`` values; the per-step parts before and after it are
  separate ``Scan``s (:func:`time_loops`).
* Time reductions in step mode (``x.mean(0)``, ``x.sum(0)``: a firing-rate readout): the step
  model carries the running sum ``<node>.acc`` (and, for a mean, the step count
  ``<node>.steps``) as states like a neuron's, listed in the same metadata, and returns the
  mean (sum) of the steps seen so far. A stream of ``T`` steps then ends with the sequence
  model's output, and every earlier step gives the readout so far (an anytime prediction).
  A model that builds its sequence with ``x.unsqueeze(0).repeat(T, 1, ...)`` takes
  ``[N, *]`` and is tiled in the graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import onnx
import torch
from onnx import TensorProto, helper

from snncompile.dynamics.neuron import NeuronDynamics
from snncompile.export.onnx_attention import render_sequence_module, sequence_module
from snncompile.export.onnx_builder import GraphBuilder, Initializers, NameSource, OnnxExportError
from snncompile.export.onnx_emitter import (
    _T,
    RUNNING_STEPS,
    RUNNING_SUM,
    Emitter,
    StateInfo,
    call_name,
    is_time_reduction,
    neuron_dynamics,
    per_step_shape,
    state_key,
)
from snncompile.export.onnx_metadata import DTYPES
from snncompile.export.onnx_ops import SYNAPSE_OPS
from snncompile.ir.graph import Graph, Node
from snncompile.ir.ops import Layout, Op, OpGroup


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
        if node.op is not Op.FUNCTION or call_name(node) not in ("repeat", "expand"):
            continue
        src = graph[node.inputs[0]] if node.inputs else None
        if src is None or src.op is not Op.FUNCTION or call_name(src) != "unsqueeze":
            continue
        s_args = src.attrs.get("args") or ()
        s_dim = (src.attrs.get("kwargs") or {}).get("dim", s_args[1] if len(s_args) > 1 else None)
        if s_dim != 0 or not src.inputs or src.inputs[0] != inputs[0].name:
            continue
        sizes = _int_sizes(node)
        keep = 1 if call_name(node) == "repeat" else -1
        if (
            not sizes
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes)
            or sizes[0] < 1
            or any(v != keep for v in sizes[1:])
            or (src.shape is not None and len(sizes) != len(src.shape))
        ):
            raise OnnxExportError(
                f"export_onnx: IR node %{node.name} ({call_name(node)}) builds a sequence from "
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


def post_loop_nodes(graph: Graph) -> frozenset[str]:
    """Time reductions and every node that depends on one (they run after the loop)."""
    post: set[str] = set()
    for node in graph:
        if node.op is Op.OUTPUT:
            continue
        if is_time_reduction(node) or any(i in post for i in node.inputs):
            post.add(node.name)
    return frozenset(post)


# -- model assembly -------------------------------------------------------------------------------
def _state_infos(graph: Graph, names: NameSource, prefix: str) -> dict[str, StateInfo]:
    infos: dict[str, StateInfo] = {}
    for node in graph:
        if node.op.group is not OpGroup.NEURON:
            continue
        shape = per_step_shape(node)
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


def _reduction_infos(graph: Graph, names: NameSource) -> dict[str, StateInfo]:
    """Step mode: the states of each time reduction (``x.sum(0)``, ``x.mean(0)``).

    A reduction carries its running sum ``<node>.acc`` (``[N, *]`` of its per-step input,
    starting at 0) and, for a mean, its step count ``<node>.steps`` (``[N, 1, ..., 1]``,
    starting at 0), so that each step returns the sum/mean of the steps so far.
    """
    infos: dict[str, StateInfo] = {}
    for node in graph:
        if not is_time_reduction(node):
            continue
        shape = per_step_shape(graph[node.inputs[0]]) if node.inputs else None
        if shape is None:
            raise OnnxExportError(
                f"export_onnx: IR node %{node.name} reduces over time a value without a recorded "
                "shape; trace it with an example input."
            )
        states = [(RUNNING_SUM, tuple(int(s) for s in shape))]
        if call_name(node) == "mean":
            states.append((RUNNING_STEPS, (1,) * len(shape)))
        for state, dims in states:
            infos[state_key(node.name, state)] = StateInfo(
                node=node.name,
                input=names.reserve(f"{node.name}.{state}"),
                output=names.reserve(f"{node.name}.{state}_next"),
                shape=dims,
                init=0.0,
                dynamics=None,
                uniforms=(),
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
    elem = DTYPES.get(dtype or "float32")
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


def build_model(
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
        infos = {**_state_infos(graph, names, ""), **_reduction_infos(graph, names)}
        b = GraphBuilder(names, inits)
        emitter = Emitter(
            graph,
            b,
            ops=SYNAPSE_OPS,
            opset=opset,
            passthrough=through,
            running=post_loop_nodes(graph),
        )
        outs, nxt = emitter.run(x_public, {k: i.input for k, i in infos.items()}, infos)
        taken: dict[str, str] = {}
        out_vis = []
        for k, (value, src) in enumerate(outs):
            public = names.reserve("output" if len(outs) == 1 else f"output_{k}")
            _publish(b, value, public, taken)
            shape = emitter.step_shape(src) or ()
            out_vis.append(_value_info(public, src.dtype, ["N", *shape]))
        for key, info in infos.items():
            _publish(b, nxt[key], info.output, taken)
            out_vis.append(_value_info(info.output, "float32", ["N", *info.shape]))
        in_vis = [_value_info(x_public, "float32", ["N", *feat])]
        in_vis += [_value_info(i.input, "float32", ["N", *i.shape]) for i in infos.values()]
        g = helper.make_graph(b.nodes, "snncompile_step", in_vis, out_vis, inits.tensors)
        return g, _states_meta(infos)
    return _build_sequence(graph, names, inits, x_public, feat, repeat, through, opset)


def time_loops(graph: Graph, post: frozenset[str]) -> tuple[dict[str, int], dict[str, Any]]:
    """Assign every node before the time reductions to a time loop (``Scan``) of a sequence
    export, and find the layers that mix time steps (:mod:`~snncompile.export.onnx_attention`).

    ``loop(n) = max(loop(i) for the inputs i of n)`` (0 for the input), except that a layer
    mixing time steps gets ``max(...) + 1``: it runs in the main graph on the stacked
    ``[T, N, *]`` values of the loops before it, and the nodes that read it run in a later loop.
    A model without such layers has one loop. Returns ``({node: loop}, {mixing node: its
    rendering})``.
    """
    loop: dict[str, int] = {}
    mixers: dict[str, Any] = {}
    for node in graph:
        if node.op is Op.OUTPUT or node.name in post:
            continue
        level = max((loop.get(i, 0) for i in node.inputs), default=0)
        entry = sequence_module(node)
        if entry is not None:
            mixers[node.name] = entry
            level += 1
        loop[node.name] = level
    return loop, mixers


def _fixed_steps(graph: Graph, mixers: dict[str, Any]) -> int | str:
    """The input's time dimension: ``'T'`` (any), or the number of steps the mixing layers are
    built for (an MLP over ``T``), so that onnxruntime rejects another ``T`` at the input with
    a shape error instead of failing inside the layer. Layers built for different ``T`` are an
    export error naming them."""
    fixed = {
        name: t for name, entry in mixers.items() if (t := entry.steps(graph[name].module))
    }
    if len(set(fixed.values())) > 1:
        found = ", ".join(f"%{name}: T={t}" for name, t in fixed.items())
        raise OnnxExportError(
            f"export_onnx: the layers that mix time steps are built for different numbers of "
            f"time steps ({found}); no input length runs them all. Build them with one T."
        )
    return next(iter(fixed.values()), "T")


def _crossing(graph: Graph, members: frozenset[str]) -> list[Node]:
    """Per-step values of one loop read outside it (later loops, mixing layers, the nodes
    after the time reductions, graph outputs): the loop stacks them over ``T``."""
    out: dict[str, Node] = {}
    for node in graph:
        if node.name in members:
            continue
        for name in node.inputs:
            src = graph[name]
            if name in members and src.is_tensor and src.layout is not Layout.NONE:
                out.setdefault(name, src)
    return list(out.values())


def _build_sequence(
    graph: Graph,
    names: NameSource,
    inits: Initializers,
    x_public: str,
    feat: list[int],
    repeat: _RepeatOverTime | None,
    through: frozenset[str],
    opset: int,
) -> tuple[onnx.GraphProto, list[dict[str, Any]]]:
    """The sequence model: per-step parts as ``Scan`` bodies, mixing layers and time
    reductions (and what follows them) in the main graph on stacked values."""
    post = post_loop_nodes(graph)
    loop, mixers = time_loops(graph, post)
    steps = _fixed_steps(graph, mixers)
    infos = _state_infos(graph, names, "scan.")
    main = GraphBuilder(names, inits)
    scan_in = x_public
    if repeat is not None:  # the sequence is built in the graph: Tile(Unsqueeze(x, 0))
        unsq = main.node("Unsqueeze", [x_public, inits.int64([0], "time_axis0")], "x_unsqueeze")
        scan_in = main.node(
            "Tile", [unsq, inits.int64(list(repeat.repeats), "time_repeats")], "x_seq"
        )
    batch = None
    if infos:
        shape_x = main.node("Shape", [scan_in], "x_shape")
        batch = main.node("Gather", [shape_x, inits.int64([1], "batch_index")], "batch", axis=0)
    stacked: dict[str, str] = {}  # IR value -> its [T, N, *] ONNX value in the main graph
    carried: dict[str, Any] = {}  # non-tensor values (constants, sizes) of earlier loops
    for k in range(max(loop.values(), default=0) + 1):
        for name, entry in mixers.items():  # the mixing layers that the loop k reads
            if loop[name] == k:
                node = graph[name]
                src = node.inputs[0] if node.inputs else None
                if src not in stacked:
                    raise OnnxExportError(
                        f"export_onnx: IR node %{name} ({type(node.module).__name__}) reads "
                        f"{'%' + src if src else 'nothing'}, which is not a whole-sequence "
                        "value of the model; it cannot be exported."
                    )
                stacked[name] = render_sequence_module(main, node, stacked[src], opset, entry)
        members = frozenset(n for n, lv in loop.items() if lv == k and n not in mixers)
        if not members:
            continue
        body = GraphBuilder(names, inits)
        emitter = Emitter(graph, body, ops=SYNAPSE_OPS, opset=opset, post=post, passthrough=through)
        emitter.env.update(carried)
        prefix = "scan." if k == 0 else f"scan{k}."
        scan_values: list[str] = []  # main-graph [T, N, *] values sliced by this loop
        body_in_vis: list[onnx.ValueInfoProto] = []
        x_t = ""
        if k == 0:
            x_t = names.reserve("scan.x_t")
            scan_values.append(scan_in)
            body_in_vis.append(_value_info(x_t, "float32", ["N", *feat]))
        for node in graph:
            if node.name not in members:
                continue
            for name in node.inputs:
                if name in members or name in carried or name in emitter.env:
                    continue
                if name not in stacked:
                    raise OnnxExportError(
                        f"export_onnx: IR node %{node.name} reads %{name}, which no earlier "
                        "time loop computes; it cannot be exported."
                    )
                value_t = names.fresh(f"{prefix}{name}_t")
                emitter.env[name] = _T(value_t)
                scan_values.append(stacked[name])
                src = graph[name]
                body_in_vis.append(
                    _value_info(value_t, src.dtype, ["N", *(per_step_shape(src) or ())])
                )
        loop_infos = {key: i for key, i in infos.items() if loop[i.node] == k}
        _, nxt = emitter.run(
            x_t, {key: i.input for key, i in loop_infos.items()}, loop_infos, include=members
        )
        carried.update(
            (n, v) for n, v in emitter.env.items() if not isinstance(v, (_T, list)) and n in members
        )
        taken: dict[str, str] = {}
        body_out_vis = []
        for key, info in loop_infos.items():
            _publish(body, nxt[key], info.output, taken)
            body_out_vis.append(_value_info(info.output, "float32", ["N", *info.shape]))
        per_step = _crossing(graph, members)
        for j, src in enumerate(per_step):
            public = names.reserve(f"{prefix}y_{j}")
            _publish(body, emitter.tensor(src, emitter.env[src.name]), public, taken)
            body_out_vis.append(_value_info(public, src.dtype, ["N", *(per_step_shape(src) or ())]))
        if not body_out_vis:
            continue  # nothing of this loop is read: dead code
        body_in_vis = [
            *[_value_info(i.input, "float32", ["N", *i.shape]) for i in loop_infos.values()],
            *body_in_vis,
        ]
        body_graph = helper.make_graph(body.nodes, "snncompile_step", body_in_vis, body_out_vis)
        init_states = []
        for info in loop_infos.values():
            assert batch is not None
            dims = inits.int64(list(info.shape), f"{info.node}_dims")
            full = main.node("Concat", [batch, dims], f"{info.node}_shape", axis=0)
            value = helper.make_tensor("value", TensorProto.FLOAT, [1], [info.init])
            init_states.append(
                main.node("ConstantOfShape", [full], f"{info.node}_{info.state}0", value=value)
            )
        final = [names.fresh(f"{i.node}_{i.state}_final") for i in loop_infos.values()]
        seq_names = [names.fresh(f"{src.name}_seq") for src in per_step]
        main.nodes.append(
            helper.make_node(
                "Scan",
                [*init_states, *scan_values],
                [*final, *seq_names],
                name=names.fresh("n_time_loop"),
                body=body_graph,
                num_scan_inputs=len(scan_values),
            )
        )
        stacked.update({src.name: st for src, st in zip(per_step, seq_names, strict=True)})
    after = Emitter(graph, main, ops=SYNAPSE_OPS, opset=opset, post=post)
    after.env.update(carried)
    outs = after.run_post(stacked)
    out_vis = []
    renamed: dict[str, str] = {}
    for k, (value, src) in enumerate(outs):
        public = names.reserve("output" if len(outs) == 1 else f"output_{k}")
        _publish(main, value, public, renamed)
        lead = ["N"] if src.name in post else [steps, "N"]
        out_vis.append(_value_info(public, src.dtype, [*lead, *(after.step_shape(src) or ())]))
    in_vis = [_value_info(x_public, "float32", ["N", *feat] if repeat else [steps, "N", *feat])]
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
