"""Pass infrastructure: :class:`PassResult`, :class:`PassManager` and its error.

A pass is any callable ``graph -> PassResult(graph, modified)`` (a function or an object with
``__call__``) with a docstring stating its math and the cases it handles. Passes read the
compile options from ``options_of(graph)`` (:class:`~snncompile.passes.options.CompileOptions`:
``mode``, ``backend``, chunking) and the program's facts from ``graph.meta`` (``'step_mode'``,
``'T'``, ``'N'``). The manager times each pass, counts nodes, verifies the graph after every pass
and keeps a record per pass for ``CompiledModule.report()``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from snncompile.ir.graph import Graph
from snncompile.ir.verify import IRVerificationError, verify


@dataclasses.dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph, whether it changed, and short notes."""

    graph: Graph
    modified: bool
    notes: list[str] = dataclasses.field(default_factory=list)


Pass = Callable[[Graph], PassResult]


@dataclasses.dataclass
class PassRecord:
    """One row of a compile report."""

    name: str
    modified: bool
    nodes_before: int
    nodes_after: int
    seconds: float
    notes: list[str]


class PassVerificationError(RuntimeError):
    """A pass produced a graph that fails :func:`~snncompile.ir.verify`."""

    def __init__(self, pass_name: str, before: Sequence[str], error: IRVerificationError) -> None:
        self.pass_name = pass_name
        self.passes_before = tuple(before)
        self.error = error
        ran = ", ".join(before) if before else "none"
        super().__init__(f"pass {pass_name!r} broke the IR (passes run before it: {ran}): {error}")


def pass_name(fn: Any) -> str:
    """The display name of a pass (its ``name`` attribute, function name or class name)."""
    return getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__


class PassManager:
    """Runs passes in order, verifying the graph after each one.

    ``passes`` is a sequence of ``(name, pass)`` pairs or bare passes. ``verify_each=False``
    skips the per-pass verification (the final graph is still verified).
    """

    def __init__(self, passes: Sequence[Any], *, verify_each: bool = True) -> None:
        self.passes: list[tuple[str, Pass]] = []
        for entry in passes:
            if isinstance(entry, tuple):
                self.passes.append((entry[0], entry[1]))
            else:
                self.passes.append((pass_name(entry), entry))
        self.verify_each = verify_each
        self.records: list[PassRecord] = []

    def run(self, graph: Graph) -> Graph:
        """Run every pass on ``graph`` and return the final graph (records in ``.records``)."""
        done: list[str] = []
        self.records = []
        for name, fn in self.passes:
            before = len(graph)
            start = time.perf_counter()
            result = fn(graph)
            elapsed = time.perf_counter() - start
            if not isinstance(result, PassResult):
                raise TypeError(
                    f"pass {name!r} must return a PassResult(graph, modified), got "
                    f"{type(result).__name__}"
                )
            graph = result.graph
            if self.verify_each:
                try:
                    verify(graph)
                except IRVerificationError as err:
                    raise PassVerificationError(name, done, err) from err
            self.records.append(
                PassRecord(name, result.modified, before, len(graph), elapsed, list(result.notes))
            )
            done.append(name)
        if not self.verify_each:
            try:
                verify(graph)
            except IRVerificationError as err:
                raise PassVerificationError(done[-1] if done else "<none>", done[:-1], err) from err
        return graph
