"""Train a small spiking CNN on scikit-learn's 8x8 digits with snncompile's modules.

The network (built by :func:`build_model`) is written exactly as a SpikingJelly user would write
it, from ``snncompile.layer`` and ``snncompile.neuron``, and switched to multi-step mode with
``functional.set_step_mode(net, 'm')``::

    Conv2d(1, 16, 3, padding=1) - BatchNorm2d - LIF - MaxPool2d(2)      [16, 4, 4]
    Conv2d(16, 32, 3, padding=1) - BatchNorm2d - LIF - MaxPool2d(2)     [32, 2, 2]
    Flatten - Linear(128, 10) - LIF

By default (``--engine compiled``) the network is compiled with ``snncompile.optimize`` before
training (the compiled module shares the parameters, so the optimizer trains both); after
training, the test set is scored once more by an inference compile (BatchNorm folded into the
convolutions), which must agree with the trained model. ``--engine eager`` trains the plain
modules instead, for comparison.

Deployment (``--out DIR``, default ``digits_demo_out``; ``--no-save`` skips it): the trained
weights are saved as a state dict (``DIR/digits_cnn.pt``, the model's keys, loadable with
``torch.load(weights_only=True)``), loaded back into a fresh model, and exported to ONNX in both
forms (``DIR/digits_cnn_step.onnx`` for streaming, ``DIR/digits_cnn_seq.onnx`` for whole
sequences); the sequence export scores the test set under onnxruntime. The same export from the
command line::

    snncompile export examples/digits_demo.py:build_model --weights digits_demo_out/digits_cnn.pt \
        --input-shape 4,1,1,8,8 --mode step -o digits_cnn_step.onnx

Input encoding is direct: the image (scaled to [0, 1]) is repeated ``T`` times, ``[T, N, 1, 8,
8]``. The prediction is the firing rate of the 10 output neurons (mean spikes over ``T``); the
loss is the MSE between the rate and the one-hot label (``--loss mse``, default) or the cross
entropy of the rates (``--loss ce``). The network state is reset after every batch with
``functional.reset_net``. The data never leave the machine (``sklearn.datasets.load_digits``).

Run ``python examples/digits_demo.py`` (or ``scripts/demo.sh``); ``--help`` lists the flags.
:func:`main` returns the final metrics so that tests and later tools can call it.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import snncompile
from snncompile import functional, layer, neuron

NUM_CLASSES = 10


def build_model(tau: float = 2.0) -> nn.Module:
    """Return the spiking CNN for 1x8x8 inputs, in multi-step mode (input ``[T, N, 1, 8, 8]``)."""
    net = nn.Sequential(
        layer.Conv2d(1, 16, 3, padding=1, bias=False),
        layer.BatchNorm2d(16),
        neuron.LIFNode(tau=tau),
        layer.MaxPool2d(2),
        layer.Conv2d(16, 32, 3, padding=1, bias=False),
        layer.BatchNorm2d(32),
        neuron.LIFNode(tau=tau),
        layer.MaxPool2d(2),
        layer.Flatten(),
        layer.Linear(32 * 2 * 2, NUM_CLASSES),
        neuron.LIFNode(tau=tau),
    )
    functional.set_step_mode(net, "m")
    return net


def load_data(seed: int, batch_size: int) -> tuple[DataLoader, DataLoader]:
    """Return train/test loaders of digits scaled to [0, 1] (80/20 split fixed by ``seed``)."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # [n, 1, 8, 8]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )
    train = TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train).long())
    test = TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test).long())
    generator = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
        DataLoader(test, batch_size=256, shuffle=False),
    )


def forward_rate(net: nn.Module, images: Tensor, T: int) -> Tensor:
    """Run ``T`` steps of direct encoding and return the output firing rate ``[N, 10]``."""
    x_seq = images.unsqueeze(0).repeat(T, 1, 1, 1, 1)
    return net(x_seq).mean(0)


def loss_fn(rate: Tensor, labels: Tensor, kind: str) -> Tensor:
    """MSE to the one-hot label (``'mse'``) or cross entropy of the rates (``'ce'``)."""
    if kind == "mse":
        return F.mse_loss(rate, F.one_hot(labels, NUM_CLASSES).to(rate.dtype))
    return F.cross_entropy(rate, labels)


def train_one_epoch(
    net: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    T: int,
    device: torch.device,
    loss_kind: str = "mse",
    desc: str = "train",
) -> dict[str, float]:
    """Train for one pass over ``loader``; return the mean loss and the training accuracy."""
    net.train()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=None):
        images, labels = images.to(device), labels.to(device)
        rate = forward_rate(net, images, T)
        loss = loss_fn(rate, labels, loss_kind)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        functional.reset_net(net)
        total_loss += loss.item() * labels.numel()
        correct += int((rate.argmax(1) == labels).sum())
        seen += labels.numel()
    return {"loss": total_loss / seen, "acc": correct / seen}


