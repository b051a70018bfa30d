"""Benchmark: chain fusion (batchnorm -> neuron -> pooling in one kernel), with vs without.

Models (SpikingJelly 2.0.0 modules, multi-step):

* a CSNN: ``(conv3x3 - BN - LIF - maxpool2) x 3`` (32, 64, 128 channels) + linear - LIF, on
  3x32x32 spike inputs, batch 16, T=4 and T=16 (LIF with ATan and ``detach_reset=True``);
* ``spiking_resnet18`` and ``sew_resnet18`` (ADD) from SpikingJelly's zoo (IF, ATan,
  ``detach_reset=True``), T=4, batch 8, 3x32x32.

One training step = reset state, forward, cross-entropy on the time-mean output, backward,
``SGD.step()``. Contestants, each on its own copy of the same initial model, in the same
process, interleaved rep by rep (median of ``--reps``): eager SpikingJelly, ``torch.compile`` of
the SpikingJelly model (CSNN only), ``snncompile.optimize`` without the ``fuse_chains`` pass and
with it. Inference (``torch.no_grad``, eval mode, batchnorms folded) of the zoo models is timed
with vs without the pass, for the CSNN too. Before timing, outputs of the two compiles are
compared. ``--micro`` times one ``FusedChain`` (training batchnorm or eval, residual add before
an IF neuron, T=4, batch 8) fused vs its separate ops on ResNet-18's plane sizes, 8x8 ... 1x1,
then ``batchnorm -> neuron -> maxpool2`` chains of the neurons with states beside ``v``
(Izhikevich, ALIF, CUBA-LIF; training and eval, T=4, batch 8, 64 channels of 16x16) vs their
separate ops (the neuron in its own fused kernel). ``--chains`` times the CSNN's three chains
(``[T, 16, 32, 32, 32]``, ``[T, 16, 64, 16, 16]``, ``[T, 16, 128, 8, 8]``) fused, forward and
forward + backward, with the caches emptied before each call.

Run: ``.venv/bin/python benchmarks/bench_chain_fusion.py [--reps 7] [--only csnn|zoo]
[--no-torch-compile] [--profile] [--micro] [--chains]``. On a shared machine absolute times
vary; the ratios of one run are what count.
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
from snncompile.passes.pipeline import build_pipeline
from snncompile.runtime.host_memory import minor_page_faults, reuse_host_memory


def csnn(channels: tuple[int, ...] = (32, 64, 128)) -> nn.Module:
    """The CSNN of the benchmark (SpikingJelly modules, multi-step)."""
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    mods: list[nn.Module] = []
    cin = 3
    for co in channels:
        mods += [
            layer.Conv2d(cin, co, 3, padding=1, bias=False),
            layer.BatchNorm2d(co),
            neuron.LIFNode(surrogate_function=surrogate.ATan(), detach_reset=True),
            layer.MaxPool2d(2),
        ]
        cin = co
    mods += [
        layer.Flatten(),
        layer.Linear(cin * 16, 10),
        neuron.LIFNode(surrogate_function=surrogate.ATan(), detach_reset=True),
    ]
    model = nn.Sequential(*mods)
    functional.set_step_mode(model, "m")
    return model


def zoo(name: str) -> nn.Module:
    """A SpikingJelly zoo ResNet in multi-step mode."""
    from snncompile.zoo_compat import install_torchvision_stand_in

    install_torchvision_stand_in()
    from spikingjelly.activation_based import functional, neuron, surrogate
    from spikingjelly.activation_based.model import sew_resnet, spiking_resnet

    kw: dict[str, Any] = {
        "spiking_neuron": neuron.IFNode,
        "surrogate_function": surrogate.ATan(),
        "detach_reset": True,
        "num_classes": 10,
    }
    if name == "spiking_resnet18":
        model = spiking_resnet.spiking_resnet18(**kw)
    else:
        model = sew_resnet.sew_resnet18(**kw, cnf="ADD")
    functional.set_step_mode(model, "m")
    return model


def without_chains(mode: str) -> list[str]:
    """The default pipeline of ``mode`` minus ``fuse_chains`` (and ``pack_spikes``, which the
    default pipeline drops unless asked for: listing it would turn packing on)."""
    return [n for n, _ in build_pipeline(mode) if n not in ("fuse_chains", "pack_spikes")]


def reset(model: nn.Module) -> None:
    from spikingjelly.activation_based import functional

    functional.reset_net(model)


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    run: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """One SGD step of ``model`` (run through ``run`` when given); returns the outputs."""
    reset(run if isinstance(run, nn.Module) else model)
    opt.zero_grad(set_to_none=True)
    out = (run or model)(x)
    loss = nn.functional.cross_entropy(out.mean(0), y)
    loss.backward()
    opt.step()
    return out.detach()


def interleaved(
    fns: dict[str, Callable[[], Any]], reps: int, faults: dict[str, float] | None = None
) -> dict[str, float]:
    """Median seconds per call of each function, rep by rep interleaved (after a warm-up);
    ``faults``, when given, receives each function's minor page faults per call."""
    for f in fns.values():
        f()
        f()  # the heap settles over the first calls (see snncompile.runtime.host_memory)
    times: dict[str, list[float]] = {k: [] for k in fns}
    counts: dict[str, int] = dict.fromkeys(fns, 0)
    for _ in range(reps):
        for k, f in fns.items():
            before = minor_page_faults()
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
            counts[k] += minor_page_faults() - before
    if faults is not None:
        faults.update({k: c / reps for k, c in counts.items()})
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_floor(model: nn.Module, x: torch.Tensor, backward: bool = True) -> Callable[[], None]:
    """A step of only ``model``'s convolutions and linear layers on the inputs they get in one
    eager pass: forward and backward (gradients w.r.t. every input but the model's own) when
    ``backward``, else forward under ``no_grad``. What a step costs with every other op free."""
    calls: list[tuple[nn.Module, torch.Tensor]] = []

    def keep(layer: nn.Module, args: tuple[torch.Tensor, ...], _out: Any) -> None:
        inp = args[0].detach().clone()
        calls.append((layer, inp if args[0] is x or not backward else inp.requires_grad_()))

    hooks = [
        m.register_forward_hook(keep)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        reset(model)
        model(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        grads = [torch.randn_like(layer(inp)) for layer, inp in calls]

    def step() -> None:
        with torch.set_grad_enabled(backward):
            for (layer, inp), g in zip(calls, grads, strict=True):
                y = layer(inp)
                if backward:
                    torch.autograd.backward(y, g)

    return step


def bench_train(name: str, model: nn.Module, x: torch.Tensor, args: Any) -> dict[str, float]:
    y = torch.randint(0, 10, (x.shape[1],))
    models = {k: copy.deepcopy(model) for k in ("eager", "torch.compile", "unfused", "fused")}
    runs: dict[str, Any] = {}
    runs["unfused"] = snncompile.optimize(models["unfused"], x, passes=without_chains("train"))
    runs["fused"] = snncompile.optimize(models["fused"], x)
    runs["eager"] = models["eager"]
    if not args.no_torch_compile and name == "csnn":
        runs["torch.compile"] = torch.compile(models["torch.compile"])
    else:
        del models["torch.compile"]
    with torch.no_grad():
        outs = {}
        for k in ("unfused", "fused"):
            reset(runs[k])
            outs[k] = runs[k](x)
        diff = (outs["unfused"] - outs["fused"]).abs().max().item()
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in models.items()}
    fns = {
        k: (lambda k=k: train_step(models[k], opts[k], x, y, runs[k]))
        for k in models
    }  # fmt: skip
    fns["convs+linears alone"] = matmul_floor(copy.deepcopy(model), x)
    faults: dict[str, float] = {}
    t = interleaved(fns, args.reps, faults)
    line = "  ".join(f"{k} {v * 1e3:7.1f} ms" for k, v in t.items())
    print(f"{name:<18} T={x.shape[0]:<3} train step: {line}   (max |fused - unfused| {diff:.2g})")
    print(" " * 24 + "minor page faults per step: " + "  ".join(
        f"{k} {v:.0f}" for k, v in faults.items()))  # fmt: skip
    f = t["fused"]
    ratios = [f"fused vs eager {t['eager'] / f:.2f}x", f"vs unfused {t['unfused'] / f:.2f}x"]
    if "torch.compile" in t:
        ratios.insert(1, f"vs torch.compile {t['torch.compile'] / f:.2f}x")
    print(" " * 24 + "  ".join(ratios))
    floor = t["convs+linears alone"]
    bounds = [f"eager {t['eager'] / floor:.2f}x", f"unfused {t['unfused'] / floor:.2f}x"]
    if "torch.compile" in t:
        bounds.insert(1, f"torch.compile {t['torch.compile'] / floor:.2f}x")
    print(
        " " * 24 + f"convolutions + linears alone are {floor / f:.0%} of the fused step; a step "
        "costing only them would be " + ", ".join(f"vs {b}" for b in bounds)
    )
    if args.profile:
        profile(runs["fused"], models["fused"], opts["fused"], x, y)
    return t


def bench_inference(name: str, model: nn.Module, x: torch.Tensor, args: Any) -> None:
    m = copy.deepcopy(model).eval()
    unfused = snncompile.optimize(copy.deepcopy(m), x, passes=without_chains("inference"))
    fused = snncompile.optimize(copy.deepcopy(m), x)

    def run(c: nn.Module) -> Callable[[], Any]:
        def f() -> Any:
            reset(c)
            with torch.no_grad():
                return c(x)

        return f

    diff = (run(unfused)() - run(fused)()).abs().max().item()
    floor = matmul_floor(copy.deepcopy(m), x, backward=False)
    t = interleaved({"unfused": run(unfused), "fused": run(fused), "floor": floor}, args.reps)
    print(
        f"{name:<18} T={x.shape[0]:<3} inference:  unfused {t['unfused'] * 1e3:7.1f} ms  fused "
        f"{t['fused'] * 1e3:7.1f} ms  {t['unfused'] / t['fused']:.2f}x  (max diff {diff:.2g}); "
        f"convs+linears alone {t['floor'] * 1e3:.1f} ms ({t['floor'] / t['fused']:.0%} of fused, "
        f"bound vs unfused {t['unfused'] / t['floor']:.2f}x)"
    )
    notes = next(r for r in fused.records if r.name == "fuse_chains").notes
    print(" " * 24 + "; ".join(notes[:1] + [n for n in notes if n.startswith("left")][:3]))


def profile(run: nn.Module, model: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(3):
            train_step(model, opt, x, y, run)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def time_chain(chain: nn.Module, inputs: tuple[torch.Tensor, ...], train: bool, reps: int
               ) -> dict[str, float]:  # fmt: skip
    """Median seconds of one ``FusedChain`` call fused and as its separate ops (forward, and
    backward of the sum when ``train``), interleaved."""

    def call(unfused: bool) -> None:
        chain.neuron.reset()
        with torch.set_grad_enabled(train):
            y = chain.unfused(*inputs) if unfused else chain(*inputs)
            if train:
                y.sum().backward()

    return interleaved({"fused": lambda: call(False), "unfused": lambda: call(True)}, reps)


def bench_micro(args: Any) -> None:
    """One chain (batchnorm -> + r -> IF) fused vs its separate ops, per plane size."""
    from snncompile import neuron, surrogate
    from snncompile.runtime.fused_chain import FusedChain, group_planes

    for C, H in ((512, 1), (256, 2), (128, 4), (64, 8)):
        for train in (True, False):
            sn = neuron.IFNode(step_mode="m", surrogate_function=surrogate.ATan(),
                               detach_reset=True, backend="cpu")  # fmt: skip
            chain = FusedChain(sn, nn.BatchNorm2d(C), None, residual=True).train(train)
            x = torch.randn(4, 8, C, H, H, requires_grad=train)
            r = torch.randn(4, 8, C, H, H)

            t = time_chain(chain, (x, r), train, args.reps)
            print(
                f"chain C={C:<3} {H}x{H} {'train fwd+bwd' if train else 'eval no_grad':<13} "
                f"fused {t['fused'] * 1e3:6.3f} ms  unfused {t['unfused'] * 1e3:6.3f} ms  "
                f"{t['unfused'] / t['fused']:.2f}x  (planes per work item "
                f"{group_planes(8 * C, H * H)})"
            )


def bench_micro_multistate(args: Any) -> None:
    """``bn -> neuron -> maxpool2`` for the multi-state neurons, fused vs the separate ops."""
    from snncompile import neuron, surrogate
    from snncompile.runtime.fused_chain import FusedChain

    kws = {"IzhikevichNode": dict(a=0.3, b=0.2), "ALIFNode": {}, "CUBALIFNode": {}}
    for cls, kw in kws.items():
        for train in (True, False):
            sn = getattr(neuron, cls)(step_mode="m", surrogate_function=surrogate.ATan(),
                                      backend="cpu", **kw)  # fmt: skip
            chain = FusedChain(sn, nn.BatchNorm2d(64), nn.MaxPool2d(2)).train(train)
            x = (torch.randn(4, 8, 64, 16, 16) * 2 + 0.5).requires_grad_(train)

            t = time_chain(chain, (x,), train, args.reps)
            print(
                f"chain {cls:<14} bn->sn->maxpool 64x16x16 "
                f"{'train fwd+bwd' if train else 'eval no_grad':<13} "
                f"fused {t['fused'] * 1e3:6.3f} ms  unfused {t['unfused'] * 1e3:6.3f} ms  "
                f"{t['unfused'] / t['fused']:.2f}x"
            )


def bench_chains(args: Any) -> None:
    """The CSNN's three chains (training batchnorm -> LIF -> ``MaxPool2d(2)``, batch 16) on
    their own: one ``FusedChain`` forward, and forward + backward (the input's gradient), with
    the caches emptied before each call as the convolutions between them do in a step."""
    from snncompile import neuron, surrogate
    from snncompile.runtime.fused_chain import FusedChain

    junk = torch.empty(16 << 20)  # 64 MiB, more than the last-level cache
    for T in (int(t) for t in args.T.split(",")):
        for C, H in ((32, 32), (64, 16), (128, 8)):
            sn = neuron.LIFNode(step_mode="m", surrogate_function=surrogate.ATan(),
                                detach_reset=True, backend="cpu")  # fmt: skip
            chain = FusedChain(sn, nn.BatchNorm2d(C), nn.MaxPool2d(2)).train()
            x = (torch.randn(T, 16, C, H, H) * 2 + 0.3).requires_grad_()
            g = torch.randn(T, 16, C, H // 2, H // 2)

            def fwd(chain: FusedChain = chain, x: Any = x) -> Any:
                chain.neuron.reset()
                return chain(x)

            def fwd_bwd(chain: FusedChain = chain, x: Any = x, g: Any = g) -> Any:
                chain.neuron.reset()
                return torch.autograd.grad(chain(x), (x,), g)

            times: dict[str, list[float]] = {"fwd": [], "fwd+bwd": []}
            for _ in range(2 + args.reps * 3):
                for k, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                    junk.fill_(1.0)
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v[2:]) * 1e3 for k, v in times.items()}
            print(
                f"chain [{T}, 16, {C}, {H}, {H}] bn(train) -> LIF -> maxpool2: forward "
                f"{med['fwd']:6.3f} ms  forward + backward {med['fwd+bwd']:6.3f} ms  "
                f"(backward {med['fwd+bwd'] - med['fwd']:6.3f} ms)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("csnn", "zoo"), default=None)
    parser.add_argument("--T", type=str, default="4,16")
    parser.add_argument("--no-torch-compile", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--plot", default=None, help="write the training steps' chart here (PNG)")
    parser.add_argument(
        "--host-memory",
        choices=("default", "reuse"),
        default="default",
        help="'reuse': snncompile.runtime.reuse_host_memory() first (all contestants share it)",
    )
    parser.add_argument("--micro", action="store_true", help="only the per-plane-size chain rows")
    parser.add_argument(
        "--chains", action="store_true", help="only the CSNN's three chains, fused, on their own"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.host_memory == "reuse":
        print(f"host memory: {reuse_host_memory()}")
    print(f"threads={args.threads}, reps={args.reps} (median, interleaved)")
    if args.chains:
        bench_chains(args)
        return
    if args.micro:
        bench_micro(args)
        bench_micro_multistate(args)
        return
    steps: dict[str, dict[str, float]] = {}
    if args.only in (None, "csnn"):
        for T in (int(t) for t in args.T.split(",")):
            x = (torch.rand(T, 16, 3, 32, 32) > 0.5).float()
            model = csnn()
            steps[f"CSNN, T={T}"] = bench_train("csnn", model, x, args)
            bench_inference("csnn", model, x, args)
    if args.only in (None, "zoo"):
        for name in ("spiking_resnet18", "sew_resnet18"):
            x = (torch.rand(4, 8, 3, 32, 32) > 0.5).float()
            model = zoo(name)
            steps[f"{name}, T=4"] = bench_train(name, model, x, args)
            bench_inference(name, model, x, args)
    if args.plot:
        plot_steps(steps, args.plot, f"host memory: {args.host_memory}")


def issue_goals(row: str, t: dict[str, float]) -> list[tuple[str, float]]:
    """The step times issue #19 asks for on ``row`` of the benchmark (label, seconds)."""
    if row.startswith("CSNN"):
        vs_eager, vs_tc = (3.5, 1.6) if row.endswith("T=4") else (4.5, 1.9)
        goals = [(f"{vs_eager}x eager", t["eager"] / vs_eager)]
        if "torch.compile" in t:
            goals.append((f"{vs_tc}x torch.compile", t["torch.compile"] / vs_tc))
        return goals
    return [("1.3x without the pass", t["unfused"] / 1.3)]


def plot_steps(steps: dict[str, dict[str, float]], path: str, note: str) -> None:
    """Bars of each model's training step per contestant, relative to eager SpikingJelly, with
    the convolutions-and-linears floor: how far fusion got and how far it could go."""
    from matplotlib.figure import Figure

    kinds = ["eager", "torch.compile", "unfused", "fused", "convs+linears alone"]
    labels = {
        "eager": "eager SpikingJelly",
        "torch.compile": "torch.compile",
        "unfused": "optimize without fuse_chains",
        "fused": "optimize",
        "convs+linears alone": "only the convolutions + linears",
    }
    fig = Figure(figsize=(8, 0.9 + 1.1 * len(steps)))
    ax = fig.add_subplot()
    height = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        rows = [(j, t[kind] / t["eager"]) for j, t in enumerate(steps.values()) if kind in t]
        ys = [j + (i - len(kinds) / 2 + 0.5) * height for j, _ in rows]
        bars = ax.barh(ys, [r for _, r in rows], height, label=labels[kind],
                       hatch="//" if kind == "convs+linears alone" else None)  # fmt: skip
        for bar, (j, _) in zip(bars, rows, strict=True):
            ms = list(steps.values())[j][kind] * 1e3
            ax.text(bar.get_width() + 0.01, bar.get_y() + height / 2, f"{ms:.1f} ms",
                    va="center", fontsize=7)  # fmt: skip
    for j, (row, t) in enumerate(steps.items()):
        for k, (goal, seconds) in enumerate(issue_goals(row, t)):
            ax.plot([seconds / t["eager"]] * 2, [j - 0.45, j + 0.45], color="black", lw=1.2,
                    ls="--")  # fmt: skip
            ax.text(seconds / t["eager"], j - 0.47, f" {goal} ", fontsize=6.5,
                    ha="right" if k == 0 else "left")  # fmt: skip
    ax.set_yticks(range(len(steps)), list(steps))
    ax.invert_yaxis()
    ax.set_xlabel(
        "training step time relative to eager SpikingJelly (lower is faster); dashed: the "
        "issue's goals",
        fontsize=8,
    )
    ax.set_xlim(0, 1.6)
    ax.set_title(f"One SGD step, 2 threads ({note}): the floor bounds what fusion can reach",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
