"""Unsupervised STDP on scikit-learn's 8x8 digits: a winner-take-all layer learns digit prototypes.

Network: Poisson-encoded pixels -> ``layer.Linear(64, K, bias=False)`` -> LIF neurons with
winner-take-all lateral inhibition (per sample and step, only the most driven spiking neuron keeps
its spike and every membrane is reset) and an adaptive threshold (homeostasis: a neuron that wins
often is handicapped, so all neurons get to learn). ``snncompile.learning.STDPLearner`` records the
synapse input and the WTA output through its monitors; ``learner.step(on_grad=True)`` writes
``-delta_w`` to ``weight.grad`` and a plain SGD step applies it. Soft weight bounds
(``f_post(w) = A+ (w_max - w)``, ``f_pre(w) = A- w``) and a per-neuron weight normalisation keep
the weights in range. No labels are used for learning.

Evaluation: the learned layer's spike counts on held-out digits are read out by a logistic
regression fitted on the training digits' spike counts, compared with the same readout on the
same network trained with plasticity off (the same random initial weights; the adaptive
thresholds still adapt, so only STDP differs). The learned receptive fields are saved to
``outputs/stdp_receptive_fields.png``.

Run: ``.venv/bin/python examples/stdp_digits.py`` (about half a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn

from snncompile import layer, neuron
from snncompile.learning import STDPLearner

RATE = 0.5  # spike probability per step of a white pixel
W_TOTAL = 12.0  # sum of each neuron's incoming weights after normalisation
W_MAX = 1.0  # soft upper bound of a weight


class WinnerTakeAll(nn.Module):
    """LIF neurons with winner-take-all lateral inhibition and an adaptive threshold.

    Per sample and step, among the neurons that fire only the one with the largest input current
    keeps its spike; when anything fires, every membrane of that sample is reset (the inhibition).
    ``theta`` is subtracted from the input current, grows by ``theta_plus`` per win and decays by
    the factor ``theta_decay`` per step.
    """

    def __init__(
        self, n_out: int, tau: float, theta_plus: float, theta_decay: float, wta: bool = True
    ) -> None:
        super().__init__()
        self.lif = neuron.LIFNode(tau=tau, v_threshold=1.0, v_reset=0.0)
        self.register_buffer("theta", torch.zeros(n_out))
        self.theta_plus = theta_plus
        self.theta_decay = theta_decay
        self.wta = wta
        self.adapt = True

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        drive = current - self.theta
        spike = self.lif(drive)
        if self.wta:
            fired = spike.sum(1, keepdim=True) > 0
            winner = torch.where(spike > 0, drive, torch.full_like(drive, -torch.inf)).argmax(1)
            spike = torch.zeros_like(spike).scatter_(1, winner[:, None], 1.0) * fired
            self.lif.v = self.lif.v * (~fired)  # lateral inhibition: reset the whole sample
        if self.adapt:
            self.theta.mul_(self.theta_decay).add_(self.theta_plus * spike.sum(0))
        return spike

    def reset(self) -> None:
        """Reset the membranes (the adaptive threshold persists across samples)."""
        self.lif.reset()


def poisson(images: torch.Tensor, steps: int, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Rate-code images in [0, 1] as ``[T, N, 64]`` Bernoulli spikes with ``p = rate * pixel``."""
    probs = (images * rate).expand(steps, *images.shape)
    return (torch.rand(probs.shape, generator=gen) < probs).float()


