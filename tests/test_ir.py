"""IR tests: op groups, graph editing and use-def, verifier errors, golden printer, views."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from torch import nn

import snncompile
from snncompile import ir, layer, neuron
from snncompile.ir import Graph, IRVerificationError, Layout, Node, Op, OpGroup, Ref, verify


def test_op_groups() -> None:
    assert Op.CONV2D.group is OpGroup.SYNAPSE
    assert Op.NEURON.group is OpGroup.NEURON and Op.FUSED_NEURON.group is OpGroup.NEURON
    assert Op.MERGE_TIME.group is OpGroup.TIME and Op.CHUNK.group is OpGroup.TIME
    assert Op.INPUT.group is OpGroup.IO
    assert len({op.label for op in Op}) == len(Op)


def _tiny() -> Graph:
    g = Graph({"step_mode": "m", "T": 2, "N": 3})
    g.add(Node("x", Op.INPUT, layout=Layout.SEQ, shape=(2, 3, 4)))
    g.add(Node("x_flat", Op.MERGE_TIME, ("x",), layout=Layout.FLAT, shape=(6, 4)))
    g.add(
        Node(
            "relu",
            Op.ELEMENTWISE,
            ("x_flat",),
            {"args": (Ref(0),), "kwargs": {}},
            layout=Layout.FLAT,
            target=torch.relu,
            shape=(6, 4),
        )
    )
    g.add(Node("relu_seq", Op.SPLIT_TIME, ("relu",), layout=Layout.SEQ, shape=(2, 3, 4)))
    g.add(Node("output", Op.OUTPUT, ("relu_seq",), {"args": (Ref(0),)}, layout=Layout.NONE))
    return g


def test_graph_use_def_and_editing() -> None:
    g = _tiny()
    verify(g)
    assert [u.name for u in g.users("x_flat")] == ["relu"]
    assert g.users_map()["relu_seq"] == [g.output_node]
    g.add(
        Node("neg", Op.ELEMENTWISE, ("relu",), layout=Layout.FLAT, target=torch.neg), after="relu"
    )
    assert g.index("neg") == g.index("relu") + 1
    assert g.replace_all_uses("relu", "neg", exclude=("neg",)) == 1
    assert g["relu_seq"].inputs == ("neg",)
    with pytest.raises(ValueError, match="still used by %neg"):
        g.remove("relu")
    verify(g)
    assert g.fresh_name("relu") == "relu_1"
    c = g.copy()
    c["neg"].attrs["k"] = 1
    assert "k" not in g["neg"].attrs


@pytest.mark.parametrize(
    ("breaker", "node", "pattern"),
    [
        (lambda g: setattr(g["relu"], "inputs", ("nope",)), "relu", "input %nope is not defined"),
        (lambda g: setattr(g["x_flat"], "inputs", ("relu",)), "x_flat", "defined after its reader"),
        (lambda g: setattr(g["x_flat"], "layout", Layout.SEQ), "x_flat", "MERGE_TIME must read"),
        (lambda g: setattr(g["relu"], "layout", Layout.SEQ), "relu", "layout flat but runs in"),
        (lambda g: setattr(g["x_flat"], "shape", (5, 4)), "x_flat", "does not match"),
        (lambda g: g["relu"].attrs.update(args=(Ref(3),)), "relu", "references input #3"),
        (lambda g: setattr(g["x"], "layout", Layout.STEP), "x_flat", "still has step values"),
        (
            lambda g: (
                setattr(g["relu"], "op", Op.NEURON),
                setattr(g["relu"], "module", nn.ReLU()),
            ),
            "relu",
            "neuron must run on step or seq",
        ),
        (lambda g: setattr(g["relu"], "op", Op.OPAQUE_MODULE), "relu", "needs a module"),
    ],
)
def test_verify_names_the_node(breaker, node: str, pattern: str) -> None:
    g = _tiny()
    breaker(g)
    with pytest.raises(IRVerificationError, match=pattern) as info:
        verify(g)
    assert info.value.node == node
    assert f"%{node}" in str(info.value)


def test_verify_output_rules() -> None:
    g = _tiny()
    g.add(Node("late", Op.ELEMENTWISE, ("x_flat",), layout=Layout.FLAT, target=torch.neg))
    with pytest.raises(IRVerificationError, match="OUTPUT node must be the last"):
        verify(g)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = layer.Conv2d(1, 2, 3, padding=1, bias=False)
        self.bn = layer.BatchNorm2d(2)
        self.sn = neuron.LIFNode(tau=2.0)
        self.flat = layer.Flatten()
        self.fc = layer.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.sn(self.bn(self.conv(x))))) + 0.5


GOLDEN_TRACE = """\
graph(step_mode=s, mode=train, T=2, N=3):
  %x : step[3, 1, 4, 4] = INPUT()
  %conv : step[3, 2, 4, 4] = CONV2D(%x) {path='conv', in_channels=1, out_channels=2, \
kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=1, bias=False}
  %bn : step[3, 2, 4, 4] = BATCHNORM(%conv) {path='bn', num_features=2, eps=1e-05, affine=True}
  %sn : step[3, 2, 4, 4] = NEURON(%bn) {path='sn', kind='lif', v_threshold=1.0, v_reset=0.0, \
tau=2.0, decay_input=True, detach_reset=False, surrogate='Sigmoid'}
  %flat : step[3, 32] = FLATTEN(%sn) {path='flat', start_dim=1, end_dim=-1}
  %fc : step[3, 3] = LINEAR(%flat) {path='fc', in_features=32, out_features=3, bias=True}
  %add : step[3, 3] = ADD[operator.add](%fc, 0.5)
  return %add"""

GOLDEN_INFERENCE = """\
graph(step_mode=s, mode=inference, backend=auto, T=2, N=3):
  %x : seq[2, 3, 1, 4, 4] = INPUT()
  %x_flat : flat[6, 1, 4, 4] = MERGE_TIME(%x)
  %conv : flat[6, 2, 4, 4] = CONV2D(%x_flat) {path='conv', in_channels=1, out_channels=2, \
kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=1, bias=True, folded_bn='bn'}
  %bn_seq : seq[2, 3, 2, 4, 4] = SPLIT_TIME(%conv)
  %sn : seq[2, 3, 2, 4, 4] = NEURON(%bn_seq) {path='sn', kind='lif', v_threshold=1.0, \
v_reset=0.0, tau=2.0, decay_input=True, detach_reset=False, surrogate='Sigmoid'}
  %sn_flat : flat[6, 2, 4, 4] = MERGE_TIME(%sn)
  %flat : flat[6, 32] = FLATTEN(%sn_flat) {path='flat', start_dim=1, end_dim=-1}
  %fc : flat[6, 3] = LINEAR(%flat) {path='fc', in_features=32, out_features=3, bias=True}
  %add : flat[6, 3] = ADD[operator.add](%fc, 0.5)
  %add_seq : seq[2, 3, 3] = SPLIT_TIME(%add)
  return %add_seq"""


def test_golden_printer() -> None:
    x = torch.rand(2, 3, 1, 4, 4)
    assert str(snncompile.trace(Net(), x)) == GOLDEN_TRACE
    # Only this file's passes (stage passes such as kernel fusion have their own tests).
    compiled = snncompile.optimize(Net().eval(), x, passes=["remove_dead_ops", "fold_batchnorm"])
    assert str(compiled.graph) == GOLDEN_INFERENCE


def test_views(tmp_path) -> None:
    g = snncompile.trace(Net(), torch.rand(2, 3, 1, 4, 4))
    nxg = g.to_networkx()
    assert isinstance(nxg, nx.DiGraph)
    assert list(nx.topological_sort(nxg))[0] == "x"
    assert nxg.nodes["sn"]["op"] == "NEURON" and nxg.nodes["sn"]["layout"] == "step"
    assert set(nxg.edges) == {(i, n.name) for n in g for i in n.inputs}
    dot = g.to_dot()
    assert dot.startswith("digraph snn {") and '"bn" -> "sn";' in dot
    for suffix in ("png", "svg"):
        path = g.draw(str(tmp_path / f"g.{suffix}"))
        data = open(path, "rb").read()
        assert len(data) > 500
        assert data[:4] == b"\x89PNG" if suffix == "png" else b"<svg" in data[:2000]
    with pytest.raises(ValueError, match="unsupported format"):
        g.draw(str(tmp_path / "g.gif"))
    assert ir.format_node(g["sn"]).startswith("%sn : step[3, 2, 4, 4] = NEURON(%bn)")


def test_toposort_repairs_order_and_detects_cycles() -> None:
    nodes = _tiny().nodes
    g = Graph()
    for node in [nodes[0], nodes[3], nodes[1], nodes[2], nodes[4]]:
        g.add(node)  # relu_seq now comes before the relu it reads
    with pytest.raises(IRVerificationError, match="defined after its reader"):
        verify(g)
    g.toposort()
    verify(g)
    assert [n.name for n in g] == ["x", "x_flat", "relu", "relu_seq", "output"]
    g["x_flat"].inputs = ("relu",)
    with pytest.raises(ValueError, match="cycle"):
        g.toposort()
