"""Online training (OTTT and FPTT) on scikit-learn's 8x8 digits, read one row per time step.

Each image is a sequence of ``T = 8`` steps; step ``t`` shows row ``t`` of the image (8 pixel
values in [0, 1]) together with a one-hot code of the row index (8 more values), so a network
without recurrent weights can tell the rows apart. The label is the target at every step and the
prediction is the arg-max of the read-out summed over the 8 steps.

* **OTTT**: ``OTTTSequential(Linear(16, 128), OTTTLIFNode, Linear(128, 128), OTTTLIFNode,
  Linear(128, 10))`` trained with :func:`snncompile.functional.ottt_online_training` (one
  backward and one Adam update per time step; weight gradients from presynaptic traces).
* **FPTT**: the same layers with plain ``LIFNode`` trained with
  :func:`snncompile.functional.fptt_online_training` (per-step update plus the FPTT running-average
  regulariser, ``alpha = 1``).

``--compiled`` trains the :func:`snncompile.online.compile_online` forms of both networks
instead (same results up to float rounding of fused kernels).

Then the script measures peak training memory against the sequence length ``T`` (8 ... 512) for
BPTT (a whole sequence forward, one backward), OTTT and FPTT on the same network with random
inputs of the same size, and plots ``outputs/online_memory.png``. Memory is measured honestly
for torch's CPU tensors, which ``tracemalloc`` cannot see: every point runs in a forked child
process, which creates its input batch, records its resident set size (``VmRSS``), resets the
kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``), trains on one batch of ``T`` steps
and reports the peak resident set size (``VmHWM``) minus that baseline (torch's one-time lazy
initialisation included, the same for every ``T``). Linux only (``/proc``).

Run ``python examples/online_digits.py`` (about a minute on 2 cores); ``--help`` lists the flags.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from snncompile import functional, layer, neuron
from snncompile.online import compile_online

ROWS = 8
FEATURES = 16  # 8 pixels + one-hot row index
HIDDEN = 128
CLASSES = 10
MEMORY_TS = (8, 32, 128, 512)
MEMORY_BATCH = 128
ALPHA = 1.0  # FPTT regularisation strength


def load_sequences(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Return ``(x_train, y_train, x_test, y_test)`` with ``x`` batch first ``[N, 8, 16]``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # [N, 8 rows, 8 columns]
    position = torch.eye(ROWS).expand(len(pixels), ROWS, ROWS)
    x = torch.cat([pixels, position], dim=2)
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


def ottt_net() -> nn.Module:
    """The OTTT network: LIF layers with traces; the last Linear is the read-out."""
    return layer.OTTTSequential(
        nn.Linear(FEATURES, HIDDEN),
        neuron.OTTTLIFNode(),
        nn.Linear(HIDDEN, HIDDEN),
        neuron.OTTTLIFNode(),
        nn.Linear(HIDDEN, CLASSES),
    )


def lif_net() -> nn.Module:
    """The same layers with plain LIF neurons (for FPTT and BPTT)."""
    return nn.Sequential(
        nn.Linear(FEATURES, HIDDEN),
        neuron.LIFNode(),
        nn.Linear(HIDDEN, HIDDEN),
        neuron.LIFNode(),
        nn.Linear(HIDDEN, CLASSES),
    )


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy of ``net`` (eval mode) on batch-first sequences, summed read-out."""
    was_training = net.training
    net.eval()
    functional.reset_net(net)
    logits = sum(net(x_t) for x_t in x.transpose(0, 1).unbind(0))
    functional.reset_net(net)
    net.train(was_training)
    return (logits.argmax(1) == y).float().mean().item()


def batches(n: int, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=generator)
    return [perm[i : i + size] for i in range(0, n, size)]


def train_ottt(data: tuple[torch.Tensor, ...], epochs: int, compiled: bool, log: Any) -> float:
    """Train the OTTT network; return its test accuracy."""
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(0)
    model = ottt_net()
    net = compile_online(model, x_tr[:64, 0]) if compiled else model
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        total = 0.0
        for idx in batches(len(x_tr), 64, gen):
            target = y_tr[idx].unsqueeze(1).expand(-1, ROWS)  # [N, T]: the label at every step
            loss, _ = functional.ottt_online_training(
                net, optimizer, x_tr[idx], target, F.cross_entropy, online=True
            )
            functional.reset_net(net)
            total += loss.item()
        schedule.step()
        log(
            f"  OTTT epoch {epoch + 1}: loss {total:.1f}, test accuracy "
            f"{accuracy(net, x_te, y_te):.3f}"
        )
    return accuracy(net, x_te, y_te)


def train_fptt(data: tuple[torch.Tensor, ...], epochs: int, compiled: bool, log: Any) -> float:
    """Train the LIF network with FPTT; return its test accuracy."""
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(0)
    model = lif_net()
    net = compile_online(model, x_tr[:64, 0]) if compiled else model
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    w_ra = functional.fptt_online_training_init_w_ra(optimizer)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        for idx in batches(len(x_tr), 64, gen):
            x_seq = x_tr[idx].transpose(0, 1)  # FPTT is time first: [T, N, 16]
            target = y_tr[idx].unsqueeze(0).expand(ROWS, -1)
            functional.fptt_online_training(
                net, optimizer, x_seq, target, F.cross_entropy, ALPHA, w_ra
            )
            functional.reset_net(net)
        schedule.step()
        log(f"  FPTT epoch {epoch + 1}: test accuracy {accuracy(net, x_te, y_te):.3f}")
    return accuracy(net, x_te, y_te)


