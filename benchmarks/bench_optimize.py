"""Benchmark: eager single-step SNN (python loop over T) vs ``snncompile.optimize``.

A small spiking VGG-style CNN (conv-BN-LIF x3, pooling, linear readout) on 1x28x28 inputs with
T=8 and batch 32:

* training step: forward + backward of the eager single-step model looped over T, versus the
  compiled module (``mode='train'``: convolutions over ``[T*N, ...]``, neurons multi-step,
  BN with per-step statistics computed for all steps in one call);
* inference: eager eval-mode loop versus the compiled module with BN folded (``mode='inference'``).

Both run in the same process on the same inputs; outputs are checked to match before timing.
Run: ``.venv/bin/python benchmarks/bench_optimize.py [--reps 5]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import snncompile
from snncompile import functional, layer, neuron


def vgg(channels: int = 16) -> nn.Module:
    c = channels
    return nn.Sequential(
        layer.Conv2d(1, c, 3, padding=1, bias=False),
        layer.BatchNorm2d(c),
        neuron.LIFNode(),
        layer.MaxPool2d(2),
        layer.Conv2d(c, 2 * c, 3, padding=1, bias=False),
        layer.BatchNorm2d(2 * c),
        neuron.LIFNode(),
        layer.MaxPool2d(2),
        layer.Conv2d(2 * c, 2 * c, 3, padding=1, bias=False),
        layer.BatchNorm2d(2 * c),
        neuron.LIFNode(),
        layer.AdaptiveAvgPool2d((2, 2)),
        layer.Flatten(),
        layer.Linear(2 * c * 4, 10),
    )


def timeit(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    T, N = args.T, args.batch
    x = (torch.rand(T, N, 1, 28, 28) > 0.7).float()

    model = vgg()
    eager_model = copy.deepcopy(model)
    compiled = snncompile.optimize(model, x)

    def eager_train() -> None:
        functional.reset_net(eager_model)
        out = torch.stack([eager_model(xt) for xt in x.unbind(0)])
        out.mean(0).sum().backward()

    def compiled_train() -> None:
        functional.reset_net(compiled)
        compiled(x).mean(0).sum().backward()

    functional.reset_net(eager_model)
    functional.reset_net(compiled)
    with torch.no_grad():
        y_ref = torch.stack([eager_model(xt) for xt in x.unbind(0)])
        y = compiled(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)

    t_eager = timeit(eager_train, args.reps)
    t_comp = timeit(compiled_train, args.reps)

    eval_model = copy.deepcopy(model).eval()
    compiled_inf = snncompile.optimize(eval_model, x)  # mode='inference': BN folded

    def eager_inf() -> None:
        functional.reset_net(eval_model)
        with torch.no_grad():
            torch.stack([eval_model(xt) for xt in x.unbind(0)])

    def compiled_inf_run() -> None:
        functional.reset_net(compiled_inf)
        with torch.no_grad():
            compiled_inf(x)

    with torch.no_grad():
        functional.reset_net(eval_model)
        functional.reset_net(compiled_inf)
        torch.testing.assert_close(
            compiled_inf(x),
            torch.stack([eval_model(xt) for xt in x.unbind(0)]),
            rtol=1e-4,
            atol=1e-4,
        )
    i_eager = timeit(eager_inf, args.reps)
    i_comp = timeit(compiled_inf_run, args.reps)

    print(f"VGG-style SNN, T={T}, batch={N}, 1x28x28, threads={args.threads}, reps={args.reps}")
    print(f"{'case':<34}{'eager ms':>10}{'compiled ms':>13}{'speed-up':>10}")
    print(
        f"{'train step (fwd+bwd)':<34}{t_eager * 1e3:>10.1f}{t_comp * 1e3:>13.1f}"
        f"{t_eager / t_comp:>9.2f}x"
    )
    print(
        f"{'inference (BN folded)':<34}{i_eager * 1e3:>10.1f}{i_comp * 1e3:>13.1f}"
        f"{i_eager / i_comp:>9.2f}x"
    )
    print()
    print(compiled_inf.report())


if __name__ == "__main__":
    main()
