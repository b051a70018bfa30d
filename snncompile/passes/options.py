"""The options a graph is compiled with: one typed, immutable record (:class:`CompileOptions`).

:func:`snncompile.optimize` builds the record from its arguments and puts it on the IR graph
(``graph.options``); passes read it with :func:`options_of` instead of looking up free-form
``graph.meta`` keys. ``graph.meta`` keeps the facts the frontend found about the program
(``'step_mode'``, the example sizes ``'T'`` and ``'N'``, notes) and what passes record (such as
the chunk plan, ``graph.meta['chunk_plan']``).

Changing an option means a new record: ``graph.options = dataclasses.replace(options_of(graph),
mode='inference')``. A graph that still carries one of the old keys (``graph.meta['mode']``,
``['backend']``, ``['chunk']``) is refused with an error that says so, rather than compiled
with an option that would silently not be read.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snncompile.ir.graph import Graph

__all__ = ["BACKENDS", "MODES", "CompileOptions", "options_of"]

MODES = ("train", "inference")
BACKENDS = ("auto", "torch", "cpu", "cuda")
# graph.meta keys that carried options before they were one record.
_OLD_KEYS = ("mode", "backend", "chunk")


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """What a graph is compiled for.

    Attributes:
        mode: ``'train'`` (autograd through every op, batchnorm in training mode) or
            ``'inference'`` (batchnorm folded, dropout removed).
        backend: The ``backend=`` of :func:`snncompile.optimize` (``'auto'``, ``'torch'``,
            ``'cpu'``, ``'cuda'``), or ``None`` for a graph that was only traced.
        chunk_size: The requested chunked-forward window ``K`` (inference), or ``None``.
        memory_budget: The requested inference memory budget (turned into ``K`` by the
            runtime), or ``None``.
    """

    mode: str = "train"
    backend: str | None = None
    chunk_size: int | None = None
    memory_budget: str | int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"CompileOptions: mode must be one of {MODES}, got {self.mode!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(
                f"CompileOptions: backend must be one of {BACKENDS} or None, got {self.backend!r}"
            )

    @property
    def chunked(self) -> bool:
        """Whether a chunked forward was requested (``chunk_size`` or ``memory_budget``)."""
        return self.chunk_size is not None or self.memory_budget is not None

    @property
    def fused_backend(self) -> str:
        """The backend fused neurons record: ``backend``, or ``'auto'`` when none was chosen."""
        return self.backend or "auto"


def options_of(graph: Graph) -> CompileOptions:
    """The options of ``graph`` (the defaults, ``CompileOptions()``, when it has none).

    Raises:
        ValueError: the graph carries an option as an old ``graph.meta`` key; the message names
            the key and how to set the option now.
    """
    stale = [k for k in _OLD_KEYS if k in graph.meta]
    if stale:
        raise ValueError(
            f"graph.meta[{stale[0]!r}] is no longer read: compile options travel in "
            "graph.options, a snncompile.passes.options.CompileOptions record. Set "
            "graph.options = CompileOptions(mode=..., backend=...) (or dataclasses.replace the "
            f"current one) and drop the meta key(s) {stale}."
        )
    options = getattr(graph, "options", None)
    return options if options is not None else CompileOptions()
