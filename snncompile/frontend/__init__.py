"""snncompile.frontend: torch.fx capture of SNN models into the IR.

:func:`trace_model` (also ``snncompile.trace``) reads snncompile's modules, plain ``torch.nn``
layers, ``torch.nn.functional`` calls and tensor methods, residual adds and concatenations,
flatten/reshape/view with symbolic batch sizes, and SpikingJelly 2.0.0 ``activation_based``
models. Untraceable submodules become opaque leaves (or an error with ``strict=True``).
:func:`register_module_rule` / :func:`register_neuron_type` /
:func:`register_neuron_subclass` extend the mapping.
"""

from snncompile.frontend.rules import (
    Kind,
    ModuleInfo,
    classify_call,
    classify_module,
    register_module_rule,
    register_neuron_subclass,
    register_neuron_type,
)
from snncompile.frontend.trace import (
    FrontendError,
    SNNTracer,
    copy_sharing_parameters,
    merge_time,
    model_step_mode,
    split_time,
    trace_model,
)

__all__ = [
    "FrontendError",
    "Kind",
    "ModuleInfo",
    "SNNTracer",
    "classify_call",
    "classify_module",
    "copy_sharing_parameters",
    "merge_time",
    "model_step_mode",
    "register_module_rule",
    "register_neuron_subclass",
    "register_neuron_type",
    "split_time",
    "trace_model",
]
