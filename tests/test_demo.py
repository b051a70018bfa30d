"""Smoke test of the digits demo: one short epoch trains the spiking CNN well above chance."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

DEMO = Path(__file__).resolve().parents[1] / "examples" / "digits_demo.py"


def _load_demo():
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("digits_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_one_epoch_learns(capsys, tmp_path):
    demo = _load_demo()
    metrics = demo.main(["--epochs", "1", "--T", "4", "--seed", "0", "--out", str(tmp_path)])
    # Chance is 0.1; one epoch reached 0.89-0.96 over seeds 0-5 when this test was written.
    assert metrics["test_acc"] > 0.5
    for key in ("test_acc", "train_loss", "train_acc", "epoch_time", "total_time", "history"):
        assert key in metrics
    assert metrics["epochs"] == 1 and len(metrics["history"]) == 1
    assert metrics["train_loss"] > 0 and metrics["epoch_time"] > 0
    assert metrics["engine"] == "compiled"
    # The BN-folded inference compile scores the same trained weights: folding only changes
    # float rounding, which may flip a rare spike, never the accuracy by more than a sample or two.
    assert abs(metrics["inference_test_acc"] - metrics["test_acc"]) <= 2 / 360
    out = capsys.readouterr().out
    assert "test acc" in out and "fuse_neurons" in out  # the compile report is printed
    # The trained checkpoint: the model's keys, weights_only, into a fresh model; its ONNX export
    # scores like the inference compile (same BN-folded weights; rounding may flip a rare spike).
    sd = torch.load(metrics["checkpoint"], weights_only=True)
    fresh = demo.build_model()
    fresh.load_state_dict(sd)
    assert list(sd) == list(fresh.state_dict())
    assert abs(metrics["onnx_test_acc"] - metrics["inference_test_acc"]) <= 2 / 360
    for key in ("onnx_step", "onnx_sequence"):
        assert Path(metrics[key]).is_file()
    assert "onnxruntime test acc" in out


def test_demo_eager_engine_runs():
    demo = _load_demo()
    metrics = demo.main(
        ["--epochs", "1", "--T", "4", "--seed", "1", "--engine", "eager", "--no-save"]
    )
    assert metrics["engine"] == "eager" and metrics["test_acc"] > 0.5


def test_demo_model_is_multi_step_and_uses_our_modules():
    demo = _load_demo()
    from snncompile import layer, neuron

    net = demo.build_model()
    assert all(getattr(m, "step_mode", "m") == "m" for m in net)
    assert any(isinstance(m, neuron.LIFNode) for m in net)
    assert isinstance(net[0], layer.Conv2d)
    out = net(torch.rand(3, 2, 1, 8, 8))
    assert out.shape == (3, 2, 10)


def test_demo_rejects_bad_flags():
    demo = _load_demo()
    with pytest.raises(SystemExit):
        demo.parse_args(["--T", "0"])
