"""Time chunks with training BatchNorm (runtime.batch_stats): statistics over all T, chunk by chunk.

The oracle is the unbudgeted compile of the same model and SpikingJelly 2.0.0 eager. In fused
chains the forward is bit-equal to the unbudgeted compile's (the chain kernel's own float64 sums,
carried from chunk to chunk) and so are the running statistics; batchnorms outside chains
(``backend='torch'``) round like PyTorch's to about one float32 ulp. Gradients agree within
float rounding: the statistics' share of the input gradient is added as its own term.
"""

from __future__ import annotations

import re

import pytest
import torch
from time_chunk_helpers import buffers_restored, train_step
from torch import fx, nn

import snncompile
from snncompile.runtime.batch_stats import batch_stat_sites
from snncompile.runtime.time_chunks import TimeChunks, time_chunk_blocker

sj = pytest.importorskip("spikingjelly.activation_based", reason="SpikingJelly 2.0.0 is the oracle")
from spikingjelly.activation_based import functional as sj_functional  # noqa: E402
from spikingjelly.activation_based import layer as sj_layer  # noqa: E402
from spikingjelly.activation_based import neuron as sj_neuron  # noqa: E402
from spikingjelly.activation_based import surrogate as sj_surrogate  # noqa: E402

#: (chunk size, chunk-start states kept) at T=6: binomial reversal with 2 and 3 states, uneven
#: 4 + 2 with all kept, 3 chunks of 2 recomputed from the first one.
CHUNKS = [(1, 2), (4, "all"), (2, 1), (1, 3)]


def _lif(**kw) -> nn.Module:
    return sj_neuron.LIFNode(
        surrogate_function=sj_surrogate.ATan(), v_threshold=0.5, step_mode="m", **kw
    )


def _cnn(*, affine: bool = True, momentum: float | None = 0.1, dropout: bool = False) -> nn.Module:
    """conv-BN-LIF-maxpool x2, then linear-BN1d-LIF: three levels of training batchnorms."""

    def bn2(c: int) -> nn.Module:
        return sj_layer.BatchNorm2d(c, affine=affine, momentum=momentum)

    mods: list[nn.Module] = [
        sj_layer.Conv2d(2, 6, 3, padding=1, bias=False), bn2(6), _lif(), sj_layer.MaxPool2d(2),
        sj_layer.Conv2d(6, 8, 3, padding=1, bias=False), bn2(8), _lif(), sj_layer.MaxPool2d(2),
        sj_layer.Flatten(),
    ]  # fmt: skip
    if dropout:
        mods.append(sj_layer.Dropout(0.3))
    # no bias before a batchnorm: its gradient is zero up to rounding, nothing to compare
    mods += [sj_layer.Linear(8 * 2 * 2, 5, bias=False), sj_layer.BatchNorm1d(5), _lif()]
    net = nn.Sequential(*mods)
    sj_functional.set_step_mode(net, "m")
    return net


