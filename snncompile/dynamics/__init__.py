"""Neuron dynamics as small expression trees (charge, fire, reset, surrogate) and their
symbolically derived BPTT backward. See :mod:`snncompile.dynamics.expr` for the expression IR and
:mod:`snncompile.dynamics.neuron` for neuron definitions; ``docs/kernels.md`` shows how to define a
new neuron and get fused kernels for it."""

from snncompile.dynamics.expr import (
    Expr,
    Op,
    abs_,
    atan,
    const,
    detach,
    erf,
    erfc,
    exp,
    grad,
    heaviside,
    log,
    maximum,
    minimum,
    param,
    sigmoid,
    sqrt,
    tanh,
    var,
    where,
)
from snncompile.dynamics.neuron import (
    NeuronDynamics,
    StepProgram,
    from_spec,
    if_dynamics,
    lif_dynamics,
    plif_dynamics,
)
from snncompile.dynamics.surrogates import (
    SURROGATE_EXPRESSIONS,
    SurrogateExpr,
    register_surrogate,
    surrogate_expr,
)

__all__ = [
    "Expr",
    "Op",
    "NeuronDynamics",
    "StepProgram",
    "SURROGATE_EXPRESSIONS",
    "SurrogateExpr",
    "abs_",
    "atan",
    "const",
    "detach",
    "erf",
    "erfc",
    "exp",
    "from_spec",
    "grad",
    "heaviside",
    "if_dynamics",
    "lif_dynamics",
    "log",
    "maximum",
    "minimum",
    "param",
    "plif_dynamics",
    "register_surrogate",
    "sigmoid",
    "sqrt",
    "surrogate_expr",
    "tanh",
    "var",
    "where",
]
