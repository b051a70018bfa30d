"""Concrete values beside the fx proxies: shape arithmetic and shape checks trace.

torch.fx traces with proxies that have no values, so a forward that branches on a size
(``if local_dim % self.num_heads != 0: raise``), unpacks a shape into a loop bound, or asks
for the rank of an intermediate (``if x.ndim == 4``) cannot be traced. SpikingJelly's attention
layers do all three. The tracer therefore runs the example through a private copy of the model
*alongside* the proxies (:class:`ValueRecorder`): every recorded node also gets its real value,
computed from its inputs' values exactly as the traced program will compute it.

What becomes a Python value while tracing, and why that is safe:

* ``x.ndim`` / ``x.dim()`` of any tensor: a plain ``int`` (the rank).
* A **shape-derived** non-tensor value -- ``x.shape``, ``x.size(i)``, ``x.numel()`` and any
  arithmetic, comparison or indexing of such values -- stays a proxy in the graph (so the
  program reads sizes at run time where it can), but whenever Python needs an actual value
  (``bool()`` in an ``if``/``assert``, ``len()``, iteration, ``int()``/``range()``) the value
  recorded from the example is used. The program is then *specialised* to the example's shape.
  The compiled module guards its input shape (:mod:`snncompile.runtime.shape_guard`): every
  input shape that was not traced is re-traced, and a program whose code differs is kept as its
  own specialisation, so a specialised decision is never reused at another shape.
* A value derived from tensor **data** (``x.sum() > 0``, ``x.max().item()``, ``torch.equal``) is
  never made concrete: branching on it still fails to trace, and the module then runs as
  written (``strict=True`` names it). Data cannot be guarded by a shape signature.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

#: ``getattr(tensor, name)`` reads that depend only on the tensor's shape/rank.
_SHAPE_ATTRS = frozenset({"shape", "ndim"})
#: Tensor methods whose (non-tensor) result depends only on the tensor's shape.
_SHAPE_METHODS = frozenset({"size", "dim", "numel", "nelement", "ndimension"})


class _Missing:
    """No value is known for a node (its computation failed or read an unknown value)."""


MISSING = _Missing()


class _Released:
    """A tensor value freed when its node's last proxy died (see :meth:`ValueRecorder.watch`)."""


RELEASED = _Released()


class ValueRecorder:
    """Computes the value of each node that the tracer records, on a private model copy.

    Args:
        root: A private copy of the module being traced (the caller makes it): it runs the
            example, so its state, buffers and running statistics change.
        example: The value of the traced forward's (single) input.
        module_runner: ``module_runner(path, module) -> module``: the module object to call for
            a ``call_module`` node (the tracer's plan may run a copy in another step mode).
    """

    def __init__(
        self,
        root: nn.Module,
        example: Any,
        module_runner: Callable[[str, nn.Module], nn.Module],
    ) -> None:
        self.root = root
        self.example = example
        self.module_runner = module_runner
        self.values: dict[fx.Node, Any] = {}
        self.static: set[fx.Node] = set()  # non-tensor values derived from shapes only
        self._proxies: dict[fx.Node, int] = {}  # live proxy objects per node (see watch)
        # True while a value is computed: fx patches Module.__call__ during tracing, and the
        # tracer's call_module then runs the copy's modules directly instead of recording them.
        self.running = False

    def value(self, node: fx.Node) -> Any:
        """The recorded value of ``node`` (:data:`MISSING` when unknown or freed)."""
        value = self.values.get(node, MISSING)
        return MISSING if value is RELEASED else value

    def watch(self, proxy: fx.Proxy) -> None:
        """Free ``proxy``'s tensor value once no proxy of its node is alive.

        A later node can only read a value through a live proxy (the user's forward passes
        proxies, never nodes), so a tensor whose proxies are all gone is never read again.
        Without this the recorder would hold every activation of the example until the trace
        ends: as much memory as an eager training step (1.4 GB for a CNN at T=64).
        """
        node = proxy.node
        if node.op == "call_function" and node.target is getattr:
            # fx's ``Attribute`` proxy (``x.mT``, ``x.T``) makes its node through a proxy it
            # drops at once and keeps only the node: such values must stay (they are views).
            return
        self._proxies[node] = self._proxies.get(node, 0) + 1
        weakref.finalize(proxy, self._release, node)

    def _release(self, node: fx.Node) -> None:
        left = self._proxies[node] - 1
        self._proxies[node] = left
        if left == 0 and _holds_tensor(self.values.get(node)):
            self.values[node] = RELEASED

    def is_static(self, node: fx.Node) -> bool:
        """Whether ``node`` is a non-tensor value computed from shapes only (see module doc)."""
        return node in self.static

    def record(self, node: fx.Node) -> None:
        """Compute and store the value of a newly created node from its inputs' values."""
        inputs = node.all_input_nodes
        if any(self.value(i) is MISSING for i in inputs):
            self.values[node] = MISSING
            return
        args = fx.node.map_arg(node.args, self.value)
        kwargs = fx.node.map_arg(node.kwargs, self.value)
        self.running = True
        try:
            with torch.no_grad():
                value = self._run(node, args, kwargs)
        except Exception:
            value = MISSING
        finally:
            self.running = False
        self.values[node] = value
        if value is MISSING or _holds_tensor(value):
            return
        if node.op == "call_function" and node.target is getattr:
            ok = len(args) == 2 and args[1] in _SHAPE_ATTRS or self._all_static(inputs)
        elif node.op == "call_method" and node.target in _SHAPE_METHODS:
            ok = all(self.is_static(i) for i in inputs[1:])
        else:
            ok = self._all_static(inputs)
        if ok:
            self.static.add(node)

    def drop_unused_static(self, graph: fx.Graph) -> None:
        """Remove shape-derived values nobody reads (sizes that only fed an ``if``/``raise``)."""
        for node in reversed(list(graph.nodes)):
            if node in self.static and not node.users:
                graph.erase_node(node)

    def _all_static(self, inputs: list[fx.Node]) -> bool:
        return all(self.is_static(i) for i in inputs)

    def _run(self, node: fx.Node, args: Any, kwargs: Any) -> Any:
        if node.op == "placeholder":
            return self.example
        if node.op == "get_attr":
            obj: Any = self.root
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if node.op == "call_module":
            path = str(node.target)
            module = self.module_runner(path, self.root.get_submodule(path))
            return module(*args, **kwargs)
        return MISSING


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


