"""ONNX renderings of recorded tensor functions and methods (the IR's ``FUNCTION`` op).

Spiking transformers reshape, transpose and multiply their per-step tensors: ``q @ k.transpose(
-2, -1)``, ``x.permute(0, 1, 3, 2, 4)``, ``qk.chunk(2, dim=2)``, ``x[:, :, 0]``, ``x.mean(-1)``.
Each entry of :data:`FUNCTIONS` renders one such call for one time step ``[N, *]``. Dimension
arguments are read in the node's own layout and converted with ``Emitter.dim`` (a ``[T, N, *]``
sequence-level call's ``d`` is ``d - 1`` per step; ``d = 0``, time, is refused); the batch
dimension (``0`` per step) must stay where it is, since every value of the step graph is
``[N, *]``. Calls over time (``x.mean(0)``) are handled by the exporter's time reductions, not
here. A call with no entry is an error naming the node.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

from snncompile.export.onnx_emitter import Emitter
from snncompile.ir.graph import Node


def call_name(node: Node) -> str:
    """``'transpose'`` for ``x.transpose(...)`` and ``torch.transpose(...)``, etc."""
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return name


def _rank(e: Emitter, node: Node, i: int = 0) -> int:
    """Per-step rank (batch included) of input ``i``."""
    shape = e.in_shape(node, i)
    if shape is None:
        raise e.fail(node, "needs a tensor input with a recorded shape")
    return len(shape) + 1


def _axis(e: Emitter, node: Node, d: int, rank: int, what: str = "dimension") -> int:
    """A non-negative per-step axis other than the batch axis."""
    axis = e.dim(node, int(d))
    axis = axis + rank if axis < 0 else axis
    if not 0 < axis < rank:
        raise e.fail(
            node,
            f"{what} {d} is the batch dimension (or out of range); only per-sample feature "
            "dimensions can be exported",
        )
    return axis


def _transpose(e: Emitter, node: Node) -> str:
    rank = _rank(e, node)
    a = _axis(e, node, e.arg(node, 1, "dim0"), rank)
    b = _axis(e, node, e.arg(node, 2, "dim1"), rank)
    perm = list(range(rank))
    perm[a], perm[b] = perm[b], perm[a]
    return e.b.node("Transpose", [e.data(node)], node.name, perm=perm)


def _permute(e: Emitter, node: Node) -> str:
    args = node.attrs.get("args") or ()
    kwargs = node.attrs.get("kwargs") or {}
    dims = kwargs.get("dims", args[1] if len(args) == 2 else tuple(args[1:]))
    if isinstance(dims, int):
        dims = (dims,)
    dims = [int(d) for d in dims]
    full = len(dims)
    dims = [d + full if d < 0 else d for d in dims]
    shift = e.shift(node)
    lead = list(range(shift + 1))  # time (sequence-level call) and batch stay first
    if dims[: shift + 1] != lead:
        raise e.fail(
            node,
            f"permutes the time/batch dimensions (dims {dims}); only per-sample feature "
            "dimensions can be exported",
        )
    perm = [d - shift for d in dims[shift:]]
    return e.b.node("Transpose", [e.data(node)], node.name, perm=perm)


def _matmul(e: Emitter, node: Node) -> str:
    a = e.tensor(node, e.arg(node, 0, "input"))
    b = e.tensor(node, e.arg(node, 1, "other"))
    return e.b.node("MatMul", [a, b], node.name)


def _reduce(op_type: str) -> Callable[[Emitter, Node], str]:
    def emit(e: Emitter, node: Node) -> str:
        dim = e.arg(node, 1, "dim", None)
        if dim is None:
            raise e.fail(node, "reduces over every dimension (time and batch included)")
        keep = int(bool(e.arg(node, 2, "keepdim", False)))
        if e.arg(node, 3, "dtype", None) is not None:
            raise e.fail(node, "a reduction with dtype= is not exported")
        rank = _rank(e, node)
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        axes = [_axis(e, node, d, rank) for d in dims]
        x = e.data(node)
        if op_type == "ReduceSum" or e.opset >= 18:
            ins = [x, e.b.inits.int64(axes, f"{node.name}_axes")]
            return e.b.node(op_type, ins, node.name, keepdims=keep)
        return e.b.node(op_type, [x], node.name, axes=axes, keepdims=keep)

    return emit


def _identity(e: Emitter, node: Node) -> str:
    return e.b.node("Identity", [e.data(node)], node.name)


def _softmax(e: Emitter, node: Node) -> str:
    rank = _rank(e, node)
    axis = _axis(e, node, e.arg(node, 1, "dim"), rank)
    if e.arg(node, 2, "dtype", None) is not None:
        raise e.fail(node, "softmax with dtype= is not exported")
    return e.b.node("Softmax", [e.data(node)], node.name, axis=axis)


def _split_sizes(e: Emitter, node: Node, axis: int) -> int:
    shape = e.in_shape(node)
    assert shape is not None  # checked by _rank
    return int(shape[axis - 1])


def _split(e: Emitter, node: Node, sizes: list[int], axis: int) -> list[str]:
    split = e.b.inits.int64(sizes, f"{node.name}_split")
    return e.b.node_multi("Split", [e.data(node), split], len(sizes), node.name, axis=axis)


def _chunk(e: Emitter, node: Node) -> list[str]:
    rank = _rank(e, node)
    axis = _axis(e, node, e.arg(node, 2, "dim", 0), rank)
    chunks = int(e.arg(node, 1, "chunks"))
    size = _split_sizes(e, node, axis)
    step = -(-size // chunks)  # torch.chunk: ceil(size / chunks) each, the last one smaller
    sizes = [min(step, size - start) for start in range(0, size, step)]
    return _split(e, node, sizes, axis)


def _split_call(e: Emitter, node: Node) -> list[str]:
    rank = _rank(e, node)
    axis = _axis(e, node, e.arg(node, 2, "dim", 0), rank)
    size = _split_sizes(e, node, axis)
    spec = e.arg(node, 1, "split_size_or_sections")
    if isinstance(spec, int):
        sizes = [min(spec, size - start) for start in range(0, size, spec)]
    elif isinstance(spec, (tuple, list)) and all(isinstance(s, int) for s in spec):
        sizes = [int(s) for s in spec]
    else:
        raise e.fail(node, f"split sizes {spec!r} are not exported (ints only)")
    return _split(e, node, sizes, axis)


def _unbind(e: Emitter, node: Node) -> list[str]:
    rank = _rank(e, node)
    axis = _axis(e, node, e.arg(node, 1, "dim", 0), rank)
    parts = _split(e, node, [1] * _split_sizes(e, node, axis), axis)
    axes = e.b.inits.int64([axis], f"{node.name}_axes")
    return [e.b.node("Squeeze", [p, axes], node.name) for p in parts]


def _getitem(e: Emitter, node: Node) -> str:
    """``parts[i]`` of a ``chunk``/``split``/``unbind`` result, or basic tensor indexing
    (ints and slices with constant bounds) of the per-sample dimensions."""
    container = e.arg(node, 0, "input")
    index = e.arg(node, 1, "index")
    if isinstance(container, list):
        if not isinstance(index, int):
            raise e.fail(node, f"index {index!r} of a list of tensors is not exported")
        return e.b.node("Identity", [e.tensor(node, container[index])], node.name)
    x = e.tensor(node, container)
    rank = _rank(e, node)
    items = list(index) if isinstance(index, tuple) else [index]
    full = rank + e.shift(node)
    if any(i is Ellipsis for i in items):
        at = items.index(Ellipsis)
        items[at : at + 1] = [slice(None)] * (full - len(items) + 1)
    if any(i is None or isinstance(i, (torch.Tensor, list, bool)) for i in items):
        raise e.fail(node, f"index {index!r} is not exported (ints and slices only)")
    lead = e.shift(node) + 1  # time (sequence-level) and batch: must be taken whole
    if any(i != slice(None) for i in items[:lead]):
        raise e.fail(node, f"index {index!r} selects along the time/batch dimensions; not exported")
    starts, ends, axes, steps, squeeze = [], [], [], [], []
    for axis, item in enumerate(items[lead:], start=1):
        if isinstance(item, int):
            start = item
            end = item + 1 if item != -1 else 2**62
            step = 1
            squeeze.append(axis)
        elif isinstance(item, slice):
            if item == slice(None):
                continue
            start = 0 if item.start is None else int(item.start)
            end = 2**62 if item.stop is None else int(item.stop)
            step = 1 if item.step is None else int(item.step)
        else:
            raise e.fail(node, f"index {index!r} is not exported (ints and slices only)")
        starts.append(start)
        ends.append(end)
        axes.append(axis)
        steps.append(step)
    y = x
    if axes:
        ins = [
            x,
            e.b.inits.int64(starts, f"{node.name}_starts"),
            e.b.inits.int64(ends, f"{node.name}_ends"),
            e.b.inits.int64(axes, f"{node.name}_axes"),
            e.b.inits.int64(steps, f"{node.name}_steps"),
        ]
        y = e.b.node("Slice", ins, node.name)
    if squeeze:
        y = e.b.node("Squeeze", [y, e.b.inits.int64(squeeze, f"{node.name}_sq")], node.name)
    return y if y != x else e.b.node("Identity", [x], node.name)


def _mul(e: Emitter, node: Node) -> str:
    a = e.tensor(node, e.arg(node, 0, "input"))
    b = e.tensor(node, e.arg(node, 1, "other"))
    return e.b.node("Mul", [a, b], node.name)


#: call name -> emitter; an emitter returns one ONNX value, or a list for a tuple of tensors.
FUNCTIONS: dict[str, Callable[[Emitter, Node], Any]] = {
    "transpose": _transpose,
    "permute": _permute,
    "matmul": _matmul,
    operator.matmul.__name__: _matmul,
    "sum": _reduce("ReduceSum"),
    "mean": _reduce("ReduceMean"),
    "contiguous": _identity,
    "clone": _identity,
    "softmax": _softmax,
    "chunk": _chunk,
    "split": _split_call,
    "unbind": _unbind,
    "getitem": _getitem,
    "mul": _mul,
}


def function_call(e: Emitter, node: Node) -> Any:
    """Render a recorded function/method call (see :data:`FUNCTIONS`), or fail naming it."""
    name = call_name(node)
    entry = FUNCTIONS.get(name)
    if entry is None:
        raise e.fail(
            node,
            f"the call {name!r} has no ONNX rendering. Exported calls: "
            + ", ".join(sorted(FUNCTIONS))
            + "; replace it by a supported layer or register a rendering in "
            "snncompile.export.onnx_functions.FUNCTIONS.",
        )
    return entry(e, node)


def _size_of(e: Emitter, node: Node, src: Node, dim: int | None) -> Any:
    """``src.shape`` (``dim=None``) or ``src.size(dim)`` with the time and batch sizes unknown."""
    from snncompile.export.onnx_emitter import _NOT_STATIC

    if src.shape is None:
        return _NOT_STATIC
    lead = e.lead(src)
    sizes: list[Any] = [_NOT_STATIC if i < lead else int(s) for i, s in enumerate(src.shape)]
    if dim is None:
        return tuple(sizes)
    return sizes[dim]


def static_value(e: Emitter, node: Node) -> Any:
    """The Python value of a non-tensor call computed from per-sample sizes only (``C // h``,
    ``x.shape[-1] ** -0.5``), or ``_NOT_STATIC`` when it reads a time/batch size, a value the
    export does not compute, or anything that is not a size."""
    from snncompile.export.onnx_emitter import _NOT_STATIC, _T, _Unknown

    name = call_name(node)
    args = node.attrs.get("args") or ()
    kwargs = node.attrs.get("kwargs") or {}
    first = e.resolve(node, args[0]) if args else None
    if isinstance(first, _T) and node.inputs:
        src = e.graph[node.inputs[0]]
        if name == "getattr" and tuple(args[1:]) == ("shape",):
            return _size_of(e, node, src, None)
        if name == "size" and not kwargs and len(args) <= 2:
            return _size_of(e, node, src, None if len(args) == 1 else int(args[1]))
        if name in ("dim", "ndimension") and src.shape is not None:
            return len(src.shape)
        return _NOT_STATIC
    values = e.resolve(node, tuple(args))
    kw = e.resolve(node, dict(kwargs))

    def known(v: Any) -> bool:
        if isinstance(v, (tuple, list)):
            return all(known(i) for i in v)
        if isinstance(v, dict):
            return all(known(i) for i in v.values())
        return not isinstance(v, (_T, _Unknown, torch.Tensor)) and v is not _NOT_STATIC

    fn = node.target
    if not callable(fn) or getattr(fn, "__module__", None) not in ("_operator", "operator"):
        return _NOT_STATIC  # only Python arithmetic/indexing on sizes
    if name == "getitem" and isinstance(values[0], tuple):
        picked = values[0][values[1]] if isinstance(values[1], (int, slice)) else _NOT_STATIC
        return picked if known(picked) else _NOT_STATIC
    if not known(values) or not known(kw):
        return _NOT_STATIC
    return fn(*values, **kw)
