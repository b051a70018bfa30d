"""The neuron-configuration grid shared by the kernel tests (C, CUDA on the host, CUDA on a GPU).

IF / LIF / PLIF x decay_input x v_reset {0, None (soft), -0.3} x detach_reset, each with one of
the seven fusable surrogates in turn (every surrogate appears; ``SNNCOMPILE_FULL_GRID=1`` crosses
every configuration with every surrogate).
"""

from __future__ import annotations

import itertools
import os

from snncompile.dynamics import (
    NeuronDynamics,
    SurrogateExpr,
    if_dynamics,
    lif_dynamics,
    plif_dynamics,
)
from snncompile.dynamics.surrogates import DEFAULT_ALPHA

ALPHAS = dict(DEFAULT_ALPHA)  # the fusable surrogates, each with SpikingJelly's default alpha
SURROGATES = list(ALPHAS)
FULL = os.environ.get("SNNCOMPILE_FULL_GRID") == "1"

Config = tuple[str, bool, float | None, bool, str]  # kind, decay_input, v_reset, detach, surrogate


def _configs() -> list[Config]:
    base = [
        (kind, di, vr, dr)
        for kind, di, vr, dr in itertools.product(
            ["if", "lif", "plif"], [True, False], [0.0, None, -0.3], [False, True]
        )
        if not (kind == "if" and not di)  # IF has no decay_input
    ]
    if FULL:
        return [(*b, sg) for b in base for sg in SURROGATES]
    return [(*b, SURROGATES[i % len(SURROGATES)]) for i, b in enumerate(base)]


CONFIGS: list[Config] = _configs()


def config_id(c: Config) -> str:
    """A short pytest id for a configuration."""
    kind, di, vr, dr, sg = c
    return f"{kind}-di{int(di)}-vr{vr}-dr{int(dr)}-{sg}"


def dynamics_for(kind: str, di: bool, vr: float | None, dr: bool, sg: str) -> NeuronDynamics:
    """The dynamics of one configuration (LIF with tau = 2)."""
    s = SurrogateExpr(sg, (ALPHAS[sg],))
    if kind == "if":
        return if_dynamics(v_reset=vr, detach_reset=dr, surrogate=s)
    if kind == "lif":
        return lif_dynamics(2.0, di, v_reset=vr, detach_reset=dr, surrogate=s)
    return plif_dynamics(di, v_reset=vr, detach_reset=dr, surrogate=s)
