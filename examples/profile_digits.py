"""Profile the digits demo CNN: per-layer firing rates, SOPs, MACs, energy, and three plots.

Trains the spiking CNN of ``examples/digits_demo.py`` for a few epochs on scikit-learn's 8x8
digits, then runs :func:`snncompile.profile` on a batch of test images, once on the eager model
and once on its inference compile, prints both tables, and writes three PNGs to ``--out``:

* ``profile_raster.png`` -- spike raster of the first LIF layer for one image;
* ``profile_rates.png`` -- firing rate per neuron layer;
* ``profile_membrane.png`` -- membrane traces of a few output neurons.

Run ``python examples/profile_digits.py --out docs`` to regenerate the pictures in the docs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import digits_demo  # noqa: E402  (the example next to this file)

import snncompile  # noqa: E402
from snncompile import functional, plot  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, profile and plot; return the two profiles' ``as_dict()`` and the written files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    parser.add_argument("--T", type=int, default=8, help="time steps (default 8)")
    parser.add_argument("--images", type=int, default=64, help="test images to profile")
    parser.add_argument("--out", default="profile_plots", help="directory for the PNGs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train_loader, test_loader = digits_demo.load_data(args.seed, batch_size=32)
    model = digits_demo.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(args.epochs):
        digits_demo.train_one_epoch(
            model, train_loader, optimizer, args.T, torch.device("cpu"),
            desc=f"epoch {epoch + 1}/{args.epochs}",
        )
    accuracy = digits_demo.evaluate(model, test_loader, args.T, torch.device("cpu"))
    print(f"test accuracy after {args.epochs} epochs: {accuracy:.3f}")

    images, _ = next(iter(test_loader))
    images = images[: args.images]
    x = images.unsqueeze(0).repeat(args.T, 1, 1, 1, 1)  # direct encoding, [T, N, 1, 8, 8]
    model.eval()
    eager = snncompile.profile(model, x, record=True)
    print(eager)
    print()
    compiled = snncompile.optimize(model, x, mode="inference")
    prof_c = snncompile.profile(compiled, x)
    print(prof_c)
    functional.reset_net(model)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first, last = eager.neuron_layers[0].name, eager.neuron_layers[-1].name
    written = []
    for filename, ax in (
        ("profile_raster.png", plot.spike_raster(eager, first, sample=0)),
        ("profile_rates.png", plot.firing_rates(eager)),
        ("profile_membrane.png",
         plot.membrane_traces(eager, last, neurons=(0, 3, 7), threshold=1.0)),
    ):
        path = out / filename
        ax.figure.savefig(path, dpi=110)
        written.append(str(path))
        print(f"wrote {path}")
    return {"eager": eager.as_dict(), "compiled": prof_c.as_dict(), "files": written,
            "accuracy": accuracy}


if __name__ == "__main__":
    main()
