"""Chain fusion: ``BatchNorm2d -> (+ r) -> neuron -> max/avg pool (+ e)`` on ``[T, N, C, H, W]``.

Math (per channel ``c``, per neuron and step): ``x = xin * a_c + b_c (+ r)`` with ``a = w /
sqrt(var + eps)``, ``b = bias - mean * a`` (batch statistics over ``T*N*H*W`` in training, as
SpikingJelly's multi-step ``BatchNorm2d`` pools them; running statistics in eval), then the
neuron's charge / fire / reset, then either a pooling of the spikes (max: the OR of a ``K x K``
window with stride ``S`` and padding ``P``, the gradient routed to PyTorch's first maximum and
summed over overlapping windows; avg: ``K == S``, no padding, the count / ``K^2``) or ``out = e +
s``. ``r`` is the residual add of a spiking ResNet block (``sn2(bn2(conv2(.)) + identity)``),
``e`` SEW ResNet's ADD after the neuron (``identity + sn2(.)``); both gradients are pass-through
(``gr = gx``, ``ge = gout``). The unfused graph makes one pass per op over the ``[T*N, C, H,
W]`` tensor forward and backward (plus the pooling's zero-filled gradient and its indices); the
fused node makes one forward (two in training: the statistics are a reduction before the
neuron) and two backward, keeping only its inputs for backward (``h`` and the spikes are
recomputed in the kernel, the max-pool routing recomputed from the spikes). Spikes are
bit-identical to the unfused compile in eval and, in the tests, in training too (the statistics
are float64 sums there: see :mod:`snncompile.runtime.fused_chain` for the bound); gradients
agree to ~1e-6 relative (the adds are exact: ``a + b`` is commutative in IEEE arithmetic).

Cases handled: a ``FUSED_NEURON`` node running a plain snncompile neuron (``fuse_neurons`` made
it; no merged scales, no ``store_v_seq``; with or without states beside ``v``: Izhikevich, ALIF
and CUBA-LIF are chained as IF / LIF are) on a 5-D ``seq`` input, with any of

* before it, through a single-user ``SPLIT_TIME``, a ``BATCHNORM`` node (``nn.BatchNorm2d``, not
  per step) whose only user is that split;
* between that split and the neuron, an ``ADD`` (its only user the neuron) of the split and
  another ``seq`` value ``r`` of the same shape (also without a batchnorm: inference compiles
  fold it into the convolution);
* instead of a batchnorm, through a single-user ``SPLIT_TIME``, a per-channel ``VoltageScale``
  (ann2snn's channel-wise ``x * a_c``, scale shape ``[C, 1, 1]``; scalar ones are
  :mod:`~snncompile.passes.fuse_elementwise`'s), and/or, instead of a pooling, one after the
  neuron (``out = s * b_c``), bit-exact (the same float32 products);
* after it, through a single-user ``MERGE_TIME``, the only reader of the spikes: a ``MAXPOOL``
  (square window, stride and padding, dilation 1, floor mode, no indices) or ``AVGPOOL``
  (window == stride, no padding, floor mode, no divisor override) node; or, instead of a
  pooling, an ``ADD`` of the spikes and another ``seq`` value ``e`` of the same shape, the only
  reader of the spikes (the graph is re-sorted when ``e`` was computed after the neuron).

The neuron node keeps its name, op and ``seq`` layout and runs a
:class:`~snncompile.runtime.fused_chain.FusedChain` on its inputs ``(x, [r], [e])``; the merged
nodes are removed (the split now reads the batchnorm's input; the merge gives the pooled shape;
the add's readers read the neuron). Left as they are, with the reason in the pass notes:
neurons whose spikes have other readers (the spikes must exist), pooling the kernels do not
express, batchnorms with other users or other than 2-D, neurons with a state whose name the
chain kernels use for their own variables (e.g. ``xin``), with ``backend='auto'`` planes of fewer
than :data:`~snncompile.runtime.fused_chain.AUTO_MIN_PLANE` neurons (1 since small planes are
grouped per work item: no plane size is left out now), and a neuron with nothing next to it
to merge. With
``optimize(..., fold_batchnorm=False)`` (``graph.meta['exact_batchnorm']``: eval outputs
bit-exact with the eager model asked for) no batchnorm is merged, only poolings and adds. On
CUDA tensors, non-float32 inputs, ``backend='torch'`` or without a compiler the node runs the
same ops unfused. Listed in the pipeline's ``'fusion'`` stage (both modes), after
``fuse_elementwise`` and before ``pack_spikes``.
"""

from __future__ import annotations

import dataclasses

