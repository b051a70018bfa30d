"""From training to deployment: checkpoints of compiled modules, the export signature, streaming.

Checkpoints: ``compiled.state_dict()`` has the model's keys, in the model's order, and the same
values; it loads (strictly) into a fresh model, and a model's state dict loads into a compiled
module -- whose outputs then equal those of a compile of the source model -- in train and
inference compiles (batchnorms folded), for snncompile's and SpikingJelly's modules, PLIF's
learnable ``w`` included, and across a fresh process with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import snncompile
from snncompile import functional, layer, neuron

REPO = Path(__file__).resolve().parents[1]


# -- models ---------------------------------------------------------------------------------------
def cnn_bn() -> nn.Module:
    """Conv-BN-LIF CNN (multi-step), input ``[T, N, 1, 8, 8]``."""
    net = nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1, bias=False),
        layer.BatchNorm2d(4),
        neuron.LIFNode(tau=2.0),
        layer.MaxPool2d(2),
        layer.Conv2d(4, 8, 3, padding=1),
        layer.BatchNorm2d(8),
        neuron.ParametricLIFNode(init_tau=3.0),
        layer.Flatten(),
        layer.Linear(8 * 4 * 4, 5),
        neuron.LIFNode(tau=2.0),
    )
    functional.set_step_mode(net, "m")
    return net


def mlp_plif() -> nn.Module:
    """Single-step MLP with a BatchNorm1d and two PLIF neurons, input ``[T, N, 4, 4]``."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(16, 12),
        nn.BatchNorm1d(12),
        neuron.ParametricLIFNode(init_tau=2.5),
        nn.Dropout(0.1),
        nn.Linear(12, 6),
        neuron.ParametricLIFNode(v_reset=None),
    )


def _sj_model() -> nn.Module:
    from spikingjelly.activation_based import functional as sf
    from spikingjelly.activation_based import layer as sl
    from spikingjelly.activation_based import neuron as sn

    net = nn.Sequential(
        sl.Conv2d(1, 4, 3, padding=1),
        sl.BatchNorm2d(4),
        sn.ParametricLIFNode(init_tau=2.0),
        sl.MaxPool2d(2),
        sl.Flatten(),
        sl.Linear(4 * 4 * 4, 5),
        sn.LIFNode(tau=2.0),
    )
    sf.set_step_mode(net, "m")
    return net


SHAPES = {"cnn_bn": (4, 2, 1, 8, 8), "mlp_plif": (4, 2, 4, 4), "sj": (4, 2, 1, 8, 8)}


def _factory(name: str, sj: object = None) -> Callable[[], nn.Module]:
    if name == "sj":
        return _sj_model
    return {"cnn_bn": cnn_bn, "mlp_plif": mlp_plif}[name]


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter and BN statistic values unlike a fresh model's (a 'trained' one)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen) * 0.3)
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        last.bias.add_(1.0)  # enough drive that the output neurons spike
    return model


