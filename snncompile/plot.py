"""Pictures of what a spiking network did, drawn from a :class:`snncompile.profiling.Profile`.

Run :func:`snncompile.profile` with ``record=True`` first, then:

* :func:`spike_raster` -- one dot per spike of one layer (time step x neuron) for one sample;
* :func:`firing_rates` -- the mean firing rate of every neuron layer, as bars;
* :func:`membrane_traces` -- the membrane potential (after reset) of a few neurons over time,
  with the spike times marked (eager models; compiled modules keep no per-step membrane).

Every function draws into ``ax`` when given (a matplotlib ``Axes``), otherwise into a new
``matplotlib.figure.Figure`` (no pyplot, so no GUI backend is needed), and returns the ``Axes``;
save the picture with ``ax.figure.savefig('raster.png')``. Needs matplotlib:
``pip install snncompile[plot]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from snncompile.profiling import Profile

__all__ = ["firing_rates", "membrane_traces", "spike_raster"]


def _axes(ax: Any, figsize: tuple[float, float]) -> Any:
    if ax is not None:
        return ax
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            f"snncompile.plot needs matplotlib ({err}); install it with "
            f"`pip install snncompile[plot]` or `pip install matplotlib`"
        ) from None
    fig = Figure(figsize=figsize, layout="constrained")
    return fig.subplots()


def _sample(values: torch.Tensor, sample: int, name: str) -> torch.Tensor:
    """``[T, N, *]`` -> ``[T, neurons]`` for one sample."""
    if not 0 <= sample < values.shape[1]:
        raise IndexError(f"plot: sample {sample} out of range for {name!r} (N={values.shape[1]})")
    return values[:, sample].reshape(values.shape[0], -1).float()


def spike_raster(
    profile: Profile,
    layer: str,
    *,
    sample: int = 0,
    max_neurons: int | None = 256,
    ax: Any = None,
) -> Any:
    """Draw the spikes of neuron layer ``layer`` for one ``sample``: a dot at (step, neuron).

    ``max_neurons`` keeps the first that many neurons of the (flattened) layer; ``None`` keeps
    all. Returns the matplotlib ``Axes``.
    """
    s = _sample(profile.spikes(layer), sample, layer)
    if max_neurons is not None:
        s = s[:, :max_neurons]
    t_idx, n_idx = torch.nonzero(s, as_tuple=True)
    ax = _axes(ax, (6.0, 3.5))
    ax.scatter(t_idx.numpy(), n_idx.numpy(), s=6, marker="|", color="black", linewidths=1.0)
    ax.set_xlim(-0.5, s.shape[0] - 0.5)
    ax.set_ylim(-0.5, s.shape[1] - 0.5)
    ax.set_xlabel("time step")
    ax.set_ylabel("neuron")
    rate = float(s.mean()) if s.numel() else 0.0
    ax.set_title(f"spikes of layer {layer} (sample {sample}, rate {rate:.3f})")
    return ax


def firing_rates(profile: Profile, *, ax: Any = None) -> Any:
    """Draw the mean firing rate (spikes per neuron and step) of every neuron layer as bars."""
    rows = profile.neuron_layers
    if not rows:
        raise ValueError("plot: the profile has no neuron layers")
    ax = _axes(ax, (6.0, 3.0))
    names = [r.name for r in rows]
    rates = [r.firing_rate for r in rows]
    bars = ax.bar(range(len(rows)), rates, color="tab:blue")
    ax.bar_label(bars, labels=[f"{r:.3f}" for r in rates], fontsize=8)
    ax.set_xticks(range(len(rows)), names)
    ax.set_xlabel("neuron layer")
    ax.set_ylabel("firing rate")
    ax.set_ylim(0, max(max(rates) * 1.25, 0.05))
    ax.set_title(f"firing rate per layer (T={profile.T}, N={profile.N})")
    return ax


def membrane_traces(
    profile: Profile,
    layer: str,
    *,
    neurons: Sequence[int] = (0, 1, 2),
    sample: int = 0,
    threshold: float | None = None,
    ax: Any = None,
) -> Any:
    """Draw the membrane (after reset) of ``neurons`` of ``layer`` over time for one ``sample``.

    Spikes are marked with a dot at the top of each trace's step; ``threshold`` draws a dashed
    line (for example the layer's ``v_threshold``). Needs a profile of an eager model recorded
    with ``record=True``.
    """
    v = _sample(profile.membrane(layer), sample, layer)
    s = _sample(profile.spikes(layer), sample, layer)
    bad = [n for n in neurons if not 0 <= n < v.shape[1]]
    if bad:
        raise IndexError(f"plot: neurons {bad} out of range for {layer!r} ({v.shape[1]} neurons)")
    ax = _axes(ax, (6.0, 3.0))
    steps = range(v.shape[0])
    for n in neurons:
        (line,) = ax.plot(steps, v[:, n].numpy(), marker=".", label=f"neuron {n}")
        fired = torch.nonzero(s[:, n]).flatten().numpy()
        top = threshold if threshold is not None else float(v[:, n].max())
        ax.scatter(fired, [top] * len(fired), marker="v", color=line.get_color(), s=25)
    if threshold is not None:
        ax.axhline(threshold, linestyle="--", color="gray", linewidth=1, label="threshold")
    ax.set_xlabel("time step")
    ax.set_ylabel("membrane v (after reset)")
    ax.set_title(f"membrane of layer {layer} (sample {sample}; triangles: spikes)")
    ax.legend(fontsize=8, loc="best")
    return ax
