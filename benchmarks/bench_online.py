"""Online training benchmark: peak memory vs T (BPTT, OTTT, FPTT) and time per step vs SpikingJelly.

**Memory.** One training batch of ``T`` steps (``T`` = 8 and 512 by default) of a
``64-256-256-10`` LIF MLP, batch 128, for BPTT (whole-sequence forward, one backward), OTTT
(:func:`snncompile.online.ottt_online_training`) and FPTT
(:func:`snncompile.online.fptt_online_training`). Each point runs in a forked child process,
because a peak is per process. torch's CPU tensors are invisible to ``tracemalloc``, so the
child reads the kernel's resident-set counters: it creates the data, records ``VmRSS``, resets
the peak mark (``echo 5 > /proc/self/clear_refs``), runs a 2-step warm-up, records ``VmRSS``
again and resets the mark, trains on the ``T``-step batch and reads the peak ``VmHWM``. Printed:

* ``peak``: the highest RSS of warm-up or training minus the RSS before any training (one-time
  lazy initialisation of torch included; this is what a fresh training process needs);
* ``growth``: the training peak minus the post-warm-up RSS (what depends on ``T``).

The target is ``peak(T=512) / peak(T=8) <= 1.1`` for OTTT and FPTT; BPTT grows with ``T``.

**Time per step.** The same small and large models trained with our loops and SpikingJelly
2.0.0's (``learning.online_learning``) on identical data and weights, plus our
:func:`~snncompile.online.compile_online` module (``backend='auto'``): milliseconds per time
step (median of repeats) and the ratio SpikingJelly / ours. One torch thread (shared machine).

Run: ``python benchmarks/bench_online.py`` (about a minute); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from snncompile import neuron
from snncompile.online import (
    OTTTLIFNode,
    OTTTSequential,
    SLTTLIFNode,
    compile_online,
    fptt_online_training,
    fptt_online_training_init_w_ra,
    ottt_online_training,
)

IN_FEATURES = 64
CLASSES = 10


# -- models ---------------------------------------------------------------------------------------
def build(lib: Any, kind: str, hidden: int) -> nn.Module:
    """``kind`` in ottt/sltt/lif, from our modules (``lib='ours'``) or SpikingJelly's."""
    if lib == "ours":
        seq_cls, ottt, sltt, lif = OTTTSequential, OTTTLIFNode, SLTTLIFNode, neuron.LIFNode
    else:
        from spikingjelly.activation_based import layer as sj_layer
        from spikingjelly.activation_based import neuron as sj_neuron

        seq_cls, ottt = sj_layer.OTTTSequential, sj_neuron.OTTTLIFNode
        sltt, lif = sj_neuron.SLTTLIFNode, sj_neuron.LIFNode
    node = {"ottt": ottt, "sltt": sltt, "lif": lif}[kind]
    container = seq_cls if kind == "ottt" else nn.Sequential
    torch.manual_seed(0)
    return container(
        nn.Linear(IN_FEATURES, hidden),
        node(),
        nn.Linear(hidden, hidden),
        node(),
        nn.Linear(hidden, CLASSES),
    )


def _reset(net: nn.Module) -> None:
    for m in net.modules():
        if m is not net and callable(getattr(m, "reset", None)):
            m.reset()