def _run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    functional.reset_net(module)
    with torch.no_grad():
        out = module(x)
    functional.reset_net(module)
    return out


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The eager output over ``[T, N, ...]`` for single- or multi-step models."""
    functional.reset_net(model)
    torch.manual_seed(0)
    with torch.no_grad():
        if getattr(model[-1], "step_mode", "s") == "m":
            out = model(x)
        else:
            out = torch.stack([model(x[t]) for t in range(x.shape[0])])
    functional.reset_net(model)
    return out


def _assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "inference"])
@pytest.mark.parametrize("name", ["cnn_bn", "mlp_plif", "sj"])
def test_state_dict_round_trips(name: str, mode: str, request: pytest.FixtureRequest) -> None:
    if name == "sj":
        request.getfixturevalue("sj")
    factory = _factory(name)
    x = torch.rand(*SHAPES[name]) * 2
    model = _perturb(factory(), 1)
    if mode == "inference":
        model.eval()
    compiled = snncompile.optimize(model, x, mode=mode, backend="torch")
    ref = _run(compiled, x)

    # 1. compiled -> model keys, values and order
    sd = compiled.state_dict()
    _assert_same_state(sd, model.state_dict())

    # 2. compiled's state dict into a fresh model (strict): the fresh model computes the same
    fresh = factory()
    fresh.load_state_dict(sd)
    if mode == "inference":
        fresh.eval()
    _assert_same_state(fresh.state_dict(), model.state_dict())
    assert torch.equal(_eager(fresh, x), _eager(model, x))

    # 3. a model's state dict into the compiled form of another (fresh) model: same outputs as
    #    compiling the source model, folded batchnorms recomputed from the loaded tensors
    other = factory()
    if mode == "inference":
        other.eval()
    compiled_other = snncompile.optimize(other, x, mode=mode, backend="torch")
    assert not torch.equal(_run(compiled_other, x), ref) or ref.sum() == 0
    result = compiled_other.load_state_dict(model.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same_state(compiled_other.state_dict(), model.state_dict())
    if mode == "train":  # parameters stay shared with the model the compile came from
        _assert_same_state(other.state_dict(), model.state_dict())
    assert torch.equal(_run(compiled_other, x), ref)  # (train mode: BN uses batch statistics)

    # 4. compiled -> compiled
    third = snncompile.optimize(factory().train(mode == "train"), x, mode=mode, backend="torch")
    third.load_state_dict(compiled.state_dict())
    assert torch.equal(_run(third, x), ref)


def test_fused_backend_and_inference_of_a_training_model() -> None:
    """The fused C backend and an inference compile of a training-mode model name keys alike."""
    x = torch.rand(4, 2, 1, 8, 8) * 2
    model = _perturb(cnn_bn(), 2)  # training mode: the inference compile works on an eval copy
    for kwargs in ({"mode": "inference"}, {"mode": "train", "backend": "cpu"}):
        compiled = snncompile.optimize(model, x, **kwargs)
        _assert_same_state(compiled.state_dict(), model.state_dict())
        fresh = snncompile.optimize(cnn_bn(), x, **kwargs)
        fresh.load_state_dict(compiled.state_dict())
        assert torch.equal(_run(fresh, x), _run(compiled, x))


def test_chunked_compile_state_dict() -> None:
    x = torch.rand(8, 2, 4, 4)
    model = _perturb(mlp_plif(), 3).eval()
    compiled = snncompile.optimize(model, x, chunk_size=3)
    _assert_same_state(compiled.state_dict(), model.state_dict())
    fresh = snncompile.optimize(mlp_plif().eval(), x, chunk_size=3)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(_run(fresh, x), _run(compiled, x))


def test_training_updates_show_in_both_state_dicts() -> None:
    x = torch.rand(4, 2, 1, 8, 8) * 2
    model = cnn_bn()
    compiled = snncompile.optimize(model, x)
    opt = torch.optim.SGD(compiled.parameters(), lr=0.5)
    for _ in range(2):
        compiled(x).sum().backward()
        opt.step()
        opt.zero_grad()
        functional.reset_net(compiled)
    _assert_same_state(compiled.state_dict(), model.state_dict())
    assert int(model.state_dict()["1.num_batches_tracked"]) == 2


def test_nested_compiled_module_uses_prefixed_model_keys() -> None:
    x = torch.rand(4, 2, 4, 4)
    model = _perturb(mlp_plif(), 4).eval()
    wrapper = nn.ModuleDict({"net": snncompile.optimize(model, x)})
    sd = wrapper.state_dict()
    assert list(sd) == [f"net.{k}" for k in model.state_dict()]
    other = nn.ModuleDict({"net": snncompile.optimize(mlp_plif().eval(), x)})
    other.load_state_dict(sd)
    assert torch.equal(_run(other["net"], x), _run(wrapper["net"], x))


def test_load_errors_name_the_model_keys() -> None:
    x = torch.rand(4, 2, 1, 8, 8)
    compiled = snncompile.optimize(cnn_bn().eval(), x)
    sd = cnn_bn().state_dict()
    del sd["1.running_var"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as err:
        compiled.load_state_dict(sd)
    msg = str(err.value)
    assert '"1.running_var"' in msg and '"extra.weight"' in msg and "gm." not in msg
    bad = cnn_bn().state_dict()
    bad["0.weight"] = torch.zeros(4, 1, 5, 5)
    with pytest.raises(RuntimeError, match=r"size mismatch for 0\.weight"):
        compiled.load_state_dict(bad)
    before = compiled.state_dict()["0.weight"].clone()
    partial = {"8.bias": torch.ones(5)}
    res = compiled.load_state_dict(partial, strict=False)
    assert "0.weight" in res.missing_keys and "gm" not in " ".join(res.missing_keys)
    assert torch.equal(compiled.state_dict()["0.weight"], before)
    assert torch.equal(compiled.state_dict()["8.bias"], torch.ones(5))


def test_local_keys_of_older_checkpoints_still_load() -> None:
    x = torch.rand(4, 2, 4, 4)
    model = _perturb(mlp_plif(), 5).eval()
    compiled = snncompile.optimize(model, x)
    local = nn.Module.state_dict(compiled)  # the generated code's own names (gm._1.weight, ...)
    assert all(k.startswith(("gm.", "_sources.")) for k in local)
    fresh = snncompile.optimize(mlp_plif().eval(), x)
    fresh.load_state_dict(local)
    assert torch.equal(_run(fresh, x), _run(compiled, x))


def test_deepcopy_of_compiled_keeps_model_keys() -> None:
    x = torch.rand(4, 2, 1, 8, 8)
    model = _perturb(cnn_bn(), 6).eval()
    compiled = snncompile.optimize(model, x)
    clone = copy.deepcopy(compiled)
    _assert_same_state(clone.state_dict(), model.state_dict())


def test_checkpoint_in_a_fresh_process(tmp_path: Path) -> None:
    """Train compiled, save the state dict; another process loads it with weights_only=True."""
    x = torch.rand(4, 2, 1, 8, 8) * 2
    model = cnn_bn()
    compiled = snncompile.optimize(model, x)
    opt = torch.optim.Adam(compiled.parameters(), lr=0.05)
    for _ in range(3):
        compiled(x).mean().backward()
        opt.step()
        opt.zero_grad()
        functional.reset_net(compiled)
    ckpt, data = tmp_path / "ckpt.pt", tmp_path / "data.pt"
    torch.save(compiled.state_dict(), ckpt)
    model.eval()
    torch.save({"x": x, "y": _eager(model, x)}, data)
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(REPO / "tests")!r})
        import snncompile
        from snncompile import functional
        from test_deploy import cnn_bn
        sd = torch.load({str(ckpt)!r}, weights_only=True)
        ref = torch.load({str(data)!r}, weights_only=True)
        model = cnn_bn()
        model.load_state_dict(sd)                         # into a fresh model
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(ref["x"]), ref["y"])
        functional.reset_net(model)
        compiled = snncompile.optimize(cnn_bn().eval(), ref["x"])
        compiled.load_state_dict(sd)                      # into a fresh compiled module
        with torch.no_grad():
            assert torch.equal(compiled(ref["x"]), ref["y"])
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# -- export signature, command line, metadata -------------------------------------------------
def test_export_onnx_takes_model_example_path(tmp_path: Path) -> None:
    x = torch.rand(3, 2, 4, 4)
    model = mlp_plif().eval()
    path = tmp_path / "m.onnx"
    m = snncompile.export_onnx(model, x, path, mode="step")
    assert path.is_file() and m.graph.name == "snncompile_step"
    assert snncompile.export_onnx(model, x).graph.name == "snncompile_sequence"  # path optional
    for old in ((path, x), (str(path), x), (None, x)):
        with pytest.raises(TypeError, match=r"export_onnx\(model, example_input, path=None"):
            snncompile.export_onnx(model, *old, mode="step")
    with pytest.raises(TypeError, match="path must be a file path"):
        snncompile.export_onnx(model, x, 3)


_FACTORY_FILE = '''
from torch import nn
from snncompile import neuron

def net():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), neuron.ParametricLIFNode(init_tau=2.5),
        nn.Linear(12, 6), neuron.LIFNode(),
    )
'''


def _cli_factory(tmp_path: Path) -> Path:
    src = tmp_path / "factory_models.py"
    src.write_text(_FACTORY_FILE)
    return src


def test_cli_export_loads_trained_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from snncompile.cli import main
    from snncompile.onnx_runtime import run_step_model

    src = _cli_factory(tmp_path)
    spec = {"__name__": "factory_models"}
    exec(compile(_FACTORY_FILE, str(src), "exec"), spec)  # noqa: S102
    x = torch.rand(4, 2, 4, 4) * 2
    model = _perturb(spec["net"](), 7)
    with torch.no_grad():
        model[4].bias.add_(1.0)  # enough drive for output spikes
    compiled = snncompile.optimize(model, x, mode="train")
    ckpt = tmp_path / "ckpt.pt"
    torch.save(compiled.state_dict(), ckpt)  # a compiled module's checkpoint, model keys
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "full.pt")
    out = tmp_path / "m.onnx"
    code = main(["export", f"{src}:net", "--weights", str(ckpt), "--input-shape", "4,1,4,4",
                 "--mode", "step", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "weights from" in capsys.readouterr().out
    model.eval()
    ref = _eager(model, x).numpy()
    assert ref.any()
    assert (run_step_model(out, x, threads=1) == ref).all()
    out2 = tmp_path / "m2.onnx"
    code = main(["export", f"{src}:net", "--weights", str(tmp_path / "full.pt"),
                 "--weights-key", "model", "--input-shape", "4,1,4,4", "-o", str(out2)])
    assert code == 0 and out2.is_file()


def test_cli_export_never_unpickles(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from snncompile.cli import main

    src = _cli_factory(tmp_path)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module, not a state dict
    torch.save({"model": {"a": torch.zeros(1)}, "epoch": 1}, tmp_path / "nested.pt")
    torch.save({"0.weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    base = ["export", f"{src}:net", "--input-shape", "4,1,4,4", "-o", str(tmp_path / "x.onnx")]
    cases = {
        "evil.pt": "weights_only=True",
        "module.pt": "never unpickles",
        "nested.pt": "--weights-key",
        "wrong.pt": "does not fit the factory's model",
        "missing.pt": "no such file",
    }
    for name, expect in cases.items():
        assert main([*base, "--weights", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert expect in err and err.count("\n") == 1, (name, err)
    assert not marker.exists()
    import snncompile.export.onnx as onnx_export

    assert not hasattr(onnx_export, "main_export")
    source = (REPO / "snncompile").rglob("*.py")
    assert not any("weights_only=False" in p.read_text() for p in source)


def _with_states(model, value: str):
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for p in m.metadata_props:
        if p.key == "snncompile.states":
            p.value = value
    return m


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("{not json", "is not valid JSON"),
        ('{"a": 1}', "must be a JSON list"),
        ("[1]", "record 0, field '(record)'"),
        ('[{"input": "a", "output": "b", "shape": [-1, 2], "init": 0}]', "field 'node'"),
        ('[{"node": "n", "input": "a", "output": "b", "init": 0}]', "field 'shape'"),
        ('[{"node": "n", "input": "a", "output": "b", "shape": [2, 2], "init": 0}]', "'shape'"),
        ('[{"node": "n", "input": "a", "output": "b", "shape": [-1, 2]}]', "field 'init'"),
        ('[{"node": "n", "input": "a", "output": "b", "shape": [-1], "init": "x"}]', "'init'"),
        ('[{"node": "n", "input": "a", "output": "b", "shape": [-1], "init": 0, "dtype": "q"}]',
         "field 'dtype'"),
    ],
)
def test_bad_states_metadata_names_model_and_field(value: str, expect: str, tmp_path) -> None:
    from snncompile.export.onnx import OnnxMetadataError, onnx_initial_states
    from snncompile.onnx_runtime import StreamingSession

    good = snncompile.export_onnx(mlp_plif().eval(), torch.rand(3, 2, 4, 4), mode="step")
    bad = _with_states(good, value)
    with pytest.raises(OnnxMetadataError, match=re.escape(expect)) as err:
        onnx_initial_states(bad, 2)
    assert "graph 'snncompile_step'" in str(err.value) and "snncompile.states" in str(err.value)
    path = tmp_path / "bad.onnx"
    import onnx

    onnx.save(bad, str(path))
    with pytest.raises(OnnxMetadataError, match=re.escape(str(path))):
        StreamingSession(path)


# -- streaming: T = 1 calls ------------------------------------------------------------------------
class _RateReadout(nn.Module):
    """A multi-step net with a time reduction (needs the time axis: no T = 1 program)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = layer.Linear(16, 6, step_mode="m")
        self.sn = neuron.LIFNode(step_mode="m")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sn(self.fc(x.flatten(2))).mean(0, keepdim=True)