class _Residual(nn.Module):
    """A spiking ResNet block with a downsample batchnorm: two sites on one level."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            sj_layer.Conv2d(2, 6, 3, padding=1, bias=False), sj_layer.BatchNorm2d(6), _lif()
        )
        self.conv1 = sj_layer.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = sj_layer.BatchNorm2d(8)
        self.sn1 = _lif()
        self.conv2 = sj_layer.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = sj_layer.BatchNorm2d(8)
        self.down = nn.Sequential(
            sj_layer.Conv2d(6, 8, 1, stride=2, bias=False), sj_layer.BatchNorm2d(8)
        )
        self.sn2 = _lif()
        self.head = nn.Sequential(sj_layer.Flatten(), sj_layer.Linear(8 * 4 * 4, 5), _lif())
        with torch.no_grad():
            self.head[1].weight.mul_(3.0)  # enough drive for the output neurons to spike

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        y = self.bn2(self.conv2(self.sn1(self.bn1(self.conv1(h)))))
        return self.head(self.sn2(y + self.down(h)))


def _resnet() -> nn.Module:
    net = _Residual()
    sj_functional.set_step_mode(net, "m")
    return net


def _reset(*modules: nn.Module) -> None:
    for m in modules:
        sj_functional.reset_net(m)


def _step(
    model: nn.Module, compiled: nn.Module, run, x: torch.Tensor, seed: int = 0
) -> list[torch.Tensor]:
    """Outputs, input and parameter gradients and the buffers after one step of ``run`` (the
    model's buffers are put back afterwards)."""
    y, gx, grads, after = train_step(model, lambda: _reset(model, compiled), run, x, seed=seed)
    return [y, gx, *grads, *after]


def _same_buffers(
    model: nn.Module, compiled: nn.Module, got: list[torch.Tensor], ref: list[torch.Tensor]
) -> bool:
    """The buffers after the step: bit-equal for the batchnorms that run in fused chains,
    within one float32 ulp for the others."""
    sites = batch_stat_sites(compiled.gm)
    assert not isinstance(sites, str)
    chained = {b.data_ptr() for s in sites if s.chained for b in s.bn.buffers()}
    for b, u, v in zip(model.buffers(), got, ref, strict=True):
        if b.data_ptr() in chained:
            if not torch.equal(u, v):
                return False
        elif not torch.allclose(u.double(), v.double(), rtol=2.4e-7, atol=1e-9):
            return False
    return True


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    a, b = a.double(), b.double()
    return bool((a - b).norm() <= rel * b.norm().clamp_min(1e-12))


def _inputs(T: int = 6, N: int = 3, side: int = 8) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(T, N, 2, side, side) * 2


def _ngrads(model: nn.Module) -> int:
    return 2 + len(list(model.parameters()))


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("build", [_cnn, _resnet], ids=["cnn", "resnet"])
def test_same_step_as_unbudgeted_and_eager(build, backend: str) -> None:
    torch.manual_seed(0)
    model = build()
    x = _inputs()
    compiled = snncompile.optimize(model, x, backend=backend)
    assert time_chunk_blocker(compiled.gm, compiled.graph, x) is None
    ref = _step(model, compiled, compiled, x)
    eager = _step(model, compiled, model, x)
    k = _ngrads(model)
    assert ref[0].sum() > 0 and torch.equal(ref[0], eager[0])
    for chunk, keep in CHUNKS:
        tc = TimeChunks(compiled.gm, chunk, keep)
        assert tc.batch_stats is not None
        got = _step(model, compiled, tc.run, x)
        if backend == "auto":  # fused chains: the same statistics bits
            assert torch.equal(got[0], ref[0]), (chunk, keep)
            assert _same_buffers(model, compiled, got[k:], ref[k:])
        else:
            assert (got[0] != ref[0]).float().mean() <= 1e-3
            assert all(
                torch.allclose(u.double(), v.double(), rtol=1e-6, atol=1e-7)
                for u, v in zip(got[k:], ref[k:], strict=True)
            )
        assert all(_close(u, v, 1e-5) for u, v in zip(got[1:k], ref[1:k], strict=True)), (
            chunk,
            keep,
        )
        assert all(_close(u, v, 1e-4) for u, v in zip(got[1:k], eager[1:k], strict=True))


def test_levels_and_parallel_sites() -> None:
    torch.manual_seed(0)
    compiled = snncompile.optimize(_resnet(), _inputs(), backend="torch")
    sites = batch_stat_sites(compiled.gm)
    assert not isinstance(sites, str)
    levels = sorted(s.level for s in sites)
    # stem 1; bn1 and the downsample batchnorm both 2 (they read the stem's spikes); bn2 3
    assert levels == [1, 2, 2, 3]


@pytest.mark.parametrize("affine,momentum", [(False, 0.1), (True, None)])
def test_no_affine_and_cumulative_average(affine: bool, momentum: float | None) -> None:
    torch.manual_seed(0)
    model = _cnn(affine=affine, momentum=momentum)
    x = _inputs()
    compiled = snncompile.optimize(model, x)
    ref = [_step(model, compiled, compiled, x)]
    tc = TimeChunks(compiled.gm, 2, 1)
    got = [_step(model, compiled, tc.run, x)]
    k = _ngrads(model)
    assert torch.equal(got[0][0], ref[0][0])
    assert _same_buffers(model, compiled, got[0][k:], ref[0][k:])
    assert all(_close(u, v, 1e-5) for u, v in zip(got[0][1:k], ref[0][1:k], strict=True))


def test_running_statistics_over_two_steps() -> None:
    torch.manual_seed(0)
    model = _cnn(momentum=None)
    x = _inputs()
    compiled = snncompile.optimize(model, x)

    def two_steps(run) -> list[torch.Tensor]:
        with buffers_restored(model):
            for step in range(2):
                _reset(model, compiled)
                run(x * (1 + step)).sum().backward()
            return [b.clone() for b in model.buffers()]

    ref = two_steps(compiled)
    got = two_steps(TimeChunks(compiled.gm, 1, 2).run)
    names = [n for n, _ in model.named_buffers()]
    counts = [b for n, b in zip(names, ref, strict=True) if n.endswith("tracked")]
    assert len(counts) == 3 and all(int(n) == 2 for n in counts)
    assert _same_buffers(model, compiled, got, ref)


def test_dropout_masks_replayed_in_every_sweep() -> None:
    torch.manual_seed(0)
    model = _cnn(dropout=True)
    x = _inputs()
    compiled = snncompile.optimize(model, x)
    ref = _step(model, compiled, compiled, x, seed=5)
    got = _step(model, compiled, TimeChunks(compiled.gm, 2, 1).run, x, seed=5)
    k = _ngrads(model)
    assert torch.equal(got[0], ref[0])
    assert all(_close(u, v, 1e-5) for u, v in zip(got[1:k], ref[1:k], strict=True))


def test_budget_plans_time_chunks_for_training_batchnorm() -> None:
    torch.manual_seed(0)
    model = _cnn()
    x = _inputs(T=16, N=8)
    plain = snncompile.optimize(model, x)
    from snncompile.runtime.memory import measure_train_step

    base = measure_train_step(plain, x).peak
    budgeted = snncompile.optimize(model, x, memory_budget=int(base * 0.6))
    plan = budgeted._memory_plan.time_chunks
    assert plan is not None and plan.choice.measured <= base * 0.6
    report = budgeted.report()
    assert re.search(r"time chunks: Tc=\d+ .*3 training BatchNorm level", report), report
    ref = _step(model, plain, plain, x)
    got = _step(model, budgeted, budgeted, x)
    assert torch.equal(got[0], ref[0])
    k = _ngrads(model)
    assert all(_close(u, v, 1e-5) for u, v in zip(got[1:k], ref[1:k], strict=True))


def test_batchnorm_inside_another_module_refused_by_name() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x)

    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x)

    class Leaf(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, Block) or super().is_leaf_module(m, name)

    root = Root()
    gm = fx.GraphModule(root, Leaf().trace(root))
    why = batch_stat_sites(gm)
    assert isinstance(why, str) and "%block (Block) holds a training BatchNorm1d" in why
    with pytest.raises(ValueError, match="holds a training BatchNorm1d"):
        TimeChunks(gm, 1)


