"""Streaming latency: one time step per call at batch 1, eager vs compiled vs onnxruntime.

The deployment question: a trained SNN runs in real time, one input frame per call, the neuron
state carried between calls. Per-step latency at batch 1 over ``T`` steps (default 100) for

* **eager, 's'**: the model in single-step mode, ``model(x[t])`` (``[N, ...]`` per call);
* **eager, 'm'**: the model in multi-step mode called with ``x[t:t+1]`` (``[1, N, ...]``);
* **compiled**: ``snncompile.optimize(model, example, mode='inference')`` called with
  ``x[t:t+1]`` (its neurons keep their state between calls), which takes the module's ``T = 1``
  path (:mod:`snncompile.runtime.one_step`); for comparison, the same calls through the
  sequence code (``compiled.gm``), which is what a ``T = 1`` call ran before that path existed;
* **ORT step**: the ``mode='step'`` ONNX export under onnxruntime, one call per step, states fed
  back (:class:`snncompile.onnx_runtime.StreamingSession`);
* **ORT sequence**: the ``mode='sequence'`` export, one call over all ``T`` steps (not
  streaming: the whole input must be known; shown as the per-step floor).

Models: the digits demo CNN (``examples/digits_demo.py``, 1x8x8 input) and SpikingJelly 2.0.0's
``spiking_resnet18`` (its own IF neurons, ATan surrogate, ``detach_reset``, single-step mode)
on a 3x32x32 input. SpikingJelly's zoo imports torchvision only for
``load_state_dict_from_url`` (pretrained weights, never used here); torchvision does not install
beside this torch, so a stub module is put in ``sys.modules`` when the import fails.

Every variant is checked to give the same outputs at every step as eager single-step before it
is timed. Rounds interleave the variants (each round runs every variant over ``T`` steps) and
the median over rounds is reported, so load on a shared machine hits all of them alike. One
thread for torch and onnxruntime (spinning off). Goals: compiled <= eager per step, ORT step
>= 5x faster than eager. Run: ``python benchmarks/bench_latency.py`` (``--quick``: smoke run).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import snncompile
from snncompile import functional
from snncompile.onnx_runtime import StreamingSession, make_session, run_sequence_model

REPO = Path(__file__).resolve().parents[1]


def demo_cnn() -> tuple[nn.Module, tuple[int, ...]]:
    """The digits demo CNN (multi-step), weights scaled so that every layer spikes."""
    spec = importlib.util.spec_from_file_location("digits_demo", REPO / "examples/digits_demo.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    torch.manual_seed(0)
    model = demo.build_model()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(3.0)
        model[9].bias.add_(1.0)  # the output layer spikes too
    return model.eval(), (1, 8, 8)


def import_sj_zoo() -> types.ModuleType:
    """``spikingjelly.activation_based.model.spiking_resnet`` (torchvision stand-in if needed)."""
    from snncompile.zoo_compat import install_torchvision_stand_in

    install_torchvision_stand_in()
    import spikingjelly.activation_based.model.spiking_resnet as zoo

    return zoo


def sj_resnet18() -> tuple[nn.Module, tuple[int, ...]]:
    """SpikingJelly's spiking_resnet18 (IF, ATan, detach_reset), single-step, 3x32x32 input."""
    zoo = import_sj_zoo()
    from spikingjelly.activation_based import neuron, surrogate

    torch.manual_seed(0)
    model = zoo.spiking_resnet18(
        spiking_neuron=neuron.IFNode, surrogate_function=surrogate.ATan(), detach_reset=True
    )
    return model.eval(), (3, 32, 32)


def single_step_copy(model: nn.Module) -> nn.Module:
    """``model`` in single-step mode (a copy; ``model`` keeps its mode)."""
    clone = copy.deepcopy(model)
    functional.set_step_mode(clone, "s")
    return clone


def multi_step_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    functional.set_step_mode(clone, "m")
    return clone


