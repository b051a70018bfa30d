"""ONNX renderings of tensor calls in sequence-level code (``snncompile.export.onnx_functions``).

A hand-written multi-step attention block uses every rendered call -- ``transpose``,
``permute``, ``@``/``matmul``, ``softmax``, ``chunk``, ``split``, ``unbind``, indexing with ints
and slices, ``sum``/``mean`` over feature dims, sizes read from ``x.shape`` -- and is exported in
both modes: onnxruntime matches the compiled module (and the compiled module matches eager), and
the step and sequence exports agree. Calls over the time or batch dimension, and calls without a
rendering, are errors that name the node.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from snncompile import functional, layer, neuron
from snncompile.api import optimize
from snncompile.export.onnx import OnnxExportError, export_onnx
from snncompile.onnx_runtime import run_sequence_model, run_step_model

TOL = 1e-5  # softmax/matmul add in another order than PyTorch


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = layer.Linear(8, 24, step_mode="m")
        self.sn = neuron.IFNode(step_mode="m")
        self.out = neuron.IFNode(v_threshold=0.5, step_mode="m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, N, F = x.shape
        if F % 2:
            raise ValueError("even features expected")
        qkv = self.sn(self.fc(x)).reshape(T, N, 3, 2, 4)
        q, k, v = qkv.unbind(2)  # [T, N, 2, 4] each
        a, _b = qkv.chunk(2, dim=-1)  # [T, N, 3, 2, 2]
        attn = torch.matmul(q.transpose(-2, -1), k) * (F**-0.5)  # [T, N, 4, 4]
        y = v @ attn.softmax(dim=-1)  # [T, N, 2, 4]
        y = y.permute(0, 1, 3, 2).contiguous().flatten(2)  # [T, N, 8]
        s1, s2 = y.split([3, 5], dim=2)
        z = (
            s1.sum(-1, keepdim=True)
            + s2[:, :, 1:4].mean(dim=2, keepdim=True)
            + a[:, :, 0, 1, :].sum(-1, keepdim=True)
            + y[..., -1:]
        )
        return self.out(torch.cat([y, z], dim=-1))


def test_attention_calls_export_in_both_modes() -> None:
    torch.manual_seed(0)
    model = _Attention().eval()
    example, x = torch.rand(2, 2, 8) * 2, torch.rand(5, 3, 8) * 2
    compiled = optimize(model, example, mode="inference", backend="torch")
    assert "ran as written" not in compiled.report()
    functional.reset_net(model)
    with torch.no_grad():
        want = model(x)
        functional.reset_net(compiled)
        ref = compiled(x)
    assert torch.equal(ref, want)
    assert ref.abs().sum() > 0
    seq = np.asarray(run_sequence_model(export_onnx(model, example, mode="sequence"), x))
    step = np.asarray(run_step_model(export_onnx(model, example, mode="step"), x))
    for got in (seq, step):
        assert got.shape == tuple(ref.shape)
        assert float(np.abs(got - ref.numpy()).max()) <= TOL
    assert float(np.abs(seq - step).max()) <= TOL


class _Calls(nn.Module):
    def __init__(self, call: str) -> None:
        super().__init__()
        self.call = call
        self.sn = neuron.IFNode(step_mode="m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.sn(x)
        if self.call == "batch_transpose":
            return y.transpose(1, 2)
        if self.call == "time_index":
            return y[1:]
        return torch.cumsum(y, dim=2)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        ("batch_transpose", r"%transpose \(op FUNCTION, transpose\): dimension 1 is the batch"),
        ("time_index", r"%getitem \(op FUNCTION, getitem\): index .* time/batch"),
        ("cumsum", r"%cumsum \(op FUNCTION, cumsum\): the call 'cumsum' has no ONNX rendering"),
    ],
)
def test_unexportable_calls_name_the_node(call: str, match: str) -> None:
    model = _Calls(call).eval()
    with pytest.raises(OnnxExportError, match=match):
        export_onnx(model, torch.rand(2, 2, 3, 4), mode="sequence")
