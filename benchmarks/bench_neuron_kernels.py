"""Fused neuron kernels vs SpikingJelly 2.0 vs snnTorch vs a plain PyTorch loop.

Same process, same inputs, a multi-step LIF layer (tau=2, decay_input, hard reset to 0, threshold
1; snnTorch: Leaky with beta = 1 - 1/tau and reset_mechanism='zero'), for the shapes of issue 4:

* (T=64, N=65,536), (T=500, B=16, N=512), (T=8, B=32, 64x32x32)

and two workloads: forward without grad, and forward + backward (``spikes.backward(g)`` with a
fixed random ``g``; the final membrane is not differentiated). Printed per case: median wall time
of each implementation, ratios (``x`` = how many times slower than snncompile), snncompile's
achieved bandwidth against a measured ``copy_`` bandwidth (bytes that must move: forward reads x
and writes spikes, training also writes h in the forward and reads g, h and writes grad_x in the
backward), and training memory per element (bytes autograd keeps for backward, measured with
saved-tensor hooks, per neuron-step).

Options: ``--quick`` (fewer repeats, skip the slowest peer runs beyond one repeat),
``--auto-threshold`` (the small-size sweep used to pick ``AUTO_MIN_ELEMENTS`` and the per-call
overhead of the custom op vs the autograd.Function path), ``--device cuda`` (everything on the
GPU: snncompile's CUDA kernel with ``backend='cuda'``, SpikingJelly 2.0 with whatever GPU kernels
it picks itself (Triton/CuPy), snnTorch and the torch loop on CUDA tensors, the device's own
``copy_`` bandwidth, CUDA-event timing; the cases are LIF at T=64, N=1,048,576 and the two
batched shapes above), ``--json PATH`` (the measured rows as JSON).

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_neuron_kernels.py``
(``scripts/gpu_check.sh`` runs ``--device cuda --quick``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from snncompile import neuron as sn
from snncompile.dynamics import lif_dynamics
from snncompile.runtime.fused import fused_multi_step

TAU = 2.0
DEVICE = "cpu"  # set by --device


def _timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()``; on CUDA measured with events around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if DEVICE == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int | None = None) -> float:
    """Measured ``dst.copy_(src)`` bandwidth in GB/s (read + write) on ``DEVICE``."""
    if nbytes is None:
        nbytes = 2**30 if DEVICE == "cuda" else 256 * 2**20  # far beyond the caches
    src = torch.rand(nbytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    t = _timeit(lambda: dst.copy_(src), repeats=10, warmup=2)
    return 2 * nbytes / t / 1e9


# -- implementations ---------------------------------------------------------------------------
def make_snncompile() -> Callable[[torch.Tensor], torch.Tensor]:
    node = sn.LIFNode(tau=TAU, step_mode="m", backend="cuda" if DEVICE == "cuda" else "cpu")

    def run(x: torch.Tensor) -> torch.Tensor:
        node.reset()
        return node(x)

    return run


def make_spikingjelly() -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        from spikingjelly.activation_based import neuron
    except Exception:  # pragma: no cover - optional peer
        return None
    node = neuron.LIFNode(tau=TAU, step_mode="m").to(DEVICE)

    def run(x: torch.Tensor) -> torch.Tensor:
        node.reset()
        return node(x)

    return run


def make_snntorch() -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        import snntorch
    except Exception:  # pragma: no cover - optional peer (pip install snntorch --no-deps)
        return None
    lif = snntorch.Leaky(beta=1.0 - 1.0 / TAU, reset_mechanism="zero").to(DEVICE)

    def run(x: torch.Tensor) -> torch.Tensor:
        mem = torch.zeros_like(x[0])
        spikes = []
        for xt in x.unbind(0):
            spk, mem = lif(xt, mem)
            spikes.append(spk)
        return torch.stack(spikes)

    return run


class _Heaviside(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        return (z >= 0).to(z)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (z,) = ctx.saved_tensors
        s = torch.sigmoid(4.0 * z)
        return g * (1 - s) * s * 4.0


def make_torch_loop() -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(x[0])
        spikes = []
        for xt in x.unbind(0):
            h = v + (xt - v) / TAU
            s = _Heaviside.apply(h - 1.0)
            v = (1.0 - s) * h
            spikes.append(s)
        return torch.stack(spikes)

    return run


# -- measurements ------------------------------------------------------------------------------
def saved_bytes_per_element(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """Bytes autograd keeps for backward per element of ``x``: distinct storages of saved
    tensors, not counting the input's own storage (the caller holds it anyway)."""
    seen: dict[int, int] = {}
    xr = x.detach().requires_grad_()
    own = xr.untyped_storage().data_ptr()

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() != own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s = run(xr)
    del s
    return sum(seen.values()) / x.numel()


