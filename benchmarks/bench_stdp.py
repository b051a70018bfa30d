"""Benchmark: multi-step STDP learner step, snncompile vs SpikingJelly 2.0.0.

Both learners get the same recorded ``[T, N, ...]`` spike sequences (fed straight into their
monitors, so only ``learner.step()`` is timed) and must produce the same ``delta_w``. Also times
our batched multi-step path against our own per-step loop (``stdp_multi_step(batched=False)``).

Run: ``.venv/bin/python benchmarks/bench_stdp.py [--repeat 5] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable

import torch
from torch import nn

from snncompile.learning import STDPLearner, stdp_multi_step, trace_sequence


def _best_time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up (allocations, first-call dispatch)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _spikes(shape: tuple[int, ...], p: float = 0.2) -> torch.Tensor:
    return (torch.rand(shape) < p).float()


def bench_case(
    name: str,
    layer: nn.Module,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    repeat: int,
    sj_learning: object | None,
) -> None:
    """Time one learner step on one recorded sequence for both libraries and print the ratio."""
    x, y = _spikes(in_shape), _spikes(out_shape)
    ours = STDPLearner("m", layer, None, 2.0, 2.0, hooks=False)

    def run_ours() -> torch.Tensor:
        ours.reset()
        ours.record(x, y)
        return ours.step(on_grad=False)

    t_ours = _best_time(run_ours, repeat)

    def run_loop() -> torch.Tensor:
        return stdp_multi_step(layer, x, y, None, None, 2.0, 2.0, batched=False)[2]

    t_loop = _best_time(run_loop, repeat)
    line = (
        f"{name:<44} ours {t_ours * 1e3:9.2f} ms | our per-step loop {t_loop * 1e3:9.2f} ms "
        f"(x{t_loop / t_ours:5.1f})"
    )
    if sj_learning is not None:
        theirs = sj_learning.STDPLearner("m", layer, nn.Identity(), 2.0, 2.0)

        def run_sj() -> torch.Tensor:
            theirs.reset()
            theirs.in_spike_monitor.records.append(x)
            theirs.out_spike_monitor.records.append(y)
            return theirs.step(on_grad=False)

        t_sj = _best_time(run_sj, max(1, repeat // 2))
        ref, got = run_sj(), run_ours()
        err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        line += f" | SpikingJelly {t_sj * 1e3:9.2f} ms -> speedup x{t_sj / t_ours:6.1f}"
        line += f" (max rel err {err:.1e})"
        theirs.close()
    print(line, flush=True)


def bench_traces(steps: int, per_step: int, repeat: int) -> None:
    """Time the trace of a ``[steps, per_step]`` spike train: decay-matrix vs in-place vs naive."""
    s = _spikes((steps, per_step))

    def naive() -> torch.Tensor:
        x, out = torch.zeros(per_step), []
        for s_t in s.unbind(0):
            x = x - x / 2.0 + s_t
            out.append(x)
        return torch.stack(out)

    t_mm = _best_time(lambda: trace_sequence(s, None, 2.0, method="matmul"), repeat)
    t_rec = _best_time(lambda: trace_sequence(s, None, 2.0, method="recurrence"), repeat)
    t_naive = _best_time(naive, repeat)
    ref = naive()
    err = ((trace_sequence(s, None, 2.0, method="matmul") - ref).abs().max() / ref.max()).item()
    print(
        f"trace T={steps:<4} step={per_step:<8} matmul {t_mm * 1e3:8.3f} ms | in-place "
        f"recurrence {t_rec * 1e3:8.3f} ms | naive loop {t_naive * 1e3:8.3f} ms "
        f"(matmul rel err {err:.1e})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        sj_learning = importlib.import_module("spikingjelly.activation_based.learning")
    except Exception as exc:  # pragma: no cover - environment dependent
        print(f"SpikingJelly learning not importable ({exc!r}); timing snncompile only.")
        sj_learning = None

    t, n = 16, 8
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, T={t}, N={n}")
    conv = nn.Conv2d(16, 32, 3, stride=1, padding=1, bias=False)
    bench_case(
        "Conv2d 16->32 k3 s1 p1, 32x32", conv, (t, n, 16, 32, 32), (t, n, 32, 32, 32),
        args.repeat, sj_learning,
    )
    conv2 = nn.Conv2d(8, 16, 5, stride=2, padding=1, bias=False)
    bench_case(
        "Conv2d 8->16 k5 s2 p1, 28x28", conv2, (t, n, 8, 28, 28), (t, n, 16, 13, 13),
        args.repeat, sj_learning,
    )
    conv1 = nn.Conv1d(8, 16, 5, stride=2, padding=1, bias=False)
    bench_case(
        "Conv1d 8->16 k5 s2 p1, L=256", conv1, (t, n, 8, 256), (t, n, 16, 127),
        args.repeat, sj_learning,
    )
    fc = nn.Linear(784, 256, bias=False)
    bench_case("Linear 784->256", fc, (t, n, 784), (t, n, 256), args.repeat, sj_learning)
    for steps, per_step in ((16, 1024), (16, 16384), (16, 262144), (256, 2048), (1024, 512)):
        bench_traces(steps, per_step, args.repeat)
    fc_long = nn.Linear(784, 256, bias=False)
    bench_case(
        "Linear 784->256, T=256", fc_long, (256, n, 784), (256, n, 256), args.repeat, sj_learning
    )


if __name__ == "__main__":
    main()