# -- memory vs T ---------------------------------------------------------------------------------
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _train_once(method: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training pass over a batch of sequences ``x`` ``[N, T, 16]`` with ``method``."""
    torch.manual_seed(0)
    if method == "ottt":
        net = ottt_net()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        functional.ottt_online_training(net, opt, x, y, F.cross_entropy, online=True)
    elif method == "fptt":
        net = lif_net()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        w_ra = functional.fptt_online_training_init_w_ra(opt)
        functional.fptt_online_training(
            net, opt, x.transpose(0, 1), y.transpose(0, 1), F.cross_entropy, ALPHA, w_ra
        )
    elif method == "bptt":
        net = lif_net()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        steps = zip(x.transpose(0, 1).unbind(0), y.transpose(0, 1).unbind(0), strict=True)
        loss = sum(F.cross_entropy(net(x_t), y_t) for x_t, y_t in steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    else:
        raise ValueError(f"unknown method {method!r}; use bptt, ottt or fptt")
    functional.reset_net(net)


def memory_point(method: str, steps: int, batch: int) -> dict[str, float]:
    """Train one batch of ``steps`` steps; return the peak RSS increase over the baseline (MB).

    The input batch is created before the baseline (it is data, not training memory); the
    increase includes torch's one-time lazy initialisation, the same for every ``T``. Runs in a
    forked child (:func:`measure_memory`): the peak mark is per process.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, steps, FEATURES, generator=gen)
    y = torch.randint(0, CLASSES, (batch, steps), generator=gen)
    base = _status_mb("VmRSS")
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs is not writable)")
    start = time.perf_counter()
    _train_once(method, x, y)
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    return {"peak_mb": peak, "base_mb": base, "delta_mb": peak - base, "s": seconds}


def _in_child(fn: Any, *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a forked child process and return its JSON-able result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the parent's code
        os.close(read_fd)
        try:
            payload = json.dumps(fn(*args))
        except BaseException as exc:  # report any failure to the parent
            payload = json.dumps({"error": repr(exc)})
        os.write(write_fd, payload.encode())
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks).decode())
    if "error" in result:
        raise RuntimeError(f"memory measurement failed in the child process: {result['error']}")
    return result


def measure_memory(ts: Sequence[int], batch: int, log: Any) -> dict[str, list[dict[str, float]]]:
    """Run :func:`memory_point` for every method and ``T``, each in a fresh forked process."""
    results: dict[str, list[dict[str, float]]] = {}
    for method in ("bptt", "ottt", "fptt"):
        results[method] = []
        for steps in ts:
            point = _in_child(memory_point, method, steps, batch)
            point["T"] = steps
            results[method].append(point)
            log(
                f"  {method:5s} T={steps:4d}: peak RSS +{point['delta_mb']:7.1f} MB "
                f"(baseline {point['base_mb']:.0f} MB, {point['s']:.1f} s)"
            )
    return results


def plot_memory(results: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in results.items():
        ax.plot(
            [p["T"] for p in points], [p["delta_mb"] for p in points], "o-", label=method.upper()
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("time steps T")
    ax.set_ylabel("peak RSS minus pre-training RSS (MB)")
    ax.set_title(f"One training batch (N={MEMORY_BATCH}, 16-128-128-10 LIF MLP)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train OTTT and FPTT on digits, measure memory vs T, and return the metrics."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--compiled", action="store_true", help="train compile_online modules")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory-vs-T plot")
    parser.add_argument("--batch", type=int, default=MEMORY_BATCH, help="memory-test batch")
    parser.add_argument("--out", default="outputs/online_memory.png")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # the machine is shared; one thread is also the fastest here
    start = time.perf_counter()
    data = load_sequences()
    print(
        f"digits as sequences: train {tuple(data[0].shape)}, test {tuple(data[2].shape)}"
        f"{' (compiled)' if args.compiled else ''}"
    )
    metrics: dict[str, Any] = {}
    metrics["ottt_accuracy"] = train_ottt(data, args.epochs, args.compiled, print)
    print(f"OTTT test accuracy: {metrics['ottt_accuracy']:.3f}")
    metrics["fptt_accuracy"] = train_fptt(data, args.epochs, args.compiled, print)
    print(f"FPTT test accuracy: {metrics['fptt_accuracy']:.3f}")
    if not args.no_memory:
        print("peak training memory vs T (one forked process per point):")
        results = measure_memory(MEMORY_TS, args.batch, print)
        plot_memory(results, Path(args.out))
        metrics["memory"] = results
        for method, points in results.items():
            ratio = (points[-1]["delta_mb"] + 1e-9) / (points[0]["delta_mb"] + 1e-9)
            print(
                f"  {method}: T={MEMORY_TS[-1]} / T={MEMORY_TS[0]} peak memory "
                f"{points[-1]['delta_mb']:.1f} / {points[0]['delta_mb']:.1f} MB"
            )
            metrics[f"{method}_memory_ratio"] = ratio
        print(f"wrote {args.out}")
    print(f"total {time.perf_counter() - start:.0f} s")
    return metrics


if __name__ == "__main__":
    main()