def bench_case(
    label: str, shape: tuple[int, ...], impls: dict, bw: float, repeats: int
) -> dict[str, Any]:
    """Time every implementation on one shape; print the table and return the numbers."""
    torch.manual_seed(0)
    x = (torch.randn(shape) * 1.2 + 0.4).to(DEVICE)
    g = torch.randn(shape).to(DEVICE)
    numel = x.numel()
    print(f"\n== {label}: x {tuple(shape)} = {numel / 1e6:.2f} M neuron-steps ==")
    rows = {}
    for name, run in impls.items():
        if run is None:
            print(f"  {name:12s} not installed (skipped)")
            continue
        slow = name != "snncompile"
        reps = max(3, repeats // 2) if slow else repeats

        def fwd(run=run) -> None:
            with torch.no_grad():
                run(x)

        def train(run=run) -> None:
            xr = x.detach().requires_grad_()
            run(xr).backward(g)

        t_fwd = _timeit(fwd, reps)
        t_train = _timeit(train, reps)
        mem = saved_bytes_per_element(run, x)
        rows[name] = (t_fwd, t_train, mem)
    base_f, base_t, _ = rows["snncompile"]
    print(
        f"  {'impl':12s} {'fwd ms':>9s} {'fwd x':>7s} {'f+b ms':>9s} {'f+b x':>7s} "
        f"{'saved B/elem':>12s}"
    )
    for name, (tf, tt, mem) in rows.items():
        print(
            f"  {name:12s} {tf * 1e3:9.2f} {tf / base_f:7.1f} {tt * 1e3:9.2f} "
            f"{tt / base_t:7.1f} {mem:12.1f}"
        )
    fwd_bytes = numel * 8  # read x, write spikes
    train_bytes = numel * 24  # fwd: x, s, h; bwd: g, h, grad_x
    print(
        f"  snncompile bandwidth: forward {fwd_bytes / base_f / 1e9:.1f} GB/s "
        f"({100 * fwd_bytes / base_f / 1e9 / bw:.0f}% of copy), forward+backward "
        f"{train_bytes / base_t / 1e9:.1f} GB/s ({100 * train_bytes / base_t / 1e9 / bw:.0f}%)"
    )
    return {
        "case": label,
        "shape": list(shape),
        "ms": {n: {"fwd": r[0] * 1e3, "fwd_bwd": r[1] * 1e3} for n, r in rows.items()},
        "saved_bytes_per_elem": {n: r[2] for n, r in rows.items()},
        "ratio_vs_snncompile": {
            n: {"fwd": r[0] / base_f, "fwd_bwd": r[1] / base_t} for n, r in rows.items()
        },
        "pct_of_copy_bandwidth": {
            "fwd": 100 * fwd_bytes / base_f / 1e9 / bw,
            "fwd_bwd": 100 * train_bytes / base_t / 1e9 / bw,
        },
    }


def auto_threshold_sweep() -> None:
    """Fused vs torch loop at small sizes (forward+backward, eager) and per-call overhead."""
    d = lif_dynamics(TAU)
    loop = make_torch_loop()
    print("\n== backend='auto' sweep: forward+backward, fused vs torch loop ==")
    for T, N in [(1, 64), (1, 1024), (4, 256), (4, 1024), (8, 512), (16, 1024), (64, 1024)]:
        x = torch.randn(T, N)
        g = torch.randn(T, N)

        def fused(x=x, g=g) -> None:
            xr = x.detach().requires_grad_()
            fused_multi_step(d, xr, 0.0)[0].backward(g)

        def torch_(x=x, g=g) -> None:
            xr = x.detach().requires_grad_()
            loop(xr).backward(g)

        tf = _timeit(fused, 50, 5)
        tt = _timeit(torch_, 50, 5)
        print(
            f"  T={T:3d} N={N:5d} T*N={T * N:7d}: fused {tf * 1e6:8.1f} us, torch "
            f"{tt * 1e6:8.1f} us, speedup {tt / tf:5.1f}x"
        )
    x = torch.randn(1, 16)
    for name, flag in (("autograd.Function", False), ("custom op", True)):
        with torch.no_grad():
            t = _timeit(lambda flag=flag: fused_multi_step(d, x, 0.0, use_custom_op=flag), 2000, 50)
        print(f"  per-call overhead, T=1 N=16 forward ({name}): {t * 1e6:.1f} us")


def cnn_training(repeats: int) -> None:
    """A compiled spiking CNN's training step with fused neurons vs the torch loop."""
    from torch import nn

    from snncompile import functional, layer
    from snncompile.api import optimize

    def net() -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(
            layer.Conv2d(1, 16, 3, padding=1, bias=False),
            layer.BatchNorm2d(16),
            sn.LIFNode(tau=TAU),
            layer.MaxPool2d(2),
            layer.Conv2d(16, 32, 3, padding=1, bias=False),
            layer.BatchNorm2d(32),
            sn.LIFNode(tau=TAU),
            layer.MaxPool2d(2),
            layer.Flatten(),
            layer.Linear(32 * 7 * 7, 10),
            sn.LIFNode(tau=TAU),
        )
        functional.set_step_mode(m, "m")
        return m

    x = torch.rand(16, 32, 1, 28, 28, device=DEVICE)
    y = torch.randint(0, 10, (32,), device=DEVICE)
    print("\n== compiled spiking CNN (T=16, N=32, 1x28x28), one SGD training step ==")
    times = {}
    fused_backend = "cuda" if DEVICE == "cuda" else "cpu"
    for backend in ("torch", fused_backend):
        model = net().to(DEVICE)
        compiled = optimize(model, x, mode="train", backend=backend)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def step(compiled=compiled, opt=opt) -> None:
            functional.reset_net(compiled)
            out = compiled(x).mean(0)
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        times[backend] = _timeit(step, repeats)
        print(f"  backend={backend!r:7s}: {times[backend] * 1e3:8.1f} ms/step")
    print(f"  fused neurons speed-up: {times['torch'] / times[fused_backend]:.2f}x")


def _device_line() -> str:
    if DEVICE != "cuda":
        return f"device cpu, threads {torch.get_num_threads()}"
    try:
        import cupy

        cupy_version = cupy.__version__
    except ImportError:  # pragma: no cover - checked in main
        cupy_version = "missing"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    return (
        f"device {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, CuPy {cupy_version}, "
        f"Triton {triton_version}"
    )


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--auto-threshold", action="store_true", help="small-size sweep only")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", metavar="PATH", help="also write the measured rows as JSON")
    parser.add_argument("--no-cnn", action="store_true", help="skip the compiled CNN step")
    args = parser.parse_args()
    DEVICE = args.device
    if DEVICE == "cuda":
        from snncompile.runtime.fused_backends import unavailable_reason

        why = unavailable_reason("cuda")
        if why is not None:
            print(f"bench_neuron_kernels --device cuda: {why}; nothing measured.")
            sys.exit(2)
    print(f"torch {torch.__version__}, {_device_line()}")
    if args.auto_threshold:
        auto_threshold_sweep()
        return
    bw = copy_bandwidth()
    print(f"copy bandwidth on {DEVICE} (tensor.copy_, read+write): {bw:.1f} GB/s")
    impls = {
        "snncompile": make_snncompile(),
        "spikingjelly": make_spikingjelly(),
        "snntorch": make_snntorch(),
        "torch loop": make_torch_loop(),
    }
    repeats = 4 if args.quick else 8
    first = ("T=64, N=1,048,576", (64, 1 << 20)) if DEVICE == "cuda" else (
        "T=64, N=65,536", (64, 65536))  # fmt: skip
    results = [bench_case(*first, impls, bw, repeats)]
    results.append(bench_case("T=500, B=16, N=512", (500, 16, 512), impls, bw, repeats))
    results.append(bench_case("T=8, B=32, 64x32x32", (8, 32, 64, 32, 32), impls, bw, repeats))
    if not args.no_cnn:
        cnn_training(repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": _device_line(), "copy_bandwidth_gb_s": bw, "cases": results}, f, indent=1
            )


if __name__ == "__main__":
    main()
