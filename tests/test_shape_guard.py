"""Shape guards: a compiled module is correct at every input shape, never silently wrong.

The reproduction is SpikingJelly's Fashion-MNIST CSNN tutorial pattern: the model takes
``[N, C, H, W]`` and repeats it over ``T`` inside ``forward``. Compiled at batch 4 it used to
return ``(4, 10)`` for inputs of batch 3, 1 or 7. Every check compares with the eager model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import snncompile
from snncompile import functional, layer, neuron, surrogate
from snncompile.ir.ops import Op
from snncompile.passes.base import PassResult
from snncompile.runtime.shape_guard import ShapeGuardError, format_signature, signature

T_INSIDE = 4


class RepeatCSNN(nn.Module):
    """The tutorial's CSNN at a small size: conv-BN-IF-maxpool x2, flatten, linear-IF x2.

    ``layers`` is SpikingJelly's ``activation_based.layer``/``neuron``/``surrogate`` namespace
    or snncompile's; the forward repeats the static image over ``T`` itself.
    """

    def __init__(self, lib: dict[str, object], T: int = T_INSIDE, c: int = 4) -> None:
        super().__init__()
        layer_, neuron_, sg = lib["layer"], lib["neuron"], lib["surrogate"]
        self.T = T
        self.conv_fc = nn.Sequential(
            layer_.Conv2d(1, c, 3, padding=1, bias=False),
            layer_.BatchNorm2d(c),
            neuron_.IFNode(surrogate_function=sg.ATan()),
            layer_.MaxPool2d(2, 2),
            layer_.Conv2d(c, c, 3, padding=1, bias=False),
            layer_.BatchNorm2d(c),
            neuron_.IFNode(surrogate_function=sg.ATan()),
            layer_.MaxPool2d(2, 2),
            layer_.Flatten(),
            layer_.Linear(c * 3 * 3, 16, bias=False),
            neuron_.IFNode(surrogate_function=sg.ATan()),
            layer_.Linear(16, 10, bias=False),
            neuron_.IFNode(surrogate_function=sg.ATan()),
        )
        lib["functional"].set_step_mode(self, "m")
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.weight.mul_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_seq = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        return self.conv_fc(x_seq).mean(0)


def _ours() -> dict[str, object]:
    return {"layer": layer, "neuron": neuron, "surrogate": surrogate, "functional": functional}


@pytest.fixture(params=["snncompile", "spikingjelly"])
def lib(request: pytest.FixtureRequest) -> dict[str, object]:
    if request.param == "snncompile":
        return _ours()
    sj = request.getfixturevalue("sj")
    return {
        "layer": sj.layer,
        "neuron": sj.neuron,
        "surrogate": sj.surrogate,
        "functional": sj.functional,
    }


def _eager(model: nn.Module, x: torch.Tensor, reset: object) -> torch.Tensor:
    reset(model)
    out = model(x)
    reset(model)
    return out


def _images(n: int, hw: int = 12) -> torch.Tensor:
    return torch.rand(n, 1, hw, hw)


def test_repeat_inside_every_batch_size_equals_eager(lib: dict[str, object]) -> None:
    reset = lib["functional"].reset_net
    model = RepeatCSNN(lib)
    compiled = snncompile.optimize(model, _images(4))
    assert sum(1 for n in compiled.graph if n.op is Op.FUSED_NEURON) == 4
    for n in (4, 3, 1, 7, 4, 2):
        x = _images(n)
        ref = _eager(model, x, reset)
        functional.reset_net(compiled)
        got = compiled(x)
        assert got.shape == (n, 10), f"batch {n}: got shape {tuple(got.shape)}"
        assert torch.equal(got, ref), f"batch {n}: max diff {(got - ref).abs().max()}"
        assert ref.abs().sum() > 0  # the comparison sees spikes
    # One program serves every batch size; the report lists the shapes seen.
    assert set(compiled.shape_guard.signatures.values()) == {0}
    text = compiled.report()
    for n in (4, 3, 1, 7, 2):
        assert format_signature((n, 1, 12, 12)) in text
    assert "same program as [4, 1, 12, 12]" in text


def test_repeat_inside_training_updates_every_batch_size(lib: dict[str, object]) -> None:
    reset = lib["functional"].reset_net
    torch.manual_seed(1)
    model = RepeatCSNN(lib)
    compiled = snncompile.optimize(model, _images(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    target = torch.randint(0, 10, (4,))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        functional.reset_net(compiled)
        loss = nn.functional.cross_entropy(compiled(_images(4)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    # Batch 3 (the last, smaller batch of an epoch) runs with the updated weights and BN stats;
    # forward and gradients equal eager.
    x = _images(3)
    y = torch.randint(0, 10, (3,))
    functional.reset_net(compiled)
    got = compiled(x)
    loss_c = nn.functional.cross_entropy(got, y)
    grads_c = torch.autograd.grad(loss_c, list(model.parameters()), allow_unused=True)
    reset(model)
    ref = model(x)
    loss_e = nn.functional.cross_entropy(ref, y)
    grads_e = torch.autograd.grad(loss_e, list(model.parameters()), allow_unused=True)
    reset(model)
    assert torch.equal(got, ref)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        if ge is None:
            continue
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)
    # BN running statistics are the model's own: 3 compiled steps, compiled and eager batch 3.
    assert model.conv_fc[1].num_batches_tracked.item() == 5


def _mstep_net() -> nn.Module:
    net = nn.Sequential(
        layer.Conv2d(2, 4, 3, padding=1),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.Sigmoid()),
        layer.Flatten(),
        layer.Linear(4 * 6 * 6, 5),
        neuron.IFNode(),
    )
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(3.0)
    return net


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_time_steps_and_batch_change(step_mode: str) -> None:
    net = _mstep_net()
    functional.set_step_mode(net, step_mode)
    compiled = snncompile.optimize(net, torch.rand(4, 3, 2, 6, 6))
    for shape in ((4, 3), (7, 3), (2, 5), (1, 1)):
        x = torch.rand(*shape, 2, 6, 6)
        functional.reset_net(net)
        ref = functional.multi_step_forward(x, net) if step_mode == "s" else net(x)
        functional.reset_net(net)
        functional.reset_net(compiled)
        got = compiled(x)
        assert torch.equal(got, ref), f"T, N = {shape}"
    assert len(compiled.shape_guard.signatures) == 4
    assert "[7, 3, 2, 6, 6]" in compiled.report()


def test_state_carries_over_calls_of_another_T() -> None:
    """Same batch, another T, state not reset: the membrane continues, as in eager."""
    net = _mstep_net()
    compiled = snncompile.optimize(net, torch.rand(4, 2, 2, 6, 6))
    xs = [torch.rand(t, 2, 2, 6, 6) for t in (4, 3, 5)]
    functional.reset_net(net)
    ref = [net(x) for x in xs]
    functional.reset_net(compiled)
    got = [compiled(x) for x in xs]
    for g, r in zip(got, ref, strict=True):
        assert torch.equal(g, r)


def test_other_spatial_size_is_a_clear_error() -> None:
    net = _mstep_net()
    compiled = snncompile.optimize(net, torch.rand(4, 2, 2, 6, 6))
    with pytest.raises(ShapeGuardError, match=r"\[4, 2, 2, 6, 6\].*\[4, 2, 2, 8, 8\]"):
        compiled(torch.rand(4, 2, 2, 8, 8))
    functional.reset_net(compiled)
    assert compiled(torch.rand(4, 2, 2, 6, 6)).shape == (4, 2, 5)  # still usable


def _tag_batch(graph: object) -> PassResult:
    """A user pass that makes the program depend on the traced batch size (a specialisation)."""
    for node in graph:
        if node.op.group.name == "NEURON":
            node.attrs["traced_batch"] = int(graph.meta["N"])
    return PassResult(graph, True, [])


def test_specialisations_share_parameters_and_follow_the_owner() -> None:
    net = _mstep_net()
    compiled = snncompile.optimize(net, torch.rand(4, 2, 2, 6, 6), passes=[_tag_batch])
    x3 = torch.rand(4, 3, 2, 6, 6)
    functional.reset_net(compiled)
    out3 = compiled(x3)
    functional.reset_net(net)
    assert torch.equal(out3, net(x3))
    assert compiled.shape_guard.signatures == {(4, 2, 2, 6, 6): 0, (4, 3, 2, 6, 6): 1}
    assert "specialisation 1" in compiled.report()
    spec = compiled.shape_guard.program(compiled, 1)
    assert spec.graph is compiled.shape_guard.graph_for(compiled, (4, 3, 2, 6, 6))
    # Parameters are the model's in both programs: an update shows in both.
    with torch.no_grad():
        net[3].bias.add_(0.5)
    functional.reset_net(net)
    ref3 = net(x3)
    functional.reset_net(net)
    functional.reset_net(compiled)
    assert torch.equal(compiled(x3), ref3)
    # Switching programs under live state is refused; after reset_net it works.
    with pytest.raises(ShapeGuardError, match="reset_net"):
        compiled(torch.rand(4, 2, 2, 6, 6))
    functional.reset_net(compiled)
    assert compiled(torch.rand(4, 2, 2, 6, 6)).shape == (4, 2, 5)
    # train()/eval() reach the hidden specialisation.
    compiled.eval()
    assert not spec.training
    compiled.train()
    assert spec.training


def test_signature_of_inputs() -> None:
    assert signature(torch.zeros(2, 3)) == (2, 3)
    assert signature((torch.zeros(2), torch.zeros(1, 4))) == ((2,), (1, 4))
    assert signature(3) is None
    assert format_signature(((2,), (1, 4))) == "([2], [1, 4])"


def test_chunked_inference_at_other_shapes() -> None:
    net = _mstep_net().eval()
    compiled = snncompile.optimize(net, torch.rand(8, 2, 2, 6, 6), chunk_size=3)
    for shape in ((8, 2), (5, 4), (13, 1)):
        x = torch.rand(*shape, 2, 6, 6)
        functional.reset_net(net)
        with torch.no_grad():
            ref = net(x)
            functional.reset_net(compiled)
            got = compiled(x)
        functional.reset_net(net)
        assert torch.equal(got, ref), f"T, N = {shape}"
    assert set(compiled.shape_guard.signatures.values()) == {0}


def test_copies_and_device_moves_keep_the_guard() -> None:
    import copy

    net = _mstep_net()
    compiled = snncompile.optimize(net, torch.rand(4, 2, 2, 6, 6), passes=[_tag_batch])
    x3 = torch.rand(4, 3, 2, 6, 6)
    compiled(x3)  # creates specialisation 1
    functional.reset_net(compiled)
    twin = copy.deepcopy(compiled)
    functional.reset_net(twin)
    assert torch.equal(twin(x3), compiled(x3))
    functional.reset_net(compiled)
    compiled.double()
    spec = compiled.shape_guard.program(compiled, 1)
    assert all(p.dtype == torch.float64 for p in spec.parameters())
    assert not any(k.startswith("shape_guard") for k in compiled.state_dict())
