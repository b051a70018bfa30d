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
    """A named slot in the pipeline: its built-in passes in the order listed here (``(name,
    'module:function')``, or ``(name, 'module:function', modes)`` for a pass that runs only in
    some modes; imported when a pipeline is built), then the passes registered for it with
    :func:`register_pass`, in registration order."""

    name: str
    builtin: tuple[tuple[str, str] | tuple[str, str, frozenset[str]], ...] = ()


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
    # Kernel fusion sees the final op set and layouts (neurons as seq ops, synapses as flat):
    # fuse_neurons first, then fuse_elementwise, because merging scales needs FUSED_NEURON nodes
    # to merge into; then fuse_chains (batchnorm / pooling around a fused neuron without merged
    # scales, so after fuse_elementwise has decided which neurons take scales); passes
    # registered for the stage run after these.
    Stage(
        "fusion",
        (
            ("fuse_neurons", "snncompile.passes.fuse_neurons:fuse_neurons"),
            ("fuse_elementwise", "snncompile.passes.fuse_elementwise:fuse_elementwise"),
            ("fuse_chains", "snncompile.passes.fuse_chains:fuse_chains"),
            # Last in the stage: a spike is binary only once no gain has been merged into it.
            ("pack_spikes", "snncompile.passes.pack_spikes:pack_spikes", frozenset({"train"})),
        ),
    ),
    # Chunking wraps whatever graph fusion left, bounding memory over T; it must come last.
    Stage("chunking", (("chunk_forward", "snncompile.passes.chunk:chunk_forward"),)),
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


def _builtin(stage: str) -> list[PipelineEntry]:
    import importlib

    item = next(i for i in PIPELINE if isinstance(i, Stage) and i.name == stage)
    entries = []
    for name, ref, *modes in item.builtin:
        module, fn = ref.split(":")
        fn_obj = getattr(importlib.import_module(module), fn)
        entries.append(PipelineEntry(name, fn_obj, modes[0] if modes else BOTH))
    return entries


def registered_passes(stage: str) -> list[PipelineEntry]:
    """The passes of ``stage``, in order: its built-in ones (listed in :data:`PIPELINE`; a pass
    registered under a built-in's name replaces it in place), then the registered ones."""
    user = {e.name: e for e in _REGISTERED[stage]}
    builtin = [user.pop(e.name, e) for e in _builtin(stage)]
    return builtin + [e for e in _REGISTERED[stage] if e.name in user]


def import_builtin_passes() -> None:
    """Import the built-in stage passes listed in :data:`PIPELINE` (``import snncompile`` is
    lazy, so they may not be imported yet when a pipeline is built)."""
    for stage in STAGES:
        _builtin(stage)


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
            flat.extend(e for e in registered_passes(item.name) if mode in e.modes)
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
