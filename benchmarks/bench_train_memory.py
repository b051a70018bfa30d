"""Training memory: peak memory and step time of one BPTT step, SpikingJelly vs snncompile.

Model: a SpikingJelly-built CNN (conv-BN-LIF-maxpool x3 with 32/64/128 channels, then
linear-LIF), multi-step, batch 16, 3x32x32 inputs, cross-entropy on the time-mean output. Rows
(one fresh subprocess each, so peak RSS is the row's own):

* ``sj_eager``: the SpikingJelly model as written;
* ``sj_memopt``: SpikingJelly's ``memopt.checkpoint_module`` on each conv block, with
  ``BitSpikeCompressor`` on blocks whose input is spikes (checkpointing + bit compression);
* ``torch_compile``: ``torch.compile`` of the SpikingJelly model (``--torch-compile``; slow
  to compile on a small machine);
* ``sc_default``: ``snncompile.optimize(model, x)``;
* ``sc_packed``: ``optimize(..., pack_spikes=True)`` (binary spikes saved 1 bit each);
* ``sc_budget``: ``optimize(..., memory_budget=B)`` with ``B`` the smallest budget the
  compiler accepts at that shape (read from its error message).

Reported per row: peak RSS over the RSS before the model is built (``VmHWM``), peak live tensor
bytes of the step (:class:`snncompile.runtime.memory.LiveBytes`) and the median step time of 3
steps after one warm-up. Numbers are from a shared, busy machine: ratios within a run count.

Run: ``.venv/bin/python benchmarks/bench_train_memory.py [--T 4,16,64] [--torch-compile]
[--plot docs/train_memory.png]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import statistics
import time
from typing import Any

import torch
from torch import nn

BATCH = 16


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def build_cnn() -> nn.Module:
    """The benchmarked SpikingJelly CNN (multi-step)."""
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            layer.Conv2d(cin, cout, 3, padding=1, bias=False),
            layer.BatchNorm2d(cout),
            neuron.LIFNode(surrogate_function=surrogate.ATan()),
            layer.MaxPool2d(2),
        )

    net = nn.Sequential(
        block(3, 32),
        block(32, 64),
        block(64, 128),
        nn.Sequential(
            layer.Flatten(),
            layer.Linear(128 * 4 * 4, 10),
            neuron.LIFNode(surrogate_function=surrogate.ATan()),
        ),
    )
    functional.set_step_mode(net, "m")
    return net


def _smallest_budget(model: nn.Module, x: torch.Tensor) -> str:
    import snncompile
    from snncompile.runtime.recompute import MemoryBudgetError

    try:
        snncompile.optimize(model, x, memory_budget="1KB")
    except MemoryBudgetError as err:
        return re.search(r">= '([0-9.]+MB)'", str(err)).group(1)
    return "1KB"


def row(kind: str, steps: int, queue: Any) -> None:
    """Measure one row in this (child) process and put a dict on ``queue``."""
    torch.set_num_threads(1)
    from spikingjelly.activation_based import functional

    import snncompile
    from snncompile.runtime.memory import LiveBytes

    base_rss = _rss("VmRSS:")
    torch.manual_seed(0)
    model = build_cnn()
    x = (torch.rand(steps, BATCH, 3, 32, 32) > 0.5).float()
    target = torch.randint(0, 10, (BATCH,))
    info: dict[str, Any] = {"kind": kind, "T": steps}
    if kind == "sj_eager":
        run = model
    elif kind == "sj_memopt":
        from spikingjelly.activation_based import memopt

        for i in range(len(model)):
            comp = memopt.BitSpikeCompressor() if i > 0 else None
            model[i] = memopt.checkpoint_module(model[i], compressor=comp)
        run = model
    elif kind == "torch_compile":
        run = torch.compile(model)
    elif kind == "sc_default":
        run = snncompile.optimize(model, x)
    elif kind == "sc_packed":
        run = snncompile.optimize(model, x, pack_spikes=True)
    elif kind == "sc_budget":
        budget = _smallest_budget(model, x)
        info["budget"] = budget
        run = snncompile.optimize(model, x, memory_budget=budget)
    else:
        raise ValueError(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        functional.reset_net(run)
        y = run(x).mean(0)
        loss = nn.functional.cross_entropy(y, target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up (kernel builds, torch.compile)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    meter = LiveBytes()
    with meter:
        step()
    info.update(
        rss_mb=(_rss("VmHWM:") - base_rss) / 1e6,
        live_mb=meter.peak / 1e6,
        step_s=statistics.median(times),
    )
    queue.put(info)


def in_child(kind: str, steps: int) -> dict[str, Any]:
    """Run :func:`row` in a fresh process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=row, args=(kind, steps, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        return {"kind": kind, "T": steps, "error": f"exit {p.exitcode}"}
    return q.get()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="4,16,64")
    ap.add_argument("--torch-compile", action="store_true")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    kinds = ["sj_eager", "sj_memopt", "sc_default", "sc_packed", "sc_budget"]
    if args.torch_compile:
        kinds.insert(2, "torch_compile")
    results = []
    print(f"{'row':14s} {'T':>3s} {'peak RSS MB':>12s} {'live MB':>8s} {'step s':>7s}  budget")
    for steps in [int(t) for t in args.T.split(",")]:
        for kind in kinds:
            r = in_child(kind, steps)
            results.append(r)
            if "error" in r:
                print(f"{kind:14s} {steps:3d} {r['error']}")
                continue
            print(
                f"{kind:14s} {steps:3d} {r['rss_mb']:12.1f} {r['live_mb']:8.1f} "
                f"{r['step_s']:7.3f}  {r.get('budget', '')}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for kind in kinds:
            pts = [(r["T"], r["rss_mb"]) for r in results if r["kind"] == kind and "rss_mb" in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=kind)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("T (time steps)")
        ax.set_ylabel("peak RSS over pre-model RSS (MB)")
        ax.set_title(f"BPTT step, SpikingJelly CNN, batch {BATCH}, 3x32x32")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
