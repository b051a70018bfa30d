"""The model's state-dict names on a compiled module (:class:`StateNames`).

A :class:`~snncompile.runtime.compiled.CompiledModule` holds the model's tensors under the names
of its generated code (``gm._0.weight``); a checkpoint has to use the model's names
(``0.weight``) so that it loads into the model, into a compiled module, or into a fresh model in
another process alike. :class:`StateNames` is the translation, built once when the module is
compiled from the model (``source``) it was traced from:

* every tensor of ``source.state_dict()`` that the generated code holds (the same tensor object:
  parameters and buffers are shared, not copied) is found under its local name(s) -- one tensor
  may sit under several local names, its *aliases*;
* a tensor the generated code does not hold is kept in the compiled module's ``_sources``
  submodule (same object as the model's), so the state dict still has every model key. That is
  the case in inference compiles for a conv/linear layer and the batchnorm folded into it: the
  generated code runs a new layer with ``W' = W * s`` and ``b' = (b - mean) * s + beta``
  (``s = gamma / sqrt(var + eps)``, see :mod:`snncompile.passes.fold_batchnorm`), and the
  original ``W``, ``b``, ``gamma``, ``beta``, ``mean`` and ``var`` stay the source of truth;
* such *derived* tensors (the folded ``W'`` and ``b'``) never appear in a state dict: loading one
  recomputes them from the loaded originals, with the same float64 arithmetic as the pass;
* anything else the generated code holds that is not model state (a constant captured from the
  model's code) is not in the state dict either, and loading leaves it as it is.

``state_dict()`` then lists exactly the keys of ``source.state_dict()``, in the same order, and
``load_state_dict`` takes them (strict by default: a missing or unexpected key, or a shape that
differs, is an error that names the model's key). A state dict written with the local names by an
older snncompile (keys starting ``gm.``) still loads.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from snncompile.passes.fold_batchnorm import fold_tensors

#: The compiled module's children that hold model state (their keys are never shown).
_LOCAL_ROOTS = ("gm", "_sources")


class Sources(nn.Module):
    """Model tensors that the generated code does not read (folded away); see module doc."""


@dataclasses.dataclass(frozen=True)
class FoldRecord:
    """One folded layer: where its derived tensors live and the model keys they come from."""

    weight: tuple[str, ...]  # local keys of the folded weight (every alias)
    bias: tuple[str, ...]  # local keys of the folded bias
    sources: dict[str, str | None]  # role -> model key (weight, bias, mean, var, gamma, beta)
    eps: float
    what: str  # "%_0 (model layers '0' + '1')", for error messages


def _is_local(key: str, prefix: str) -> bool:
    return any(key.startswith(f"{prefix}{root}.") for root in _LOCAL_ROOTS)


class StateNames:
    """The map between a compiled module's local state-dict keys and its model's keys."""

    def __init__(self, compiled: nn.Module, gm: nn.Module, graph: Any, source: nn.Module) -> None:
        model_sd = source.state_dict(keep_vars=True)
        self.metadata: dict[str, dict[str, Any]] = {
            k: dict(v) for k, v in getattr(model_sd, "_metadata", {}).items()
        }
        by_id: dict[int, list[str]] = {}
        for key, tensor in gm.state_dict(keep_vars=True).items():
            by_id.setdefault(id(tensor), []).append(f"gm.{key}")
        self.model_keys: list[str] = list(model_sd)
        self.local: dict[str, str] = {}  # model key -> its first local key
        self.aliases: dict[str, tuple[str, ...]] = {}  # model key -> every local key
        sources = Sources()
        for i, (key, tensor) in enumerate(model_sd.items()):
            found = by_id.get(id(tensor))
            if found:
                self.local[key], self.aliases[key] = found[0], tuple(found)
                continue
            attr = f"t{i}"
            if isinstance(tensor, nn.Parameter):
                sources.register_parameter(attr, tensor)
            else:
                sources.register_buffer(attr, tensor)
            self.local[key], self.aliases[key] = f"_sources.{attr}", (f"_sources.{attr}",)
        self.sources = sources if len(sources.state_dict()) else None
        self.folds, self.unresolved = self._folds(gm, graph, source, set(self.model_keys))

    @staticmethod
    def _folds(
        gm: nn.Module, graph: Any, source: nn.Module, keys: set[str]
    ) -> tuple[list[FoldRecord], list[str]]:
        """The folded layers of ``graph`` and the ones whose model tensors were not found."""
        names_of: dict[int, list[str]] = {}
        for name, module in gm.named_modules():
            names_of.setdefault(id(module), []).append(f"gm.{name}")
        folds: list[FoldRecord] = []
        unresolved: list[str] = []
        for node in graph:
            bn_path = node.attrs.get("folded_bn")
            if bn_path is None or node.module is None:
                continue
            layer_path = node.attrs.get("path")
            where = names_of.get(id(node.module), [])
            what = f"%{node.name} (model layers {layer_path!r} + {bn_path!r})"
            try:
                layer = source.get_submodule(str(layer_path))
                bn = source.get_submodule(str(bn_path))
            except (AttributeError, TypeError):
                layer = bn = None
            roles = {
                "weight": f"{layer_path}.weight",
                "bias": f"{layer_path}.bias" if getattr(layer, "bias", None) is not None else None,
                "mean": f"{bn_path}.running_mean",
                "var": f"{bn_path}.running_var",
                "gamma": f"{bn_path}.weight" if getattr(bn, "weight", None) is not None else None,
                "beta": f"{bn_path}.bias" if getattr(bn, "bias", None) is not None else None,
            }
            if layer is None or bn is None or not where or any(
                k is not None and k not in keys for k in roles.values()
            ):
                unresolved.append(what)
                continue
            folds.append(
                FoldRecord(
                    weight=tuple(f"{w}.weight" for w in where),
                    bias=tuple(f"{w}.bias" for w in where),
                    sources=roles,
                    eps=float(bn.eps),
                    what=what,
                )
            )
        return folds, unresolved

    # -- state_dict ---------------------------------------------------------------------------
    def to_model(self, sd: dict[str, Any], prefix: str) -> dict[str, Any]:
        """Rename the local entries of ``sd`` (under ``prefix``) to the model's keys, in place."""
        ours = {k: sd.pop(k) for k in list(sd) if _is_local(k, prefix)}
        for key in self.model_keys:
            sd[prefix + key] = ours[prefix + self.local[key]]
        meta = getattr(sd, "_metadata", None)
        if meta is not None:
            for k in list(meta):
                if any(k == prefix + r or k.startswith(f"{prefix}{r}.") for r in _LOCAL_ROOTS):
                    del meta[k]
            for k, v in self.metadata.items():
                if k:  # the model's root entry is the compiled module's own
                    meta[prefix + k] = dict(v)
        return sd

    # -- load_state_dict ----------------------------------------------------------------------
    def to_local(
        self,
        compiled: nn.Module,
        sd: dict[str, Any],
        prefix: str,
        missing_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Rewrite the model-keyed entries of ``sd`` to local keys, in place (see module doc).

        Missing model keys go to ``missing_keys`` under their model names and keep their current
        values; a shape that differs is reported in ``error_msgs``; derived (folded) tensors are
        recomputed from the loaded values; other local entries keep their current values.
        """
        model_style = any(prefix + k in sd for k in self.model_keys)
        if not model_style and any(_is_local(k, prefix) for k in sd):
            return  # local names (an older snncompile's checkpoint): load them as they are
        current = OrderedDict(nn.Module.state_dict(compiled, keep_vars=True))
        loaded: dict[str, torch.Tensor] = {}
        for key in self.model_keys:
            now = current[self.local[key]]
            full = prefix + key
            if full not in sd:
                missing_keys.append(full)
                value = now
            else:
                value = sd.pop(full)
                if not isinstance(value, torch.Tensor):
                    error_msgs.append(
                        f'While copying the parameter named "{full}", expected torch.Tensor or '
                        f"Tensor-like object from checkpoint but received {type(value)}"
                    )
                    value = now
                elif value.shape != now.shape:
                    error_msgs.append(
                        f"size mismatch for {full}: copying a param with shape {value.shape} "
                        f"from checkpoint, the shape in current model is {now.shape}."
                    )
                    value = now
            loaded[key] = value
            for alias in self.aliases[key]:
                sd[prefix + alias] = value
        derived: set[str] = set()
        for fold in self.folds:
            src = {r: (None if k is None else loaded[k]) for r, k in fold.sources.items()}
            w2, b2 = fold_tensors(
                src["weight"], src["bias"], src["mean"], src["var"], src["gamma"], src["beta"],
                fold.eps,
            )
            for k in fold.weight:
                sd[prefix + k] = w2
                derived.add(k)
            for k in fold.bias:
                sd[prefix + k] = b2
                derived.add(k)
        if self.unresolved:
            error_msgs.append(
                "this inference-mode compiled module folded batchnorms whose original tensors "
                f"it cannot find in the model ({', '.join(self.unresolved)}), so it cannot "
                "recompute them from a state dict: load the state dict into the model and call "
                "snncompile.optimize again."
            )
        covered = {a for aliases in self.aliases.values() for a in aliases} | derived
        for k, v in current.items():
            if k not in covered and prefix + k not in sd:
                sd[prefix + k] = v  # not model state (a captured constant): keep it
