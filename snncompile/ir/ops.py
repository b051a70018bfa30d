"""The op vocabulary of the SNN IR: one :class:`Op` enum whose members carry an :class:`OpGroup`.

Passes dispatch on ``node.op`` (an enum member) or ``node.op.group``; nothing compares op names as
strings. :class:`Layout` names the time layout of the value a node produces:

* ``Layout.STEP`` -- ``[N, *]``: one time step (a single-step model before lowering);
* ``Layout.SEQ``  -- ``[T, N, *]``: a whole sequence (neurons in multi-step form, sequence-level
  torch code of multi-step models, per-step loops);
* ``Layout.FLAT`` -- ``[T*N, *]``: time folded into the batch so a stateless op runs once over all
  steps (what step-mode lowering produces);
* ``Layout.NONE`` -- no time layout (constants, parameters, python scalars computed from shapes).
"""

from __future__ import annotations

import enum


class OpGroup(enum.Enum):
    """The coarse family of an :class:`Op`."""

    IO = "io"
    SYNAPSE = "synapse"
    NEURON = "neuron"
    TIME = "time"


class Layout(enum.Enum):
    """The time layout of a value (see the module docstring)."""

    STEP = "step"
    SEQ = "seq"
    FLAT = "flat"
    NONE = "none"


class Op(enum.Enum):
    """Every operation the IR knows. ``op.group`` gives its :class:`OpGroup`."""

    # -- io --
    INPUT = ("input", OpGroup.IO)
    OUTPUT = ("output", OpGroup.IO)
    CONSTANT = ("constant", OpGroup.IO)  # a parameter/buffer/tensor attribute read (fx get_attr)
    # -- synapse: stateless per time step --
    CONV1D = ("conv1d", OpGroup.SYNAPSE)
    CONV2D = ("conv2d", OpGroup.SYNAPSE)
    LINEAR = ("linear", OpGroup.SYNAPSE)
    BATCHNORM = ("batchnorm", OpGroup.SYNAPSE)
    MAXPOOL = ("maxpool", OpGroup.SYNAPSE)
    AVGPOOL = ("avgpool", OpGroup.SYNAPSE)
    ADAPTIVE_AVGPOOL = ("adaptive_avgpool", OpGroup.SYNAPSE)
    FLATTEN = ("flatten", OpGroup.SYNAPSE)
    RESHAPE = ("reshape", OpGroup.SYNAPSE)
    ADD = ("add", OpGroup.SYNAPSE)
    MUL = ("mul", OpGroup.SYNAPSE)
    CAT = ("cat", OpGroup.SYNAPSE)
    DROPOUT = ("dropout", OpGroup.SYNAPSE)
    IDENTITY = ("identity", OpGroup.SYNAPSE)
    ELEMENTWISE = ("elementwise", OpGroup.SYNAPSE)  # known pointwise torch function/module
    FUNCTION = ("function", OpGroup.SYNAPSE)  # any other torch function/method fx recorded
    OPAQUE_MODULE = ("opaque_module", OpGroup.SYNAPSE)  # a module run as a black box
    OPAQUE_FUNCTION = ("opaque_function", OpGroup.SYNAPSE)  # a non-torch callable run as is
    # -- neuron --
    NEURON = ("neuron", OpGroup.NEURON)
    FUSED_NEURON = ("fused_neuron", OpGroup.NEURON)
    # -- time --
    MERGE_TIME = ("merge_time", OpGroup.TIME)  # [T, N, *] -> [T*N, *]
    SPLIT_TIME = ("split_time", OpGroup.TIME)  # [T*N, *] -> [T, N, *]
    SEQ_LOOP = ("seq_loop", OpGroup.TIME)  # reserved: an explicit loop over T around a subgraph
    CHUNK = ("chunk", OpGroup.TIME)  # reserved: chunked forward over T (later issue)

    def __init__(self, label: str, group: OpGroup) -> None:
        self.label = label
        self.group = group

    def __repr__(self) -> str:
        return f"Op.{self.name}"


#: Ops whose node runs an ``nn.Module`` with parameters that batchnorm can be folded into.
FOLDABLE_INTO_BN = frozenset({Op.CONV1D, Op.CONV2D, Op.LINEAR})

#: Synapse ops that never mix samples of a batch (safe to run over ``[T*N, *]``) by construction.
#: Other ops are checked against shape metadata by the lowering pass.
POINTWISE_SYNAPSE = frozenset(
    {
        Op.CONV1D,
        Op.CONV2D,
        Op.LINEAR,
        Op.MAXPOOL,
        Op.AVGPOOL,
        Op.ADAPTIVE_AVGPOOL,
        Op.FLATTEN,
        Op.ADD,
        Op.MUL,
        Op.CAT,
        Op.IDENTITY,
        Op.ELEMENTWISE,
    }
)
