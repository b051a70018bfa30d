"""Step-mode lowering: a single-step graph becomes one multi-step (sequence) graph.

A single-step model computes ``y_t = f(x_t; s_t)`` once per time step, where only neurons (and
other stateful modules) carry state ``s``. Stacking its outputs over ``t`` is the reference. For a
stateless op ``g`` that never mixes samples, ``stack_t g(x_t) = unflatten(g(flatten(x)))`` with
``flatten: [T, N, *] -> [T*N, *]``, so ``g`` runs **once** over all steps (``flat`` layout). A
neuron's ``T`` single steps equal one multi-step call on ``[T, N, *]`` (``seq`` layout). Every
other op -- stateful or untraceable opaque modules and opaque functions (unknown code may
look at the whole batch), batchnorm in training mode (per-step batch statistics and
``T`` running-statistic updates), ops whose output does not keep the batch in dimension 0 (found
by the frontend's two-batch-size probe) -- runs in an explicit per-step loop (``seq`` layout,
``attrs['per_step']=True``), which is exact by definition. ``MERGE_TIME``/``SPLIT_TIME`` nodes are
inserted where layouts change; the output is the stacked ``seq`` value. Multi-step graphs are
left alone (``modified=False``); a single-step graph whose stateful module is called more than
once per step is refused (its calls interleave within a step).
"""

from __future__ import annotations

from torch.nn.modules.batchnorm import _BatchNorm

from snncompile.ir.graph import Graph, Node
from snncompile.ir.ops import POINTWISE_SYNAPSE, Layout, Op, OpGroup
from snncompile.passes.base import PassResult
from snncompile.passes.options import options_of


class LoweringError(ValueError):
    """The single-step graph cannot be turned into a sequence graph."""


def _aligned(node: Node) -> bool:
    return bool(node.meta.get("batch_aligned", node.op in POINTWISE_SYNAPSE))


def _per_step(node: Node, inputs: list[Node], mode: str) -> bool:
    if node.attrs.get("stateful"):
        return True
    if node.op is Op.OPAQUE_FUNCTION or (
        node.op is Op.OPAQUE_MODULE and not node.attrs.get("torch_nn")
    ):
        # Unknown code (user functions, untraceable modules) may look at the whole batch, e.g.
        # `if x.sum() > 0`; running it per step is the only choice that is always exact.
        return True
    if node.op is Op.BATCHNORM or isinstance(node.module, _BatchNorm):
        bn = node.module
        # Training graphs keep per-step statistics even if the model is in eval right now, so a
        # later compiled.train() stays exact; inference graphs use running statistics.
        return mode == "train" or bn is None or getattr(bn, "running_mean", None) is None
    # An op that reads a value without the batch in dim 0 (e.g. a per-step mean) would broadcast
    # it wrongly over [T*N, *]; an op whose own output lacks it cannot be split back into steps.
    if any(i.is_tensor and i.layout is not Layout.NONE and not _aligned(i) for i in inputs):
        return True
    return node.is_tensor and not _aligned(node)


def lower_step_mode(graph: Graph) -> PassResult:
    """Turn a single-step (``step`` layout) graph into a sequence graph; see the module doc."""
    if graph.meta.get("step_mode") != "s" or not any(n.layout is Layout.STEP for n in graph):
        return PassResult(graph, False)
    shared = graph.meta.get("shared_stateful")
    if shared:
        raise LoweringError(
            f"stateful module(s) {', '.join(shared)} are called more than once per time step; "
            "a single-step model like this cannot be lowered to multi-step form. Use a separate "
            "module instance per call."
        )
    T, N = int(graph.meta["T"]), int(graph.meta["N"])
    mode = options_of(graph).mode
    notes: dict[str, int] = {"flat": 0, "neuron": 0, "per_step": 0}

    for node in graph:
        if node.layout is not Layout.STEP:
            continue
        if node.op is Op.INPUT:
            node.layout = Layout.SEQ
            if node.shape is not None:
                node.shape = (T, *node.shape)
        elif node.op.group is OpGroup.NEURON:
            node.layout = Layout.SEQ
            node.module.step_mode = "m"
            if node.shape is not None:
                node.shape = (T, *node.shape)
            notes["neuron"] += 1
        elif _per_step(node, [graph[i] for i in node.inputs], mode):
            kind = node.meta.get("value_kind", "tensor")
            if kind not in ("tensor", "tensors"):
                what = (
                    f"module {node.attrs.get('path')!r} ({type(node.module).__name__})"
                    if (node.module is not None)
                    else f"node %{node.name}"
                )
                raise LoweringError(
                    f"{what} must run once per time step but returns a {kind}, which cannot be "
                    "stacked over time: no rule understands it and it cannot be run opaquely. "
                    "Make it return tensors, or describe it with "
                    "snncompile.frontend.register_module_rule."
                )
            node.layout = Layout.SEQ
            node.attrs["per_step"] = True
            if node.shape is not None:
                node.shape = (T, *node.shape)
            notes["per_step"] += 1
        else:
            node.layout = Layout.FLAT
            if node.shape is not None and node.shape and node.shape[0] == N:
                node.shape = (T * N, *node.shape[1:])
            notes["flat"] += 1

    converted: dict[tuple[str, Layout], str] = {}

    def convert(src: Node, want: Layout, reader: str) -> str:
        key = (src.name, want)
        if key in converted:
            return converted[key]
        if want is Layout.FLAT:
            if not src.is_tensor:
                raise LoweringError(
                    f"%{reader} reads the non-tensor value %{src.name} computed per time step; "
                    "this single-step model cannot be lowered"
                )
            shape = None if src.shape is None else (src.shape[0] * src.shape[1], *src.shape[2:])
            new = Node(
                graph.fresh_name(f"{src.name}_flat"),
                Op.MERGE_TIME,
                (src.name,),
                layout=Layout.FLAT,
                shape=shape,
                dtype=src.dtype,
            )
        else:
            if not src.is_tensor:
                raise LoweringError(
                    f"%{reader} runs per time step but reads %{src.name}, a non-tensor value "
                    "computed over all steps; this single-step model cannot be lowered"
                )
            shape = None if src.shape is None else (T, src.shape[0] // T, *src.shape[1:])
            new = Node(
                graph.fresh_name(f"{src.name}_seq"),
                Op.SPLIT_TIME,
                (src.name,),
                layout=Layout.SEQ,
                shape=shape,
                dtype=src.dtype,
            )
        graph.add(new, after=src.name)
        converted[key] = new.name
        return new.name

    for node in graph:
        if node.op in (Op.INPUT, Op.CONSTANT, Op.MERGE_TIME, Op.SPLIT_TIME):
            continue
        want = Layout.SEQ if node.op is Op.OUTPUT else node.layout
        new_inputs = []
        for name in node.inputs:
            src = graph[name]
            if src.layout is Layout.NONE or src.layout is want:
                new_inputs.append(name)
            else:
                new_inputs.append(convert(src, want, node.name))
        node.inputs = tuple(new_inputs)
    graph.output_node.layout = Layout.SEQ
    text = ", ".join(f"{v} {k}" for k, v in notes.items() if v)
    return PassResult(graph, True, [f"lowered to sequence form: {text}"])
