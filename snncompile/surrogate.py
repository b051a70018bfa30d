r"""Surrogate gradient functions, compatible with SpikingJelly 2.0.0's ``surrogate`` module.

A spiking neuron fires with the Heaviside step ``S = heaviside(x)`` (``heaviside(0) = 1``), whose
derivative is zero almost everywhere. A *surrogate* keeps the step in the forward pass and uses
the derivative ``g'(x)`` of a smooth step-like *primitive* ``g`` in the backward pass.

Every class here is an :class:`torch.nn.Module` built as ``Cls(alpha=..., spiking=True)``
(multi-parameter classes take their own parameters first, like SpikingJelly). With
``spiking=True`` ``forward`` is the Heaviside step with the surrogate gradient; with
``spiking=False`` it is the smooth primitive itself (autograd differentiates it normally).

Each class has two class-level functions:

* ``primitive(x, *params)``: the smooth function ``g`` (torch ops, any float dtype);
* ``derivative(x, *params)``: ``g'`` — the surrogate gradient used in backward.

The surrogates that fused kernels support (Sigmoid, ATan, PiecewiseQuadratic, PiecewiseExp,
SoftSign, SuperSpike, Erf; :class:`ExpressionSurrogate`) define their math once, as expressions
in :mod:`snncompile.dynamics.surrogates`: their ``primitive`` and ``derivative`` are those
expressions rendered to PyTorch, the same expressions the C/CUDA kernels are generated from
(PiecewiseQuadratic's primitive is the exception, see the class). The other classes write their
formulas in PyTorch here.

``params`` is the tuple of the module's parameters in declaration order (``module.params``;
names in ``module.param_names``). One shared :class:`torch.autograd.Function` applies
``grad_output * derivative(x, *params)`` in backward. The derivative expressions follow
SpikingJelly's arithmetic form so gradients agree with it to float rounding: bit for bit where
SpikingJelly multiplies ``grad_output`` in last (ATan, PiecewiseExp, PiecewiseQuadratic, ...);
its Sigmoid, SoftSign, SuperSpike and Erf multiply it in first, so those differ by an ulp.

Formulas (``|x|`` is ``abs(x)``, ``s(z) = 1 / (1 + exp(-z))``; defaults in brackets; the names
are SpikingJelly's):

=======================  ===========================================  =============================
class [defaults]         primitive ``g(x)``                           derivative ``g'(x)``
=======================  ===========================================  =============================
Sigmoid [alpha=4]        ``s(alpha x)``                               ``alpha s (1 - s)``,
                                                                      ``s = s(alpha x)``
ATan [alpha=2]           ``atan(pi alpha x / 2) / pi + 1/2``          ``(alpha/2) /
                                                                      (1 + (pi alpha x / 2)^2)``
PiecewiseQuadratic [1]   0 (x < -1/alpha); 1 (x > 1/alpha); else      ``max(0, alpha - alpha^2|x|)``
                         ``-alpha^2 x|x|/2 + alpha x + 1/2``          (0 for ``|x| > 1/alpha``)
PiecewiseExp [alpha=1]   ``exp(alpha x)/2`` (x < 0),                  ``(alpha/2) exp(-alpha|x|)``
                         ``1 - exp(-alpha x)/2`` (x >= 0)
SoftSign [alpha=2]       ``(softsign(alpha x) + 1) / 2``              ``1 / (2 alpha
                                                                      (1/alpha + |x|)^2)``
SuperSpike [alpha=1]     ``alpha x / (1 + |x|) + 1/2`` (*)            ``alpha / (1 + |x|)^2``
Erf [alpha=2]            ``erfc(-alpha x) / 2``                       ``(alpha/sqrt(pi))
                                                                      exp(-(alpha x)^2)``
PiecewiseLeakyReLU       ``c x + c w`` (x < -w); ``x/(2w) + 1/2``     ``1/(2w)`` (``|x| < w``),
[w=1, c=0.01]            (``|x| <= w``); ``c x - c w + 1`` (x > w)    else ``c``
QPseudoSpike [alpha=2]   ``(1 - 2x/(alpha-1))^(1-alpha) / 2`` (x<0),  ``(1 + 2|x|/(alpha-1))
                         ``1 - (1 + 2x/(alpha-1))^(1-alpha) / 2``     ^(-alpha)``
LeakyKReLU [leak=0,k=1]  ``leak x`` (x < 0), ``k x`` (x >= 0)         ``leak`` (x < 0), ``k``
S2NN [alpha=4, beta=1]   ``s(alpha x)`` (x < 0),                      ``alpha s (1 - s)`` (x < 0),
                         ``beta log(|x + 1| + 1e-5) + 1/2``           ``beta / (x + 1)``
NonzeroSignLogAbs [1]    ``sign(x) log(alpha|x| + 1)``, sign(0) = 1   ``1 / (1/alpha + |x|)``
Rect [alpha=1]           ``clamp(alpha x + 1/2, 0, 1)``               ``alpha`` on
                                                                      ``|x| < 1/(2 alpha)``, else 0
=======================  ===========================================  =============================

(*) SpikingJelly 2.0.0 defines no primitive for ``SuperSpike`` (it raises). Ours is the
antiderivative of its surrogate gradient, shifted so ``g(0) = 1/2``; it tends to
``1/2 +- alpha``, so it is a proper 0-to-1 step only for ``alpha = 1/2``. For ``S2NN`` the
``1e-5`` inside SpikingJelly's primitive makes ``g'`` differ from ``derivative`` by ~1e-5 for
``x >= 0``; we keep both as SpikingJelly defines them.

``FakeNumericalGradient``, ``SquarewaveFourierSeries``, ``LogTailedReLU`` and the pass-through /
multi-level surrogates are not provided.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "heaviside",
    "SurrogateFunctionBase",
    "ExpressionSurrogate",
    "SurrogateSpike",
    "Sigmoid",
    "ATan",
    "PiecewiseQuadratic",
    "PiecewiseExp",
    "SoftSign",
    "SuperSpike",
    "Erf",
    "PiecewiseLeakyReLU",
    "QPseudoSpike",
    "LeakyKReLU",
    "S2NN",
    "NonzeroSignLogAbs",
    "Rect",
    "SURROGATES",
]


def heaviside(x: torch.Tensor) -> torch.Tensor:
    """Return the Heaviside step of ``x`` in ``x``'s dtype: 1 where ``x >= 0`` (so ``heaviside(0)
    = 1``, SpikingJelly's tie rule), 0 elsewhere."""
    return (x >= 0).to(x)