def _stream(compiled: nn.Module, x: torch.Tensor, *, sequence_code: bool = False) -> torch.Tensor:
    """``compiled`` called once per step; ``sequence_code``: through ``gm``, not the T = 1 path."""
    run = compiled.gm if sequence_code else compiled
    functional.reset_net(compiled)
    torch.manual_seed(0)  # the same dropout masks for every run
    with torch.no_grad():
        out = torch.cat([run(x[t : t + 1]) for t in range(x.shape[0])])
    functional.reset_net(compiled)
    return out


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("cnn_bn", {"mode": "inference"}),
        ("cnn_bn", {"mode": "train"}),
        ("cnn_bn", {"mode": "inference", "backend": "cpu"}),
        ("mlp_plif", {"mode": "train"}),  # single-step model: per-step batchnorm statistics
        ("mlp_plif", {"mode": "inference", "backend": "torch"}),
        ("sj", {"mode": "inference"}),
    ],
)
def test_one_step_calls_equal_the_sequence(name, kwargs, request) -> None:
    if name == "sj":
        request.getfixturevalue("sj")
    x = torch.rand(12, 2, *SHAPES[name][2:]) * 3
    model = _perturb(_factory(name)(), 8)
    if kwargs["mode"] == "inference":
        model.eval()
    compiled = snncompile.optimize(model, x[:4], **kwargs)
    assert compiled._one_step is not None
    twin = copy.deepcopy(compiled)  # same parameters and statistics, run through the gm code
    got, want = _stream(compiled, x), _stream(twin, x, sequence_code=True)
    assert want.any() and torch.equal(got, want)
    _assert_same_state(compiled.state_dict(), twin.state_dict())  # BN statistics too
    if kwargs["mode"] == "inference" or name == "mlp_plif":
        # T = 1 calls are the sequence run step by step (a multi-step BN in training mode pools
        # its statistics over the call, so only there do T = 1 calls differ from one T call)
        assert torch.equal(got, _eager(copy.deepcopy(model), x))


