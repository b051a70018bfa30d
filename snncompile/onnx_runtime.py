"""Run models written by :func:`snncompile.export_onnx` with onnxruntime.

* :func:`make_session` -- an ``InferenceSession`` on the CPU with thread spinning **off** (an ORT
  pool that spins between calls starves PyTorch's threads in the same process, DESIGN.md §8) and
  an explicit intra-op thread count.
* :func:`run_step_model` -- a step-mode model over a whole ``[T, N, ...]`` input: a Python loop
  over ``T`` carrying the neuron states from each call's outputs to the next call's inputs,
  starting from the initial states in the model's metadata. :class:`StepRunner` is the same
  loop for streaming (one step at a time, ``reset()`` between sequences).
* :func:`run_sequence_model` -- a sequence-mode model in one call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from snncompile.export.onnx import onnx_initial_states, onnx_state_outputs

__all__ = ["StepRunner", "make_session", "run_sequence_model", "run_step_model"]

ModelLike = str | Path | onnx.ModelProto


def default_threads() -> int:
    """Intra-op threads used when none are given: the cores available, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def make_session(model: ModelLike, *, threads: int | None = None, spinning: bool = False) -> Any:
    """Create an onnxruntime ``InferenceSession`` for ``model`` (a path or a ``ModelProto``).

    ``threads`` sets the intra-op thread count (default :func:`default_threads`); inter-op
    parallelism is one thread. ``spinning=False`` turns the pools' busy-waiting off.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads) if threads is not None else default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    flag = "1" if spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", flag)
    opts.add_session_config_entry("session.inter_op.allow_spinning", flag)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return np.ascontiguousarray(arr)


class StepRunner:
    """Streams a step-mode model: ``runner.step(x_t)`` returns ``y_t`` and keeps the states.

    ``model`` is the path/``ModelProto`` the session was made from (its metadata gives the
    initial states and the input/output pairing); ``session`` defaults to :func:`make_session`.
    """

    def __init__(self, model: ModelLike, session: Any | None = None, **session_kw: Any) -> None:
        self.session = session if session is not None else make_session(model, **session_kw)
        self._pairs = onnx_state_outputs(model)
        inputs = [i.name for i in self.session.get_inputs()]
        self.input_name = inputs[0]
        self.state_inputs = inputs[1:]
        missing = [s for s in self.state_inputs if s not in self._pairs]
        if missing:
            raise ValueError(
                f"StepRunner: inputs {missing} are not described in the model's snncompile.states "
                "metadata; was it exported with snncompile.export_onnx(mode='step')?"
            )
        outputs = [o.name for o in self.session.get_outputs()]
        state_outs = [self._pairs[s] for s in self.state_inputs]
        self.data_outputs = [o for o in outputs if o not in set(state_outs)]
        self._fetch = self.data_outputs + state_outs
        # Read the metadata once; initial states for other batch sizes repeat the batch-1 ones.
        self._init_one = onnx_initial_states(model, 1)
        self.states: dict[str, np.ndarray] | None = None
        self._batch: int | None = None

    def reset(self) -> None:
        """Forget the states: the next step starts from the initial membrane potentials."""
        self.states = None
        self._batch = None

    def step(self, x_t: Any) -> np.ndarray | list[np.ndarray]:
        """Run one time step on ``x_t`` (``[N, ...]``); return the output(s) of that step."""
        x = _as_numpy(x_t)
        if self.states is None or self._batch != x.shape[0]:
            self.states = {k: np.repeat(v, x.shape[0], axis=0) for k, v in self._init_one.items()}
            self._batch = int(x.shape[0])
        feeds = {self.input_name: x, **self.states}
        res = self.session.run(self._fetch, feeds)
        n = len(self.data_outputs)
        self.states = dict(zip(self.state_inputs, res[n:], strict=True))
        return res[0] if n == 1 else res[:n]


def run_step_model(
    model: ModelLike, x_seq: Any, *, session: Any | None = None, **session_kw: Any
) -> np.ndarray | list[np.ndarray]:
    """Run a step-mode export over ``x_seq`` (``[T, N, ...]``) and stack the outputs over ``T``.

    States start from the model's initial values and are carried from step to step in Python.
    """
    runner = StepRunner(model, session, **session_kw)
    x = _as_numpy(x_seq)
    outs = [runner.step(x[t]) for t in range(x.shape[0])]
    if len(runner.data_outputs) == 1:
        return np.stack(outs)  # type: ignore[arg-type]
    return [np.stack([o[k] for o in outs]) for k in range(len(runner.data_outputs))]


def run_sequence_model(
    model: ModelLike, x_seq: Any, *, session: Any | None = None, **session_kw: Any
) -> np.ndarray | list[np.ndarray]:
    """Run a sequence-mode export on ``x_seq`` (``[T, N, ...]``) in one call."""
    sess = session if session is not None else make_session(model, **session_kw)
    name = sess.get_inputs()[0].name
    res = sess.run(None, {name: _as_numpy(x_seq)})
    return res[0] if len(res) == 1 else res