from snncompile.ir.graph import Graph, Node, Ref
from snncompile.ir.ops import Layout, Op
from snncompile.passes.base import PassResult
from snncompile.passes.fuse_elementwise import MERGED_ATTR

#: The hidden attribute of a chain node recording what was merged (for :func:`unfuse_chains`).
CHAIN_ATTR = "_chain"


def _single(users: dict[str, list[Node]], name: str) -> Node | None:
    us = users.get(name, [])
    return us[0] if len(us) == 1 else None


def _bn_before(graph: Graph, node: Node, users: dict[str, list[Node]]) -> tuple[Node, Node] | None:
    """``(split, bn)`` feeding ``node`` only, or None."""
    from torch import nn

    if len(node.inputs) != 1:
        return None
    split = graph[node.inputs[0]]
    if split.op is not Op.SPLIT_TIME or _single(users, split.name) is not node:
        return None
    bn = graph[split.inputs[0]]
    if (
        bn.op is not Op.BATCHNORM
        or bn.layout is not Layout.FLAT
        or bn.attrs.get("per_step")
        or not isinstance(bn.module, nn.BatchNorm2d)
        or len(bn.inputs) != 1
        or _single(users, bn.name) is not split
        or bn.attrs.get("kwargs")
    ):
        return None
    return split, bn


def _channel_scale(node: Node, channels: int) -> bool:
    """Whether ``node`` is a ``VoltageScale`` with one scale per channel (``[C, 1, 1]``)."""
    from snncompile.ann2snn.modules import VoltageScale

    return (
        node.op is Op.ELEMENTWISE
        and node.attrs.get("fn") == "VoltageScale"
        and isinstance(node.module, VoltageScale)
        and tuple(node.module.scale.shape) == (channels, 1, 1)
        and len(node.inputs) == 1
        and node.attrs.get("args") in (None, (Ref(0),))
        and not node.attrs.get("kwargs")
        and not node.attrs.get("per_step")
    )


def _scale_before(
    graph: Graph, node: Node, users: dict[str, list[Node]]
) -> tuple[Node, Node] | None:
    """``(split, scale)``: a per-channel ``VoltageScale`` feeding ``node`` only, or None."""
    if len(node.inputs) != 1 or node.shape is None:
        return None
    split = graph[node.inputs[0]]
    if split.op is not Op.SPLIT_TIME or _single(users, split.name) is not node:
        return None
    scale = graph[split.inputs[0]]
    if not _channel_scale(scale, node.shape[2]) or _single(users, scale.name) is not split:
        return None
    return split, scale


def _scale_after(
    graph: Graph, node: Node, users: dict[str, list[Node]]
) -> tuple[Node, Node] | None:
    """``(merge, scale)``: a per-channel ``VoltageScale``, the only reader of the spikes."""
    merge = _single(users, node.name)
    if merge is None or merge.op is not Op.MERGE_TIME or node.shape is None:
        return None
    scale = _single(users, merge.name)
    if scale is None or scale.inputs != (merge.name,) or not _channel_scale(scale, node.shape[2]):
        return None
    return merge, scale


def _residual_before(
    graph: Graph, node: Node, users: dict[str, list[Node]]
) -> tuple[Node, str] | None:
    """``(add, r)``: ``node`` reads ``add = split + r`` (or ``r + split``) only, where ``split``
    is a single-user ``SPLIT_TIME`` (of a batchnorm, or of a convolution whose batchnorm was
    folded); ``r`` is the other operand's name."""
    if len(node.inputs) != 1 or node.attrs.get("args") not in (None, (Ref(0),)):
        return None
    add = graph[node.inputs[0]]
    if (
        add.op is not Op.ADD
        or len(add.inputs) != 2
        or add.inputs[0] == add.inputs[1]
        or add.layout is not Layout.SEQ
        or add.attrs.get("kwargs")
        or add.attrs.get("args") not in (None, (Ref(0), Ref(1)))
        or _single(users, add.name) is not node
    ):
        return None
    for i in (0, 1):
        split, other = graph[add.inputs[i]], graph[add.inputs[1 - i]]
        if (
            split.op is Op.SPLIT_TIME
            and _single(users, split.name) is add
            and other.layout is Layout.SEQ
            and other.shape is not None
            and other.shape == node.shape == split.shape
        ):
            return add, other.name
    return None


