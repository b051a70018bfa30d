"""Input encoders that turn a static input into a ``[T, N, *]`` sequence, chunk by chunk.

A converted SNN (see :func:`snncompile.ann2snn.convert`) is driven for ``T`` steps by an encoding
of a static image. Materialising the whole ``[T, N, *]`` input costs ``T`` times the image; the
encoders here generate any window ``[t0, t1)`` of the sequence on demand, so
:func:`snncompile.runtime.chunked.stream` can consume them with memory that does not grow with
``T``.

Reproducibility: :class:`PoissonEncoder` draws the random numbers of step ``t`` from a generator
seeded with ``(seed, t)``. Step ``t`` therefore gets the same spikes whatever chunk it falls in:
the sequence depends on ``seed`` only, never on the chunk size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["Encoder", "ConstantEncoder", "PoissonEncoder", "BernoulliEncoder"]


def _check_window(t0: int, t1: int, owner: str) -> None:
    if not (0 <= t0 <= t1):
        raise ValueError(f"{owner}: need 0 <= t0 <= t1, got t0={t0}, t1={t1}.")


class Encoder:
    """Base class: an encoder maps a static input ``x`` of shape ``[N, *]`` to a spike train.

    Subclasses implement :meth:`steps`, which returns the window ``[t0, t1)`` of the encoded
    sequence as a tensor of shape ``[t1 - t0, N, *]``. :meth:`chunks` and ``__call__`` are built on
    it.
    """

    def steps(self, x: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """Return steps ``t0 .. t1-1`` of the encoding of ``x``, shape ``[t1 - t0, N, *]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement steps()")

    def chunks(self, x: torch.Tensor, T: int, chunk_size: int) -> Iterator[torch.Tensor]:
        """Yield the ``T``-step encoding of ``x`` as consecutive chunks of ``chunk_size`` steps.

        The last chunk is shorter when ``chunk_size`` does not divide ``T``.
        """
        if T < 0 or chunk_size < 1:
            raise ValueError(
                f"{type(self).__name__}.chunks: need T >= 0 and chunk_size >= 1, got T={T}, "
                f"chunk_size={chunk_size}."
            )
        for t0 in range(0, T, chunk_size):
            yield self.steps(x, t0, min(T, t0 + chunk_size))

    def __call__(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """Return the whole ``T``-step encoding of ``x`` as one ``[T, N, *]`` tensor."""
        return self.steps(x, 0, T)


class ConstantEncoder(Encoder):
    """Constant-current encoding: every step receives the analog input ``x`` unchanged.

    This is the usual input of a converted ANN: the first layer integrates the exact image at
    every step, so the only approximation error comes from the spiking hidden layers. The window
    is an ``expand`` of ``x`` (no copy); modules that need contiguous memory copy one chunk only.
    """

    def steps(self, x: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """Return ``x`` repeated ``t1 - t0`` times along a new leading time dimension."""
        _check_window(t0, t1, type(self).__name__)
        return x.unsqueeze(0).expand(t1 - t0, *x.shape)


class PoissonEncoder(Encoder):
    """Rate (Bernoulli) encoding: step ``t`` fires where ``u_t < x``, ``u_t ~ U[0, 1)``.

    ``x`` is clamped to ``[0, 1]`` and read as a firing probability per step, so the mean of the
    spike train converges to ``x``. With a fixed ``seed`` the spikes are reproducible and
    independent of how the time axis is chunked: step ``t`` always uses a CPU generator seeded
    with ``seed * 1_000_003 + t`` (its own stream, so no step's draws depend on another's).

    Args:
        seed: seed of the spike train; two encoders with the same seed give the same spikes.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._gen = torch.Generator(device="cpu")

    def _uniform(self, t: int, shape: torch.Size) -> torch.Tensor:
        self._gen.manual_seed((self.seed * 1_000_003 + t) & 0x7FFF_FFFF_FFFF_FFFF)
        return torch.rand(shape, generator=self._gen)

    def steps(self, x: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """Return the Bernoulli spikes of steps ``t0 .. t1-1`` with the dtype/device of ``x``."""
        _check_window(t0, t1, type(self).__name__)
        p = x.detach().clamp(0.0, 1.0).to("cpu", torch.float32)
        out = torch.empty((t1 - t0, *x.shape), dtype=x.dtype if x.is_floating_point() else
                          torch.float32)
        for i, t in enumerate(range(t0, t1)):
            out[i] = (self._uniform(t, p.shape) < p).to(out.dtype)
        return out.to(x.device)

    def __repr__(self) -> str:
        return f"PoissonEncoder(seed={self.seed})"


#: Alias: a per-step Bernoulli draw is what SNN papers call Poisson rate coding.
BernoulliEncoder = PoissonEncoder
