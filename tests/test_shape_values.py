"""Tracing with concrete values beside the proxies (``snncompile.frontend.shape_values``).

Shape-derived Python decisions (``if x.shape[1] > 2``, ``range(x.size(0))``, unpacking a shape,
the rank of an intermediate) trace, specialised to the example; the shape guard re-traces at
every new input shape, so a decision taken for one shape is never reused at another. Decisions
on tensor *data* are not made concrete: such a module still runs as written.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import snncompile
from snncompile import functional, neuron
from snncompile.frontend import FrontendError
from snncompile.ir.ops import Op


class _SizeBranch(nn.Module):
    """Scales by 2 or 3 depending on the batch size, and loops over the time steps in Python."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.sn = neuron.LIFNode(step_mode="m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, N, F = x.shape
        if x.flatten(0, 1).ndim != 2 or F % 2:
            raise ValueError("expected [T, N, F] with an even F")
        gain = 2.0 if N > 2 else 3.0
        y = self.fc(x.reshape(T * N, F)).reshape(T, N, F) * gain
        acc = [y[t] for t in range(x.size(0))]
        return self.sn(torch.stack(acc)) + len(acc)


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    functional.reset_net(model)
    return model(x)


def test_size_decisions_trace_and_are_guarded() -> None:
    torch.manual_seed(0)
    model = _SizeBranch()
    compiled = snncompile.optimize(model, torch.rand(3, 2, 4) * 3)
    assert "ran as written" not in compiled.report(), compiled.report()
    assert len(compiled.graph.find(Op.FUSED_NEURON)) == 1
    for t, n in ((3, 2), (3, 4), (5, 2), (2, 1), (5, 4)):
        x = torch.rand(t, n, 4) * 3
        functional.reset_net(compiled)
        assert torch.equal(compiled(x), _eager(model, x)), (t, n)
    sigs = compiled.shape_guard.signatures
    # N > 2 takes the other branch and another T unrolls another loop: new programs.
    assert sigs[(3, 4, 4)] != sigs[(3, 2, 4)]
    assert sigs[(5, 2, 4)] != sigs[(3, 2, 4)]


class _DataBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sn = neuron.IFNode(step_mode="m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: never specialised
            x = x * 2.0
        return self.sn(x)


def test_data_decisions_still_run_as_written() -> None:
    model = _DataBranch()
    compiled = snncompile.optimize(model, torch.rand(3, 2, 4))
    assert "ran as written" in compiled.report()
    x = -torch.rand(3, 2, 4)
    assert torch.equal(compiled(x), _eager(model, x))
    with pytest.raises(FrontendError, match="strict=True"):
        snncompile.optimize(model, torch.rand(3, 2, 4), strict=True)


def test_live_state_from_an_earlier_run_does_not_block_tracing() -> None:
    """The values beside the proxies start from reset state, whatever the model holds."""
    torch.manual_seed(0)
    model = _SizeBranch()
    model(torch.rand(3, 5, 4))  # live membrane of batch 5, not reset
    compiled = snncompile.optimize(model, torch.rand(3, 2, 4))
    assert "ran as written" not in compiled.report(), compiled.report()
    x = torch.rand(3, 2, 4) * 3
    assert torch.equal(compiled(x), _eager(model, x))


class _InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sn = neuron.IFNode(step_mode="m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sn(x.mul_(2.0))


def test_tracing_leaves_the_example_untouched() -> None:
    example = torch.rand(3, 2, 4)
    kept = example.clone()
    snncompile.optimize(_InPlace(), example)
    assert torch.equal(example, kept)


class _IntSize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sn = neuron.IFNode(step_mode="m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sn(x * int(x.shape[1]) * 0.1)  # the batch size baked in as a constant


def test_sizes_baked_into_constants_are_not_reused() -> None:
    model = _IntSize()
    compiled = snncompile.optimize(model, torch.rand(3, 2, 4))
    for n in (2, 3, 5):
        x = torch.rand(3, n, 4) * 4
        functional.reset_net(compiled)
        assert torch.equal(compiled(x), _eager(model, x)), n
    assert len(set(compiled.shape_guard.signatures.values())) == 3