def _add_after(graph: Graph, node: Node, users: dict[str, list[Node]]) -> tuple[Node, str] | None:
    """``(add, e)``: the only reader of ``node``'s spikes is ``add = node + e`` (or ``e +
    node``) of the same shape, ``e`` another ``seq`` value (SEW ResNet's ADD)."""
    add = _single(users, node.name)
    if (
        add is None
        or add.op is not Op.ADD
        or len(add.inputs) != 2
        or node.name not in add.inputs
        or add.inputs[0] == add.inputs[1]
        or add.layout is not Layout.SEQ
        or add.attrs.get("kwargs")
        or add.attrs.get("args") not in (None, (Ref(0), Ref(1)))
    ):
        return None
    other = graph[next(i for i in add.inputs if i != node.name)]
    if other.layout is not Layout.SEQ or other.shape is None or other.shape != node.shape:
        return None
    if add.shape is not None and add.shape != node.shape:
        return None
    return add, other.name


def _pool_after(graph: Graph, node: Node, users: dict[str, list[Node]]) -> tuple[Node, Node] | None:
    """``(merge, pool)`` reading ``node``'s spikes only, or None."""
    merge = _single(users, node.name)
    if merge is None or merge.op is not Op.MERGE_TIME:
        return None
    pool = _single(users, merge.name)
    if (
        pool is None
        or pool.op not in (Op.MAXPOOL, Op.AVGPOOL)
        or pool.attrs.get("per_step")
        or pool.module is None
        or pool.inputs != (merge.name,)
        or pool.attrs.get("kwargs")
    ):
        return None
    return merge, pool


