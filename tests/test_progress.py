"""Progress bars on the long loops: shown on a terminal, off with ``progress=False`` or a pipe.

A recording subclass of ``tqdm.tqdm`` replaces the real one, so each test sees every bar the loop
created (its label, whether it was disabled, how far it counted) without timing anything.
"""

from __future__ import annotations

import io
import sys

import pytest
import torch
import tqdm as tqdm_module
from torch import nn

from snncompile import ann2snn, functional, layer, neuron
from snncompile.progress import progress_bar
from snncompile.runtime.chunked import chunked_forward, stream


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def bars(monkeypatch) -> list:
    created: list = []

    class Recording(tqdm_module.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.label = kwargs.get("desc") or ""  # a disabled bar keeps no desc
            self.was_disabled = bool(self.disable)  # close() sets disable to True
            created.append(self)

    monkeypatch.setattr(tqdm_module, "tqdm", Recording)
    return created


def _on_terminal(monkeypatch) -> _Terminal:
    """Make ``sys.stderr`` a terminal. Called in the test body: pytest's output capture
    replaces ``sys.stderr`` again between a fixture's setup and the test call."""
    fake = _Terminal()
    monkeypatch.setattr(sys, "stderr", fake)
    return fake


def _one(bars: list, desc: str):
    mine = [b for b in bars if b.label.startswith(desc)]
    assert len(mine) == 1, [b.label for b in bars]
    return mine[0]


def test_helper_draws_on_a_terminal_only(monkeypatch) -> None:
    terminal = _on_terminal(monkeypatch)
    for _ in progress_bar(range(3), desc="work", progress=True, leave=True):
        pass
    assert "work" in terminal.getvalue() and "3/3" in terminal.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    list(progress_bar(range(3), desc="work", progress=False))
    assert quiet.getvalue() == ""
    pipe = io.StringIO()  # not a terminal: tqdm's disable=None turns it off
    monkeypatch.setattr(sys, "stderr", pipe)
    list(progress_bar(range(3), desc="work", progress=True))
    assert pipe.getvalue() == ""
    with pytest.raises(TypeError, match="True or False"):
        progress_bar(range(3), desc="x", progress="yes")  # type: ignore[arg-type]


def _snn() -> nn.Module:
    net = nn.Sequential(layer.Linear(4, 3), neuron.IFNode())
    functional.set_step_mode(net, "m")
    return net.eval()


@pytest.mark.parametrize("progress", [True, False])
def test_chunked_and_streamed_inference(bars, monkeypatch, progress) -> None:
    _on_terminal(monkeypatch)
    net, x = _snn(), torch.rand(10, 2, 4)
    chunked_forward(net, x, 3, progress=progress)
    bar = _one(bars, "chunked forward")
    assert bar.was_disabled is (not progress) and (not progress or bar.n == 10)
    functional.reset_net(net)
    stream(net, iter(x.split(4)), reduce="sum", progress=progress, total_steps=10)
    bar = _one(bars, "stream")
    assert bar.was_disabled is (not progress) and (not progress or (bar.n, bar.total) == (10, 10))


@pytest.mark.parametrize("progress", [True, False])
def test_ann2snn_calibration_and_simulate(bars, monkeypatch, progress) -> None:
    _on_terminal(monkeypatch)
    ann = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    snn = ann2snn.convert(ann, [torch.rand(5, 4) for _ in range(3)], progress=progress)
    bar = _one(bars, "ann2snn calibration")
    assert bar.was_disabled is (not progress) and (not progress or bar.n == 3)
    ann2snn.simulate(snn.eval(), torch.rand(2, 4), T=20, chunk_size=8, progress=progress)
    bar = _one(bars, "stream")
    assert bar.was_disabled is (not progress) and (not progress or (bar.n, bar.total) == (20, 20))


@pytest.mark.parametrize("progress", [True, False])
def test_online_training_loops(bars, monkeypatch, progress) -> None:
    _on_terminal(monkeypatch)
    torch.manual_seed(0)
    net = nn.Sequential(layer.Linear(4, 3), neuron.LIFNode())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.rand(5, 2, 4), torch.rand(5, 2, 3)
    w_ra = functional.fptt_online_training_init_w_ra(opt)
    functional.fptt_online_training(
        net, opt, x, y, nn.functional.mse_loss, 0.1, w_ra, progress=progress
    )
    bar = _one(bars, "fptt_online_training")
    assert bar.was_disabled is (not progress) and (not progress or bar.n == 5)
    functional.reset_net(net)
    functional.ottt_online_training(
        net, opt, x.transpose(0, 1), y.transpose(0, 1), nn.functional.mse_loss, True,
        progress=progress,
    )
    bar = _one(bars, "ottt_online_training")
    assert bar.was_disabled is (not progress) and (not progress or bar.n == 5)


def test_bench_bar(bars, monkeypatch, tmp_path, capsys) -> None:
    _on_terminal(monkeypatch)
    from snncompile import cli

    for name in ("a", "b"):
        (tmp_path / f"bench_{name}.py").write_text("print('speed-up 2.0x')\n")
    assert cli.main(["bench", "--benchmarks-dir", str(tmp_path)]) == 0
    bar = _one(bars, "bench")
    assert not bar.was_disabled and bar.n == 2
    assert "speed-up 2.0x" in capsys.readouterr().out
    bars.clear()
    assert cli.main(["bench", "--benchmarks-dir", str(tmp_path), "--no-progress"]) == 0
    assert _one(bars, "bench").was_disabled
