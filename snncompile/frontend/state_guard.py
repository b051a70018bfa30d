"""Guards that keep tracing honest about module state.

torch.fx runs a traced forward's Python code once, so state it touches outside tensors is
not recorded: a read of a stateful module's memory (a neuron's ``v``) from a parent's forward
is baked in as a constant, a write is lost, and a Python attribute it assigns (a step counter)
keeps its trace-time value. While the probe is traced every memory is replaced by a
:class:`_StateSentinel` that refuses any use (:func:`state_guarded`), and the attributes are
compared before and after (:func:`python_state`); a module caught doing either runs as
written (an ``OPAQUE_MODULE``), with the reason in the report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn


class StateWriteError(RuntimeError):
    """Traced code outside a stateful module read or wrote that module's state."""


class PythonStateError(RuntimeError):
    """A traced forward assigned a Python attribute (e.g. a step counter ``self.t += 1``)."""


_TORCH_BOOKKEEPING = ("_memories", "_memories_rv", "_non_persistent_buffers_set")


def python_state(module: nn.Module) -> dict[tuple[int, str], Any]:
    """The attributes of ``module`` and its submodules, keyed by ``(id(submodule), name)``.

    Plain attributes and the entries of ``_parameters``/``_buffers``/``_modules`` are recorded
    (memories are guarded by :class:`_StateSentinel` instead; hook tables are skipped).
    """
    out: dict[tuple[int, str], Any] = {}
    for sub in module.modules():
        for key, value in vars(sub).items():
            if (
                key in _TORCH_BOOKKEEPING
                or "hooks" in key
                or key.startswith(("_state_dict", "_load"))
            ):
                continue
            if key in ("_parameters", "_buffers", "_modules"):
                out.update(((id(sub), f"{key}[{k!r}]"), v) for k, v in value.items())
            else:
                out[(id(sub), key)] = value
    return out


def restore_python_state(module: nn.Module, before: dict[tuple[int, str], Any]) -> list[str]:
    """Put back the attributes recorded by :func:`python_state`; the changed names, sorted."""
    after = python_state(module)
    changed = [
        k
        for k in before.keys() | after.keys()
        if before.get(k, _MISSING) is not after.get(k, _MISSING)
    ]
    subs = {id(m): m for m in module.modules()}
    paths = {id(m): p for p, m in module.named_modules()}
    for key in changed:
        sub, name = subs[key[0]], key[1]
        store, entry = vars(sub), name
        if "[" in name:
            table, entry = name.split("[", 1)
            store, entry = vars(sub)[table], entry[:-2].strip("'")
        if key in before:
            store[entry] = before[key]
        else:
            store.pop(entry, None)
    return sorted(f"{paths[k[0]]}.{k[1]}" if paths.get(k[0]) else k[1] for k in changed)


def check_no_python_state(module: nn.Module, before: dict[tuple[int, str], Any]) -> None:
    """Raise :class:`PythonStateError` if tracing ``module``'s forward assigned an attribute.

    torch.fx runs the Python code of a traced forward once: an attribute it assigns (a step
    counter, a cached tensor) would be baked into the graph as the constant it had at trace time,
    and later calls would never update it. Such a module must run as written. The attributes are
    put back as they were, so the retried trace sees the model unchanged.
    """
    names = restore_python_state(module, before)
    if names:
        raise PythonStateError(
            f"its forward assigns the Python attribute(s) {names} (state kept outside tensors, "
            "e.g. a step counter); torch.fx would bake the value it had while tracing into a "
            "constant, so this module must run as written"
        )


_MISSING = object()


class _StateSentinel:
    """Stands in for a memory (e.g. a neuron's ``v``) while the model is traced.

    Stateful modules are leaves, so only code *around* them (a parent's forward) can touch their
    state during tracing, and fx records neither an attribute read (the value at trace time is
    baked in as a constant) nor a write (it is lost). Any use of the sentinel raises, which turns
    the module whose forward did it into an opaque module that runs as written.
    """

    __slots__ = ("owner",)

    def __init__(self, owner: str) -> None:
        self.owner = owner

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise StateWriteError(
            f"its forward reads the state {self.owner!r} of a stateful module (e.g. a neuron's "
            "membrane) from outside that module; torch.fx cannot record state reads or writes, "
            "so this module must run as written"
        )

    def __getattr__(self, name: str) -> Any:
        self._refuse()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        owner = next((a.owner for a in args if isinstance(a, _StateSentinel)), "?")
        _StateSentinel(owner)._refuse()

    def __repr__(self) -> str:
        return f"<state {self.owner} during tracing>"


for _dunder in (
    "add radd sub rsub mul rmul truediv rtruediv floordiv rfloordiv mod rmod pow rpow matmul "
    "rmatmul and rand or ror xor rxor lt le gt ge eq ne neg pos abs invert bool float int index "
    "len iter getitem setitem array"
).split():
    setattr(_StateSentinel, f"__{_dunder}__", _StateSentinel._refuse)
_StateSentinel.__hash__ = object.__hash__  # type: ignore[method-assign]  (eq is refused)


def memory_stores(root: nn.Module) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, sub in root.named_modules():
        memories = vars(sub).get("_memories")
        if isinstance(memories, dict) and memories:
            yield path, memories


def check_no_state_writes(module: nn.Module, path: str) -> None:
    """Raise :class:`StateWriteError` if tracing ``module``'s forward replaced a sentinel."""
    written = [
        f"{p}.{name}" if p else name
        for p, memories in memory_stores(module)
        for name, value in memories.items()
        if not isinstance(value, _StateSentinel)
    ]
    if written:
        where = [f"{path}.{w}" if path else w for w in written]
        raise StateWriteError(
            f"its forward assigns to the state {where} of a stateful module (e.g. resetting a "
            "neuron's membrane from outside the neuron); torch.fx cannot record state writes, so "
            "this module must run as written"
        )


@contextlib.contextmanager
def state_guarded(root: nn.Module) -> Iterator[None]:
    """Replace every memory of ``root``'s modules by a sentinel while tracing; restore after."""
    saved = [(memories, dict(memories)) for _path, memories in memory_stores(root)]
    for path, memories in memory_stores(root):
        for name in memories:
            memories[name] = _StateSentinel(f"{path}.{name}" if path else name)
    try:
        yield
    finally:
        for memories, before in saved:
            memories.clear()
            memories.update(before)