def _train(
    method: str, net: nn.Module, x: torch.Tensor, y: torch.Tensor, loops: dict[str, Callable]
) -> None:
    """One batch ``x`` ``[N, T, F]`` of ``method`` (bptt/ottt/sltt/fptt) with ``loops``."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    if method in ("ottt", "sltt"):
        loops["ottt"](net, opt, x, y, F.cross_entropy, True)
    elif method == "fptt":
        w_ra = loops["init"](opt)
        loops["fptt"](net, opt, x.transpose(0, 1), y.transpose(0, 1), F.cross_entropy, 2.0, w_ra)
    else:  # bptt
        pairs = zip(x.transpose(0, 1).unbind(0), y.transpose(0, 1).unbind(0), strict=True)
        loss = sum(F.cross_entropy(net(x_t), y_t) for x_t, y_t in pairs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _reset(net)


OUR_LOOPS = {
    "ottt": ottt_online_training,
    "fptt": fptt_online_training,
    "init": fptt_online_training_init_w_ra,
}


# -- memory ---------------------------------------------------------------------------------------
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_point(method: str, steps: int, batch: int, hidden: int) -> dict[str, float]:
    """Peak and T-dependent growth of RSS (MB) for one training batch; run in a child."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, steps, IN_FEATURES, generator=gen)
    y = torch.randint(0, CLASSES, (batch, steps), generator=gen)
    net = build("ours", "ottt" if method == "ottt" else "lif", hidden)
    rss0 = _status_mb("VmRSS")
    _reset_peak()
    _train(method, net, x[:, :2], y[:, :2], OUR_LOOPS)
    warm_peak = _status_mb("VmHWM")
    rss1 = _status_mb("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    _train(method, net, x, y, OUR_LOOPS)
    seconds = time.perf_counter() - start
    train_peak = _status_mb("VmHWM")
    returned = batch * steps * CLASSES * 4 / 2**20 if method == "ottt" else 0.0
    return {
        "returned": returned,  # ottt_online_training's y_all [N, T, classes], part of the result
        "peak": max(warm_peak, train_peak) - rss0,
        "growth": train_peak - rss1,
        "rss0": rss0,
        "s": seconds,
    }


def in_child(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a forked child and return its JSON result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            payload = json.dumps(fn(*args))
        except BaseException as exc:
            payload = json.dumps({"error": repr(exc)})
        os.write(write_fd, payload.encode())
        os._exit(0)
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 65536):
        data += chunk
    os.close(read_fd)
    os.waitpid(pid, 0)
    result = json.loads(data.decode())
    if "error" in result:
        raise RuntimeError(f"child failed: {result['error']}")
    return result


def bench_memory(ts: list[int], batch: int, hidden: int) -> dict[str, dict[int, dict[str, float]]]:
    print(
        f"\n== peak training memory, {IN_FEATURES}-{hidden}-{hidden}-{CLASSES} LIF MLP, "
        f"batch {batch} (MB of RSS; forked child per point) =="
    )
    print(f"{'method':7s} {'T':>5s} {'peak':>9s} {'growth':>9s} {'y_all':>7s} {'time s':>8s}")
    out: dict[str, dict[int, dict[str, float]]] = {}
    for method in ("bptt", "ottt", "fptt"):
        out[method] = {}
        for steps in ts:
            r = in_child(memory_point, method, steps, batch, hidden)
            out[method][steps] = r
            print(
                f"{method:7s} {steps:5d} {r['peak']:9.1f} {r['growth']:9.1f} "
                f"{r['returned']:7.1f} {r['s']:8.2f}"
            )
    lo, hi = ts[0], ts[-1]
    print(f"\nratio peak(T={hi}) / peak(T={lo})  [and without the returned y_all]:")
    for method, points in out.items():
        a, b = points[hi], points[lo]
        ratio = a["peak"] / max(b["peak"], 1e-9)
        net = (a["peak"] - a["returned"]) / max(b["peak"] - b["returned"], 1e-9)
        verdict = ""
        if method != "bptt":
            verdict = "  target <= 1.1: " + ("OK" if net <= 1.1 else "MISSED")
        print(f"  {method:5s} {ratio:6.2f}x  [{net:6.2f}x]{verdict}")
    return out


# -- time per step -------------------------------------------------------------------------------
def _sj_loops() -> dict[str, Callable] | None:
    try:
        from spikingjelly.activation_based.learning import online_learning as ol
    except Exception as exc:  # pragma: no cover - depends on the environment
        print(f"SpikingJelly not importable ({exc!r}); skipping the comparison")
        return None
    return {
        "ottt": ol.ottt_online_training,
        "fptt": ol.fptt_online_training,
        "init": ol.fptt_online_training_init_w_ra,
    }


def _time_per_step(
    make: Callable[[], nn.Module], method: str, loops: dict[str, Callable], x, y, repeats: int
) -> float:
    net = make()
    _train(method, net, x[:, :2], y[:, :2], loops)  # warm-up (kernel builds, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _train(method, net, x, y, loops)
        times.append((time.perf_counter() - start) / x.shape[1])
    return statistics.median(times) * 1e3


def bench_time(sizes: list[tuple[int, int]], steps: int, repeats: int) -> None:
    sj = _sj_loops()
    print(f"\n== time per step (ms, median of {repeats} batches of T={steps}; 1 torch thread) ==")
    print("compiled(b) = compile_online(model, x_t, backend=b) driven by the same loop")
    head = ["method", "batch", "hidden", "SJ 2.0.0", "ours", "compiled(torch)", "compiled(auto)"]
    print(
        " ".join(f"{h:>15s}" if i > 2 else f"{h:>6s}" for i, h in enumerate(head))
        + "   SJ/ours  SJ/compiled(auto)"
    )
    for batch, hidden in sizes:
        gen = torch.Generator().manual_seed(1)
        x = torch.rand(batch, steps, IN_FEATURES, generator=gen)
        y = torch.randint(0, CLASSES, (batch, steps), generator=gen)
        for method in ("ottt", "sltt", "fptt"):
            kind = "lif" if method == "fptt" else method

            def make(lib: str = "ours", k: str = kind, h: int = hidden) -> nn.Module:
                return build(lib, k, h)

            def make_compiled(backend: str, k: str = kind, h: int = hidden, ex=x[:, 0]) -> Any:
                return lambda: compile_online(build("ours", k, h), ex, backend=backend)

            ours = _time_per_step(make, method, OUR_LOOPS, x, y, repeats)
            comp_t = _time_per_step(make_compiled("torch"), method, OUR_LOOPS, x, y, repeats)
            comp_a = _time_per_step(make_compiled("auto"), method, OUR_LOOPS, x, y, repeats)
            theirs = float("nan")
            if sj is not None:
                theirs = _time_per_step(lambda m=make: m("sj"), method, sj, x, y, repeats)
            cells = [theirs, ours, comp_t, comp_a]
            print(
                f"{method:>6s} {batch:>6d} {hidden:>6d} "
                + " ".join(f"{c:15.3f}" for c in cells)
                + f"   {theirs / ours:6.2f}x  {theirs / comp_a:6.2f}x"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        bench_memory([8, 64], batch=32, hidden=64)
        bench_time([(32, 64)], steps=8, repeats=2)
    else:
        bench_memory([8, 64, 512], batch=128, hidden=256)
        bench_time([(64, 128), (256, 1024)], steps=16, repeats=3)


if __name__ == "__main__":
    main()
