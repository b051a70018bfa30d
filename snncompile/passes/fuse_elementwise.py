"""Neuron + adjacent scale fusion: ``VoltageScale(a) -> neuron -> VoltageScale(b)`` in one kernel.

Math: ann2snn writes every ReLU as ``x' = x * a``, ``s = neuron(x')``, ``y = s * b`` with scalar
float32 scales ``a`` (``1/s``) and ``b`` (``s``). The fused node computes, per neuron-step,
``h = H(v, x * a)``, ``s = heaviside(h - v_th)``, ``v = reset(h, s)`` and emits ``s * b``: the same
float32 multiplies in the same order (the input multiply before the charge, the output multiply
after the fire; the reset uses the unscaled ``s``), so outputs and membranes are bit-identical
to the unfused chain, and the two extra passes over ``[T, N, *]`` disappear. The backward is
derived from the same expressions (``grad_x`` includes the factor ``a``, the spike gradient the
factor ``b``); the scales are buffers, so no gradient is produced for them.

Cases handled, for every ``FUSED_NEURON`` node (after :mod:`~snncompile.passes.fuse_neurons`)
running a snncompile neuron: an ``ELEMENTWISE`` producer with ``fn='VoltageScale'`` and
``scale_shape=()`` whose only user is the neuron's input path (directly, or through
``MERGE_TIME``/``SPLIT_TIME`` nodes that each have a single user), and/or such a consumer that is
the only user of the neuron (directly or through single-user time-layout nodes). The scale
nodes are removed (the time-layout nodes stay, so layouts are unchanged and ``verify`` holds) and
the neuron node's module becomes a :class:`~snncompile.runtime.scaled_neuron.ScaledNeuron`
holding the neuron (its state stays there) and the scale modules (buffers shared). The node keeps
its ``seq`` input and output. Both modes: gradients with respect to the input are those of the
chain; training then keeps the input ``x`` for backward besides ``h`` (the gain's derivative
reads it), 8 instead of 4 bytes per neuron-step. Left as they are: per-channel scales
(``scale_shape != ()``, no per-call scalar; :mod:`~snncompile.passes.fuse_chains` merges those
of ``[C, 1, 1]`` shape on 5-D inputs), scales with other users (their values are needed
anyway), other elementwise ops, neurons without a fused kernel (``backend='torch'``: there are no
``FUSED_NEURON`` nodes, so this pass does nothing). At run time the wrapper computes the unfused
chain when the fused kernel does not apply (``'auto'`` below its size threshold, non-float32
inputs, no compiler). :func:`unfuse_elementwise` puts the scale nodes back (ONNX export of a
compiled module).

Listed in the pipeline's ``'fusion'`` stage (both modes), after ``fuse_neurons``.
"""

from __future__ import annotations

import dataclasses

from snncompile.ir.graph import Graph, Node, Ref
from snncompile.ir.ops import Op
from snncompile.passes.base import PassResult

_TIME = (Op.MERGE_TIME, Op.SPLIT_TIME)
#: The hidden attribute of a fused node that records what was merged (for unfusing).
MERGED_ATTR = "_merged_scales"


def _is_scalar_scale(node: Node) -> bool:
    from snncompile.ann2snn.modules import VoltageScale

    args = node.attrs.get("args")
    return (
        node.op is Op.ELEMENTWISE
        and node.attrs.get("fn") == "VoltageScale"
        and tuple(node.attrs.get("scale_shape", (None,))) == ()
        and isinstance(node.module, VoltageScale)
        and node.module.scale.numel() == 1
        and len(node.inputs) == 1
        and args in (None, (Ref(0),))
        and not node.attrs.get("kwargs")
        and not node.attrs.get("per_step")
    )


def _producer(graph: Graph, neuron: Node, users: dict[str, list[Node]]) -> tuple[Node, Node] | None:
    """The scalar scale feeding ``neuron`` only, and the node that reads it."""
    if len(neuron.inputs) != 1:
        return None
    reader, cur = neuron, graph[neuron.inputs[0]]
    while cur.op in _TIME and len(users[cur.name]) == 1:
        reader, cur = cur, graph[cur.inputs[0]]
    if not _is_scalar_scale(cur) or len(users[cur.name]) != 1:
        return None
    if graph[cur.inputs[0]].layout is not cur.layout:
        return None
    return cur, reader


