"""Review of time chunks with training BatchNorm (runtime.batch_stats): the cases beside
``test_time_chunks_bn.py``.

Each test compares a time-chunked step (:class:`TimeChunks` run directly, small chunks) with
the unbudgeted compile of the same model (and where it matters with SpikingJelly eager):
outputs, input and parameter gradients, and the buffers (running statistics) after the step.
"""

from __future__ import annotations

import pytest
import torch
from time_chunk_helpers import buffers_restored, train_step
from torch import nn

import snncompile
from snncompile.runtime.time_chunks import TimeChunks

sj = pytest.importorskip("spikingjelly.activation_based", reason="SpikingJelly 2.0.0 is the oracle")
from spikingjelly.activation_based import functional as sj_functional  # noqa: E402
from spikingjelly.activation_based import layer as sj_layer  # noqa: E402
from spikingjelly.activation_based import neuron as sj_neuron  # noqa: E402
from spikingjelly.activation_based import surrogate as sj_surrogate  # noqa: E402


def _lif() -> nn.Module:
    return sj_neuron.LIFNode(surrogate_function=sj_surrogate.ATan(), v_threshold=0.5, step_mode="m")


def _multi(net: nn.Module) -> nn.Module:
    sj_functional.set_step_mode(net, "m")
    return net


def _cnn(**bn) -> nn.Module:
    """conv-BN-LIF-pool twice, then linear-BN1d-LIF (three levels)."""
    return _multi(
        nn.Sequential(
            sj_layer.Conv2d(2, 4, 3, padding=1, bias=False),
            sj_layer.BatchNorm2d(4, **bn),
            _lif(),
            sj_layer.MaxPool2d(2),
            sj_layer.Conv2d(4, 6, 3, padding=1, bias=False),
            sj_layer.BatchNorm2d(6, **bn),
            _lif(),
            sj_layer.MaxPool2d(2),
            sj_layer.Flatten(),
            sj_layer.Linear(6 * 2 * 2, 5, bias=False),
            sj_layer.BatchNorm1d(5, **bn),
            _lif(),
        )
    )


def _inputs(T: int = 6, N: int = 3, side: int = 8) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(T, N, 2, side, side) * 2


def _close(a: torch.Tensor | None, b: torch.Tensor | None, rel: float = 1e-5) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = a.double(), b.double()
    return bool((a - b).norm() <= rel * b.norm().clamp_min(1e-12))


def _buffers_close(got: list[torch.Tensor], ref: list[torch.Tensor]) -> bool:
    return all(
        torch.allclose(u.double(), v.double(), rtol=1e-6, atol=1e-7)
        for u, v in zip(got, ref, strict=True)
    )


def _reset(*modules: nn.Module) -> None:
    for m in modules:
        sj_functional.reset_net(m)


def _step(
    model: nn.Module, gm: nn.Module, run, x: torch.Tensor, *, grad_x: bool = True, seed: int = 0
):
    """``(output, x.grad, parameter grads, buffers after)`` of one step (see
    :func:`time_chunk_helpers.train_step`)."""
    return train_step(model, lambda: _reset(model, gm), run, x, grad_x=grad_x, seed=seed)


def _assert_same_step(got, ref, rel: float = 1e-5) -> None:
    y, gx, gp, buf = got
    y_ref, gx_ref, gp_ref, buf_ref = ref
    assert (y != y_ref).float().mean() <= 1e-3, "outputs differ"
    assert _close(gx, gx_ref, rel), "input gradient differs"
    for i, (u, v) in enumerate(zip(gp, gp_ref, strict=True)):
        assert _close(u, v, rel), f"gradient of parameter {i} differs"
    assert _buffers_close(buf, buf_ref), "running statistics differ"


def _compare(model: nn.Module, x: torch.Tensor, chunk: int = 2, keep="all", **kw):
    compiled = snncompile.optimize(model, x, **kw.pop("optimize", {}))
    ref = _step(model, compiled, compiled, x, **kw)
    tc = TimeChunks(compiled.gm, chunk, keep)
    assert tc.batch_stats is not None
    got = _step(model, compiled, tc.run, x, **kw)
    assert ref[0].sum() > 0, "nothing spikes: the comparison is empty"
    _assert_same_step(got, ref)
    return compiled, tc


# -- cases --------------------------------------------------------------------------------------