class ValueProxy(fx.Proxy):
    """An fx proxy that knows its node's value (see the module docstring for what is concrete)."""

    def __init__(self, node: fx.Node, tracer: fx.Tracer, recorder: ValueRecorder) -> None:
        super().__init__(node, tracer)
        self.__dict__["_recorder"] = recorder

    def __getattr__(self, name: str) -> Any:
        if name == "shape":  # recorded at once, so len(x.shape) and iteration see the value
            return self.tracer.create_proxy("call_function", getattr, (self, "shape"), {})
        return super().__getattr__(name)

    def _static(self) -> Any:
        rec: ValueRecorder = self.__dict__["_recorder"]
        return rec.value(self.node) if rec.is_static(self.node) else MISSING

    def _rank(self) -> int | None:
        rec: ValueRecorder = self.__dict__["_recorder"]
        value = rec.value(self.node)
        return value.dim() if isinstance(value, torch.Tensor) else None

    @property
    def ndim(self) -> Any:  # type: ignore[override]
        rank = self._rank()
        return rank if rank is not None else self.__getattr__("ndim")

    def dim(self) -> Any:
        """The rank as a plain ``int`` when the value is a known tensor."""
        rank = self._rank()
        return rank if rank is not None else self.__getattr__("dim")()

    def _sequence(self) -> tuple[Any, ...] | list[Any] | None:
        """The value when it is a tuple/list (a shape, or the tensors of ``chunk``/``unbind``):
        its length depends on shapes only."""
        rec: ValueRecorder = self.__dict__["_recorder"]
        value = rec.value(self.node)
        return value if isinstance(value, (tuple, list)) else None

    def __len__(self) -> int:
        value = self._sequence()
        if value is None:
            return super().__len__()
        return len(value)

    def __iter__(self) -> Any:
        value = self._sequence()
        if value is None:
            return super().__iter__()
        return iter([operator.getitem(self, i) for i in range(len(value))])

    def __index__(self) -> int:
        value = self._static()
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fx.proxy.TraceError(
            "symbolically traced variables cannot be used as an index / int (not shape-derived)"
        )

    def __int__(self) -> int:
        return self.__index__()


def concrete_bool(proxy: fx.Proxy) -> bool | None:
    """``bool()`` of a shape-derived proxy's recorded value, or ``None`` when it has none."""
    if not isinstance(proxy, ValueProxy):
        return None
    value = proxy._static()
    if value is MISSING:
        return None
    return bool(value)
