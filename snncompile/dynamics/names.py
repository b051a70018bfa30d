"""Names that generated C/CUDA source uses as identifiers.

A neuron's name becomes part of its kernels' symbol names, ``param()`` and ``var()`` names and
surrogate names appear in the generated source, so every such name must be a plain C identifier:
``[A-Za-z_][A-Za-z0-9_]*`` and not a C or C++ keyword (CUDA sources are C++). Anything else could
change the meaning of the generated program, e.g. a name that closes a function and adds a
constructor to the library. :func:`check_identifier` is called where names enter (expression
leaves, neuron definitions, surrogate registration) and again by the renderer.
"""

from __future__ import annotations

import re

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: C11 keywords and C++ keywords (CUDA device code is compiled as C++).
KEYWORDS: frozenset[str] = frozenset(
    """
    auto break case char const continue default do double else enum extern float for goto if
    inline int long register restrict return short signed sizeof static struct switch typedef
    union unsigned void volatile while _Alignas _Alignof _Atomic _Bool _Complex _Generic
    _Imaginary _Noreturn _Static_assert _Thread_local
    alignas alignof and and_eq asm bitand bitor bool catch char8_t char16_t char32_t class
    compl concept consteval constexpr constinit const_cast co_await co_return co_yield decltype
    delete dynamic_cast explicit export false friend mutable namespace new noexcept not not_eq
    nullptr operator or or_eq private protected public reinterpret_cast requires static_assert
    static_cast template this thread_local throw true try typeid typename using virtual wchar_t
    xor xor_eq
    """.split()
)


def is_identifier(name: object) -> bool:
    """True when ``name`` is a string usable as a C/CUDA identifier."""
    return isinstance(name, str) and bool(IDENTIFIER.fullmatch(name)) and name not in KEYWORDS


def check_identifier(name: object, what: str, part: bool = False) -> str:
    """Return ``name`` when it is a valid C identifier, else raise ``ValueError``.

    ``what`` says where the name comes from (e.g. ``"param() name"``) for the error message.
    ``part=True`` is for names that only appear inside a longer identifier (a neuron's name in
    ``snn_<name>_<hash>_forward``), where a keyword such as ``if`` is harmless.
    """
    if is_identifier(name) or (part and isinstance(name, str) and IDENTIFIER.fullmatch(name)):
        return name  # type: ignore[return-value]
    if isinstance(name, str) and name in KEYWORDS:
        why = "it is a C/C++ keyword"
    else:
        why = "it is not of the form [A-Za-z_][A-Za-z0-9_]*"
    raise ValueError(
        f"snncompile.dynamics: the {what} {name!r} cannot be used: it becomes an identifier in "
        f"generated C/CUDA code and {why}. Use letters, digits and underscores only (not "
        "starting with a digit), e.g. 'my_neuron'."
    )