def _consumer(graph: Graph, neuron: Node, users: dict[str, list[Node]]) -> Node | None:
    """The scalar scale that is the only reader of ``neuron``'s output (through time nodes)."""
    cur = neuron
    while len(users[cur.name]) == 1 and users[cur.name][0].op in _TIME:
        cur = users[cur.name][0]
    if len(users[cur.name]) != 1:
        return None
    scale = users[cur.name][0]
    return scale if _is_scalar_scale(scale) and scale.inputs == (cur.name,) else None


def fuse_elementwise(graph: Graph) -> PassResult:
    """Merge scalar ``VoltageScale`` neighbours into fused neuron nodes; see the module doc."""
    from snncompile.runtime.fused import register_dynamics
    from snncompile.runtime.fused_backends import dynamics_for
    from snncompile.runtime.scaled_neuron import ScaledNeuron, scaled_dynamics

    merged: list[str] = []
    for node in graph.find(Op.FUSED_NEURON):
        if MERGED_ATTR in node.attrs or node.module is None:
            continue
        base = dynamics_for(node.module)
        if base is None or base.output_gain is not None:
            continue
        users = graph.users_map()
        prod = _producer(graph, node, users)
        cons = _consumer(graph, node, users)
        if prod is None and cons is None:
            continue
        record: dict[str, object] = {"neuron": node.module, "kernel": node.attrs.get("kernel")}
        if prod is not None:
            scale, reader = prod
            reader.inputs = tuple(scale.inputs[0] if i == scale.name else i for i in reader.inputs)
            graph.remove(scale.name)
            record["in"] = (scale, reader.name)
        if cons is not None:
            src = cons.inputs[0]
            graph.replace_all_uses(cons.name, src)
            graph.remove(cons.name)
            record["out"] = (cons, src)
        scale_in = prod[0].module if prod is not None else None
        scale_out = cons.module if cons is not None else None
        node.module = ScaledNeuron(node.module, scale_in, scale_out)
        dyn = scaled_dynamics(base, scale_in is not None, scale_out is not None)
        node.attrs["kernel"] = register_dynamics(dyn)
        node.attrs["merged"] = tuple(k for k in ("in", "out") if k in record)
        node.attrs[MERGED_ATTR] = record
        parts = [f"%{prod[0].name}"] if prod is not None else []
        parts.append(f"%{node.name}")
        parts += [f"%{cons.name}"] if cons is not None else []
        merged.append(" -> ".join(parts))
    notes = [f"merged scales into {len(merged)} fused neuron(s)"] + [f"merged {m}" for m in merged]
    return PassResult(graph, bool(merged), notes if merged else [])


def unfuse_elementwise(graph: Graph) -> PassResult:
    """Undo :func:`fuse_elementwise` on ``graph`` (in place): the scale nodes come back, and the
    neuron nodes run their neuron modules again. Exporters use it on compiled graphs."""
    restored = 0
    for node in graph.find(Op.FUSED_NEURON):
        record = node.attrs.pop(MERGED_ATTR, None)
        if record is None:
            continue
        node.attrs.pop("merged", None)
        node.module = record["neuron"]
        node.attrs["kernel"] = record["kernel"]
        if "in" in record:
            scale, reader_name = record["in"]
            scale = dataclasses.replace(scale, attrs=dict(scale.attrs), meta=dict(scale.meta))
            reader = graph[reader_name]
            graph.add(scale, before=reader_name)
            reader.inputs = tuple(scale.name if i == scale.inputs[0] else i for i in reader.inputs)
        if "out" in record:
            scale, src = record["out"]
            scale = dataclasses.replace(scale, attrs=dict(scale.attrs), meta=dict(scale.meta))
            graph.replace_all_uses(src, scale.name)
            graph.add(scale, after=src)
        restored += 1
    return PassResult(graph, bool(restored), [f"restored the scales of {restored} neuron(s)"])
