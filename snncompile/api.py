"""The public entry points: :func:`optimize` and :func:`trace`."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from snncompile.frontend.online_eval import online_eval_equivalent
from snncompile.frontend.trace import state_copy_memo, trace_model
from snncompile.ir.graph import Graph
from snncompile.ir.verify import verify
from snncompile.passes.base import PassManager, PassRecord
from snncompile.passes.chunk import chunk_forward  # also registers the 'chunking' stage pass
from snncompile.passes.fuse_elementwise import fuse_elementwise  # noqa: F401  (after it)
from snncompile.passes.fuse_neurons import fuse_neurons  # noqa: F401  (registers 'fusion')
from snncompile.passes.options import BACKENDS, MODES, CompileOptions
from snncompile.passes.pipeline import build_pipeline
from snncompile.runtime import fused_backends
from snncompile.runtime.chunked import configure_chunking
from snncompile.runtime.compiled import CompiledModule, lower_to_fx
from snncompile.runtime.lower_fusion import apply_fusion_decisions
from snncompile.runtime.shape_guard import ShapeGuard, program_key, signature


def trace(model: nn.Module, example_input: torch.Tensor, *, strict: bool = False) -> Graph:
    """Capture ``model`` into an (unoptimized, verified) IR graph.

    ``example_input`` is ``[T, N, ...]``. For a single-step model the graph describes one time
    step (``step`` layout); for a multi-step model, the whole sequence. ``print(graph)`` shows it.
    """
    graph = trace_model(model, example_input, strict=strict)
    graph.options = CompileOptions(mode="train" if model.training else "inference")
    verify(graph)
    return graph


def optimize(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    mode: str | None = None,
    backend: str = "auto",
    strict: bool = False,
    passes: Sequence[Any] | None = None,
    chunk_size: int | None = None,
    memory_budget: str | int | None = None,
    fold_batchnorm: bool = True,
    pack_spikes: bool | None = None,
) -> CompiledModule:
    """Compile ``model`` into a :class:`~snncompile.runtime.compiled.CompiledModule`.

    Args:
        model: A SpikingJelly-style SNN (snncompile's or SpikingJelly 2.0.0's modules, plain
            ``torch.nn`` layers and torch code), in single-step or multi-step form.
        example_input: A ``[T, N, ...]`` tensor used to trace shapes (the model's state and
            parameters are not changed by it).
        mode: ``'train'`` (parameters and BN statistics shared with ``model``; gradients equal
            eager) or ``'inference'`` (eval semantics: dropout/identity removed, BN folded into
            new layers; parameters not folded stay shared). Default: ``'train'`` if
            ``model.training`` else ``'inference'``.
        backend: ``'auto'``, ``'torch'``, ``'cpu'`` or ``'cuda'``; recorded in ``graph.options``
            (:class:`~snncompile.passes.options.CompileOptions`) for the fusion passes.
        strict: Raise instead of running untraceable submodules as opaque modules.
        passes: Pass callables or pipeline names to run instead of the default pipeline
            (step-mode lowering and layout cleanup always run).
        chunk_size: Inference only: run ``[T, N, ...]`` inputs ``chunk_size`` steps at a time,
            neuron state carried across chunks (same output, memory bounded in ``T``); see
            :mod:`snncompile.passes.chunk` and :mod:`snncompile.runtime.chunked`.
        memory_budget: A budget such as ``'512MB'``. Inference, instead of ``chunk_size``: the
            chunk size is derived from the per-step activation memory measured on
            ``example_input``. Training: the compiler measures what each segment between
            neurons saves for backward and recomputes segments in backward (from their inputs,
            spikes packed 1 bit each) until the step's predicted peak of live tensor bytes fits;
            gradients are the same. When segments cannot meet the budget and no op but the
            neurons and training BatchNorms couples time steps (no reduction, attention or
            random draw over ``T`` inside), the whole program is recomputed in chunks of time
            instead, with a bounded number of chunk-start states kept
            (:mod:`snncompile.runtime.time_chunks`; training BatchNorms take their statistics
            over all ``T`` in extra sweeps, :mod:`snncompile.runtime.batch_stats`): outputs
            bit-equal, gradients equal to float rounding. ``report()`` shows the plan, predicted and
            measured peak (see :mod:`snncompile.runtime.recompute`), or why time chunks are
            not possible; a budget below the smallest reachable peak raises
            ``MemoryBudgetError`` naming that peak.
        fold_batchnorm: Inference only: fold each BatchNorm into the conv/linear before it
            (faster). Folding is *not bit-exact*: the folded weights round differently (about
            1e-6 relative on pre-activations), which can flip a spike whose membrane sits
            within that distance of the threshold, and in deep nets the flips add up (logits
            of a ResNet-18 moved by ~1). ``compiled.report()`` says when it happened. Pass
            ``False`` for eval outputs bit-exact with the eager model (then no BatchNorm is
            merged into a neuron's kernel by ``fuse_chains`` either, in any mode).
        pack_spikes: Training only: conv/linear/max-pooling layers whose input is a binary spike
            tensor save it for backward packed 1 bit per spike (gradients bit-equal; see
            :mod:`snncompile.passes.pack_spikes`). Packing and unpacking cost step time (1.1-1.9x
            measured on a conv-BN-LIF CNN at T=4-16), so the default ``None``
            packs only under a training ``memory_budget``; ``True`` always packs, ``False``
            never.

    Returns:
        A module that takes ``[T, N, ...]`` and returns what the multi-step model returns, or
        for a single-step model the stack of its per-step outputs. It is guarded by the shape
        of ``example_input`` (:mod:`snncompile.runtime.shape_guard`): an input of another shape
        is re-traced (parameters shared) and runs a program compiled for it; ``report()`` lists
        the shapes compiled.
    """
    options: dict[str, Any] = dict(
        mode=mode,
        backend=backend,
        strict=strict,
        passes=passes,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        fold_batchnorm=fold_batchnorm,
        pack_spikes=pack_spikes,
    )
    compiled = _compile(model, example_input, **options)
    compiled.shape_guard = ShapeGuard(
        _Recompile(model, options), signature(example_input), program_key(compiled)
    )
    return compiled


def _names(passes: Sequence[Any]) -> set[str]:
    return {p if isinstance(p, str) else getattr(p, "__name__", "") for p in passes}


class _Recompile:
    """Compiles ``model`` again on another input with the first compile's options (picklable)."""

    def __init__(self, model: nn.Module, options: dict[str, Any]) -> None:
        self.model = model
        self.options = options

    def __call__(self, x: torch.Tensor) -> CompiledModule:
        return _compile(self.model, x, **self.options)


def _compile(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    mode: str | None,
    backend: str,
    strict: bool,
    passes: Sequence[Any] | None,
    chunk_size: int | None,
    memory_budget: str | int | None,
    fold_batchnorm: bool,
    pack_spikes: bool | None,
) -> CompiledModule:
    """One trace and compile of ``model`` at ``example_input``'s shape (see :func:`optimize`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: model must be an nn.Module, got {type(model).__name__}")
    if mode is None:
        mode = "train" if model.training else "inference"
    if mode not in MODES:
        raise ValueError(f"optimize: mode must be one of {MODES} or None, got {mode!r}")
    if backend not in BACKENDS:
        raise ValueError(
            f"optimize: backend must be one of {BACKENDS}, got {backend!r}."
            + fused_backends.alias_hint(backend)
        )
    # Fail now, not at the first call, when the backend cannot run here (e.g. 'cuda', no GPU).
    fused_backends.check_available(backend, "optimize")
    work = model
    if mode == "inference" and model.training:
        # Inference compiles eval semantics without flipping the user's module flags: modules are
        # copied (parameters shared) and put in eval mode.
        memo: dict[int, Any] = state_copy_memo(model)
        memo.update({id(p): p for p in model.parameters()})
        work = copy.deepcopy(model, memo).eval()
    if mode == "inference":
        # SpikingJelly's OTTT/SLTT neurons and OTTTSequential are plain LIF/Sequential in eval.
        work = online_eval_equivalent(work)

    def compile_part(part: nn.Module, part_input: torch.Tensor) -> nn.Module:
        # A part of a module that runs as written (see snncompile.frontend.partial).
        return optimize(part, part_input, mode=mode, backend=backend, passes=passes)

    start = time.perf_counter()
    graph = trace_model(work, example_input, strict=strict, compile_part=compile_part)
    frontend = PassRecord(
        "frontend",
        False,
        0,
        len(graph),
        time.perf_counter() - start,
        list(graph.meta.get("frontend_notes", ())),
    )
    train_budget = mode == "train" and memory_budget is not None and chunk_size is None
    # A chunk request is read by the 'chunking' stage pass (snncompile.passes.chunk), which
    # validates the plan; a training memory budget is planned after lowering (below).
    chunk = {} if train_budget else {"chunk_size": chunk_size, "memory_budget": memory_budget}
    graph.options = CompileOptions(mode=mode, backend=backend, **chunk)
    verify(graph)
    pipeline = build_pipeline(mode, passes)
    if not fold_batchnorm:
        # Read by fuse_chains: batchnorms run as PyTorch's own op, not inside a chain kernel.
        graph.meta["exact_batchnorm"] = True
        if passes is not None and any(name == "fold_batchnorm" for name, _ in pipeline):
            raise ValueError(
                "optimize: passes lists 'fold_batchnorm' but fold_batchnorm=False; drop one"
            )
        pipeline = [(name, fn) for name, fn in pipeline if name != "fold_batchnorm"]
    if pack_spikes is None:
        pack_spikes = train_budget or (passes is not None and "pack_spikes" in _names(passes))
    if not pack_spikes:  # packing costs step time: only under a budget unless asked for
        pipeline = [(name, fn) for name, fn in pipeline if name != "pack_spikes"]
    manager = PassManager(pipeline)
    graph = manager.run(graph)
    apply_fusion_decisions(graph)  # the passes decided; lowering makes the modules follow
    gm = lower_to_fx(graph)
    compiled = CompiledModule(
        gm,
        graph,
        [frontend, *manager.records],
        example_shape=tuple(example_input.shape),
        mode=mode,
        backend=backend,
        source=work,  # the state dict speaks the model's keys (work has the model's structure)
    )
    if mode == "inference":
        compiled.eval()
    if train_budget:
        from snncompile.runtime.chunked import parse_memory
        from snncompile.runtime.recompute import configure_memory_plan

        configure_memory_plan(compiled, graph, example_input, parse_memory(memory_budget))
    if graph.options.chunked:
        if graph.meta.get("chunk_plan", {}).get("status") != "planned":  # passes skipped it
            chunk_forward(graph)
        configure_chunking(
            compiled, example_input, chunk_size=chunk_size, memory_budget=memory_budget
        )
    return compiled