def bench_model(name: str, model: nn.Module, feat: tuple[int, ...], args: argparse.Namespace):
    T = args.T
    x = torch.rand(T, 1, *feat) * 1.5
    example = torch.rand(4, 1, *feat)
    eager_s, eager_m = single_step_copy(model), multi_step_copy(model)
    compiled = snncompile.optimize(model, example, mode="inference")
    tmp = Path(tempfile.mkdtemp())
    step_path, seq_path = tmp / "step.onnx", tmp / "seq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snncompile.export_onnx(model, example, step_path, mode="step")
        snncompile.export_onnx(model, example, seq_path, mode="sequence")
    session = StreamingSession(step_path, threads=args.threads)
    seq_session = make_session(seq_path, threads=args.threads)
    frames = [x[t : t + 1] for t in range(T)]
    steps = [x[t] for t in range(T)]
    np_steps = [s.numpy() for s in steps]
    x_np = x.numpy()

    def eager_single() -> list[torch.Tensor]:
        functional.reset_net(eager_s)
        return [eager_s(s) for s in steps]

    def eager_multi() -> list[torch.Tensor]:
        functional.reset_net(eager_m)
        return [eager_m(f)[0] for f in frames]

    def compiled_steps() -> list[torch.Tensor]:
        functional.reset_net(compiled)
        return [compiled(f)[0] for f in frames]

    def sequence_code_steps() -> list[torch.Tensor]:
        functional.reset_net(compiled)
        return [compiled.gm(f)[0] for f in frames]  # what a T=1 call ran before its own path

    def ort_steps() -> list[np.ndarray]:
        session.reset()
        return [session.step(s) for s in np_steps]

    def ort_sequence() -> np.ndarray:
        return run_sequence_model(seq_path, x_np, session=seq_session)

    variants: dict[str, Callable[[], object]] = {
        "eager, step_mode='s'": eager_single,
        "eager, step_mode='m', T=1 calls": eager_multi,
        "compiled, T=1 calls": compiled_steps,
        "compiled, sequence code at T=1": sequence_code_steps,
        "ORT step (StreamingSession)": ort_steps,
        f"ORT sequence (one call, T={T})": ort_sequence,
    }
    notes = []
    with torch.no_grad():
        ref = torch.stack(eager_single()).numpy()
        binary = bool(np.isin(ref, (0.0, 1.0)).all())
        for label, fn in variants.items():
            out = fn()
            got = np.stack([np.asarray(o) for o in out]) if isinstance(out, list) else out
            if np.array_equal(got, ref):
                continue
            first = np.argwhere(got != ref)[0]
            if not label.startswith("ORT"):
                raise AssertionError(f"{name}: {label} differs from eager (first at {first})")
            # onnxruntime's conv/GEMM kernels may round the last bit differently from
            # PyTorch's: float outputs differ by rounding, and a membrane exactly at threshold
            # flips a spike (docs/onnx.md).
            if binary:
                what = f"{np.mean(got != ref):.1e} of the output spikes differ"
            else:
                scale = float(np.abs(ref).max()) or 1.0
                what = f"max |diff| {float(np.abs(got - ref).max()) / scale:.1e} of max |output|"
            notes.append(f"{label}: {what} (first at step {first[0]}; conv rounding)")
        times: dict[str, list[float]] = {k: [] for k in variants}
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for label, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[label].append((time.perf_counter() - start) / T)
    per_step = {k: statistics.median(v) for k, v in times.items()}
    kind = f"output spike rate {float(ref.mean()):.3f}" if binary else "float outputs"
    print(
        f"\n{name}: {sum(p.numel() for p in model.parameters())} params, input 1x"
        f"{'x'.join(map(str, feat))}, T={T}, batch 1, {args.rounds} rounds, {kind}; "
        + ("outputs identical at every step across all variants" if not notes else "PyTorch "
           "variants identical at every step; " + "; ".join(notes))
    )
    eager = per_step["eager, step_mode='s'"]
    for label, sec in per_step.items():
        print(f"   {label:34s} {sec * 1e6:9.1f} us/step   ({eager / sec:5.2f}x vs eager 's')")
    comp = per_step["compiled, T=1 calls"]
    ort = per_step["ORT step (StreamingSession)"]
    best_eager = min(eager, per_step["eager, step_mode='m', T=1 calls"])
    print(
        f"   compiled / eager: {comp / eager:.2f}x of eager 's' ({comp / best_eager:.2f}x of the "
        f"faster eager form; goal <= 1: {'met' if comp <= best_eager else 'NOT met'}); "
        f"ORT step: {eager / ort:.1f}x faster than eager 's' "
        f"(goal >= 5x: {'met' if eager / ort >= 5 else 'NOT met'})"
    )
    return per_step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=100, help="time steps per sequence (default 100)")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds per variant (median)")
    p.add_argument("--threads", type=int, default=1, help="torch and ORT threads (default 1)")
    p.add_argument("--only", choices=("demo", "resnet18"), default=None)
    p.add_argument("--quick", action="store_true", help="T=10, 2 rounds (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.T, args.rounds = 10, 2
    torch.set_num_threads(args.threads)
    print(
        f"per-step latency at batch 1; torch threads={args.threads}, ORT intra-op threads="
        f"{args.threads}, spinning off"
    )
    if args.only in (None, "demo"):
        bench_model("digits demo CNN", *demo_cnn(), args)
    if args.only in (None, "resnet18"):
        if importlib.util.find_spec("spikingjelly") is None:
            print("\nspiking_resnet18: skipped (SpikingJelly 2.0.0 is not installed)")
        else:
            bench_model("SpikingJelly spiking_resnet18", *sj_resnet18(), args)


if __name__ == "__main__":
    main()
