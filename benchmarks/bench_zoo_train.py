"""Benchmark: one SGD training step of SpikingJelly 2.0.0 zoo models, eager vs compiled.

spiking_resnet18, sew_resnet18 (ADD) and spiking_vgg11_bn from
``spikingjelly.activation_based.model`` (IF neurons, ATan surrogate, ``detach_reset=True``),
T=4, batch 8, 3x32x32 spike inputs, 10 classes. One step = reset state, forward over the
``[T, N, ...]`` sequence, cross-entropy on the time-mean output, backward, ``SGD.step()``.
Three contestants, each on its own copy of the same initial model, in the same process,
interleaved rep by rep (median of ``--reps``):

* eager SpikingJelly (``step_mode='m'``: the model called on ``[T, N, ...]``; ``'s'``:
  ``functional.multi_step_forward``);
* ``snncompile.optimize(model, x)`` (train mode; parameters shared with its copy);
* ``torch.compile`` of the SpikingJelly model (inductor, default options).

Before timing, the first step's outputs are compared with eager (max abs difference printed).
The goal is >= 2x eager and >= 1.3x torch.compile; ``--profile`` prints the top operators of
the compiled step (torch.profiler), to see what limits it where the goal is missed.

Multi-step (``'m'``) zoo models compile only with the frontend's support for SpikingJelly's
zoo forwards; where ``optimize`` fails, the row says so and ``'s'`` is measured as well.

Run: ``.venv/bin/python benchmarks/bench_zoo_train.py [--reps 7] [--modes m,s]
[--models spiking_resnet18] [--no-torch-compile] [--profile]``. Numbers from a shared, busy
machine vary; the ratios within one run are what count.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import snncompile


def _torchvision_stand_in() -> None:
    """The zoo imports torchvision only for a weight loader; stand in for it when missing."""
    from snncompile.zoo_compat import install_torchvision_stand_in

    install_torchvision_stand_in()


def zoo_models() -> dict[str, Callable[[], nn.Module]]:
    """The benchmarked zoo constructors (SpikingJelly 2.0.0)."""
    _torchvision_stand_in()
    from spikingjelly.activation_based import neuron, surrogate
    from spikingjelly.activation_based.model import sew_resnet, spiking_resnet, spiking_vgg

    def kw() -> dict[str, Any]:
        return {
            "spiking_neuron": neuron.IFNode,
            "surrogate_function": surrogate.ATan(),
            "detach_reset": True,
            "num_classes": 10,
        }

    return {
        "spiking_resnet18": lambda: spiking_resnet.spiking_resnet18(**kw()),
        "sew_resnet18": lambda: sew_resnet.sew_resnet18(**kw(), cnf="ADD"),
        "spiking_vgg11_bn": lambda: spiking_vgg.spiking_vgg11_bn(**kw()),
    }


def _forward(model: nn.Module, step_mode: str, x: torch.Tensor) -> torch.Tensor:
    from spikingjelly.activation_based import functional

    if step_mode == "m":
        return model(x)
    return functional.multi_step_forward(x, model)


class Contestant:
    """One way of running the training step, on its own copy of the model."""

    def __init__(self, name: str, model: nn.Module, run: Callable[[torch.Tensor], Any]) -> None:
        self.name = name
        self.model = model
        self.run = run
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from spikingjelly.activation_based import functional

        functional.reset_net(self.model)
        out = self.run(x)
        loss = nn.functional.cross_entropy(out.mean(0), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return out.detach()


def bench_one(
    name: str, factory: Callable[[], nn.Module], step_mode: str, args: argparse.Namespace
) -> dict[str, Any]:
    from spikingjelly.activation_based import functional

    torch.manual_seed(0)
    base = factory()
    functional.set_step_mode(base, step_mode)
    x = (torch.rand(args.T, args.batch, 3, 32, 32) > 0.5).float()
    y = torch.randint(0, 10, (args.batch,))
    row: dict[str, Any] = {"model": name, "mode": step_mode}

    eager_model = copy.deepcopy(base)
    contestants = [Contestant("eager", eager_model, lambda v: _forward(eager_model, step_mode, v))]
    ours_model = copy.deepcopy(base)
    t0 = time.perf_counter()
    ours: Contestant | None = None
    try:
        compiled = snncompile.optimize(ours_model, x)
    except Exception as exc:  # eager and torch.compile are still measured
        row["error"] = f"optimize failed: {type(exc).__name__}: {str(exc)[:110]}"
    else:
        row["compile_s"] = time.perf_counter() - t0
        ours = Contestant("snncompile", ours_model, compiled)
        ours.model = compiled  # reset_net on the compiled module's state
        contestants.append(ours)
    if not args.no_torch_compile:
        tc_model = copy.deepcopy(base)
        tc_fn = torch.compile(lambda v: _forward(tc_model, step_mode, v))
        contestants.append(Contestant("torch.compile", tc_model, tc_fn))

    # First step: identical initial weights and inputs; compare outputs (and warm up).
    first: dict[str, torch.Tensor] = {}
    for c in contestants:
        torch.manual_seed(1)  # the same dropout masks for every contestant
        t0 = time.perf_counter()
        try:
            first[c.name] = c.step(x, y)
        except Exception as exc:
            row[f"{c.name}_error"] = f"{type(exc).__name__}: {str(exc)[:150]}"
            c.times = []
            continue
        if c.name == "torch.compile":
            row["torch_compile_first_s"] = time.perf_counter() - t0
    contestants = [c for c in contestants if c.name in first]
    for c in contestants:
        if c.name != "eager":
            row[f"{c.name}_maxdiff"] = float((first[c.name] - first["eager"]).abs().max())
    for c in contestants:  # second warm-up step (allocator, caches)
        c.step(x, y)
    for _ in range(args.reps):
        for c in contestants:
            t0 = time.perf_counter()
            c.step(x, y)
            c.times.append(time.perf_counter() - t0)
    for c in contestants:
        row[c.name] = statistics.median(c.times)
    if args.profile:
        for c in contestants:
            if c.name != "torch.compile":
                row[f"{c.name}_dense_share"] = _profile(c, x, y, name, step_mode)
    return row


def _profile(c: Contestant, x: torch.Tensor, y: torch.Tensor, name: str, mode: str) -> float:
    """Print the step's top operators; return the share of time in convolutions and GEMMs.

    Those (forward and backward) run as the same ATen/oneDNN kernels in every contestant, so
    ``1 / share`` bounds what any rewriting of the rest of the step can gain.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        c.step(x, y)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    dense = ("aten::mm", "aten::addmm", "aten::bmm")
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key or e.key in dense)
    print(f"\n--- torch.profiler: {c.name} training step of {name} ({mode}) ---")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))
    share = conv / total if total else float("nan")
    print(
        f"convolutions + matrix products (forward + backward): {conv / 1e3:.1f} ms of "
        f"{total / 1e3:.1f} ms ({share:.0%}); the same kernels run in every contestant, so "
        f"removing everything else would give at most {1 / share:.2f}x"
    )
    return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="m", help="step modes to run, e.g. m or m,s")
    parser.add_argument("--models", default="", help="comma-separated subset of the models")
    parser.add_argument("--no-torch-compile", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = zoo_models()
    chosen = [m for m in args.models.split(",") if m] or list(models)
    modes = [m for m in args.modes.split(",") if m]
    rows = []
    for name in chosen:
        for mode in modes:
            row = bench_one(name, models[name], mode, args)
            if "error" in row and mode == "m" and "s" not in modes:
                print(_line(row), flush=True)
                print(f"{name} (m): snncompile cannot compile it here; measuring 's' too")
                rows.append(row)
                row = bench_one(name, models[name], "s", args)
            rows.append(row)
            print(_line(row), flush=True)
    print(
        f"\nT={args.T}, batch {args.batch}, 3x32x32, median of {args.reps}, "
        f"{args.threads} threads (one SGD step: forward, backward, update)"
    )
    print(
        f"{'model':18} {'mode':4} {'eager ms':>9} {'ours ms':>8} {'t.c ms':>8} "
        f"{'vs eager':>8} {'vs t.c':>7}  goal (>=2x eager, >=1.3x torch.compile)"
    )
    for row in rows:
        e, o, t = row.get("eager"), row.get("snncompile"), row.get("torch.compile")
        if "error" in row:
            print(
                f"{row['model']:18} {row['mode']:4} {_ms(e):>9} {'-':>8} {_ms(t):>8}  "
                f"({row['error']})"
            )
            continue
        ve = e / o if e and o else None
        vt = t / o if t and o else None
        goal = "met" if ve is not None and ve >= 2 and (vt is None or vt >= 1.3) else "missed"
        print(
            f"{row['model']:18} {row['mode']:4} {_ms(e):>9} {_ms(o):>8} {_ms(t):>8} "
            f"{_ratio(ve):>8} {_ratio(vt):>7}  {goal}"
        )


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def _line(row: dict[str, Any]) -> str:
    keys = [k for k in row if k not in ("model", "mode")]
    parts = []
    for k in keys:
        v = row[k]
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return f"{row['model']} ({row['mode']}): " + ", ".join(parts)


if __name__ == "__main__":
    main()
