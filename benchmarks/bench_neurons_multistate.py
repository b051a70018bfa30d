"""The new built-in neurons, fused vs SpikingJelly 2.0.0 vs snncompile's own torch loop.

Same process, same inputs: QIF, EIF, Izhikevich (states v, w), CUBA-LIF (states v, c) and ALIF
(states v, a; no SpikingJelly class) as multi-step layers at T=64, N=65,536 (ATan surrogate), two
workloads: forward without grad, forward + backward of the spikes. Printed: median wall time of
each implementation and the ratio to the fused kernel (``x`` = times slower), and the bytes the
fused backward keeps per neuron-step (``h``, plus the pre-step value of an extra state only when
the gradient reads it).

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_neurons_multistate.py [--quick]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from snncompile import neuron, surrogate

NEURONS = {
    "QIFNode": {},
    "EIFNode": {},
    "IzhikevichNode": {"a": 0.2, "b": 0.1},
    "CUBALIFNode": {},
    "ALIFNode": {},
}


def _timeit(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _workloads(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    def fwd() -> None:
        module.reset()
        with torch.no_grad():
            module(x)

    def fwd_bwd() -> None:
        module.reset()
        xs = x.clone().requires_grad_()
        module(xs).backward(g)

    return fwd, fwd_bwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    try:
        from spikingjelly.activation_based import neuron as sj_neuron
        from spikingjelly.activation_based import surrogate as sj_surrogate
    except ImportError:
        sj_neuron = sj_surrogate = None
    T, N = 64, 65536
    torch.manual_seed(0)
    x = torch.randn(T, N) * 1.5 + 0.3
    g = torch.randn(T, N)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, T={T}, N={N:,}")
    print(f"  {'neuron':15} {'impl':13} {'fwd ms':>8} {'fwd x':>6} {'f+b ms':>8} {'f+b x':>6}")
    for name, kw in NEURONS.items():
        impls: dict[str, torch.nn.Module] = {
            "fused cpu": getattr(neuron, name)(
                **kw, surrogate_function=surrogate.ATan(), step_mode="m", backend="cpu"
            ),
            "torch loop": getattr(neuron, name)(
                **kw, surrogate_function=surrogate.ATan(), step_mode="m"
            ),
        }
        if sj_neuron is not None and hasattr(sj_neuron, name):
            ref = getattr(sj_neuron, name)(**kw, surrogate_function=sj_surrogate.ATan())
            ref.step_mode = "m"
            impls["spikingjelly"] = ref
        base: tuple[float, float] | None = None
        for impl, module in impls.items():
            fwd, fwd_bwd = _workloads(module, x, g)
            times = (_timeit(fwd, repeats), _timeit(fwd_bwd, repeats))
            base = base or times
            print(
                f"  {name:15} {impl:13} {times[0] * 1e3:8.2f} {times[0] / base[0]:6.1f} "
                f"{times[1] * 1e3:8.2f} {times[1] / base[1]:6.1f}"
            )
        saved = impls["fused cpu"].neuron_dynamics().step_program().num_saved
        print(f"  {name:15} fused backward keeps {4 * saved} bytes per neuron-step")


if __name__ == "__main__":
    main()