@torch.no_grad()
def evaluate(net: nn.Module, loader: DataLoader, T: int, device: torch.device) -> float:
    """Return the accuracy of ``net`` on ``loader`` (rate-coded argmax)."""
    net.eval()
    correct, seen = 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        rate = forward_rate(net, images, T)
        functional.reset_net(net)
        correct += int((rate.argmax(1) == labels).sum())
        seen += labels.numel()
    return correct / seen


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    parser.add_argument("--T", type=int, default=4, help="time steps per sample (default 4)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, init, shuffling")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--loss", choices=("mse", "ce"), default="mse", help="loss on the rates")
    parser.add_argument(
        "--engine",
        choices=("compiled", "eager"),
        default="compiled",
        help="train the snncompile.optimize'd module (default) or the eager modules",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "torch", "cpu"),
        default="auto",
        help="neuron backend of the compiled module (default auto: fused C kernels when large)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: this network is too small for intra-op parallelism "
        "to pay, and extra threads spin against other processes on a busy machine)",
    )
    parser.add_argument(
        "--out",
        default="digits_demo_out",
        help="directory for the trained checkpoint and its ONNX exports (default digits_demo_out)",
    )
    parser.add_argument(
        "--no-save", action="store_true", help="do not save the checkpoint or export it"
    )
    args = parser.parse_args(argv)
    if min(args.epochs, args.T, args.batch_size, args.threads) < 1 or args.lr <= 0:
        parser.error("--epochs, --T, --batch-size and --threads must be >= 1 and --lr > 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train and evaluate; print one line per epoch and return the final metrics.

    The returned dict has ``test_acc``, ``train_loss``, ``train_acc`` (last epoch), ``epoch_time``
    (seconds, mean over epochs), ``total_time``, ``epochs``, ``T``, ``engine``,
    ``inference_test_acc`` (the BN-folded inference compile), ``history`` (per epoch) and, unless
    ``--no-save``, ``checkpoint``, ``onnx_step``, ``onnx_sequence`` (paths) and ``onnx_test_acc``
    (the sequence export under onnxruntime).
    """
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)  # main() is also called from tests


def _run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train_loader, test_loader = load_data(args.seed, args.batch_size)
    model = build_model().to(device)
    example = torch.zeros(args.T, args.batch_size, 1, 8, 8, device=device)
    if args.engine == "compiled":
        net: nn.Module = snncompile.optimize(model, example, backend=args.backend)
        print(net.report(), flush=True)
    else:
        net = model
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)

    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        tic = time.perf_counter()
        train = train_one_epoch(
            net, train_loader, optimizer, args.T, device, args.loss,
            desc=f"epoch {epoch + 1}/{args.epochs}",
        )
        test_acc = evaluate(net, test_loader, args.T, device)
        seconds = time.perf_counter() - tic
        history.append(
            {"epoch": epoch + 1, "train_loss": train["loss"], "train_acc": train["acc"],
             "test_acc": test_acc, "time": seconds}
        )
        print(
            f"epoch {epoch + 1}/{args.epochs}: train loss {train['loss']:.4f}, "
            f"train acc {train['acc']:.3f}, test acc {test_acc:.3f}, {seconds:.2f} s",
            flush=True,
        )
    total = time.perf_counter() - start
    last = history[-1]
    # Deployment form: eval semantics, BN folded into the convolutions, dropout removed.
    model.eval()
    inference = snncompile.optimize(model, example, mode="inference", backend=args.backend)
    inference_acc = evaluate(inference, test_loader, args.T, device)
    print(
        f"inference compile (BatchNorm folded): test acc {inference_acc:.3f} "
        f"(trained model: {last['test_acc']:.3f})",
        flush=True,
    )
    metrics = {
        "test_acc": last["test_acc"],
        "train_loss": last["train_loss"],
        "train_acc": last["train_acc"],
        "epoch_time": total / args.epochs,
        "total_time": total,
        "epochs": args.epochs,
        "T": args.T,
        "engine": args.engine,
        "inference_test_acc": inference_acc,
        "history": history,
    }
    if not args.no_save:
        metrics.update(save_and_export(net, test_loader, args))
    print(f"final test accuracy {metrics['test_acc']:.3f} in {total:.1f} s")
    return metrics


def save_and_export(net: nn.Module, test_loader: DataLoader, args: argparse.Namespace) -> dict:
    """Save ``net``'s trained state dict, load it into a fresh model, export that to ONNX.

    ``net`` is the trained (compiled or eager) network: a compiled module's state dict has the
    model's keys, so either loads into :func:`build_model`'s model. Returns the paths and the
    sequence export's test accuracy under onnxruntime.
    """
    from snncompile.onnx_runtime import run_sequence_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "digits_cnn.pt"
    torch.save(net.state_dict(), ckpt)
    fresh = build_model()
    fresh.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    fresh.eval()
    example = torch.zeros(args.T, 1, 1, 8, 8)
    step_path, seq_path = out / "digits_cnn_step.onnx", out / "digits_cnn_seq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no onnxruntime-version chatter in the demo output
        snncompile.export_onnx(fresh, example, step_path, mode="step")
        snncompile.export_onnx(fresh, example, seq_path, mode="sequence")
    correct, seen = 0, 0
    for images, labels in test_loader:
        x_seq = images.unsqueeze(0).repeat(args.T, 1, 1, 1, 1)
        rate = run_sequence_model(seq_path, x_seq, threads=1).mean(0)
        correct += int((rate.argmax(1) == labels.numpy()).sum())
        seen += labels.numel()
    onnx_acc = correct / seen
    print(
        f"saved {ckpt} (state dict, model keys); exported {step_path.name} (streaming) and "
        f"{seq_path.name}: onnxruntime test acc {onnx_acc:.3f}",
        flush=True,
    )
    return {
        "checkpoint": str(ckpt),
        "onnx_step": str(step_path),
        "onnx_sequence": str(seq_path),
        "onnx_test_acc": onnx_acc,
    }


if __name__ == "__main__":
    main()
