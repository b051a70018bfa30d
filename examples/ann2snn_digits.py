"""ANN -> SNN on sklearn's digits: accuracy vs T and peak memory vs T.

Run: ``.venv/bin/python examples/ann2snn_digits.py`` (1-3 minutes on 2 idle cores). It

1. trains a small CNN on ``load_digits`` (seeded, a few seconds);
2. converts it with :func:`snncompile.ann2snn.convert` using ``'max'`` and ``'99.9%'``
   normalisation (half-threshold initial membrane, the default) and, for comparison, ``'99.9%'``
   with the membrane starting at 0 (up to T = 256);
3. runs each SNN once for T = 4096 steps with :func:`snncompile.runtime.chunked.stream`
   (constant-current input generated chunk by chunk) and reads the test accuracy of the
   running mean output at T = 1, 2, 4, ..., 4096;
4. measures the peak RSS (one subprocess per point) of a multi-step run (the whole
   ``[T, N, ...]`` input at once, up to T = 2048), a step-by-step loop and the chunked stream,
   for T = 16..4096;
5. saves ``outputs/ann2snn_accuracy.png`` and ``outputs/ann2snn_memory.png`` and prints the
   tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "outputs"
T_MAX = 4096
CHECKPOINTS = [2**k for k in range(13)]  # 1 .. 4096
ZERO_INIT_T_MAX = 256  # the v0=0 comparison curve stops here (it has converged by then)
MEM_BATCH = 16
CHUNK = 64  # memory runs
ACC_CHUNK = 16  # accuracy runs over the whole test set (smaller chunks stay in cache)


def digits_split() -> tuple[torch.Tensor, ...]:
    """Digits as ``[M, 1, 8, 8]`` in ``[0, 1]``: 1400 training and 397 test images (seeded)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def make_cnn() -> nn.Sequential:
    """Conv-BN-ReLU-AvgPool, then a ReLU MLP; AvgPool keeps the conversion exact in rate."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def train(x: torch.Tensor, y: torch.Tensor, epochs: int = 10) -> nn.Module:
    """Adam, batch 64, seeded."""
    torch.manual_seed(0)
    model = make_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def accuracy_curve(
    snn: nn.Module, x: torch.Tensor, y: torch.Tensor, t_max: int = T_MAX
) -> dict[int, float]:
    """Test accuracy of the running mean output at every checkpoint T, from one t_max-step run."""
    from snncompile.ann2snn import ConstantEncoder
    from snncompile.runtime.chunked import stream

    acc: dict[int, float] = {}
    running = torch.zeros(len(x), 10)
    t0 = 0
    for out in stream(snn, ConstantEncoder().chunks(x, t_max, ACC_CHUNK), reset=True):
        cumulative = running + out.cumsum(0)
        for t in CHECKPOINTS:
            if t0 < t <= t0 + out.shape[0]:
                pred = cumulative[t - t0 - 1].argmax(1)  # argmax of the sum = of the mean
                acc[t] = (pred == y).float().mean().item()
        running = cumulative[-1]
        t0 += out.shape[0]
    return acc


# -- peak memory, one subprocess per point ------------------------------------------------------


def _peak_rss_mb() -> float:
    # VmHWM: this address space's peak RSS (ru_maxrss would include the forked parent's peak).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_worker(path: str, config: str, T: int) -> dict[str, float]:
    """Run one configuration on ``MEM_BATCH`` test images and report peak RSS and time."""
    from snncompile import functional
    from snncompile.ann2snn import ConstantEncoder
    from snncompile.runtime.chunked import stream

    torch.set_num_threads(1)
    snn = torch.load(path, weights_only=False)
    x = torch.load(path + ".x", weights_only=False)
    functional.reset_net(snn)
    with torch.no_grad():  # warm-up: first-call costs (fused-kernel load) are not part of T
        snn(x.unsqueeze(0).expand(CHUNK, *x.shape).contiguous())
    start = time.perf_counter()
    with torch.no_grad():
        functional.reset_net(snn)
        if config == "multi-step":
            out = snn(x.unsqueeze(0).repeat(T, 1, 1, 1, 1)).mean(0)
        elif config == "step-by-step":
            total = torch.zeros(())
            for _ in range(T):
                total = total + snn(x.unsqueeze(0))[0]
            out = total / T
        else:
            out = stream(snn, ConstantEncoder().chunks(x, T, CHUNK), reduce="mean")
    return {"peak_mb": _peak_rss_mb(), "seconds": time.perf_counter() - start,
            "checksum": float(out.sum())}


def measure_memory(snn: nn.Module, x: torch.Tensor) -> dict[str, dict[int, dict[str, float]]]:
    from snncompile import functional

    path = os.path.join(tempfile.mkdtemp(prefix="ann2snn_digits_"), "snn.pt")
    functional.reset_net(snn)  # do not ship the accuracy run's state to the workers
    torch.save(snn, path)
    torch.save(x[:MEM_BATCH].clone(), path + ".x")
    plan = {
        "multi-step": [16, 64, 256, 1024, 2048],
        "step-by-step": [16, 256, 4096],
        "chunked": [16, 64, 256, 1024, 4096],
    }
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    results: dict[str, dict[int, dict[str, float]]] = {}
    for config, steps in plan.items():
        results[config] = {}
        for T in steps:
            cmd = [sys.executable, __file__, "--worker", path, config, str(T)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"{config} T={T} failed:\n{res.stderr[-2000:]}")
            results[config][T] = json.loads(res.stdout.strip().splitlines()[-1])
    return results


# -- plots ---------------------------------------------------------------------------------------


def plot_accuracy(curves: dict[str, dict[int, float]], ann_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    styles = {
        "max": dict(marker="o", color="tab:blue"),
        "99.9%": dict(marker="s", color="tab:orange"),
        "99.9%, v0=0": dict(marker="^", color="tab:gray", linestyle="--"),
    }
    for ax, (low, title) in zip(
        axes, ((0, "full range"), (90, "zoom: 90-100%")), strict=True
    ):
        for label, curve in curves.items():
            ts = sorted(curve)
            ax.plot(ts, [100 * curve[t] for t in ts], label=f"SNN, {label}", **styles[label])
        ax.axhline(100 * ann_acc, color="black", linewidth=1.2,
                   label=f"ANN ({100 * ann_acc:.1f}%)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(CHECKPOINTS)
        ax.set_xticklabels([str(t) for t in CHECKPOINTS], fontsize=8)
        ax.set_xlabel("time steps T")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(low, 100.5)
        ax.set_title(f"Converted digits CNN, accuracy vs T ({title})")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="lower right")
    fig.text(0.5, 0.005, "soft-reset IF neurons; membrane starts at threshold/2 unless 'v0=0'",
             ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def plot_memory(results: dict[str, dict[int, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    colors = {"multi-step": "tab:red", "step-by-step": "tab:green", "chunked": "tab:blue"}
    for config, rows in results.items():
        ts = sorted(rows)
        label = config if config != "chunked" else f"chunked (K={CHUNK}, stream)"
        ax1.plot(ts, [rows[t]["peak_mb"] for t in ts], marker="o", color=colors[config],
                 label=label)
        ax2.plot(ts, [rows[t]["seconds"] for t in ts], marker="o", color=colors[config],
                 label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks([16, 64, 256, 1024, 4096])
        ax.set_xticklabels(["16", "64", "256", "1024", "4096"])
        ax.set_xlabel("time steps T")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax1.set_ylabel("peak RSS of the process (MB)")
    ax1.set_title(f"Peak memory vs T (batch {MEM_BATCH})")
    ax2.set_yscale("log")
    ax2.set_ylabel("wall time (s)")
    ax2.set_title("Run time vs T (1 thread)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="ANN -> SNN on digits")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        path, config, T = args.worker
        print(json.dumps(memory_worker(path, config, int(T))))
        return

    from snncompile.ann2snn import convert

    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    start = time.perf_counter()
    x_tr, y_tr, x_te, y_te = digits_split()
    ann = train(x_tr, y_tr)
    with torch.no_grad():
        ann_acc = (ann(x_te).argmax(1) == y_te).float().mean().item()
    seconds = time.perf_counter() - start
    print(f"ANN test accuracy: {100 * ann_acc:.2f}% (trained in {seconds:.1f} s)")

    snns = {
        "max": convert(ann, x_tr, mode="max"),
        "99.9%": convert(ann, x_tr, mode="99.9%"),
        "99.9%, v0=0": convert(ann, x_tr, mode="99.9%", half_threshold_init=False),
    }
    curves = {}
    for label, snn in snns.items():
        t = time.perf_counter()
        t_max = ZERO_INIT_T_MAX if "v0=0" in label else T_MAX
        curves[label] = accuracy_curve(snn, x_te, y_te, t_max)
        print(f"  simulated {label!r} for T={t_max} in {time.perf_counter() - t:.1f} s")
    print(f"\nTest accuracy (%) vs T ({len(x_te)} test images, ANN {100 * ann_acc:.2f}%)")
    print(f"{'T':>5s}" + "".join(f"{label:>14s}" for label in curves))
    for t in CHECKPOINTS:
        cells = [f"{100 * c[t]:14.2f}" if t in c else f"{'-':>14s}" for c in curves.values()]
        print(f"{t:5d}" + "".join(cells))

    memory = measure_memory(snns["99.9%"], x_te)
    print(f"\nPeak RSS (MB) and time (s) vs T, batch {MEM_BATCH}, one subprocess per point")
    print(f"{'config':14s} {'T':>5s} {'peak MB':>9s} {'seconds':>9s}")
    for config, rows in memory.items():
        for t, r in sorted(rows.items()):
            print(f"{config:14s} {t:5d} {r['peak_mb']:9.1f} {r['seconds']:9.2f}")

    OUT.mkdir(exist_ok=True)
    plot_accuracy(curves, ann_acc, OUT / "ann2snn_accuracy.png")
    plot_memory(memory, OUT / "ann2snn_memory.png")
    print(f"\nsaved {OUT / 'ann2snn_accuracy.png'} and {OUT / 'ann2snn_memory.png'} "
          f"(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
