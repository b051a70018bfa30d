"""Names spliced into generated C/CUDA must be plain C identifiers.

A neuron name, a ``param()``/``var()`` name or a surrogate name that is not an identifier could
rewrite the generated program; the crafted neuron name below used to add a constructor to the
kernel library (code run on ``dlopen``). Now every such name is refused where it enters, with an
error that names it.
"""

from __future__ import annotations

import pytest

from snncompile.codegen.kernels import generate
from snncompile.codegen.render import C_TARGET, render_block
from snncompile.dynamics import NeuronDynamics, SurrogateExpr, param, var
from snncompile.dynamics.expr import Expr, Op
from snncompile.dynamics.names import check_identifier, is_identifier
from snncompile.dynamics.surrogates import SURROGATE_EXPRESSIONS, register_surrogate

CRAFTED = (
    "x_forward(void){} __attribute__((constructor)) static void evil(void)"
    "{ __builtin_trap(); } void y"
)
BAD_SYNTAX = [
    CRAFTED,
    "z(void); __attribute__((constructor)) void c",
    "",
    "1abc",
    "a-b",
    "a b",
    "a*/b",
    "näme",
    "a\nb",
    None,
    3,
]
KEYWORDS = ["int", "float", "class", "return"]
BAD = BAD_SYNTAX + KEYWORDS


@pytest.mark.parametrize("name", BAD_SYNTAX)
def test_bad_neuron_names_are_refused(name):
    v, x = var("v"), var("x")
    with pytest.raises(ValueError, match="neuron dynamics name") as info:
        NeuronDynamics(name, v + x)
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("name", BAD)
def test_bad_param_and_var_names_are_refused(name):
    with pytest.raises(ValueError, match="param\\(\\) name"):
        param(name)
    with pytest.raises(ValueError, match="var\\(\\) name"):
        var(name)


def test_bad_surrogate_names_are_refused():
    with pytest.raises(ValueError, match="surrogate name"):
        register_surrogate("Mine*/ int evil; /*", lambda x, a: x, lambda x, a: x)
    assert "Mine*/ int evil; /*" not in SURROGATE_EXPRESSIONS


def test_leaves_built_by_hand_are_checked_by_the_renderer():
    leaf = Expr(Op.PARAM, (), "w; system(0)")  # bypasses param()
    with pytest.raises(ValueError, match="w; system"):
        render_block(C_TARGET, {"y": leaf + 1.0})
    with pytest.raises(ValueError, match="kernel output name"):
        render_block(C_TARGET, {"y = 0; int z": var("x") + 1.0})


def test_good_names_still_generate_kernels():
    assert all(is_identifier(n) for n in ["lif", "_x", "my_neuron2", "Int", "w0"])
    # A neuron name is only part of a symbol (snn_<name>_<hash>_forward): 'if' is fine there.
    assert NeuronDynamics("if", var("v") + var("x")).name == "if"
    assert check_identifier("tau_m", "param() name") == "tau_m"
    v, x = var("v"), var("x")
    d = NeuronDynamics(
        "my_neuron2", v + x * param("gain_in"), surrogate=SurrogateExpr("ATan", (2.0,))
    )
    src = generate(d, "c")
    assert src.name.startswith("snn_my_neuron2_")
    # The description comment never contains a comment terminator.
    header = src.source.split("\n", 1)[0]
    assert header.startswith("/*") and header.count("*/") == 1 and header.endswith("*/")
