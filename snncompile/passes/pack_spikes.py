"""Binary-spike analysis and packed saving: layers save their spike inputs 1 bit per spike.

Math: a spiking neuron's output ``s_t = heaviside(h_t - v_th)`` is exactly 0 or 1 (when its
surrogate is in spiking mode and no output gain is merged into it). Binary stays binary through
ops that only move or select values: time-layout changes (``MERGE_TIME``/``SPLIT_TIME``),
``FLATTEN``/``RESHAPE``/``IDENTITY`` and max pooling (a max of 0/1 values is 0 or 1); a fused
batchnorm -> neuron -> pooling chain is binary unless its pooling is an average. A
conv/linear layer saves its input for the weight gradient and max pooling saves its input and
int64 indices; for a binary input both are replaced by the input packed 8 spikes per byte
(:mod:`snncompile.runtime.packed_ops`), with the same gradients bit for bit.

The pass marks every binary value with ``node.meta['binary'] = True`` (read by the memory
planner, :mod:`snncompile.runtime.recompute`, which saves binary segment inputs packed too) and
every ``CONV1D``/``CONV2D``/``LINEAR``/``MAXPOOL`` node whose data input is binary and whose
module has a packed form (``torch.nn`` layers or SpikingJelly's stateless wrappers with zero
padding and numeric padding) with ``attrs['packed_input'] = True``; lowering then calls
:func:`~snncompile.runtime.packed_ops.packed_call` for it. Nodes with keyword arguments or more
than one input, and per-step nodes, are left as they are. Training pipelines only (inference
saves nothing for backward); listed last in the pipeline's ``'fusion'`` stage, after neuron
fusion, because a scale merged into a neuron's output makes it non-binary.
"""

from __future__ import annotations

from snncompile.ir.graph import Graph, Node, Ref
from snncompile.ir.ops import Op
from snncompile.passes.base import PassResult
from snncompile.passes.options import options_of

__all__ = ["binary_values", "is_binary_neuron", "pack_spikes"]

#: Neuron kinds whose output is ``heaviside(h - v_th)`` (0/1) in spiking mode.
BINARY_KINDS = frozenset({"if", "lif", "plif"})
#: Ops whose output is binary when their (first) input is.
BINARY_PRESERVING = frozenset(
    {Op.MERGE_TIME, Op.SPLIT_TIME, Op.FLATTEN, Op.RESHAPE, Op.IDENTITY, Op.MAXPOOL}
)
#: Ops that save their input for backward and have a packed form.
PACKED_CONSUMERS = frozenset({Op.CONV1D, Op.CONV2D, Op.LINEAR, Op.MAXPOOL})


def is_binary_neuron(node: Node) -> bool:
    """Whether ``node`` is a neuron whose output is exactly 0/1 (see the module docstring)."""
    if node.op not in (Op.NEURON, Op.FUSED_NEURON) or node.module is None:
        return False
    if node.attrs.get("kind") not in BINARY_KINDS or "out" in node.attrs.get("merged", ()):
        return False
    # A fused chain (snncompile.passes.fuse_chains) outputs its pooled spikes: binary after a
    # max pooling (an OR), counts / K^2 after an average pooling.
    if getattr(node.module, "pool_kind", "none") not in ("none", "max"):
        return False
    inner = getattr(node.module, "neuron", node.module)
    surrogate = getattr(inner, "surrogate_function", None)
    if surrogate is None or not getattr(surrogate, "spiking", True):
        return False
    # store_v_seq / multi-output neurons return tuples; only a single spike tensor is binary.
    return node.meta.get("value_kind", "tensor") == "tensor" and not getattr(
        inner, "store_v_seq", False
    )


def binary_values(graph: Graph) -> set[str]:
    """Names of the nodes whose value is a binary spike tensor."""
    binary: set[str] = set()
    for node in graph:
        if is_binary_neuron(node):
            binary.add(node.name)
        elif (
            node.op in BINARY_PRESERVING
            and node.inputs
            and node.inputs[0] in binary
            and not node.attrs.get("per_step")
            and (node.op is not Op.MAXPOOL or not node.attrs.get("kwargs"))
        ):
            binary.add(node.name)
    return binary


def pack_spikes(graph: Graph) -> PassResult:
    """Mark binary values and the layers that save them packed; see the module docstring."""
    from snncompile.runtime.packed_ops import packable

    if options_of(graph).mode != "train":
        return PassResult(graph, False)
    binary = binary_values(graph)
    for name in binary:
        graph[name].meta["binary"] = True
    packed: list[str] = []
    for node in graph.find(*PACKED_CONSUMERS):
        if (
            len(node.inputs) == 1
            and node.inputs[0] in binary
            and not node.attrs.get("per_step")
            and not node.attrs.get("kwargs")
            and tuple(node.attrs.get("args") or (Ref(0),)) == (Ref(0),)
            and packable(node.module)
        ):
            node.attrs["packed_input"] = True
            packed.append(node.name)
    notes = [f"{len(binary)} binary value(s); {len(packed)} layer(s) save their input packed"]
    if packed:
        notes.append("packed: " + ", ".join(f"%{n}" for n in packed))
    return PassResult(graph, bool(packed), notes)