class SurrogateSpike(torch.autograd.Function):
    """Heaviside forward, ``grad_output * derivative(x, *params)`` backward.

    One Function serves every surrogate class: ``apply(x, surrogate_cls, params)`` where
    ``surrogate_cls`` is a :class:`SurrogateFunctionBase` subclass and ``params`` its parameter
    tuple. Only ``x`` is saved for backward.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, surrogate_cls: type, params: tuple) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.surrogate_cls = surrogate_cls
        ctx.params = params
        return heaviside(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (x,) = ctx.saved_tensors
        return grad_output * ctx.surrogate_cls.derivative(x, *ctx.params), None, None


class SurrogateFunctionBase(nn.Module):
    """Base class of the surrogate modules.

    Subclasses set ``param_names`` (their constructor parameters besides ``spiking``, in order)
    and implement the static methods :meth:`primitive` and :meth:`derivative`. Parameters are
    stored as plain float attributes (``self.alpha``) like SpikingJelly's.
    """

    param_names: ClassVar[tuple[str, ...]] = ("alpha",)

    def __init__(self, spiking: bool = True, **params: float) -> None:
        super().__init__()
        if set(params) != set(self.param_names):
            raise TypeError(
                f"{type(self).__name__}: expected parameters {self.param_names}, "
                f"got {tuple(params)}."
            )
        if not isinstance(spiking, bool):
            raise TypeError(
                f"{type(self).__name__}: spiking must be a bool (True: Heaviside forward with "
                f"surrogate backward; False: the smooth primitive), got {spiking!r}."
            )
        self.spiking = spiking
        for name in self.param_names:
            value = params[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"{type(self).__name__}: {name} must be a real number, got {value!r}."
                )
            setattr(self, name, value)

    # -- the uniform surface --------------------------------------------------------------------
    @property
    def params(self) -> tuple[float, ...]:
        """The parameter values in ``param_names`` order (the ``*params`` of ``derivative``)."""
        return tuple(getattr(self, name) for name in self.param_names)

    @staticmethod
    def primitive(x: torch.Tensor, *params: float) -> torch.Tensor:
        """The smooth step-like function whose derivative is the surrogate gradient."""
        raise NotImplementedError

    @staticmethod
    def derivative(x: torch.Tensor, *params: float) -> torch.Tensor:
        """The surrogate gradient ``d primitive / dx`` used in the spiking backward."""
        raise NotImplementedError

    # -- SpikingJelly-compatible API ------------------------------------------------------------
    def set_spiking_mode(self, spiking: bool) -> None:
        """Switch between the spiking forward (True) and the smooth primitive forward (False)."""
        self.spiking = spiking

    @classmethod
    def spiking_function(cls, x: torch.Tensor, *params: float) -> torch.Tensor:
        """Heaviside of ``x`` with this class's surrogate gradient in backward."""
        return SurrogateSpike.apply(x, cls, tuple(params))

    @classmethod
    def primitive_function(cls, x: torch.Tensor, *params: float) -> torch.Tensor:
        """Alias of :meth:`primitive` under SpikingJelly's name."""
        return cls.primitive(x, *params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spiking:
            return SurrogateSpike.apply(x, type(self), self.params)
        return type(self).primitive(x, *self.params)

    def extra_repr(self) -> str:
        parts = [f"{name}={getattr(self, name)}" for name in self.param_names]
        parts.append(f"spiking={self.spiking}")
        return ", ".join(parts)


def _check_positive(owner: str, name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{owner}: {name} must be > 0, got {value!r}.")


@functools.lru_cache(maxsize=512)
def _rendered(form: str, part: int, params: tuple[float, ...]) -> Callable[[Any], Any]:
    """The primitive (``part=0``) or derivative (``part=1``) of expression form ``form`` with
    ``params`` folded in, as a Python function of ``x`` (compiled once per parameter tuple)."""
    from snncompile.codegen.eager import expression_function
    from snncompile.dynamics.expr import var
    from snncompile.dynamics.surrogates import SURROGATE_EXPRESSIONS

    builder = SURROGATE_EXPRESSIONS[form][part]
    what = "primitive" if part == 0 else "derivative"
    return expression_function(builder(var("x"), *params), f"{form}_{what}")


def _numbers(cls: type, what: str, params: tuple[Any, ...]) -> tuple[float, ...]:
    for p in params:
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(
                f"{cls.__name__}.{what}: parameters must be Python numbers (they are folded into "
                f"the surrogate's expression, as SpikingJelly folds them), got {p!r}."
            )
    return tuple(params)


class ExpressionSurrogate(SurrogateFunctionBase):
    """A surrogate whose math is its expression form in :mod:`snncompile.dynamics.surrogates`.

    :meth:`primitive` and :meth:`derivative` are the form's expressions rendered to PyTorch by
    the eager renderer (:func:`snncompile.codegen.eager.expression_function`), the same
    expressions the fused C/CUDA kernels are generated from; their results are bit-identical to
    SpikingJelly 2.0.0's hand-written formulas (tests/test_surrogate.py). ``form`` names the
    expression form; fusion matches the class itself by identity
    (:func:`snncompile.dynamics.surrogates.registered_form`).
    """

    form: ClassVar[str]

    @classmethod
    def primitive(cls, x: torch.Tensor, *params: float) -> torch.Tensor:  # type: ignore[override]
        """The smooth step ``g(x)``, rendered from the expression form."""
        return _rendered(cls.form, 0, _numbers(cls, "primitive", params))(x)

    @classmethod
    def derivative(cls, x: torch.Tensor, *params: float) -> torch.Tensor:  # type: ignore[override]
        """The surrogate gradient ``g'(x)``, rendered from the expression form."""
        return _rendered(cls.form, 1, _numbers(cls, "derivative", params))(x)


class Sigmoid(ExpressionSurrogate):
    """Sigmoid surrogate: ``g(x) = sigmoid(alpha x)``, ``g'(x) = alpha s (1 - s)``."""

    form = "Sigmoid"

    def __init__(self, alpha: float = 4.0, spiking: bool = True) -> None:
        super().__init__(spiking=spiking, alpha=alpha)


class ATan(ExpressionSurrogate):
    """Arctangent surrogate: ``g(x) = atan(pi alpha x / 2) / pi + 1/2``."""

    form = "ATan"

    def __init__(self, alpha: float = 2.0, spiking: bool = True) -> None:
        super().__init__(spiking=spiking, alpha=alpha)


class PiecewiseQuadratic(ExpressionSurrogate):
    """Piecewise quadratic surrogate: a triangle-shaped gradient of half-width ``1/alpha``."""

    form = "PiecewiseQuadratic"

    def __init__(self, alpha: float = 1.0, spiking: bool = True) -> None:
        super().__init__(spiking=spiking, alpha=alpha)
        _check_positive("PiecewiseQuadratic", "alpha", alpha)

    # The primitive stays written out: it is SpikingJelly's masked sum ``above + inside * (...)``
    # with ``x.square() * x.sign()``, whose rounding differs from the expression form's
    # ``where(...)`` with ``x * |x|`` for most alphas (and gives NaN at +-inf, as SpikingJelly
    # does). The derivative is the expression form's (bit-identical to the formula it replaced).
    @staticmethod
    def primitive(x: torch.Tensor, alpha: float) -> torch.Tensor:  # type: ignore[override]
        above = (x > (1.0 / alpha)).to(x)
        inside = (x.abs() <= (1.0 / alpha)).to(x)
        return above + inside * (-(alpha**2) / 2 * x.square() * x.sign() + alpha * x + 0.5)


class PiecewiseExp(ExpressionSurrogate):
    """Piecewise exponential surrogate: ``g'(x) = (alpha/2) exp(-alpha |x|)``."""

    form = "PiecewiseExp"

    def __init__(self, alpha: float = 1.0, spiking: bool = True) -> None:
        super().__init__(spiking=spiking, alpha=alpha)


class SoftSign(ExpressionSurrogate):
    """Soft-sign surrogate: ``g(x) = (softsign(alpha x) + 1) / 2``."""

    form = "SoftSign"

    def __init__(self, alpha: float = 2.0, spiking: bool = True) -> None:
        super().__init__(spiking=spiking, alpha=alpha)
        _check_positive("SoftSign", "alpha", alpha)


class SuperSpike(ExpressionSurrogate):
    """SuperSpike surrogate: ``g'(x) = alpha / (1 + |x|)^2``.

    SpikingJelly defines no primitive for it; ours is ``alpha x / (1 + |x|) + 1/2``, the
    antiderivative of the gradient with ``g(0) = 1/2`` (see the module docstring).
    """

    form = "SuperSpike"

    def __init__(self, alpha: float = 1.0, spiking: bool = True) -> None:
        super().__init__(spiking=spiking, alpha=alpha)


class Erf(ExpressionSurrogate):
    """Gauss error function surrogate: ``g(x) = erfc(-alpha x) / 2``."""

    form = "Erf"

    def __init__(self, alpha: float = 2.0, spiking: bool = True) -> None:
        super().__init__(spiking=spiking, alpha=alpha)


class PiecewiseLeakyReLU(SurrogateFunctionBase):
    """Piecewise leaky ReLU surrogate: slope ``1/(2w)`` on ``|x| < w``, ``c`` outside."""

    param_names = ("w", "c")

    def __init__(self, w: float = 1.0, c: float = 0.01, spiking: bool = True) -> None:
        super().__init__(spiking=spiking, w=w, c=c)
        _check_positive("PiecewiseLeakyReLU", "w", w)

    @staticmethod
    def primitive(x: torch.Tensor, w: float, c: float) -> torch.Tensor:
        below = (x < -w).to(x)
        above = (x > w).to(x)
        inside = torch.ones_like(x) - below - above
        if c == 0:
            return inside * (x / (2 * w) + 1 / 2) + above
        cw = c * w
        return below * (c * x + cw) + above * (c * x + (-cw + 1)) + inside * (x / (2 * w) + 1 / 2)

    @staticmethod
    def derivative(x: torch.Tensor, w: float, c: float) -> torch.Tensor:
        inside = x.abs() < w
        return torch.full_like(x, c).masked_fill(inside, 1 / (2 * w))


class QPseudoSpike(SurrogateFunctionBase):
    """q-PseudoSpike surrogate: ``g'(x) = (1 + 2|x|/(alpha - 1))^(-alpha)`` (tail fatness alpha)."""

    def __init__(self, alpha: float = 2.0, spiking: bool = True) -> None:
        super().__init__(spiking=spiking, alpha=alpha)
        if not alpha > 1:
            raise ValueError(f"QPseudoSpike: alpha must be > 1, got {alpha!r}.")

    @staticmethod
    def primitive(x: torch.Tensor, alpha: float) -> torch.Tensor:
        nonneg = heaviside(x)
        sign = nonneg * 2.0 - 1.0
        return nonneg - sign * (0.5 * ((1.0 + 2.0 / (alpha - 1.0) * x * sign).pow(1.0 - alpha)))

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return (1 + 2 / (alpha - 1) * x.abs()).pow(-alpha)


class LeakyKReLU(SurrogateFunctionBase):
    """Leaky k-ReLU surrogate: gradient ``k`` for ``x >= 0`` and ``leak`` for ``x < 0``."""

    param_names = ("leak", "k")

    def __init__(self, leak: float = 0.0, k: float = 1.0, spiking: bool = True) -> None:
        super().__init__(spiking=spiking, leak=leak, k=k)

    @staticmethod
    def primitive(x: torch.Tensor, leak: float, k: float) -> torch.Tensor:
        nonneg = (x >= 0.0).to(x)
        return (leak * (1.0 - nonneg) + k * nonneg) * x

    @staticmethod
    def derivative(x: torch.Tensor, leak: float, k: float) -> torch.Tensor:
        nonneg = (x >= 0.0).to(x)
        return nonneg * k + (1.0 - nonneg) * leak


class S2NN(SurrogateFunctionBase):
    """S2NN surrogate: sigmoid gradient for ``x < 0``, ``beta / (x + 1)`` for ``x >= 0``."""

    param_names = ("alpha", "beta")

    def __init__(self, alpha: float = 4.0, beta: float = 1.0, spiking: bool = True) -> None:
        super().__init__(spiking=spiking, alpha=alpha, beta=beta)

    @staticmethod
    def primitive(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        return torch.where(
            x < 0.0, torch.sigmoid(x * alpha), beta * torch.log((x + 1.0).abs() + 1e-5) + 0.5
        )

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        s = torch.sigmoid(alpha * x)
        return torch.where(x < 0.0, alpha * s * (1.0 - s), beta / (x + 1.0))


class NonzeroSignLogAbs(SurrogateFunctionBase):
    """Nonzero-sign log-abs surrogate: ``g'(x) = 1 / (1/alpha + |x|)`` (unbounded primitive)."""

    def __init__(self, alpha: float = 1.0, spiking: bool = True) -> None:
        super().__init__(spiking=spiking, alpha=alpha)
        _check_positive("NonzeroSignLogAbs", "alpha", alpha)

    @staticmethod
    def primitive(x: torch.Tensor, alpha: float) -> torch.Tensor:
        sign = heaviside(x) * 2.0 - 1.0
        return sign * (alpha * sign * x + 1).log()

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return 1 / (1 / alpha + x.abs())


class Rect(SurrogateFunctionBase):
    """Rectangular surrogate: gradient ``alpha`` on ``|x| < 1/(2 alpha)``, 0 elsewhere."""

    def __init__(self, alpha: float = 1.0, spiking: bool = True) -> None:
        super().__init__(spiking=spiking, alpha=alpha)
        _check_positive("Rect", "alpha", alpha)

    @staticmethod
    def primitive(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return torch.clamp(alpha * x + 0.5, min=0.0, max=1.0)

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return alpha * (x.abs() < 0.5 / alpha).to(x)


#: Every surrogate class by name (what frontends and exporters look names up in).
SURROGATES: dict[str, type[SurrogateFunctionBase]] = {
    cls.__name__: cls
    for cls in (
        Sigmoid,
        ATan,
        PiecewiseQuadratic,
        PiecewiseExp,
        SoftSign,
        SuperSpike,
        Erf,
        PiecewiseLeakyReLU,
        QPseudoSpike,
        LeakyKReLU,
        S2NN,
        NonzeroSignLogAbs,
        Rect,
    )
}
