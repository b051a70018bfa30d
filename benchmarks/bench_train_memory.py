"""Training memory: peak memory and step time of one BPTT step, SpikingJelly vs snncompile.

Model: a SpikingJelly-built CNN (conv-BN-LIF-maxpool x3 with 32/64/128 channels, then
linear-LIF), multi-step, batch 16, 3x32x32 inputs, cross-entropy on the time-mean output. Rows
(one fresh subprocess each, so peak RSS is the row's own):

* ``sj_eager``: the SpikingJelly model as written;
* ``sj_memopt``: SpikingJelly's ``memopt.checkpoint_module`` on each conv block, with
  ``BitSpikeCompressor`` on blocks whose input is spikes (checkpointing + bit compression);
* ``sj_optimize_memory``: SpikingJelly's ``memopt.optimize_memory`` preset, ``level=1``
  (selective checkpointing of the conv blocks with automatic spike compression), the highest
  level that runs without CUDA: levels 2-4 search by measuring CUDA memory;
* ``torch_compile``: ``torch.compile`` of the SpikingJelly model (``--torch-compile``; slow
  to compile on a small machine);
* ``sc_default``: ``snncompile.optimize(model, x)``;
* ``sc_packed``: ``optimize(..., pack_spikes=True)`` (binary spikes saved 1 bit each);
* ``sc_budget``: ``optimize(..., memory_budget=B)`` with ``B`` the smallest budget the
  compiler accepts at that shape (read from its error message).

* ``sc_budget_fixed``: ``optimize(..., memory_budget=--fixed-budget)`` (default
  :data:`FIXED_BUDGET`), the same budget at every ``T`` (``cnn_frozenbn``: time chunks);
* ``sc_budget_quarter``: ``optimize(..., memory_budget=B)`` with ``B`` a quarter of the
  ``sj_eager`` row's peak live bytes at the same ``T`` (or the smallest accepted budget, if that
  is larger): the issue's ">= 4x less than eager" target, asked for directly.

Models (``--model``): ``cnn`` (above), ``cnn_frozenbn`` (the same CNN with its BatchNorms in
eval mode -- frozen statistics, the usual fine-tuning setting -- so that no op couples time
steps and the step can be recomputed in chunks of time; the architecture and the parameter
count stay those of ``cnn``), ``vgg11_bn`` (SpikingJelly's ``spiking_vgg11_bn``, batch 4,
3x32x32, its classifier shrunk to 512 -> 10 so that the 120M-parameter head does not dominate),
``resnet18`` (``spiking_resnet18``, batch 4, 3x32x32).

Reported per row, from a fresh subprocess:

* ``step RSS``: how far the process's resident memory rises during the measured steps: the RSS
  high-water mark (``VmHWM``, reset with ``/proc/self/clear_refs`` after a warm-up step) during
  one step, minus the RSS just before it, in a second subprocess started with glibc's
  ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB: every large tensor is then its own mapping that
  goes back to the OS when freed, so the figure is memory the step needs, not pages the
  allocator kept from compiling, tracing, the budget planner's trial steps or the warm-up, and
  not library code pages touched on first use (the same for every row). Times come from the
  first subprocess, with glibc's default adaptive settings (fixed, every large free is an
  ``munmap`` and every reuse faults its pages in again: several times slower);
* ``process RSS``: ``VmHWM`` over the RSS before the model was built (libraries' pages and
  compile-time work included: what ``top`` would show);
* ``live``: peak live tensor bytes of one step (:class:`snncompile.runtime.memory.LiveBytes`);
* the median step time of 3 steps after one warm-up.

Numbers are from a shared, busy machine: ratios within a run count.

Run: ``.venv/bin/python benchmarks/bench_train_memory.py [--model cnn] [--T 4,16,64]
[--torch-compile] [--plot docs/train_memory.png] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import re
import statistics
import time
from typing import Any

import torch
from torch import nn

BATCH = {"cnn": 16, "cnn_frozenbn": 16, "vgg11_bn": 4, "resnet18": 4}
#: Models built from the CNN (SpikingJelly's memopt rows are configured for these).
CNNS = ("cnn", "cnn_frozenbn")


#: Budget of the ``sc_budget_fixed`` row: the default compile's peak at T=4 on ``cnn_frozenbn``.
FIXED_BUDGET = "20MB"


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


def build_model(name: str) -> nn.Module:
    """The benchmarked model ``name`` (multi-step): ``cnn``, ``cnn_frozenbn``, ``vgg11_bn`` or
    ``resnet18``."""
    if name == "cnn":
        return build_cnn()
    if name == "cnn_frozenbn":  # the CNN with its BatchNorms in eval mode (frozen statistics)
        net = build_cnn()
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return net
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    from snncompile.zoo_compat import install_torchvision_stand_in

    install_torchvision_stand_in()
    from spikingjelly.activation_based.model import spiking_resnet, spiking_vgg

    kw = {"spiking_neuron": neuron.LIFNode, "surrogate_function": surrogate.ATan()}
    if name == "vgg11_bn":
        net = spiking_vgg.spiking_vgg11_bn(num_classes=10, **kw)
        net.avgpool = layer.AdaptiveAvgPool2d((1, 1))
        net.classifier = layer.Linear(512, 10)
    elif name == "resnet18":
        net = spiking_resnet.spiking_resnet18(num_classes=10, **kw)
    else:
        raise ValueError(f"unknown model {name!r}: cnn, vgg11_bn or resnet18")
    functional.set_step_mode(net, "m")
    return net


class _Root(nn.Module):
    """A root for ``memopt.optimize_memory``, whose targets (``nn.Sequential``) it is not."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _reset_peak_rss() -> None:
    """Reset this process's RSS high-water mark (Linux ``clear_refs`` value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _smallest_budget(model: nn.Module, x: torch.Tensor) -> str:
    import snncompile
    from snncompile.runtime.recompute import MemoryBudgetError

    try:
        snncompile.optimize(model, x, memory_budget="1KB")
    except MemoryBudgetError as err:
        return re.search(r">= '([0-9.]+MB)'", str(err)).group(1)
    return "1KB"


def row(
    model_name: str,
    kind: str,
    steps: int,
    ref_live: float | None,
    what: str,
    queue: Any,
    fixed_budget: str = FIXED_BUDGET,
) -> None:
    """Measure one row in this (child) process and put a dict on ``queue``.

    ``what`` is ``'time'`` (step times, live bytes, process RSS; default malloc) or ``'memory'``
    (the step's RSS rise; run with ``MALLOC_MMAP_THRESHOLD_`` fixed, see the module doc).
    ``ref_live`` is the ``sj_eager`` row's peak live bytes (for ``sc_budget_quarter``),
    ``fixed_budget`` the budget of ``sc_budget_fixed``.
    """
    torch.set_num_threads(1)
    from spikingjelly.activation_based import functional

    import snncompile
    from snncompile.runtime.memory import LiveBytes

    base_rss = _rss("VmRSS:")
    torch.manual_seed(0)
    model = build_model(model_name)
    batch = BATCH[model_name]
    x = (torch.rand(steps, batch, 3, 32, 32) > 0.5).float()
    target = torch.randint(0, 10, (batch,))
    info: dict[str, Any] = {"model": model_name, "kind": kind, "T": steps}
    if kind == "sj_eager":
        run = model
    elif kind == "sj_memopt":
        from spikingjelly.activation_based import memopt

        if model_name not in CNNS:
            raise ValueError("sj_memopt is configured for the cnn models only")
        for i in range(len(model)):
            comp = memopt.BitSpikeCompressor() if i > 0 else None
            model[i] = memopt.checkpoint_module(model[i], compressor=comp)
        run = model
    elif kind == "sj_optimize_memory":
        from spikingjelly.activation_based import memopt

        if model_name not in CNNS:
            raise ValueError("sj_optimize_memory is configured for the cnn models only")
        root = _Root(model)  # the preset cannot replace the root it is given
        memopt.optimize_memory(root, nn.Sequential, lambda m: m(x), level=1)
        functional.reset_net(root)
        run = root
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
    elif kind == "sc_budget_fixed":
        info["budget"] = fixed_budget
        run = snncompile.optimize(model, x, memory_budget=fixed_budget)
    elif kind == "sc_budget_quarter":
        smallest = _smallest_budget(model, x)
        quarter = f"{ref_live / 4 / 1e6:.1f}MB" if ref_live else smallest
        budget = max(smallest, quarter, key=lambda b: float(b[:-2]))
        info["budget"] = budget
        run = snncompile.optimize(model, x, memory_budget=budget)
    else:
        raise ValueError(kind)
    plan = getattr(run, "_memory_plan", None)
    if plan is not None:
        head = plan.describe()
        info["plan"] = head[1].strip() if plan.time_chunks is not None else head[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        functional.reset_net(run)
        y = run(x).mean(0)
        loss = nn.functional.cross_entropy(y, target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up (kernel builds, torch.compile)
    if what == "memory":
        gc.collect()
        before_step = _rss("VmRSS:")
        _reset_peak_rss()
        step()
        info["rss_mb"] = (_rss("VmHWM:") - before_step) / 1e6
        queue.put(info)
        return
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    meter = LiveBytes()
    with meter:
        step()
    info.update(
        process_rss_mb=(_rss("VmHWM:") - base_rss) / 1e6,
        live_mb=meter.peak / 1e6,
        step_s=statistics.median(times),
    )
    queue.put(info)


def in_child(
    model_name: str,
    kind: str,
    steps: int,
    ref_live: float | None,
    fixed_budget: str = FIXED_BUDGET,
) -> dict[str, Any]:
    """Run :func:`row` in two fresh processes (timing, then memory) and merge their results."""
    ctx = mp.get_context("spawn")
    info: dict[str, Any] = {}
    for what in ("time", "memory"):
        saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        if what == "memory":  # glibc reads it at process start
            os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
        try:
            q = ctx.Queue()
            p = ctx.Process(
                target=row, args=(model_name, kind, steps, ref_live, what, q, fixed_budget)
            )
            p.start()
            p.join()
        finally:
            if saved is None:
                os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
        if p.exitcode != 0:
            return {"model": model_name, "kind": kind, "T": steps, "error": f"exit {p.exitcode}"}
        info.update(q.get())
    return info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cnn", choices=sorted(BATCH))
    ap.add_argument("--T", default="4,16,64")
    ap.add_argument("--torch-compile", action="store_true")
    ap.add_argument("--fixed-budget", default=FIXED_BUDGET, help="budget of sc_budget_fixed")
    ap.add_argument("--kinds", default=None, help="comma-separated rows (default: per model)")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--from-json",
        default=None,
        help="comma-separated --json files of earlier runs: print nothing new, only --plot them "
        "(rows of the same kind from several files get the file's budget as a suffix)",
    )
    args = ap.parse_args()
    if args.from_json:
        results, kinds = [], []
        for path in args.from_json.split(","):
            with open(path) as f:
                rows = json.load(f)
            for r in rows:
                if r["kind"].startswith("sc_budget") and "budget" in r:
                    r["kind"] = f"{r['kind']}_{r['budget']}"
                if r["kind"] not in kinds:
                    kinds.append(r["kind"])
            results += rows
        plot(results, kinds, args.model, args.plot or "train_memory.png")
        return
    kinds = ["sj_eager", "sj_memopt", "sj_optimize_memory", "sc_default", "sc_packed"]
    kinds += ["sc_budget", "sc_budget_quarter"]
    if args.model not in CNNS:
        kinds.remove("sj_memopt")
        kinds.remove("sj_optimize_memory")
    if args.model == "cnn_frozenbn":
        # Frozen BatchNorm: time chunks apply. The smallest budget at T=64 recomputes every
        # chunk from the first one (slow), so the budgeted row is one fixed budget for all T.
        kinds = ["sj_eager", "sj_memopt", "sc_default", "sc_budget_fixed"]
    if args.torch_compile:
        kinds.insert(2, "torch_compile")
    if args.kinds:
        kinds = args.kinds.split(",")
    results = []
    print(
        f"{'row':18s} {'T':>3s} {'step RSS MB':>12s} {'process MB':>10s} {'live MB':>8s} "
        f"{'step s':>7s} "
        f"{'RSS/eager':>9s} {'live/eager':>10s} {'time/default':>12s}  budget"
    )
    for steps in [int(t) for t in args.T.split(",")]:
        ref_live = None
        by_kind: dict[str, dict[str, Any]] = {}
        for kind in kinds:
            r = in_child(args.model, kind, steps, ref_live, args.fixed_budget)
            results.append(r)
            if kind == "sj_eager" and "live_mb" in r:
                ref_live = r["live_mb"] * 1e6
            if "error" in r:
                print(f"{kind:18s} {steps:3d} {r['error']}")
                continue
            by_kind[kind] = r
            eager, default = by_kind.get("sj_eager"), by_kind.get("sc_default")
            rss_x = f"{eager['rss_mb'] / r['rss_mb']:.2f}x" if eager else "-"
            live_x = f"{eager['live_mb'] / r['live_mb']:.2f}x" if eager else "-"
            time_x = f"{r['step_s'] / default['step_s']:.2f}" if default else "-"
            print(
                f"{kind:18s} {steps:3d} {r['rss_mb']:12.1f} {r['process_rss_mb']:10.1f} "
                f"{r['live_mb']:8.1f} "
                f"{r['step_s']:7.3f} {rss_x:>9s} {live_x:>10s} {time_x:>12s}  "
                f"{r.get('budget', '')}",
                flush=True,
            )
            if "plan" in r:
                print(f"{'':22s}{r['plan']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        plot(results, kinds, args.model, args.plot)


def plot(results: list[dict[str, Any]], kinds: list[str], model: str, path: str) -> None:
    """Plot each row's step RSS rise against T (log2 axis) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in kinds:
        by_t: dict[int, float] = {}
        for r in results:  # the first run's row where several runs have one
            if r["kind"] == kind and "rss_mb" in r:
                by_t.setdefault(r["T"], r["rss_mb"])
        if by_t:
            budget = _budget_of(results, kind)
            label = kind if not budget or kind.endswith(budget) else f"{kind} ({budget})"
            ax.plot(*zip(*sorted(by_t.items()), strict=True), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # flat rows stay flat beside rows that grow 17x
    ax.set_xlabel("T (time steps)")
    ax.set_ylabel("RSS rise during a training step (MB, log scale)")
    ax.set_title(f"BPTT step, {model}, batch {BATCH[model]}, 3x32x32")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def _budget_of(results: list[dict[str, Any]], kind: str) -> str:
    return next((str(r["budget"]) for r in results if r["kind"] == kind and "budget" in r), "")


if __name__ == "__main__":
    main()