def fuse_chains(graph: Graph) -> PassResult:
    """Merge batchnorms and poolings into the fused neurons next to them (module docstring)."""
    from snncompile.runtime.fused_backends import dynamics_for
    from snncompile.runtime.fused_chain import FusedChain, chain_blocker, size_blocker

    fused: list[str] = []
    left: list[str] = []
    reorder = False
    # optimize(fold_batchnorm=False) asks for eval outputs bit-exact with the eager model; the
    # kernel's x * a + b may round 1 ulp off PyTorch's batchnorm, so batchnorms stay unmerged.
    exact_bn = bool(graph.meta.get("exact_batchnorm"))
    for node in graph.find(Op.FUSED_NEURON):
        if MERGED_ATTR in node.attrs or CHAIN_ATTR in node.attrs or node.module is None:
            continue
        if dynamics_for(node.module) is None or node.shape is None or len(node.shape) != 5:
            continue
        users = graph.users_map()
        residual = _residual_before(graph, node, users)
        if residual is not None:  # view the batchnorm's split as the neuron's input
            add, r_name = residual
            split_name = next(i for i in add.inputs if i != r_name)
            probe = dataclasses.replace(node, inputs=(split_name,), attrs={})
            users = {**users, split_name: [probe]}
            before = _bn_before(graph, probe, users)
        else:
            before = _bn_before(graph, node, users)
        after = _pool_after(graph, node, users)
        added = _add_after(graph, node, users) if after is None else None
        s_in = _scale_before(graph, node, users) if before is None and residual is None else None
        s_out = _scale_after(graph, node, users) if after is None and added is None else None
        if before is not None and exact_bn:
            left.append(f"%{before[1].name}: fold_batchnorm=False keeps PyTorch's batchnorm")
            before = None
        bn = before[1].module if before else None
        pool = after[1].module if after else None
        if (before, after, added, residual, s_in, s_out) == (None,) * 6:
            continue  # a plain neuron: nothing to merge
        backend = node.attrs.get("fused_backend", getattr(node.module, "backend", None))
        small = size_blocker(backend, node.shape)
        if small is not None:
            left.append(f"%{node.name}: {small}")
            continue
        why = chain_blocker(node.module, bn, pool)
        if why is not None and after is not None:
            left.append(f"%{node.name} -> %{after[1].name}: {why}")
            after, pool = None, None
            if before is not None or residual is not None:
                why = chain_blocker(node.module, bn, None)
            else:
                why = "nothing else to merge"
        if why is not None:
            left.append(f"%{node.name}: {why}")
            continue
        record: dict[str, object] = {"neuron": node.module, "shape": node.shape}
        parts = []
        if residual is not None:
            add, r_name = residual
            node.inputs = (next(i for i in add.inputs if i != r_name), r_name)
            if "args" in node.attrs:
                node.attrs["args"] = (Ref(0), Ref(1))
            graph.remove(add.name)
            record["add"] = (add, r_name)
        if before is not None:
            split, bn_node = before
            split.inputs = (bn_node.inputs[0],)
            graph.remove(bn_node.name)
            record["bn"] = bn_node
            parts.append(f"%{bn_node.name}")
        if residual is not None:
            parts.append(f"%{residual[0].name} (+ %{residual[1]})")
        parts.append(f"%{node.name}")
        if after is not None:
            merge, pool_node = after
            T = node.shape[0]
            if pool_node.shape is not None:
                node.shape = (T, pool_node.shape[0] // T, *pool_node.shape[1:])
                merge.shape = pool_node.shape
            graph.replace_all_uses(pool_node.name, merge.name)
            graph.remove(pool_node.name)
            record["pool"] = (pool_node, merge.name)
            parts.append(f"%{pool_node.name}")
        if s_in is not None:
            split, sc = s_in
            split.inputs = (sc.inputs[0],)
            graph.remove(sc.name)
            record["scale_in"] = sc
            parts.insert(0, f"%{sc.name}")
        if s_out is not None:
            merge, sc = s_out
            graph.replace_all_uses(sc.name, merge.name)
            graph.remove(sc.name)
            record["scale_out"] = (sc, merge.name)
            parts.append(f"%{sc.name}")
        if added is not None:
            add_node, e_name = added
            node.inputs = (*node.inputs, e_name)
            if "args" in node.attrs:
                node.attrs["args"] = tuple(Ref(i) for i in range(len(node.inputs)))
            graph.replace_all_uses(add_node.name, node.name)
            graph.remove(add_node.name)
            record["added"] = (add_node, e_name)
            parts.append(f"%{add_node.name} (+ %{e_name})")
            reorder = True
        node.module = FusedChain(  # type: ignore[arg-type]
            record["neuron"], bn, pool, residual=residual is not None, added=added is not None,
            scale_in=s_in[1].module if s_in else None, scale_out=s_out[1].module if s_out else None,
        )  # fmt: skip
        node.attrs[CHAIN_ATTR] = record
        node.attrs["chain"] = tuple(
            k
            for k in ("scale_in", "bn", "add", "neuron", "pool", "added", "scale_out")
            if k in record
        )
        fused.append(" -> ".join(parts))
    notes = [f"fused {len(fused)} chain(s)"] + [f"fused {f}" for f in fused]
    notes += [f"left {w}" for w in left]
    if reorder:  # an added residual may be computed after the neuron (a downsample branch)
        graph.toposort()
    return PassResult(graph, bool(fused), notes if (fused or left) else [])


def _detached_copy(node: Node) -> Node:
    """A copy of a removed ``node`` with its own ``attrs``/``meta``, to put back in the graph."""
    return dataclasses.replace(node, attrs=dict(node.attrs), meta=dict(node.meta))


def unfuse_chains(graph: Graph) -> PassResult:
    """Undo :func:`fuse_chains` on ``graph`` (in place): the batchnorm and pooling nodes come
    back and the neuron nodes run their neuron modules again (exporters use it)."""
    restored = 0
    for node in graph.find(Op.FUSED_NEURON):
        record = node.attrs.pop(CHAIN_ATTR, None)
        if record is None:
            continue
        node.attrs.pop("chain", None)
        node.module = record["neuron"]
        node.shape = record["shape"]
        if "bn" in record:
            bn = record["bn"]
            bn = _detached_copy(bn)
            split = graph[node.inputs[0]]
            graph.add(bn, before=split.name)
            split.inputs = (bn.name,)
        if "add" in record:
            add = record["add"][0]
            add = _detached_copy(add)
            graph.add(add, before=node.name)
            node.inputs = (add.name,)
            if "args" in node.attrs:
                node.attrs["args"] = (Ref(0),)
        if "scale_in" in record:
            sc = record["scale_in"]
            sc = _detached_copy(sc)
            split = graph[node.inputs[0]]
            graph.add(sc, before=split.name)
            split.inputs = (sc.name,)
        if "scale_out" in record:
            sc, merge_name = record["scale_out"]
            sc = _detached_copy(sc)
            graph.replace_all_uses(merge_name, sc.name)
            graph.add(sc, after=merge_name)
        if "added" in record:
            add = record["added"][0]
            add = _detached_copy(add)
            node.inputs = node.inputs[:-1]
            if "args" in node.attrs:
                node.attrs["args"] = tuple(Ref(i) for i in range(len(node.inputs)))
            graph.replace_all_uses(node.name, add.name)
            graph.add(add)
            graph.toposort()
        if "pool" in record:
            pool, merge_name = record["pool"]
            pool = _detached_copy(pool)
            merge = graph[merge_name]
            graph.replace_all_uses(merge_name, pool.name)
            if node.shape is not None:
                merge.shape = (node.shape[0] * node.shape[1], *node.shape[2:])
            graph.add(pool, after=merge_name)
        restored += 1
    return PassResult(graph, bool(restored), [f"restored the chains of {restored} neuron(s)"])