def test_two_forwards_then_one_backward() -> None:
    """Two steps' forwards before one backward (a loss over two batches): each backward must
    use the statistics of its own forward."""
    torch.manual_seed(0)
    model = _cnn()
    x1, x2 = _inputs(), _inputs() * 0.5 + 0.3
    compiled = snncompile.optimize(model, x1)
    tc = TimeChunks(compiled.gm, 2, "all")

    def both(run):
        for p in model.parameters():
            p.grad = None
        a = x1.clone().requires_grad_(True)
        b = x2.clone().requires_grad_(True)
        _reset(model, compiled)
        y1 = run(a)
        _reset(model, compiled)
        y2 = run(b)
        _reset(model, compiled)
        w = torch.linspace(-1, 1, y1.shape[-1])
        ((y1 * w).sum() + (y2 * w * 2).sum()).backward()
        return a.grad, b.grad, [p.grad.clone() for p in model.parameters()]

    with buffers_restored(model):
        ref = both(compiled)
    got = both(tc.run)
    assert _close(got[0], ref[0]) and _close(got[1], ref[1])
    assert all(_close(u, v) for u, v in zip(got[2], ref[2], strict=True))


def test_frozen_affine() -> None:
    """BatchNorm weights with requires_grad=False (a frozen affine), in and outside chains."""
    torch.manual_seed(0)
    model = _cnn()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)
    x = _inputs()
    _compare(model, x, 2, 1)
    _compare(model, x, 4, "all", optimize={"backend": "torch"})


def test_no_running_statistics() -> None:
    """track_running_stats=False: batch statistics in train and in eval, no buffers."""
    torch.manual_seed(0)
    model = _cnn(track_running_stats=False)
    x = _inputs()
    compiled, tc = _compare(model, x, 2, "all")
    model.eval()
    ref = _step(model, compiled, compiled, x)
    got = _step(model, compiled, tc.run, x)
    assert tc.batch_stats is not None  # eval still normalises with batch statistics
    _assert_same_step(got, ref)


def test_input_without_grad_and_uneven_chunks() -> None:
    """An input that does not require grad; T=7 in chunks of 3 (3 + 3 + 1)."""
    torch.manual_seed(0)
    model = _cnn()
    _compare(model, _inputs(T=7), 3, 2, grad_x=False)


def test_other_batch_and_time_than_compiled() -> None:
    """Compiled for T=6, N=3; called with T=5, N=2 (chunks 2 + 2 + 1)."""
    torch.manual_seed(0)
    model = _cnn()
    compiled = snncompile.optimize(model, _inputs())
    x = _inputs(T=5, N=2)
    ref = _step(model, compiled, compiled, x)
    tc = TimeChunks(compiled.gm, 2, 1)
    got = _step(model, compiled, tc.run, x)
    _assert_same_step(got, ref)