def test_sync_batchnorm_is_refused_by_name() -> None:
    """A training SyncBatchNorm reduces its statistics across processes; taking them chunk by
    chunk in one process would silently drop the other processes' samples."""
    net = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4))
    gm = fx.symbolic_trace(net)
    why = batch_stat_sites(gm)
    assert isinstance(why, str) and "%_1 is a training SyncBatchNorm" in why
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        TimeChunks(gm, 1)
    net[1].eval()  # frozen: running statistics, nothing to reduce
    assert [s.bn for s in batch_stat_sites(fx.symbolic_trace(net))] == []


@pytest.mark.parametrize("dropout", [False, True])
def test_statistics_sweeps_stop_after_the_level_unless_random(dropout: bool) -> None:
    """Without random draws a statistics sweep's chunk ends at its level's last batchnorm; with
    them (Dropout) every chunk runs whole, so that each starts from the generator state of the
    output sweep."""
    torch.manual_seed(0)
    model = _cnn(dropout=dropout)
    x = _inputs()
    compiled = snncompile.optimize(model, x)
    linear = [m for m in compiled.gm.modules() if isinstance(m, nn.Linear)][0]
    calls = []
    linear.register_forward_hook(lambda *_: calls.append(1))
    tc = TimeChunks(compiled.gm, 2)
    _reset(model, compiled)
    with torch.no_grad():
        tc.run(x)
    chunks, levels = 3, 3
    if dropout:  # every sweep runs every chunk whole
        expected = chunks * (levels + 1)
    else:  # level 1: only the first chunk whole; level 2 stops before the linear layer;
        # level 3 (its BatchNorm1d) and the output sweep reach it in every chunk
        expected = 1 + 0 + chunks + chunks
    assert len(calls) == expected


def test_train_eval_switch_after_compile() -> None:
    """The batchnorms' mode at each call decides: compiled in train mode, then ``eval()``
    (frozen statistics), then ``train()`` again -- each step equals the unbudgeted compile's."""
    torch.manual_seed(0)
    model = _cnn()
    x = _inputs()
    compiled = snncompile.optimize(model, x)
    tc = TimeChunks(compiled.gm, 2, 1)
    k = _ngrads(model)
    for train in (True, False, True):
        for m in compiled.gm.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train(train)
        ref = _step(model, compiled, compiled.gm, x)
        got = _step(model, compiled, tc.run, x)
        assert (tc.batch_stats is not None) == train
        assert torch.equal(got[0], ref[0]), train
        assert all(_close(u, v, 1e-5) for u, v in zip(got[1:k], ref[1:k], strict=True))


@pytest.mark.parametrize("name", ["spiking_resnet18", "CIFAR10Net"])
def test_zoo_models_in_chunks_of_time(name: str) -> None:
    """SpikingJelly's own zoo: ResNet-18 (17 batchnorm levels, downsample batchnorms outside the
    chains) and the PLIF CIFAR-10 net (Dropout), their training batchnorms taken chunk by chunk:
    outputs bit-equal to the unbudgeted compile, running statistics within one ulp, gradients
    within 1e-4 relative (parameters whose gradient is zero by the math -- a conv bias before a
    batchnorm -- are left out: both sides hold rounding noise there)."""
    from zoo_models import build_small, zoo_modules

    torch.manual_seed(0)
    net, shape = build_small(name, sj, zoo_modules())
    sj_functional.set_step_mode(net, "m")
    x = torch.rand(4, 2, *shape)
    compiled = snncompile.optimize(net, x)
    assert time_chunk_blocker(compiled.gm, compiled.graph, x) is None
    ref = _step(net, compiled, compiled, x, seed=3)
    got = _step(net, compiled, TimeChunks(compiled.gm, 2, 1).run, x, seed=3)
    k = _ngrads(net)
    assert torch.equal(got[0], ref[0])
    assert _same_buffers(net, compiled, got[k:], ref[k:])
    largest = max(float(g.norm()) for g in ref[2:k])
    for u, v in zip(got[1:k], ref[1:k], strict=True):
        if float(v.norm()) > 1e-5 * largest:
            assert _close(u, v, 1e-4)
