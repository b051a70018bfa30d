"""Hand-written time reshapes recorded as the IR's ``MERGE_TIME`` / ``SPLIT_TIME``.

``x_seq.flatten(0, 1)`` folds time into the batch (``[T, N, *] -> [T*N, *]``) and
``y.unflatten(0, (x_seq.size(0), -1))`` unfolds it; the rules that recognise them, and why
they are narrow, are in the comment below. :func:`time_reshape` is called by
:func:`snncompile.frontend.trace.trace_model` for each recorded call.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from snncompile.ir.graph import Graph, Node, Ref
from snncompile.ir.ops import Layout, Op, OpGroup

# -- hand-written time reshapes -> MERGE_TIME / SPLIT_TIME ----------------------------------------
# Sequence-level code (SpikingJelly's SeqToANNContainer does it, users write it by hand and
# ann2snn.convert emits it) folds time into the batch with ``x_seq.flatten(0, 1)`` and unfolds it
# with ``y.unflatten(0, (x_seq.size(0), -1))`` (or ``y.view(T, -1, ...)``/``reshape``). Recorded
# as plain FLATTEN/FUNCTION nodes these would be ``seq``-labelled values whose dimension 0 is
# really ``T*N``: the layout bookkeeping would be wrong, simplify_time_layout could not cancel
# round trips and the ONNX exporter would refuse them (they "change the time/batch
# dimensions"). They are exactly the IR's MERGE_TIME / SPLIT_TIME, so the frontend records them
# as such. The rules are deliberately narrow, so every other reshape is recorded as before:
#
# * MERGE_TIME: ``flatten(0, 1)`` (method or ``torch.flatten``), or ``view``/``reshape`` to
#   ``(-1, *x.shape[2:])`` with literal feature sizes, of a ``seq`` tensor whose recorded shape
#   starts with the example's ``(T, N)``;
# * SPLIT_TIME: ``unflatten(0, (t, -1))`` (method or ``torch.unflatten``), or ``view``/``reshape``
#   to ``(t, -1, *y.shape[1:])``, of a ``flat`` tensor ``[T*N, *]``, where ``t`` is the time size
#   *read from a sequence at run time* (``x_seq.size(0)``, ``x_seq.shape[0]``,
#   ``x_seq.size()[0]``). A literal ``T`` is not recognised: it would silently fix ``T`` (and
#   break chunked execution), so such code keeps its old recording. The IR's SPLIT_TIME reads
#   ``T`` from the graph's sequence input at run time, which is the same value: every ``seq``
#   value of a graph has the input's ``T`` (also per chunk).
#
# The ``size`` nodes that only fed recognised reshapes are dropped afterwards.
_TIME_SIZE = "time_size"  # node.meta flag: the value is T, read from a seq tensor at run time
_SEQ_SHAPE = "seq_shape"  # node.meta flag: the value is the full shape of a seq tensor


def call_label(fxn: fx.Node) -> str:
    target = fxn.target
    name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    return f".{name}" if fxn.op == "call_method" else str(name)


def _is_seq_tensor(node: Node, T: int, N: int) -> bool:
    return (
        node.layout is Layout.SEQ
        and not node.attrs.get("per_step")
        and node.shape is not None
        and len(node.shape) >= 2
        and tuple(node.shape[:2]) == (T, N)
    )


def tag_time_size(node: Node, fxn: fx.Node, args: Any, kwargs: Any, in_nodes: list[Node]) -> None:
    """Flag ``x.size(0)``, ``x.shape``, ``x.size()`` and ``<shape>[0]`` of a ``seq`` tensor."""
    first = args[0] if args else None
    if not isinstance(first, Ref):
        return
    src = in_nodes[first.index]
    nargs = len(args) + len(kwargs)
    if fxn.op == "call_function" and fxn.target is operator.getitem:
        if src.meta.get(_SEQ_SHAPE) and nargs == 2 and len(args) == 2 and args[1] == 0:
            node.meta[_TIME_SIZE] = src.meta[_SEQ_SHAPE]
        return
    if src.layout is not Layout.SEQ or src.shape is None or len(src.shape) < 2:
        return
    if src.attrs.get("per_step"):
        return
    if fxn.op == "call_method" and fxn.target == "size":
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if nargs == 1:
            node.meta[_SEQ_SHAPE] = src.name
        elif dim == 0 and nargs == 2:
            node.meta[_TIME_SIZE] = src.name
    elif fxn.op == "call_function" and fxn.target is getattr and tuple(args[1:]) == ("shape",):
        node.meta[_SEQ_SHAPE] = src.name


def _is_time_size(value: Any, in_nodes: list[Node]) -> bool:
    return isinstance(value, Ref) and bool(in_nodes[value.index].meta.get(_TIME_SIZE))


def _shape_args(fxn: fx.Node, args: Any, kwargs: Any) -> tuple[Any, ...] | None:
    """The target shape of a ``view``/``reshape`` call, or ``None`` for other calls."""
    if fxn.op == "call_method" and fxn.target in ("view", "reshape"):
        if kwargs:
            return None
        rest = tuple(args[1:])
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            rest = tuple(rest[0])
        return rest
    if fxn.op == "call_function" and fxn.target is torch.reshape:
        shape = kwargs.get("shape", args[1] if len(args) > 1 else None)
        if not isinstance(shape, (tuple, list)) or len(args) + len(kwargs) != 2:
            return None
        return tuple(shape)
    return None


def time_reshape(
    fxn: fx.Node,
    args: Any,
    kwargs: Any,
    in_nodes: list[Node],
    shape: tuple[int, ...] | None,
    T: int,
    N: int,
) -> tuple[Op, str] | None:
    """``(MERGE_TIME | SPLIT_TIME, data input name)`` for a recognised time reshape, or None."""
    if fxn.op not in ("call_method", "call_function") or not args or shape is None:
        return None
    first = args[0]
    if not isinstance(first, Ref):
        return None
    src = in_nodes[first.index]
    if src.shape is None:
        return None
    name = fxn.target if fxn.op == "call_method" else None
    is_flatten = name == "flatten" or (fxn.op == "call_function" and fxn.target is torch.flatten)
    is_unflatten = name == "unflatten" or (
        fxn.op == "call_function" and fxn.target is torch.unflatten
    )
    target_shape = _shape_args(fxn, args, kwargs)
    if _is_seq_tensor(src, T, N):
        merged = (T * N, *src.shape[2:])
        if tuple(shape) != merged:
            return None
        if is_flatten:
            start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
            end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
            if start == 0 and end == 1 and len(args) + len(kwargs) <= 3:
                return Op.MERGE_TIME, src.name
        elif target_shape is not None and target_shape == (-1, *src.shape[2:]):
            return Op.MERGE_TIME, src.name
        return None
    if src.layout is not Layout.FLAT or not src.shape or src.shape[0] != T * N:
        return None
    if tuple(shape) != (T, N, *src.shape[1:]):
        return None
    if is_unflatten:
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        sizes = kwargs.get("sizes", args[2] if len(args) > 2 else None)
        if (
            dim == 0
            and isinstance(sizes, (tuple, list))
            and len(sizes) == 2
            and sizes[1] == -1
            and _is_time_size(sizes[0], in_nodes)
            and len(args) + len(kwargs) == 3
        ):
            return Op.SPLIT_TIME, src.name
        return None
    if (
        target_shape is not None
        and len(target_shape) == len(src.shape) + 1
        and _is_time_size(target_shape[0], in_nodes)
        and tuple(target_shape[1:]) == (-1, *src.shape[1:])
    ):
        return Op.SPLIT_TIME, src.name
    return None


def time_layout_consistent(graph: Graph) -> bool:
    """Whether every ``flat`` tensor is ``[T*N, *]`` and no stateful op runs on a ``flat`` value.

    A recognised MERGE_TIME followed by user code that reshapes dimension 0 itself (a literal
    ``view(8, -1, ...)``) would otherwise be labelled ``flat`` while holding ``[T, N, *]``.
    """
    tn = int(graph.meta["T"]) * int(graph.meta["N"])
    for node in graph:
        if node.layout is not Layout.FLAT:
            continue
        if node.op.group is OpGroup.NEURON or node.attrs.get("stateful"):
            return False
        if node.shape is not None and (not node.shape or node.shape[0] != tn):
            return False
    return True


def drop_unused_time_sizes(graph: Graph, candidates: set[str]) -> None:
    """Remove T-size reads (``size``/``shape`` nodes) that only fed recognised time reshapes."""

    def flagged(name: str) -> bool:
        meta = graph[name].meta
        return bool(meta.get(_TIME_SIZE) or meta.get(_SEQ_SHAPE))

    pending = {n for n in candidates if n in graph and flagged(n)}
    while pending:
        users = graph.users_map()
        free = [n for n in pending if not users[n]]
        if not free:
            return
        for n in free:
            pending.discard(n)
            inputs = graph[n].inputs
            graph.remove(n)
            pending.update(i for i in inputs if i in graph and flagged(i))

