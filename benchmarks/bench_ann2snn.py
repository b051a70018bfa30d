"""ANN2SNN at large T: peak memory, throughput, and SpikingJelly 2.0's converter side by side.

Run: ``.venv/bin/python benchmarks/bench_ann2snn.py`` (several minutes on 2 shared cores;
``--quick`` skips T=4096, the batch-128 memory rows and the SpikingJelly comparison at T=256).

1. Trains two CNNs on ``sklearn.datasets.load_digits`` (seeded) and converts them with
   ``snncompile.ann2snn.convert`` (``'99.9%'``, half-threshold init, fused ``'auto'`` neurons):
   ``wide`` (first layer 1 -> 128 channels: large, cheap per-step activations, the case where
   multi-step memory over T hurts) for the memory rows, and ``small`` (the example's CNN: small
   per-step activations, so a step-by-step loop is overhead-bound) for the throughput check and
   the SpikingJelly comparison. Throughput rows are also printed for ``wide``: a
   bandwidth-bound model gains little from chunking.
2. Memory and time, one fresh subprocess per row (peak = the process's ``VmHWM``, its peak RSS,
   so configurations cannot pollute each other), constant-current input, 1 thread:

   - ``multi-step``: the whole ``[T, N, ...]`` input in one call (layer by layer over all T);
   - ``step-by-step``: a Python loop over T calling the model on ``[1, N, ...]``;
   - ``chunked``: ``snncompile.runtime.chunked.stream`` over encoder chunks of 16 steps with
     ``reduce='mean'`` (neither the input nor the output sequence ever exists);
   - ``optimize+budget``: ``snncompile.optimize(snn, example, memory_budget='64MB')`` and
     ``compiled.stream(..., reduce='mean')`` with the chunk size it picked.

   Memory rows use batch ``N=64`` (``BENCH_MEM_BATCH`` overrides it), throughput rows ``N=16``,
   ``T=1024``; the eager chunked rows use chunks of 16 steps (``BENCH_CHUNK`` overrides it).
   Reported: peak RSS, the RSS just before the run (interpreter, torch, model, input), their
   difference, seconds and samples*steps per second. Checks: chunked peak at T=4096 <= 1.2x at
   T=64; multi-step peak at T=1024 >= 20x the chunked one (raw RSS, and above the pre-run RSS;
   also at batch 128 with chunks of 4 steps, where the activations dominate the process: the
   multi-step run then peaks near 9.5 GB); chunked throughput >= 1.5x step-by-step (``small``).
3. SpikingJelly 2.0.0 ``ann2snn.Converter(RateCodingRecipe(...))`` on the same ANN and the same T:
   test accuracy and wall time (conversion and simulation), next to ours.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEM_BATCH = int(os.environ.get("BENCH_MEM_BATCH", "64"))  # memory rows
SPEED_BATCH = 16  # throughput rows
CHUNK = int(os.environ.get("BENCH_CHUNK", "16"))  # eager chunked rows (small chunks: cache)
# The ">= 20x below multi-step at T=1024" check needs activations to dominate the process (the
# interpreter and torch alone hold ~270 MB): batch 128 (multi-step peaks near 9.5 GB) and chunks
# of 4 steps. Skipped by --quick.
LARGE_BATCH, LARGE_CHUNK = 128, 4


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _max_rss_mb() -> float:
    # VmHWM is this address space's peak RSS. getrusage's ru_maxrss is not usable in a child
    # started by fork+exec: Linux carries the forked parent's peak into it across exec.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- data and model -----------------------------------------------------------------------------


def digits_split() -> tuple[torch.Tensor, ...]:
    """Digits as ``[M, 1, 8, 8]`` in ``[0, 1]``: 1400 training and 397 test images (seeded)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def make_cnn() -> nn.Sequential:
    """A CNN whose first layer is wide and cheap (128 channels from 1): large activations per
    step and little arithmetic, the case where layer-by-layer memory over T hurts most."""
    return nn.Sequential(
        nn.Conv2d(1, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(128 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def make_small_cnn() -> nn.Sequential:
    """The digits CNN of ``examples/ann2snn_digits.py``: small per-step activations, so a
    step-by-step loop is dominated by per-op overhead, which chunking amortises."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    """Adam, batch 64, seeded."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


# -- worker: one configuration in a fresh process ------------------------------------------------


def worker(snn_path: str, config: str, T: int, N: int) -> dict[str, float]:
    """Run one configuration and return peak/baseline RSS and time (runs in a subprocess)."""
    from snncompile import functional
    from snncompile.ann2snn import ConstantEncoder
    from snncompile.runtime.chunked import stream

    torch.set_num_threads(1)
    snn = torch.load(snn_path, weights_only=False)
    x = torch.load(snn_path + ".x", weights_only=False)[:N].clone()
    functional.reset_net(snn)
    compiled = None
    if config == "optimize+budget":
        from snncompile.api import optimize

        compiled = optimize(snn, x.unsqueeze(0).expand(4, *x.shape), memory_budget="64MB")
    # Warm-up (fused-kernel load, first-call costs) on the path the row times, then reset. The
    # chunked rows warm up on one chunk, which their own run allocates anyway.
    warm = 2
    if config == "chunked":
        warm = CHUNK
    elif compiled is not None:
        warm = compiled.chunk_size
    with torch.no_grad():
        (compiled or snn)(x.unsqueeze(0).expand(warm, *x.shape).contiguous())
    functional.reset_net(snn)
    if compiled is not None:
        functional.reset_net(compiled)
    x_seq = None
    if config == "multi-step":
        x_seq = x.unsqueeze(0).repeat(T, *([1] * x.dim()))  # the input a user would build
    base = _rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        if config == "multi-step":
            out = snn(x_seq).mean(0)
        elif config == "step-by-step":
            total = torch.zeros(())
            for _ in range(T):
                total = total + snn(x.unsqueeze(0))[0]
            out = total / T
        elif config == "chunked":
            out = stream(snn, ConstantEncoder().chunks(x, T, CHUNK), reduce="mean")
        elif config == "optimize+budget":
            assert compiled is not None
            out = compiled.stream(
                ConstantEncoder().chunks(x, T, compiled.chunk_size), reduce="mean", reset=True
            )
        else:
            raise ValueError(config)
    seconds = time.perf_counter() - start
    return {
        "peak_mb": _max_rss_mb(),
        "base_mb": base,
        "seconds": seconds,
        "checksum": float(out.sum()),
        "chunk": float(compiled.chunk_size) if compiled is not None else float(CHUNK),
    }


def run_worker(
    snn_path: str, config: str, T: int, N: int, chunk: int | None = None
) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    if chunk is not None:
        env["BENCH_CHUNK"] = str(chunk)  # the eager chunked rows' chunk size in the worker
    cmd = [sys.executable, __file__, "--worker", snn_path, config, str(T), str(N)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"worker {config} T={T} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- SpikingJelly side by side -------------------------------------------------------------------


def _spikingjelly_converter():
    # SpikingJelly's ann2snn package imports `requests` only for its model-download helper,
    # which is not used here; give it a placeholder when requests is not installed.
    try:
        import requests  # noqa: F401
    except ImportError:
        sys.modules.setdefault("requests", types.ModuleType("requests"))
    from spikingjelly.activation_based import functional as sj_functional
    from spikingjelly.activation_based.ann2snn import Converter, RateCodingRecipe

    return Converter, RateCodingRecipe, sj_functional


def compare_spikingjelly(ann, x_tr, x_te, y_te, steps: list[int]) -> list[tuple]:
    """Accuracy and time of SpikingJelly's converter and ours, same ANN and same T."""
    from snncompile.ann2snn import convert, simulate

    try:
        Converter, RateCodingRecipe, sj_functional = _spikingjelly_converter()
    except Exception as exc:  # pragma: no cover - depends on the environment
        print(f"SpikingJelly comparison skipped: {exc!r}")
        return []
    rows = []
    batches = list(x_tr.split(128))
    for mode_ours, mode_sj in (("max", "Max"), ("99.9%", "99.9%")):
        t0 = time.perf_counter()
        sj_model = Converter(RateCodingRecipe(batches, mode=mode_sj)).convert(ann)
        sj_convert = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours_model = convert(ann, x_tr, mode=mode_ours, progress=False)
        ours_convert = time.perf_counter() - t0
        zero_model = convert(ann, x_tr, mode=mode_ours, progress=False, half_threshold_init=False)
        for T in steps:
            sj_functional.reset_net(sj_model)
            t0 = time.perf_counter()
            with torch.no_grad():
                total = 0
                for _ in range(T):
                    total = total + sj_model(x_te)
            sj_time = time.perf_counter() - t0
            sj_acc = (total.argmax(1) == y_te).float().mean().item()
            t0 = time.perf_counter()
            rate = simulate(ours_model, x_te, T, chunk_size=CHUNK)
            ours_time = time.perf_counter() - t0
            ours_acc = (rate.argmax(1) == y_te).float().mean().item()
            zero_acc = (simulate(zero_model, x_te, T, chunk_size=CHUNK).argmax(1) == y_te)
            rows.append(
                (mode_ours, T, sj_acc, sj_convert, sj_time, ours_acc,
                 zero_acc.float().mean().item(), ours_convert, ours_time)
            )
    return rows


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="skip T=4096, the N=128 rows and SJ at T=256"
    )
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        path, config, T, N = args.worker
        print(json.dumps(worker(path, config, int(T), int(N))))
        return

    from snncompile.ann2snn import convert

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    x_tr, y_tr, x_te, y_te = digits_split()
    tmp = tempfile.mkdtemp(prefix="bench_ann2snn_")
    paths: dict[str, str] = {}
    anns: dict[str, nn.Module] = {}
    for name, factory, epochs in (("wide", make_cnn, 4), ("small", make_small_cnn, 10)):
        t0 = time.perf_counter()
        ann = train(factory(), x_tr, y_tr, epochs=epochs)
        with torch.no_grad():
            acc = (ann(x_te).argmax(1) == y_te).float().mean().item()
        seconds = time.perf_counter() - t0
        print(f"ANN {name!r}: test accuracy {acc:.4f} (trained in {seconds:.1f} s)")
        snn = convert(ann, x_tr, mode="99.9%", progress=False)
        paths[name] = os.path.join(tmp, f"{name}.pt")
        torch.save(snn, paths[name])
        torch.save(x_te[: max(MEM_BATCH, SPEED_BATCH, LARGE_BATCH)].clone(), paths[name] + ".x")
        anns[name] = ann

    big = [] if args.quick else [4096]
    N, S = MEM_BATCH, SPEED_BATCH
    every = ("multi-step", "step-by-step", "chunked", "optimize+budget")
    plan = (
        [("wide", "multi-step", T, N) for T in (64, 256, 1024)]
        + [("wide", "step-by-step", T, N) for T in (64, 1024)]
        + [("wide", "chunked", T, N) for T in [64, 256, 1024, *big]]
        + [("wide", "optimize+budget", T, N) for T in [64, 1024, *big]]
        + [("wide", config, 1024, S) for config in every]
        + [("small", config, 1024, S) for config in every]
    )
    results: dict[tuple[str, str, int, int], dict[str, float]] = {}
    print("\nPeak memory (VmHWM) and time, one subprocess per row, 1 thread, constant input")
    print(f"{'model':6s} {'config':16s} {'N':>4s} {'T':>5s} {'chunk':>5s} {'peak MB':>8s} "
          f"{'base MB':>8s} {'delta MB':>9s} {'seconds':>8s} {'samples*steps/s':>16s}")
    for model, config, T, n in plan:
        r = run_worker(paths[model], config, T, n)
        results[(model, config, T, n)] = r
        chunk = "-" if config in ("multi-step", "step-by-step") else str(int(r["chunk"]))
        print(f"{model:6s} {config:16s} {n:4d} {T:5d} {chunk:>5s} {r['peak_mb']:8.1f} "
              f"{r['base_mb']:8.1f} {r['peak_mb'] - r['base_mb']:9.1f} {r['seconds']:8.2f} "
              f"{T * n / r['seconds']:16.0f}")

    large: dict[str, dict[str, float]] = {}
    if not args.quick:
        for config in ("multi-step", "chunked"):
            r = run_worker(paths["wide"], config, 1024, LARGE_BATCH, chunk=LARGE_CHUNK)
            large[config] = r
            chunk = "-" if config == "multi-step" else str(LARGE_CHUNK)
            print(f"{'wide':6s} {config:16s} {LARGE_BATCH:4d} {1024:5d} {chunk:>5s} "
                  f"{r['peak_mb']:8.1f} {r['base_mb']:8.1f} {r['peak_mb'] - r['base_mb']:9.1f} "
                  f"{r['seconds']:8.2f} {1024 * LARGE_BATCH / r['seconds']:16.0f}")
        ref = large["multi-step"]["checksum"]
        assert abs(large["chunked"]["checksum"] - ref) <= 1e-3 * (1 + abs(ref))

    # Same model, same input: every configuration computes the same mean output.
    for key in (("wide", 64, N), ("wide", 1024, N), ("wide", 1024, S), ("small", 1024, S)):
        model, T, n = key
        ref = results[(model, "multi-step", T, n)]["checksum"]
        for config in every[1:]:
            got = results[(model, config, T, n)]["checksum"]
            assert abs(got - ref) <= 1e-3 * (1 + abs(ref)), (key, config, got, ref)

    print("\nChecks")
    top = 4096 if big else 1024
    for config in ("chunked", "optimize+budget"):
        lo, hi = results[("wide", config, 64, N)], results[("wide", config, top, N)]
        growth = hi["peak_mb"] / lo["peak_mb"]
        print(f"  wide, {config}: peak RSS T={top} / T=64 = {growth:.3f}x (target <= 1.2x) "
              f"{'OK' if growth <= 1.2 else 'FAIL'}")
    ms = results[("wide", "multi-step", 1024, N)]
    for config in ("chunked", "optimize+budget"):
        ch = results[("wide", config, 1024, N)]
        ratio = ms["peak_mb"] / ch["peak_mb"]
        net = (ms["peak_mb"] - ms["base_mb"]) / max(1e-6, ch["peak_mb"] - ch["base_mb"])
        print(f"  wide, multi-step / {config} peak RSS at T=1024: {ratio:.1f}x (target >= 20x) "
              f"{'OK' if ratio >= 20 else 'FAIL'}; memory above the pre-run RSS: {net:.0f}x")
    if large:
        ratio = large["multi-step"]["peak_mb"] / large["chunked"]["peak_mb"]
        print(f"  wide, multi-step / chunked (K={LARGE_CHUNK}) peak RSS at T=1024, "
              f"N={LARGE_BATCH}: {ratio:.1f}x (target >= 20x) {'OK' if ratio >= 20 else 'FAIL'}")
    for model in ("small", "wide"):
        sbs = results[(model, "step-by-step", 1024, S)]["seconds"]
        for config in ("chunked", "optimize+budget", "multi-step"):
            speed = sbs / results[(model, config, 1024, S)]["seconds"]
            target = model == "small" and config == "chunked"
            print(f"  {model}, {config} throughput / step-by-step (N={S}, T=1024): {speed:.2f}x"
                  + (f" (target >= 1.5x) {'OK' if speed >= 1.5 else 'FAIL'}" if target else ""))

    ann = anns["small"]
    with torch.no_grad():
        ann_acc = (ann(x_te).argmax(1) == y_te).float().mean().item()
    steps = [32] if args.quick else [32, 256]
    rows = compare_spikingjelly(ann, x_tr, x_te, y_te, steps)
    if rows:
        print(f"\nSpikingJelly 2.0.0 Converter vs snncompile.ann2snn, same ANN ('small', "
              f"accuracy {ann_acc:.4f}), {len(x_te)} test images")
        print(f"{'mode':6s} {'T':>4s} {'SJ acc':>7s} {'SJ conv s':>9s} {'SJ sim s':>8s} "
              f"{'ours acc':>8s} {'ours v0=0':>9s} {'ours conv s':>11s} {'ours sim s':>10s}")
        for mode, T, sj_acc, sj_c, sj_t, acc, zacc, c, t in rows:
            print(f"{mode:6s} {T:4d} {sj_acc:7.4f} {sj_c:9.2f} {sj_t:8.2f} {acc:8.4f} "
                  f"{zacc:9.4f} {c:11.2f} {t:10.2f}")
        print("(ours: half-threshold init, the default; 'ours v0=0' is the zero-init variant, "
              "SpikingJelly's default)")


if __name__ == "__main__":
    main()