def test_one_step_gradients_equal_the_sequence() -> None:
    x = torch.rand(6, 2, 1, 8, 8) * 3
    model = _perturb(cnn_bn(), 9)
    compiled = snncompile.optimize(model, x)
    grads, outs = [], []
    for run in (compiled.gm, compiled):  # the sequence code at T = 1, then the T = 1 program
        functional.reset_net(compiled)
        compiled.zero_grad()
        out = torch.cat([run(x[t : t + 1]) for t in range(6)])  # BPTT through the carried state
        (out * torch.linspace(0, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([p.grad.clone() for p in compiled.parameters()])
        outs.append(out.detach())
    assert torch.equal(*outs) and outs[0].any()
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_one_step_falls_back_where_it_must() -> None:
    from snncompile.monitor import OutputMonitor

    x = torch.rand(5, 2, 4, 4) * 3
    readout = _RateReadout().eval()
    compiled = snncompile.optimize(readout, x)
    assert compiled._one_step is None  # mean over time: runs the sequence code
    with torch.no_grad():
        assert torch.equal(compiled(x[:1]), readout(x[:1]))
    # a monitor hooks a neuron of the compiled module: T = 1 calls still feed it
    model = _perturb(cnn_bn(), 10).eval()
    xs = torch.rand(5, 2, 1, 8, 8) * 3
    compiled = snncompile.optimize(model, xs)
    mon = OutputMonitor(compiled, neuron.LIFNode)
    ref = _run(compiled, xs)
    n_seq = len(mon.records)
    mon.clear_recorded_data()
    assert torch.equal(_stream(compiled, xs), ref)
    assert len(mon.records) == 5 * n_seq
    mon.remove_hooks()
    # store_v_seq on a compiled neuron: the multi-step call keeps v_seq
    sn = next(m for m in compiled.modules() if isinstance(m, neuron.LIFNode))
    sn.store_v_seq = True
    with torch.no_grad():
        compiled(xs[:1])
    assert sn.v_seq is not None and sn.v_seq.shape[0] == 1
    functional.reset_net(compiled)


def test_one_step_program_survives_copies_and_pickles() -> None:
    import io

    x = torch.rand(5, 2, 1, 8, 8) * 3
    model = _perturb(cnn_bn(), 11).eval()
    compiled = snncompile.optimize(model, x)
    ref = _stream(compiled, x)
    clone = copy.deepcopy(compiled)
    assert clone._one_step is compiled._one_step
    assert torch.equal(_stream(clone, x), ref)
    buf = io.BytesIO()
    torch.save(compiled, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # test-only: our own object
    assert loaded._one_step is None and torch.equal(_stream(loaded, x), ref)


def test_attached_learner_sees_one_step_calls() -> None:
    from snncompile.learning import STDPLearner

    x = (torch.rand(4, 2, 8) > 0.5).float()
    model = nn.Sequential(layer.Linear(8, 4, bias=False), neuron.IFNode(v_threshold=0.5))
    functional.set_step_mode(model, "m")
    compiled = snncompile.optimize(model, x)
    learner = STDPLearner("m", model[0], model[1], tau_pre=2.0, tau_post=2.0)
    compiled.attach(learner, model=model)

    def boom(gm, x):
        raise AssertionError("the T = 1 program ran with a learner attached")

    compiled._one_step = boom
    with torch.no_grad():
        compiled(x[:1])
    assert len(learner.in_spike_monitor.records) == 1
    learner.close()


def test_streaming_session_equals_compiled_step_by_step(tmp_path: Path) -> None:
    from snncompile.onnx_runtime import StreamingSession

    x = torch.rand(20, 3, 1, 8, 8) * 3
    model = _perturb(cnn_bn(), 12).eval()
    compiled = snncompile.optimize(model, x[:4])
    path = tmp_path / "step.onnx"
    snncompile.export_onnx(model, x[:4], path, mode="step")
    session = StreamingSession(path, threads=1)
    functional.reset_net(compiled)
    with torch.no_grad():
        for t in range(20):
            y = session.step(x[t])
            assert np.array_equal(y, compiled(x[t : t + 1])[0].numpy()), t
        assert session.batch_size == 3 and set(session.states) == set(session.state_inputs)
        with pytest.raises(ValueError, match="reset"):
            session.step(x[0, :1])
        session.reset()
        functional.reset_net(compiled)
        for t in range(5):  # another batch size after reset
            y = session.step(x[t, :1].numpy())
            assert np.array_equal(y, compiled(x[t : t + 1, :1])[0].numpy()), t
    seq = snncompile.export_onnx(model, x[:4], tmp_path / "seq.onnx")
    with pytest.raises(ValueError, match="sequence-mode"):
        StreamingSession(seq)


def _sj_zoo():
    """SpikingJelly's spiking_resnet module (with snncompile's torchvision stand-in where
    torchvision is missing: the zoo imports it only for pretrained-weight downloads)."""
    from snncompile.zoo_compat import install_torchvision_stand_in

    install_torchvision_stand_in()
    import spikingjelly.activation_based.model.spiking_resnet as zoo

    return zoo


def test_spikingjelly_zoo_resnet_checkpoint_round_trip(sj) -> None:
    zoo = _sj_zoo()
    sn, sg = sj.neuron, sj.surrogate

    def make() -> nn.Module:
        return zoo.spiking_resnet18(
            spiking_neuron=sn.IFNode, surrogate_function=sg.ATan(), detach_reset=True
        ).eval()

    torch.manual_seed(0)
    model = _perturb(make(), 13)
    x = torch.rand(2, 1, 3, 16, 16)
    compiled = snncompile.optimize(model, x)  # inference: 20 batchnorms folded
    _assert_same_state(compiled.state_dict(), model.state_dict())
    other = snncompile.optimize(make(), x)
    other.load_state_dict(compiled.state_dict())
    assert torch.equal(_run(other, x), _run(compiled, x))
    fresh = make()
    fresh.load_state_dict(compiled.state_dict())
    _assert_same_state(fresh.state_dict(), model.state_dict())
