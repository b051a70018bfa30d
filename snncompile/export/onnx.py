"""ONNX export of compiled SNNs for inference (:func:`export_onnx`, :func:`onnx_initial_states`).

**Route.** We emit ONNX ourselves by walking the optimized SNN IR (after the inference passes:
BN folded, dropout gone) instead of re-tracing the model with ``torch.onnx.export``. Reasons:
the neuron state must become explicit graph inputs/outputs (SpikingJelly's own neurons export
with their membrane frozen as a constant under the dynamo exporter); each neuron must come from
its dynamics definition through one renderer table (:mod:`snncompile.codegen.onnx_renderer`),
the same expressions the torch/C/CUDA kernels render, so a new neuron type exports with no
exporter change; and the exact node list is ours (no unrolling, no dependence on onnxscript or
on which torch ops the dynamo exporter decomposes to). The ``torch._higher_order_ops.scan``
route of ``torch.onnx.export(dynamo=True)`` would give a ``Scan`` too, but only for code written
as a scan body, i.e. not for the IR we already have.

**One step, two wrappers.** Every IR layout collapses to one time step ``[N, *]``: ``flat``
values (``[T*N, *]``) and ``seq`` values (``[T, N, *]``) are both ``[N, *]`` at a single step,
``MERGE_TIME``/``SPLIT_TIME`` become no-ops, and a dimension argument ``d >= 1`` of a
sequence-level op becomes ``d - 1`` (``d = 0`` would mix time steps and is refused). The step
graph reads the input ``x_t`` and every state of every neuron (the membrane ``v``, and the extra
states of multi-state neurons), and returns the output ``y_t`` and the next states.

* ``mode='step'``: the step graph is the model. Inputs: the data input (``[N, *]``) then one
  input ``<neuron node>.<state>`` per neuron state (``.v``, then e.g. ``.w``); outputs: the model
  output(s) then ``<neuron node>.<state>_next`` in the same order.
* ``mode='sequence'``: the step graph is the body of one ONNX ``Scan`` over axis 0 of
  ``x: [T, N, *]`` (dynamic ``T`` and ``N``; the node count does not depend on ``T``). Initial
  states are built inside the graph (``ConstantOfShape`` with the batch size read from ``x``).
  Reductions over time (``x.mean(0)``, ``x.sum(0)``: a firing-rate readout) and every node that
  depends on them run after the ``Scan`` on the stacked per-step values.
* Reductions over time in ``mode='step'``: the step model carries each one's running sum
  (``<node>.acc``) and, for a mean, its step count (``<node>.steps``) as extra states after the
  neurons' (listed in the metadata, starting at 0), and returns the mean (sum) of the steps seen
  so far: the last of ``T`` steps gives the sequence model's output, every earlier step the
  readout so far (what a streaming classifier reads). A neuron after a reduction, or a node
  mixing reduced and per-step values, has no one-step form and is refused by name.

**Metadata** (``model.metadata_props``), so runtimes without Python can build the states:

* ``snncompile.format``: ``"1"``; ``snncompile.mode``: ``"step"`` or ``"sequence"``;
* ``snncompile.states``: a JSON list, one object per neuron state in input order (``v``, then a
  multi-state neuron's extra states, e.g. Izhikevich's ``w``):
  ``{"node": IR node name, "state": state name, "input": state input name, "output": next-state
  output name, "shape": [-1, C, H, W] (-1 = batch), "dtype": "float32", "init": initial
  value}``. An extra state's ``init`` is the value its module registers; ``v``'s is
  the neuron's ``NeuronSpec.v_init`` when it has one (ann2snn's half-threshold IF neurons start
  at ``v_threshold / 2``), else ``v_reset`` (hard reset) or ``0.0`` (soft reset); the initial
  state is that value broadcast to ``shape`` with the batch size filled in. Sequence-mode models
  list their (internal) states too and start their ``Scan`` from the same values.

**Versions.** The opset defaults to :data:`DEFAULT_OPSET` (capped by what the installed
onnxruntime implements) and the IR version is the smallest one that declares that opset
(``onnx.helper.find_min_ir_version_for``), capped by the onnxruntime limit table
:data:`ORT_LIMITS` -- never onnx's own (newer) default, which onnxruntime may reject.

**Files.** This module is the public entry (compile to the inference IR, build, check, write);
the work is done by :mod:`~snncompile.export.onnx_versions` (opset/IR version table),
:mod:`~snncompile.export.onnx_emitter` (one time step, neurons from their dynamics),
:mod:`~snncompile.export.onnx_ops` (the synapse op table), :mod:`~snncompile.export.onnx_scan`
(step graph or ``Scan`` assembly) and :mod:`~snncompile.export.onnx_metadata` (state records).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import helper
from torch import nn

from snncompile.export.onnx_builder import OnnxExportError
from snncompile.export.onnx_metadata import (
    STATES_KEY,
    OnnxMetadataError,
    describe_model,
    load_metadata,
    onnx_initial_states,
    onnx_state_outputs,
    read_states,
)
from snncompile.export.onnx_ops import SYNAPSE_OPS, adaptive_pool_matrix
from snncompile.export.onnx_scan import build_model
from snncompile.export.onnx_versions import (
    DEFAULT_OPSET,
    MIN_OPSET,
    ORT_LIMITS,
    ort_limits,
    pick_versions,
)
from snncompile.ir.graph import Graph

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "ORT_LIMITS",
    "SYNAPSE_OPS",
    "OnnxExportError",
    "OnnxMetadataError",
    "adaptive_pool_matrix",
    "describe_model",
    "export_onnx",
    "load_metadata",
    "node_count",
    "onnx_initial_states",
    "onnx_state_outputs",
    "ort_limits",
    "pick_versions",
    "read_states",
]


# -- getting the inference IR ---------------------------------------------------------------------
def _inference_graph(model_or_compiled: nn.Module, example_input: torch.Tensor) -> Graph:
    """The optimized inference IR of a model or of an already compiled module."""
    from snncompile.api import optimize
    from snncompile.runtime.compiled import CompiledModule

    if isinstance(model_or_compiled, CompiledModule):
        compiled = model_or_compiled
        graph = compiled.graph.copy()
        # Scales merged into fused neurons (fuse_elementwise) are exported as the ops they were.
        # So are batchnorms and poolings merged into them (fuse_chains, which ran last).
        from snncompile.passes.fuse_chains import unfuse_chains
        from snncompile.passes.fuse_elementwise import unfuse_elementwise

        graph = unfuse_elementwise(unfuse_chains(graph).graph).graph
        if compiled.mode != "inference" or compiled.training:
            warnings.warn(
                "export_onnx: the compiled module was built for training; exporting it with "
                "inference semantics (eval-mode batchnorm with running statistics, no dropout). "
                "Compile with mode='inference' to fold batchnorms too.",
                stacklevel=3,
            )
            from snncompile.passes.base import PassManager
            from snncompile.passes.fold_batchnorm import fold_batchnorm
            from snncompile.passes.options import options_of
            from snncompile.passes.remove_dead_ops import remove_dead_ops

            graph.options = dataclasses.replace(options_of(graph), mode="inference")
            graph = PassManager([remove_dead_ops, fold_batchnorm]).run(graph)
        return graph
    if not isinstance(model_or_compiled, nn.Module):
        raise OnnxExportError(
            "export_onnx: expected an nn.Module or a snncompile CompiledModule, got "
            f"{type(model_or_compiled).__name__}"
        )
    model = model_or_compiled
    if model.training:
        warnings.warn(
            f"export_onnx: {type(model).__name__} is in training mode; exporting it in "
            "inference mode (BN folded with running statistics, dropout removed). Call "
            "model.eval() before exporting to silence this warning.",
            stacklevel=3,
        )
    # optimize(mode='inference') copies a training-mode model into eval mode itself; the torch
    # backend keeps neurons as NEURON nodes (the fused ones carry the same dynamics anyway).
    return optimize(model, example_input, mode="inference", backend="torch").graph


_SIGNATURE = "export_onnx(model, example_input, path=None, *, mode='sequence', opset=None)"


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, Path)) or hasattr(value, "__fspath__")


def export_onnx(
    model_or_compiled: nn.Module,
    example_input: torch.Tensor,
    path: str | Path | None = None,
    *,
    mode: str = "sequence",
    opset: int | None = None,
) -> onnx.ModelProto:
    """Export an SNN (or a compiled module) to ONNX for inference and return the model.

    The argument order is that of :func:`snncompile.export_nir` and ``torch.onnx.export``:
    the model, an example input, then the file. A call in the order of older snncompile
    releases (``export_onnx(model, path, example_input)``) is refused with a ``TypeError`` that
    shows this order.

    Args:
        model_or_compiled: A SpikingJelly-style model (single- or multi-step) or the result of
            :func:`snncompile.optimize`. A model is compiled with ``mode='inference'`` first
            (BN folded, dropout removed); a training-mode model or compiled module is exported
            with inference semantics and a warning.
        example_input: A float32 ``[T, N, ...]`` example (shapes of the per-sample features are
            fixed by it; ``T`` and ``N`` stay dynamic).
        path: Where to write the ``.onnx`` file (``None``, the default: only return the model).
        mode: ``'sequence'`` -- input ``[T, N, ...]``, output like the compiled module, the time
            loop one ONNX ``Scan``; ``'step'`` -- one time step with explicit state inputs and
            outputs (see the module docstring for names, order and metadata).
        opset: ai.onnx opset to write (default: :data:`DEFAULT_OPSET`, capped by the installed
            onnxruntime); the IR version follows from it.

    Raises:
        OnnxExportError: an IR node/op has no ONNX rendering (the message names both), or the
            model/options cannot be exported.
    """
    if _is_path(example_input) or (example_input is None and isinstance(path, torch.Tensor)):
        raise TypeError(
            f"export_onnx: the example input comes second and the file path third: {_SIGNATURE} "
            f"(the order of export_nir and torch.onnx.export). Got example_input="
            f"{example_input!r}; call it as export_onnx(model, x, {str(example_input)!r}, "
            f"mode={mode!r})."
        )
    if mode not in ("sequence", "step"):
        raise OnnxExportError(f"export_onnx: mode must be 'sequence' or 'step', got {mode!r}")
    if path is not None and not _is_path(path):
        raise TypeError(
            f"export_onnx: path must be a file path (str or os.PathLike) or None, got "
            f"{type(path).__name__}; the signature is {_SIGNATURE}."
        )
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise OnnxExportError(
            "export_onnx: example_input must be a [T, N, ...] tensor (time, batch, features)"
        )
    opset_v, ir_v = pick_versions(opset)
    graph = _inference_graph(model_or_compiled, example_input)
    g, states = build_model(graph, mode, example_input, opset_v)
    model = helper.make_model(
        g,
        opset_imports=[helper.make_opsetid("", opset_v)],
        producer_name="snncompile",
        doc_string=f"snncompile {mode}-mode export",
    )
    model.ir_version = ir_v
    helper.set_model_props(
        model,
        {"snncompile.format": "1", "snncompile.mode": mode, STATES_KEY: json.dumps(states)},
    )
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save(model, str(path))
    return model


# -- helpers for the command line ---------------------------------------------------------------
def node_count(model: onnx.ModelProto) -> int:
    """Nodes of ``model``'s graph plus those of its subgraphs one level down (a ``Scan`` body)."""
    graph = model.graph
    return len(graph.node) + sum(
        len(a.g.node) for n in graph.node for a in n.attribute if a.type == a.GRAPH
    )
