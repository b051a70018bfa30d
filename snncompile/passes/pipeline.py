"""The pass pipeline: the single place where pass order lives.

:data:`PIPELINE` is one ordered list. Each entry is a pass (with the modes it runs in) or a named
*stage* -- a slot where passes registered with :func:`register_pass` run (``'fusion'`` for
neuron-kernel fusion, ``'chunking'`` for chunked forward). :func:`build_pipeline` expands it for a
mode (``'train'`` or ``'inference'``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from snncompile.passes.base import Pass, pass_name
from snncompile.passes.fold_batchnorm import fold_batchnorm
from snncompile.passes.lower_step_mode import lower_step_mode
from snncompile.passes.remove_dead_ops import remove_dead_ops
from snncompile.passes.simplify_time_layout import simplify_time_layout

MODES = ("train", "inference")
BOTH = frozenset(MODES)
INFERENCE = frozenset({"inference"})


@dataclasses.dataclass(frozen=True)
class PipelineEntry:
    """A pass in the pipeline: ``required`` passes also run when the user picks the passes."""

    name: str
    fn: Pass
    modes: frozenset[str] = BOTH
    required: bool = False


@dataclasses.dataclass(frozen=True)
class Stage:
    """A named slot in the pipeline that runs the passes registered for it, in order."""

    name: str


STAGES = ("fusion", "chunking")
_REGISTERED: dict[str, list[PipelineEntry]] = {stage: [] for stage in STAGES}

PIPELINE: list[PipelineEntry | Stage] = [
    # First: removing eval-mode dropout/identity shrinks the graph for every later pass and
    # makes conv -> dropout(eval) -> BN chains foldable.
    PipelineEntry("remove_dead_ops", remove_dead_ops, INFERENCE),
    # Then lowering: every later pass sees the sequence form that will actually run.
    PipelineEntry("lower_step_mode", lower_step_mode, BOTH, required=True),
    # Right after lowering (and for multi-step models, after the frontend's per-layer
    # merge/split pairs): make stateless chains one flat run so conv and BN become neighbours.
    PipelineEntry("simplify_time_layout", simplify_time_layout, BOTH, required=True),
    # BN folding needs conv -> BN adjacency in the final layout, so it runs after the cleanup.
    PipelineEntry("fold_batchnorm", fold_batchnorm, INFERENCE),
    # Kernel fusion sees the final op set and layouts (neurons as seq ops, synapses as flat).
    # Its passes run in registration order: fuse_neurons, then fuse_elementwise (which imports
    # fuse_neurons first), because merging scales needs FUSED_NEURON nodes to merge into; then
    # fuse_chains (batchnorm / pooling around a fused neuron; imports fuse_elementwise first).
    Stage("fusion"),
    # Chunking wraps whatever graph fusion left, bounding memory over T; it must come last.
    Stage("chunking"),
]


def register_pass(
    stage: str, fn: Pass, *, name: str | None = None, modes: Sequence[str] = MODES
) -> None:
    """Register ``fn`` to run in pipeline stage ``stage`` (``'fusion'`` or ``'chunking'``).

    Passes of a stage run in registration order; registering the same name again replaces the
    earlier pass. ``modes`` limits the pass to ``'train'`` and/or ``'inference'`` pipelines.
    """
    if stage not in _REGISTERED:
        raise ValueError(f"register_pass: unknown stage {stage!r}; stages are {STAGES}")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"register_pass: unknown mode(s) {bad}; modes are {MODES}")
    entry = PipelineEntry(name or pass_name(fn), fn, frozenset(modes))
    entries = [e for e in _REGISTERED[stage] if e.name != entry.name]
    entries.append(entry)
    _REGISTERED[stage] = entries


def unregister_pass(stage: str, name: str) -> None:
    """Remove the pass called ``name`` from ``stage`` (no error if it is not there)."""
    _REGISTERED[stage] = [e for e in _REGISTERED.get(stage, []) if e.name != name]


def registered_passes(stage: str) -> list[PipelineEntry]:
    """The passes registered in ``stage``, in order."""
    return list(_REGISTERED[stage])


def import_builtin_passes() -> None:
    """Import the modules whose import registers the built-in stage passes (fusion, chunking).

    ``import snncompile`` is lazy, so they may not be imported yet when a pipeline is built.
    """
    import snncompile.passes.chunk  # noqa: F401
    import snncompile.passes.fuse_chains  # noqa: F401
    import snncompile.passes.fuse_elementwise  # noqa: F401
    import snncompile.passes.fuse_neurons  # noqa: F401


def build_pipeline(mode: str, passes: Sequence[object] | None = None) -> list[tuple[str, Pass]]:
    """The ``(name, pass)`` list to run for ``mode``.

    With ``passes=None`` this is :data:`PIPELINE` for the mode with the stages expanded. With an
    explicit ``passes`` list (pass callables or names of pipeline entries), those run in the
    given order, and the ``required`` entries (which execution depends on) are added in their
    pipeline positions if missing.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    import_builtin_passes()
    flat: list[PipelineEntry] = []
    for item in PIPELINE:
        if isinstance(item, Stage):
            flat.extend(e for e in _REGISTERED[item.name] if mode in e.modes)
        elif mode in item.modes:
            flat.append(item)
    if passes is None:
        return [(e.name, e.fn) for e in flat]
    by_name = {e.name: e for e in flat}
    by_name.update(
        {e.name: e for item in PIPELINE if isinstance(item, PipelineEntry) for e in [item]}
    )
    chosen: list[tuple[str, Pass]] = []
    for p in passes:
        if isinstance(p, str):
            if p not in by_name:
                raise ValueError(f"unknown pass {p!r}; known passes: {sorted(by_name)}")
            chosen.append((p, by_name[p].fn))
        elif callable(p):
            chosen.append((pass_name(p), p))
        else:
            raise TypeError(f"passes must be pass callables or names, got {p!r}")
    names = [n for n, _ in chosen]
    required = [e for e in flat if e.required and e.name not in names]
    # Required passes go first (they establish the executable sequence form).
    return [(e.name, e.fn) for e in required] + chosen
