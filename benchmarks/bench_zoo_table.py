"""Benchmark: one SGD training step of every SpikingJelly 2.0.0 zoo family, as a markdown table.

One row per (family, step mode) of ``tests/test_zoo.py``'s ``ZOO`` list, each at a small
benchmark size (printed per row: ``T``, batch, input shape and the model's width). One step =
reset state, forward over the ``[T, N, ...]`` sequence, cross-entropy on the readout (the time
mean of a ``[T, N, classes]`` output; a model that averages over time itself returns
``[N, classes]``), backward, ``SGD.step()``. Three contestants, each on its own copy of the
same initial model, in the same process, interleaved rep by rep (median of ``--reps``):

* eager SpikingJelly (``step_mode='m'``: the model called on ``[T, N, ...]``; ``'s'``: a
  Python loop over the steps, ``functional.multi_step_forward``);
* ``snncompile.optimize(model, x)`` (training mode);
* ``torch.compile`` of the SpikingJelly model (inductor, ``dynamic=False``; in ``'s'`` the
  single-step model is compiled and called per step). Where it fails, the row says why.
  Its first (compiling) call takes 20-120 s per model here; inductor's on-disk caches make a
  second run of the table much faster.

The first step's outputs are compared with eager (``max|diff|`` column: 0 is bit-exact;
torch.compile reorders float sums, so it is not). ``--profile NAME:MODE`` prints the top
operators (torch.profiler) of the snncompile and eager steps of that row.

Run: ``.venv/bin/python benchmarks/bench_zoo_table.py [--reps 3] [--rows spiking_resnet18:m]
[--no-torch-compile] [--profile MSResNet:m]``. Numbers from a shared, busy machine vary; the
ratios within one run are what count.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import snncompile


@dataclass
class Family:
    """A zoo family at its benchmark size."""

    build: Callable[[], nn.Module]
    sample: tuple[int, ...]  # per-sample input shape
    T: int
    batch: int
    size: str  # the model's width/depth, for the table
    events: bool = False  # DVS-style binary inputs


def families() -> dict[str, Family]:
    """The benchmarked families (SpikingJelly 2.0.0's ``activation_based.model``)."""
    from snncompile.zoo_compat import zoo_modules

    z = zoo_modules()
    from spikingjelly.activation_based import layer, neuron, surrogate

    spiking_resnet, sew_resnet, spiking_vgg = z["spiking_resnet"], z["sew_resnet"], z["spiking_vgg"]
    parametric_lif_net, ms_resnet, masnn = z["plif"], z["ms_resnet"], z["masnn"]
    spike_driven_transformer, qkformer, maxformer = z["sdt"], z["qkformer"], z["maxformer"]
    spikformer, spiking_vggws_ottt = z["spikformer"], z["ottt"]

    sg = {"surrogate_function": surrogate.ATan(), "detach_reset": True}
    lif = {"spiking_neuron": neuron.LIFNode, **sg}
    plif = {"spiking_neuron": neuron.ParametricLIFNode, **sg}

    def vgg() -> nn.Module:
        net = spiking_vgg.spiking_vgg11_bn(num_classes=10, spiking_neuron=neuron.IFNode, **sg)
        # The real classifier is 25088 -> 4096 -> 4096 (120M parameters): narrowed, same code.
        net.classifier = nn.Sequential(
            layer.Linear(512 * 49, 64), neuron.IFNode(**sg), layer.Dropout(), layer.Linear(64, 10)
        )
        return net

    attn = {"T": 4, "num_classes": 10}
    return {
        "spiking_resnet18": Family(
            lambda: spiking_resnet.spiking_resnet18(num_classes=10, **lif),
            (3, 32, 32),
            4,
            4,
            "resnet18",
        ),
        "sew_resnet18": Family(
            lambda: sew_resnet.sew_resnet18(num_classes=10, cnf="ADD", **lif),
            (3, 32, 32),
            4,
            4,
            "resnet18, ADD",
        ),
        "spiking_vgg_bn": Family(vgg, (3, 32, 32), 4, 4, "vgg11_bn, fc 64"),
        "MNISTNet": Family(
            lambda: parametric_lif_net.MNISTNet(channels=32, **plif), (1, 28, 28), 4, 16, "c=32"
        ),
        "CIFAR10Net": Family(
            lambda: parametric_lif_net.CIFAR10Net(channels=32, **lif), (3, 32, 32), 4, 8, "c=32"
        ),
        "DVSGestureNet": Family(
            lambda: parametric_lif_net.DVSGestureNet(channels=16, **lif),
            (2, 128, 128),
            4,
            4,
            "c=16",
            events=True,
        ),
        "MSResNet": Family(
            lambda: ms_resnet.MSResNet(
                T=4, num_classes=10, base_channels=32, layers=(1, 1, 1, 1), **sg
            ),
            (3, 32, 32),
            4,
            4,
            "c=32, 1-1-1-1",
        ),
        "MaxResNet": Family(
            lambda: ms_resnet.max_resnet18(T=4, num_classes=10, **sg),
            (3, 32, 32),
            4,
            4,
            "max_resnet18",
        ),
        "MASNN": Family(
            lambda: masnn.MASNN(
                T=4,
                num_classes=11,
                input_size=(32, 32),
                channels=(16, 16, 16),
                fc_hidden=64,
                reduction_t=1,
                reduction_c=2,
                surrogate_function=surrogate.ATan(),
            ),
            (2, 32, 32),
            4,
            8,
            "c=16",
            events=True,
        ),
        "AttMSResNet": Family(
            lambda: masnn.AttMSResNet(
                T=4,
                num_classes=10,
                base_channels=16,
                layers=(1, 1, 1, 1),
                surrogate_function=surrogate.ATan(),
            ),
            (3, 32, 32),
            4,
            4,
            "c=16, 1-1-1-1",
        ),
        "SpikeDrivenTransformer": Family(
            lambda: spike_driven_transformer.SpikeDrivenTransformer(
                **attn, embed_dims=64, num_heads=2, depths=1
            ),
            (3, 32, 32),
            4,
            4,
            "d=64, 1 block",
        ),
        "QKFormer": Family(
            lambda: qkformer.QKFormer(**attn, embed_dims=64, num_heads=(1, 2, 2), depths=(1, 1, 1)),
            (3, 32, 32),
            4,
            4,
            "d=64",
        ),
        "MaxFormer": Family(
            lambda: maxformer.MaxFormer(**attn, embed_dims=64, depths=(1, 1, 1), cifar=True),
            (3, 32, 32),
            4,
            4,
            "d=64",
        ),
        "Spikformer": Family(
            lambda: spikformer.Spikformer(
                **attn,
                img_size_h=32,
                img_size_w=32,
                patch_size=4,
                embed_dims=64,
                num_heads=2,
                depths=1,
            ),
            (3, 32, 32),
            4,
            4,
            "d=64, 1 block",
        ),
        "OTTTSpikingVGG": Family(
            lambda: spiking_vggws_ottt.OTTTSpikingVGG(
                [32, "M", 64, "M", 512], num_classes=10, spiking_neuron=neuron.OTTTLIFNode
            ),
            (3, 32, 32),
            4,
            8,
            "32-M-64-M-512",
        ),
    }


# (family, step mode): the rows of tests/test_zoo.py's ZOO.
ROWS = [
    ("spiking_resnet18", "s"),
    ("spiking_resnet18", "m"),
    ("sew_resnet18", "s"),
    ("sew_resnet18", "m"),
    ("spiking_vgg_bn", "s"),
    ("spiking_vgg_bn", "m"),
    ("MNISTNet", "s"),
    ("MNISTNet", "m"),
    ("CIFAR10Net", "s"),
    ("CIFAR10Net", "m"),
    ("DVSGestureNet", "s"),
    ("DVSGestureNet", "m"),
    ("MSResNet", "m"),
    ("MaxResNet", "m"),
    ("MASNN", "m"),
    ("AttMSResNet", "m"),
    ("SpikeDrivenTransformer", "m"),
    ("QKFormer", "m"),
    ("MaxFormer", "m"),
    ("Spikformer", "m"),
    ("OTTTSpikingVGG", "s"),
]


def _readout(out: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, classes]``: the time mean of a per-step output, or the output itself."""
    return out.mean(0) if out.dim() == 3 else out


class Contestant:
    """One way of running the training step, on its own copy of the model."""

    def __init__(
        self, name: str, model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        self.name = name
        self.model = model
        self.run = run
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Reset, forward, cross-entropy, backward, update; return the detached output."""
        from spikingjelly.activation_based import functional

        functional.reset_net(self.model)
        out = self.run(x)
        loss = nn.functional.cross_entropy(_readout(out), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return out.detach()


def _eager_run(model: nn.Module, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from spikingjelly.activation_based import functional

    if mode == "m":
        return model
    return lambda x: functional.multi_step_forward(x, model)


def bench_row(name: str, fam: Family, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time one (family, step mode) row; errors are recorded, not raised."""
    from spikingjelly.activation_based import functional

    torch.manual_seed(0)
    base = fam.build()
    functional.set_step_mode(base, mode)
    x = torch.rand(fam.T, fam.batch, *fam.sample)
    x = (x > 0.8).float() if fam.events else x
    classes = 11 if name == "MASNN" else 10
    y = torch.randint(0, classes, (fam.batch,))
    row: dict[str, Any] = {"model": name, "mode": mode, "fam": fam, "notes": []}

    eager_model = copy.deepcopy(base)
    contestants = [Contestant("eager", eager_model, _eager_run(eager_model, mode))]
    ours_model = copy.deepcopy(base)
    t0 = time.perf_counter()
    try:
        compiled = snncompile.optimize(ours_model, x)
    except Exception as exc:  # eager and torch.compile are still measured
        row["notes"].append(f"optimize failed: {type(exc).__name__}: {str(exc)[:100]}")
    else:
        row["compile_s"] = time.perf_counter() - t0
        ours = Contestant("snncompile", compiled, compiled)
        contestants.append(ours)
    if not args.no_torch_compile:
        tc_model = copy.deepcopy(base)
        # Static shapes: automatic dynamic shapes after a recompile (the neurons' first call
        # sees a float membrane, the next a tensor) fail in inductor on some of these models.
        tc = torch.compile(tc_model, dynamic=False)
        contestants.append(Contestant("torch.compile", tc_model, _eager_run(tc, mode)))

    first: dict[str, torch.Tensor] = {}
    for c in contestants:
        torch.manual_seed(1)  # the same dropout masks for every contestant
        t0 = time.perf_counter()
        try:
            first[c.name] = c.step(x, y)
        except Exception as exc:
            row["notes"].append(f"{c.name} failed: {type(exc).__name__}: {str(exc)[:100]}")
            continue
        if c.name == "torch.compile":
            row["tc_first_s"] = time.perf_counter() - t0
    contestants = [c for c in contestants if c.name in first]
    for c in contestants:
        if c.name != "eager" and "eager" in first:
            row[f"{c.name}_maxdiff"] = float((first[c.name] - first["eager"]).abs().max())
    for c in contestants:  # second warm-up step (allocator, caches, recompiles)
        c.step(x, y)
    for _ in range(args.reps):
        for c in contestants:
            t0 = time.perf_counter()
            c.step(x, y)
            c.times.append(time.perf_counter() - t0)
    for c in contestants:
        row[c.name] = statistics.median(c.times)
    if f"{name}:{mode}" in args.profile:
        for c in contestants:
            if c.name != "torch.compile":
                _profile(c, x, y, name, mode)
    return row


def _profile(c: Contestant, x: torch.Tensor, y: torch.Tensor, name: str, mode: str) -> None:
    """Print the step's top operators and the share of convolutions and matrix products."""
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
    print(f"convolutions + matrix products: {conv / 1e3:.1f} of {total / 1e3:.1f} ms ({share:.0%})")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def _diff(v: float | None) -> str:
    return "-" if v is None else ("0" if v == 0 else f"{v:.1e}")


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the measured rows."""
    head = (
        "| model | mode | T x N, input | size | eager SJ ms | snncompile ms | torch.compile ms "
        "| vs eager | vs torch.compile | max abs diff (ours / t.c) | notes |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---|"
    )
    lines = [head]
    for r in rows:
        fam: Family = r["fam"]
        e, o, t = r.get("eager"), r.get("snncompile"), r.get("torch.compile")
        shape = f"{fam.T}x{fam.batch}, {'x'.join(map(str, fam.sample))}"
        diffs = f"{_diff(r.get('snncompile_maxdiff'))} / {_diff(r.get('torch.compile_maxdiff'))}"
        notes = "; ".join(r["notes"]).replace("|", "/")
        lines.append(
            f"| {r['model']} | {r['mode']} | {shape} | {fam.size} | {_ms(e)} | {_ms(o)} | "
            f"{_ms(t)} | {_ratio(e, o)} | {_ratio(t, o)} | {diffs} | {notes} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="", help="comma-separated NAME:MODE subset")
    parser.add_argument("--no-torch-compile", action="store_true")
    parser.add_argument("--profile", default="", help="comma-separated NAME:MODE rows to profile")
    args = parser.parse_args()
    args.profile = [p for p in args.profile.split(",") if p]
    torch.set_num_threads(args.threads)
    fams = families()
    chosen = [tuple(r.split(":")) for r in args.rows.split(",") if r] or ROWS
    rows = []
    start = time.perf_counter()
    for name, mode in chosen:
        t0 = time.perf_counter()
        row = bench_row(name, fams[name], mode, args)
        rows.append(row)
        print(
            f"{name} ({mode}): eager {_ms(row.get('eager'))} ms, ours {_ms(row.get('snncompile'))}"
            f" ms, torch.compile {_ms(row.get('torch.compile'))} ms "
            f"(row took {time.perf_counter() - t0:.0f} s) {'; '.join(row['notes'])}",
            flush=True,
        )
    print(
        f"\nOne SGD training step (forward, backward, update), median of {args.reps}, "
        f"{args.threads} threads, whole table {time.perf_counter() - start:.0f} s\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
