"""Tests of snncompile.passes.options: compile options travel in one typed record."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import snncompile
from snncompile import layer, neuron
from snncompile.passes import CompileOptions, options_of
from snncompile.passes.fold_batchnorm import fold_batchnorm


def _model() -> nn.Module:
    return nn.Sequential(layer.Linear(6, 5), layer.BatchNorm1d(5), neuron.LIFNode()).eval()


def test_optimize_records_one_frozen_record() -> None:
    x = torch.rand(3, 2, 6)
    compiled = snncompile.optimize(_model(), x, backend="torch", chunk_size=2)
    options = compiled.graph.options
    assert options == CompileOptions(mode="inference", backend="torch", chunk_size=2)
    assert options.chunked and options_of(compiled.graph) is options
    assert not {"mode", "backend", "chunk"} & set(compiled.graph.meta)
    assert compiled.graph.meta["chunk_plan"]["status"] == "planned"
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.mode = "train"  # type: ignore[misc]
    assert str(compiled.graph).startswith("graph(step_mode=s, mode=inference, backend=torch")


def test_traced_graph_has_a_mode_and_no_backend() -> None:
    graph = snncompile.trace(_model(), torch.rand(3, 2, 6))
    assert graph.options == CompileOptions(mode="inference")
    assert options_of(graph).fused_backend == "auto"
    assert "backend=" not in str(graph).splitlines()[0]
    assert graph.copy().options is graph.options


def test_passes_read_the_record() -> None:
    graph = snncompile.trace(_model(), torch.rand(3, 2, 6))
    graph.options = CompileOptions(mode="train")
    assert fold_batchnorm(graph).modified is False  # training: batchnorm kept
    graph.options = dataclasses.replace(graph.options, mode="inference")
    assert fold_batchnorm(graph).modified is True


def test_old_meta_keys_are_refused_not_ignored() -> None:
    graph = snncompile.trace(_model(), torch.rand(3, 2, 6))
    graph.meta["mode"] = "train"
    with pytest.raises(ValueError, match=r"graph.meta\['mode'\] is no longer read"):
        fold_batchnorm(graph)


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        CompileOptions(mode="eval")
    with pytest.raises(ValueError, match="backend must be one of"):
        CompileOptions(backend="gpu")