def normalize_(weight: torch.Tensor, total: float) -> None:
    """Scale each neuron's incoming weights to sum to ``total`` (keeps competition fair)."""
    weight.clamp_(min=0.0)
    weight.mul_(total / weight.sum(1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def spike_counts(
    fc: nn.Linear,
    out: WinnerTakeAll,
    images: torch.Tensor,
    steps: int,
    rate: float,
    gen: torch.Generator,
    repeats: int,
) -> np.ndarray:
    """Spike counts of the output layer (WTA off, thresholds frozen) per image, ``[N, K]``."""
    wta, adapt = out.wta, out.adapt
    out.wta, out.adapt = False, False
    counts = torch.zeros(images.shape[0], fc.out_features)
    for _ in range(repeats):
        out.reset()
        for x_t in poisson(images, steps, rate, gen):
            counts += out(fc(x_t))
    out.wta, out.adapt = wta, adapt
    return counts.numpy()


def readout_accuracy(
    train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray
) -> float:
    """Test accuracy of a logistic regression on standardised log spike counts."""
    scaler = StandardScaler().fit(np.log1p(train))
    clf = LogisticRegression(max_iter=1000)
    clf.fit(scaler.transform(np.log1p(train)), y_train)
    return float(clf.score(scaler.transform(np.log1p(test)), y_test))


def save_fields(weight: torch.Tensor, path: Path) -> None:
    """Save the receptive fields (one 8x8 weight image per output neuron) as a PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = weight.shape[0]
    cols = int(np.ceil(np.sqrt(k)))
    rows = int(np.ceil(k / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.1))
    for i, ax in enumerate(np.asarray(axes).ravel()):
        ax.axis("off")
        if i < k:
            ax.imshow(weight[i].reshape(8, 8).numpy(), cmap="gray_r", interpolation="nearest")
    fig.suptitle("STDP receptive fields (load_digits, unsupervised)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(
    x_train: torch.Tensor, args: argparse.Namespace, lr: float, gen: torch.Generator
) -> tuple[layer.Linear, WinnerTakeAll, torch.Tensor]:
    """Run unsupervised STDP (``lr=0``: the no-plasticity control) and return the trained parts."""
    torch.manual_seed(args.seed)  # the same random initial weights for every run
    fc = layer.Linear(64, args.neurons, bias=False)
    with torch.no_grad():
        fc.weight.uniform_(0.0, 1.0)
        normalize_(fc.weight, W_TOTAL)
    out = WinnerTakeAll(args.neurons, tau=4.0, theta_plus=0.05, theta_decay=0.999)
    # Soft bounds: potentiation shrinks near W_MAX, depression shrinks near 0.
    learner = STDPLearner(
        "s", fc, out, tau_pre=4.0, tau_post=4.0,
        f_pre=lambda w: 0.4 * w, f_post=lambda w: W_MAX - w,
    )
    opt = torch.optim.SGD(fc.parameters(), lr=lr)
    wins = torch.zeros(args.neurons)
    for _ in range(args.epochs):
        order = torch.randperm(x_train.shape[0], generator=gen)
        for b in range(0, len(order), args.batch):
            images = x_train[order[b : b + args.batch]]
            out.reset()
            learner.reset()  # traces restart with every presentation
            with torch.no_grad():
                for x_t in poisson(images, args.steps, RATE, gen):
                    wins += out(fc(x_t)).sum(0)
            if lr == 0.0:
                learner.reset()  # control run: homeostasis only, no weight change
                continue
            opt.zero_grad()
            learner.step(on_grad=True)  # weight.grad = -delta_w (summed over the batch)
            opt.step()  # w += lr * delta_w
            with torch.no_grad():
                fc.weight.clamp_(0.0, W_MAX)
                normalize_(fc.weight, W_TOTAL)
    learner.close()
    return fc, out, wins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16, help="time steps per presentation")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/stdp_receptive_fields.png"))
    args = parser.parse_args()
    start = time.perf_counter()
    # Tiny tensors: one thread avoids thread-pool overhead (and contention on shared machines).
    torch.set_num_threads(1)
    threadpool_limits(1)

    digits = load_digits()
    x_all = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        x_all, digits.target, test_size=0.3, random_state=args.seed, stratify=digits.target
    )
    results = {}
    for name, lr in (("STDP-learned weights", args.lr), ("random weights (no STDP)", 0.0)):
        gen = torch.Generator().manual_seed(args.seed)
        fc, out, wins = train(x_train, args, lr, gen)
        if lr > 0:
            save_fields(fc.weight.detach(), args.out)
            print(f"STDP: {int((wins > 0).sum())}/{args.neurons} neurons won at least once")
        tr = spike_counts(fc, out, x_train, args.steps, RATE, gen, repeats=2)
        te = spike_counts(fc, out, x_test, args.steps, RATE, gen, repeats=2)
        results[name] = readout_accuracy(tr, y_train, te, y_test)
    pixels = readout_accuracy(x_train.numpy(), y_train, x_test.numpy(), y_test)
    print(f"readout accuracy (logistic regression on spike counts, {len(y_test)} test digits):")
    for name, acc in results.items():
        print(f"  {name:<26} {acc:.3f}")
    print(f"  (same readout on raw pixels, for reference: {pixels:.3f})")
    print(f"receptive fields saved to {args.out} ({time.perf_counter() - start:.1f} s total)")


if __name__ == "__main__":
    main()