def test_repeated_steps_and_gradient_accumulation() -> None:
    """Two full steps (forward + backward) with the gradients accumulated, the running
    statistics updated twice, the neuron states reset between them."""
    torch.manual_seed(0)
    model = _cnn()
    x = _inputs()
    compiled = snncompile.optimize(model, x)

    def two(run):
        for p in model.parameters():
            p.grad = None
        ys = []
        with buffers_restored(model):
            for k in range(2):
                _reset(model, compiled)
                y = run(x * (1 + 0.5 * k))
                (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
                ys.append(y.detach())
            return (
                ys,
                [p.grad.clone() for p in model.parameters()],
                [b.clone() for b in model.buffers()],
            )

    ref = two(compiled)
    got = two(TimeChunks(compiled.gm, 2, 2).run)
    assert all(torch.equal(u, v) for u, v in zip(got[0], ref[0], strict=True))
    assert all(_close(u, v) for u, v in zip(got[1], ref[1], strict=True))
    assert _buffers_close(got[2], ref[2])


class _TwoConsumers(nn.Module):
    """A BatchNorm whose output feeds a neuron and, through a second path, the sum after it
    (not fusable into a chain: a plain site); then a second BatchNorm (level 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = sj_layer.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = sj_layer.BatchNorm2d(4)
        self.sn = _lif()
        self.conv2 = sj_layer.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = sj_layer.BatchNorm2d(4)
        self.sn2 = _lif()
        self.head = nn.Sequential(sj_layer.Flatten(), sj_layer.Linear(4 * 8 * 8, 5), _lif())
        with torch.no_grad():
            self.head[1].weight.mul_(4.0)  # enough drive for the output neurons to spike

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x))
        s = self.sn(h)
        z = self.bn2(self.conv2(s)) + 0.5 * h
        return self.head(self.sn2(z))


def test_batchnorm_output_with_two_consumers() -> None:
    torch.manual_seed(0)
    model = _multi(_TwoConsumers())
    _compare(model, _inputs(), 2, "all")
    _compare(model, _inputs(), 4, 1, optimize={"backend": "torch"})


def test_batchnorm1d_on_three_dims() -> None:
    """BatchNorm1d on [T*N, C, L] (Conv1d) and on [T*N, C] (Linear)."""
    torch.manual_seed(0)
    model = _multi(
        nn.Sequential(
            sj_layer.Conv1d(2, 4, 3, padding=1, bias=False),
            sj_layer.BatchNorm1d(4),
            _lif(),
            sj_layer.Flatten(),
            sj_layer.Linear(4 * 16, 5, bias=False),
            sj_layer.BatchNorm1d(5),
            _lif(),
        )
    )
    torch.manual_seed(1)
    x = torch.rand(6, 3, 2, 16) * 2
    _compare(model, x, 2, 1)


def test_plain_batchnorm_and_momentum_none_outside_chains() -> None:
    """backend='torch' (no chains): momentum=None (a cumulative average) and affine=False."""
    torch.manual_seed(0)
    _compare(_cnn(momentum=None), _inputs(), 2, 2, optimize={"backend": "torch"})
    _compare(_cnn(affine=False), _inputs(), 2, 2, optimize={"backend": "torch"})


def test_eval_forward_between_a_step_forward_and_its_backward() -> None:
    """A validation forward in eval mode (grad enabled) between a training forward and its
    backward: the backward still takes the training forward's batch statistics."""
    torch.manual_seed(0)
    model = _cnn()
    x = _inputs()
    compiled = snncompile.optimize(model, x)
    tc = TimeChunks(compiled.gm, 2, 1)

    def run(call):
        for p in model.parameters():
            p.grad = None
        with buffers_restored(model):
            model.train()
            _reset(model, compiled)
            xx = x.clone().requires_grad_(True)
            y = call(xx)
            model.eval()
            _reset(model, compiled)
            call(x * 0.7)  # validation, output dropped
            _reset(model, compiled)
            model.train()
            (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        return xx.grad, [p.grad.clone() for p in model.parameters()]

    ref = run(compiled)
    got = run(tc.run)
    assert _close(got[0], ref[0])
    assert all(_close(u, v) for u, v in zip(got[1], ref[1], strict=True))


def test_partly_frozen_batchnorms() -> None:
    """Only some batchnorms in train mode (the first one frozen in eval mode)."""
    torch.manual_seed(0)
    model = _cnn()
    model[1].eval()
    compiled, tc = _compare(model, _inputs(), 2, 2)
    assert tc.batch_stats is not None and len(tc.batch_stats.sites) == 2


def test_budgeted_model_under_no_grad_and_other_batch() -> None:
    """``optimize(memory_budget=...)`` planning time chunks for training batchnorms: compiling
    leaves the running statistics as they were; a ``torch.no_grad()`` call (training mode)
    equals the unbudgeted compile's, running statistics included; a training step on a
    smaller batch than the example's equals the unbudgeted one."""
    from snncompile.runtime.memory import measure_train_step

    torch.manual_seed(0)
    model = _cnn()
    x = _inputs(T=16, N=8)
    plain = snncompile.optimize(model, x)
    before = [b.clone() for b in model.buffers()]
    base = measure_train_step(plain, x).peak
    budgeted = snncompile.optimize(model, x, memory_budget=int(base * 0.6))
    assert budgeted._memory_plan.time_chunks is not None
    assert all(torch.equal(u, v) for u, v in zip(model.buffers(), before, strict=True))

    def no_grad_call(compiled):
        _reset(model, plain, budgeted)
        with buffers_restored(model), torch.no_grad():
            y = compiled(x)
            return y, [b.clone() for b in model.buffers()]

    ref, got = no_grad_call(plain), no_grad_call(budgeted)
    assert torch.equal(got[0], ref[0])
    assert _buffers_close(got[1], ref[1])
    small = _inputs(T=16, N=3)
    _assert_same_step(_step(model, budgeted, budgeted, small), _step(model, plain, plain, small))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda() -> None:
    """Training batchnorms on a GPU (outside chains: the chain kernels are the CPU's): the
    sums, coefficients, gathering leaves and gradient sums live on the input's device."""
    torch.manual_seed(0)
    for affine in (True, False):
        model = _cnn(affine=affine).cuda()
        _compare(model, _inputs().cuda(), 2, 1, optimize={"backend": "torch"})


def test_second_backward_refused_by_name() -> None:
    """``backward(retain_graph=True)`` twice: the chunk-start states are gone after the first
    backward, so the second is refused with a message (it was a TypeError on None)."""
    torch.manual_seed(0)
    model = _cnn()
    x = _inputs()
    compiled = snncompile.optimize(model, x)
    for keep in ("all", 1):
        _reset(model, compiled)
        y = TimeChunks(compiled.gm, 2, keep).run(x)
        loss = (y * torch.linspace(-1, 1, y.shape[-1])).sum()
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="second backward"):
            loss.backward()
    for p in model.parameters():
        p.grad = None


def test_create_graph_refused_by_name() -> None:
    """``backward(create_graph=True)``: the reruns inside backward build no graph, so the
    double backward is refused with a message rather than left without second-order terms."""
    torch.manual_seed(0)
    model = _cnn()
    x = _inputs().requires_grad_()
    compiled = snncompile.optimize(model, x)
    _reset(model, compiled)
    y = TimeChunks(compiled.gm, 2, 1).run(x)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    for p in model.parameters():
        p.grad = None


def test_float64_model() -> None:
    """A float64 model: no chain kernel (float32 only), the batchnorms run outside chains."""
    torch.manual_seed(0)
    _compare(_cnn().double(), _inputs().double(), 2, 1)


def test_every_parameter_frozen_input_gradient() -> None:
    """No parameter requires grad (an attack on a model in train mode): the input gradient."""
    torch.manual_seed(0)
    model = _cnn()
    for p in model.parameters():
        p.requires_grad_(False)
    x = _inputs()
    compiled = snncompile.optimize(model, x)
    ref = _step(model, compiled, compiled, x)
    got = _step(model, compiled, TimeChunks(compiled.gm, 2, 1).run, x)
    assert ref[1] is not None and _close(got[1], ref[1])
    assert _buffers_close(got[3], ref[3])


class _InputTwice(nn.Module):
    """A batchnorm on the model's input (its first op); a convolution whose output feeds a
    batchnorm and, beside it, the next batchnorm's input."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = sj_layer.BatchNorm2d(2)
        self.sn0 = _lif()
        self.conv = sj_layer.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = sj_layer.BatchNorm2d(4)
        self.sn = _lif()
        self.bn2 = sj_layer.BatchNorm2d(4)
        self.sn2 = _lif()
        self.head = nn.Sequential(sj_layer.Flatten(), sj_layer.Linear(4 * 64, 5), _lif())
        with torch.no_grad():
            self.head[1].weight.mul_(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv(self.sn0(self.bn0(x)))
        a = self.sn(self.bn(c))
        return self.head(self.sn2(self.bn2(c * 0.5 + a)))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_batchnorm_on_the_input_and_its_input_shared(backend: str) -> None:
    torch.manual_seed(0)
    _compare(_multi(_InputTwice()), _inputs(), 2, 1, optimize={"backend": backend})


def _dropout_cnn() -> nn.Module:
    """conv-BN-LIF-Dropout, conv-BN-LIF, Dropout, linear-LIF (the head's weights scaled up so
    that it spikes)."""
    model = _multi(
        nn.Sequential(
            sj_layer.Conv2d(2, 4, 3, padding=1, bias=False),
            sj_layer.BatchNorm2d(4),
            _lif(),
            sj_layer.Dropout(0.3),
            sj_layer.Conv2d(4, 4, 3, padding=1, bias=False),
            sj_layer.BatchNorm2d(4),
            _lif(),
            sj_layer.Flatten(),
            sj_layer.Dropout(0.2),
            sj_layer.Linear(4 * 64, 5),
            _lif(),
        )
    )
    with torch.no_grad():
        model[9].weight.mul_(4.0)
    return model


def test_dropout_with_uneven_chunks() -> None:
    """Two SpikingJelly Dropouts (one between the levels), T=7 in chunks of 3 and of 2."""
    torch.manual_seed(0)
    model = _dropout_cnn()
    for backend in ("auto", "torch"):
        opt = {"backend": backend}
        _compare(model, _inputs(T=7), 3, 1, optimize=opt, seed=4)
        _compare(model, _inputs(T=7), 2, "all", optimize=opt, seed=4)


def test_eval_between_forward_and_backward() -> None:
    """A training forward, then ``eval()`` before its backward: the chunks rerun in backward
    with the forward's modes (Dropout's masks, batch statistics), as autograd's saved graph of
    the unbudgeted compile does."""
    torch.manual_seed(0)
    model = _dropout_cnn()
    x = _inputs(T=6)
    compiled = snncompile.optimize(model, x)

    def switch_before_backward(run) -> list:
        def call(xx: torch.Tensor) -> torch.Tensor:
            y = run(xx)
            compiled.eval()
            return y

        try:
            return _step(model, compiled, call, x, seed=4)
        finally:
            compiled.train()

    ref = switch_before_backward(compiled)
    for keep in ("all", 1):
        got = switch_before_backward(TimeChunks(compiled.gm, 2, keep).run)
        _assert_same_step(got, ref)


def test_fewer_steps_than_a_chunk() -> None:
    """T=1 and T=3 with chunks of 2 and 8: one chunk, a batchnorm statistics sweep over it."""
    torch.manual_seed(0)
    model = _cnn()
    compiled = snncompile.optimize(model, _inputs())
    for T, chunk in ((1, 2), (3, 8)):
        x = _inputs(T=T)
        ref = _step(model, compiled, compiled, x)
        _assert_same_step(_step(model, compiled, TimeChunks(compiled.gm, chunk, 1).run, x), ref)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_batchnorm_as_the_output(backend: str) -> None:
    """The program's output is a batchnorm's (no neuron after it), with a loss whose gradient
    is not constant per channel (a constant one makes the batchnorm's input gradient zero)."""
    torch.manual_seed(0)
    model = _multi(
        nn.Sequential(
            sj_layer.Conv2d(2, 4, 3, padding=1, bias=False),
            sj_layer.BatchNorm2d(4),
            _lif(),
            sj_layer.Flatten(),
            sj_layer.Linear(4 * 64, 5, bias=False),
            sj_layer.BatchNorm1d(5),
        )
    )
    x = _inputs()
    compiled = snncompile.optimize(model, x, backend=backend)
    w = torch.randn(6, 3, 5)

    def step(run):
        return _step(model, compiled, lambda xx: (run(xx) * w) ** 2, x)

    ref = step(compiled)
    got = step(TimeChunks(compiled.gm, 2, 2).run)
    assert torch.allclose(got[0], ref[0], rtol=1e-5, atol=1e-6)
    _assert_same_step((ref[0], *got[1:]), ref)


@pytest.mark.parametrize("name", ["IzhikevichNode", "CUBALIFNode"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_multi_state_neurons_after_training_batchnorms(name: str, backend: str) -> None:
    """SpikingJelly's neurons with states beside v (Izhikevich ``w``, CUBA-LIF's current) after
    training batchnorms, in fused chains (``cpu``) and as separate ops: every state is a
    chunk-start state and carries its gradient across the chunks."""
    kw = {"IzhikevichNode": dict(a=0.3, b=0.2, tau_w=3.0), "CUBALIFNode": {}}[name]

    def sn() -> nn.Module:
        return getattr(sj_neuron, name)(surrogate_function=sj_surrogate.ATan(), **kw)

    torch.manual_seed(11)
    model = _multi(
        nn.Sequential(
            sj_layer.Conv2d(2, 4, 3, padding=1, bias=False),
            sj_layer.BatchNorm2d(4),
            sn(),
            sj_layer.MaxPool2d(2),
            sj_layer.Conv2d(4, 4, 3, padding=1, bias=False),
            sj_layer.BatchNorm2d(4),
            sn(),
            sj_layer.Flatten(),
            sj_layer.Linear(4 * 16, 5),
            _lif(),
        )
    )
    with torch.no_grad():
        model[0].weight.mul_(3.0)
        model[8].weight.mul_(3.0)
    _compare(model, _inputs(), 2, 1, optimize={"backend": backend})
