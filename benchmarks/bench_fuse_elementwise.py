"""Scales merged into the neuron kernel (``fuse_elementwise``) vs separate scale ops.

Run: ``.venv/bin/python benchmarks/bench_fuse_elementwise.py`` (about a minute; ``--quick`` runs
T=256 only).

A converted wide CNN (``Conv2d(1, 64, 3) -> ReLU -> AvgPool(4) -> Linear``: the first layer's
64x32x32 neurons per sample are cheap to compute, so the elementwise passes matter) is compiled
with ``backend='cpu'`` twice in the same process: with the default pipeline and with
``passes=`` listing every pass but ``fuse_elementwise``. Both run the same input (inference,
``torch.no_grad``), best of 5; outputs are checked to be bit-identical. A second row times only
the first neuron layer: its ``ScaledNeuron`` fused vs its unfused chain (scale, fused neuron,
scale) on the same ``[T, N, 64, 32, 32]`` input. Printed: times and the ratio unfused / fused.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import snncompile
from snncompile import functional
from snncompile.ann2snn import convert
from snncompile.ir.ops import Op
from snncompile.passes.pipeline import build_pipeline


def _best(fn, repeats: int = 5) -> float:
    fn()  # warm-up (kernel build, workspaces)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    """Run the benchmark and print one line per case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T=256 only")
    args = parser.parse_args()
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4), nn.Flatten(),
                        nn.Linear(64 * 8 * 8, 10)).eval()
    snn = convert(ann, torch.rand(64, 1, 32, 32), progress=False)
    without = [n for n, _ in build_pipeline("inference") if n != "fuse_elementwise"]
    N = 2
    print(f"threads={torch.get_num_threads()}, N={N}, neurons per sample = 64x32x32")
    for T in (256,) if args.quick else (256, 1024):
        _case(snn, without, T, N)


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    functional.reset_net(model)
    with torch.no_grad():
        return model(x)


def _case(snn: nn.Module, without: list[str], T: int, N: int) -> None:
    x = torch.rand(T, N, 1, 32, 32)
    fused = snncompile.optimize(snn, x[:4], backend="cpu")
    plain = snncompile.optimize(snn, x[:4], backend="cpu", passes=without)
    assert torch.equal(_run(fused, x), _run(plain, x)), "outputs differ"
    t_fused, t_plain = _best(lambda: _run(fused, x)), _best(lambda: _run(plain, x))
    print(f"T={T:5d} model   fused {t_fused * 1e3:8.1f} ms  separate scales "
          f"{t_plain * 1e3:8.1f} ms  ratio {t_plain / t_fused:.2f}x")
    wrapper = fused.graph.find(Op.FUSED_NEURON)[0].module
    chain = nn.Sequential(wrapper.scale_in, wrapper.neuron, wrapper.scale_out)  # same modules
    xs = torch.rand(T, N, 64, 32, 32)
    assert torch.equal(_run(wrapper, xs), _run(chain, xs))
    t_f, t_u = _best(lambda: _run(wrapper, xs)), _best(lambda: _run(chain, xs))
    print(f"T={T:5d} layer   fused {t_f * 1e3:8.1f} ms  separate scales "
          f"{t_u * 1e3:8.1f} ms  ratio {t_u / t_f:.2f}x")


if __name__ == "__main__":
    main()
