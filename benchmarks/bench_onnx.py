"""ONNX export under onnxruntime vs the compiled PyTorch module vs the eager model (issue 9).

Two measurements on a small spiking VGG-style CNN (1x28x28 input, conv-BN-LIF blocks, LIF head):

1. **Step latency, batch 1**: one time step at a time, state carried -- the streaming use case.
   Eager: ``model(x_t)`` (single-step model). Compiled: ``compiled(x[t:t+1])`` (multi-step
   neurons keep their state across calls). ORT: the ``mode='step'`` export, states fed back
   from each call's outputs (:class:`snncompile.onnx_runtime.StepRunner`).
2. **Sequence throughput, batch 16**: a whole ``[T, 16, ...]`` input. Eager: Python loop over T.
   Compiled: one call. ORT: the ``mode='sequence'`` export (one ``Scan``), one call.

Every variant is checked to produce the same spikes before it is timed. Same thread count for
torch and ORT (``--threads``), ORT spinning off. Run: ``python benchmarks/bench_onnx.py``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import snncompile
from snncompile import functional, neuron
from snncompile.onnx_runtime import StepRunner, make_session, run_sequence_model


def build_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        neuron.LIFNode(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        neuron.LIFNode(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 64),
        neuron.LIFNode(),
        nn.Linear(64, 10),
        neuron.LIFNode(),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(3.0)
                m.bias.add_(0.3)  # enough drive that every layer spikes
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        model[9].bias.add_(0.5)
        model[11].bias.add_(0.8)
    return model.eval()


def timeit(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)  # stable on small shared machines
    p.add_argument("--T", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test of the script)")
    args = p.parse_args(argv)
    if args.quick:
        args.T, args.batch, args.repeats = 6, 4, 1
    torch.set_num_threads(args.threads)
    T = args.T
    model = build_model()
    example = torch.rand(4, 1, 1, 28, 28)
    compiled = snncompile.optimize(model, example, mode="inference")
    tmp = Path(tempfile.mkdtemp())
    step_path, seq_path = tmp / "step.onnx", tmp / "seq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snncompile.export_onnx(model, example, step_path, mode="step")
        snncompile.export_onnx(model, example, seq_path, mode="sequence")
    print(
        f"model: VGG-style SNN 1x28x28, {sum(p.numel() for p in model.parameters())} params; "
        f"T={T}; torch threads={args.threads}, ORT intra-op threads={args.threads}, spinning off"
    )

    # -- 1. per-step latency at batch 1 --
    x1 = (torch.rand(T, 1, 1, 28, 28) * 1.5).contiguous()
    x1_np = [x1[t].numpy() for t in range(T)]
    runner = StepRunner(step_path, threads=args.threads)

    def eager_steps() -> torch.Tensor:
        functional.reset_net(model)
        with torch.no_grad():
            return torch.stack([model(x1[t]) for t in range(T)])

    def compiled_steps() -> torch.Tensor:
        functional.reset_net(compiled)
        with torch.no_grad():
            return torch.cat([compiled(x1[t : t + 1]) for t in range(T)])

    def ort_steps() -> np.ndarray:
        runner.reset()
        return np.stack([runner.step(x) for x in x1_np])

    ref = eager_steps().numpy()
    assert ref.mean() > 0, "benchmark input gives no output spikes"
    np.testing.assert_array_equal(compiled_steps().numpy(), ref)
    np.testing.assert_array_equal(ort_steps(), ref)
    t_eager = timeit(eager_steps, args.repeats) / T
    t_comp = timeit(compiled_steps, args.repeats) / T
    t_ort = timeit(ort_steps, args.repeats) / T
    print("\n1) step latency, batch 1 (per time step; spikes identical across all three)")
    print(f"   eager PyTorch          {t_eager * 1e6:9.1f} us")
    print(f"   compiled PyTorch       {t_comp * 1e6:9.1f} us")
    print(f"   ORT step mode          {t_ort * 1e6:9.1f} us")
    print(
        f"   ORT step speed-up: {t_eager / t_ort:.2f}x vs eager, {t_comp / t_ort:.2f}x vs compiled"
        f" (target >= 2x vs eager: {'met' if t_eager / t_ort >= 2 else 'NOT met'})"
    )

    # -- 2. sequence throughput at batch 16 --
    xb = torch.rand(T, args.batch, 1, 28, 28) * 1.5
    session = make_session(seq_path, threads=args.threads)

    def eager_seq() -> torch.Tensor:
        functional.reset_net(model)
        with torch.no_grad():
            return torch.stack([model(xb[t]) for t in range(T)])

    def compiled_seq() -> torch.Tensor:
        functional.reset_net(compiled)
        with torch.no_grad():
            return compiled(xb)

    xb_np = xb.numpy()

    def ort_seq() -> np.ndarray:
        return run_sequence_model(seq_path, xb_np, session=session)

    ref = eager_seq().numpy()
    np.testing.assert_array_equal(compiled_seq().numpy(), ref)
    np.testing.assert_array_equal(ort_seq(), ref)
    steps = T * args.batch
    s_eager = timeit(eager_seq, args.repeats)
    s_comp = timeit(compiled_seq, args.repeats)
    s_ort = timeit(ort_seq, args.repeats)
    print(f"\n2) sequence throughput, batch {args.batch}, T={T} (sample-steps per second)")
    print(f"   eager PyTorch          {steps / s_eager:9.0f} /s   ({s_eager * 1e3:.2f} ms)")
    print(f"   compiled PyTorch       {steps / s_comp:9.0f} /s   ({s_comp * 1e3:.2f} ms)")
    print(f"   ORT sequence mode      {steps / s_ort:9.0f} /s   ({s_ort * 1e3:.2f} ms)")
    print(
        f"   ORT sequence speed-up: {s_eager / s_ort:.2f}x vs eager, "
        f"{s_comp / s_ort:.2f}x vs compiled"
    )


if __name__ == "__main__":
    main()
