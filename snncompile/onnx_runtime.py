"""Run models written by :func:`snncompile.export_onnx` with onnxruntime.

* :func:`make_session` -- an ``InferenceSession`` on the CPU with thread spinning **off** (an ORT
  pool that spins between calls starves PyTorch's threads in the same process, DESIGN.md §8) and
  an explicit intra-op thread count.
* :func:`run_step_model` -- a step-mode model over a whole ``[T, N, ...]`` input: a Python loop
  over ``T`` carrying the neuron states from each call's outputs to the next call's inputs,
  starting from the initial states in the model's metadata. :class:`StreamingSession` is the
  same loop for streaming: ``step(x_t)`` one step at a time, states kept, ``reset()`` between
  sequences, any batch size.
* :func:`run_sequence_model` -- a sequence-mode model in one call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from snncompile.export.onnx_metadata import (
    describe_model,
    onnx_initial_states,
    step_states,
)

__all__ = [
    "StepRunner",
    "StreamingSession",
    "make_session",
    "run_sequence_model",
    "run_step_model",
]

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


class StreamingSession:
    """Stream a step-mode export one time step at a time: ``y_t = session.step(x_t)``.

    The neuron states (the model's ``<node>.v`` inputs) are kept between calls: each call feeds
    the previous call's ``<node>.v_next`` outputs back in, starting from the initial states in
    the model's metadata (:func:`snncompile.onnx_initial_states`). ``reset()`` starts the next
    sequence from the initial states again. The batch size is free: the first step after a
    reset (or after construction) fixes it until the next reset. Step by step, the outputs are
    those of the compiled module called on ``x[t:t+1]`` (or of the eager model on ``x[t]``)::

        session = StreamingSession("model_step.onnx")
        for x_t in frames:            # [N, ...] numpy arrays or torch tensors
            y_t = session.step(x_t)   # numpy [N, ...]
        session.reset()

    Args:
        model: The path or ``ModelProto`` of a ``mode='step'`` export.
        session: An onnxruntime ``InferenceSession`` of that model (default: :func:`make_session`
            with ``session_kw``, e.g. ``threads=1``).

    Raises:
        OnnxMetadataError: the model's ``snncompile.states`` metadata is missing or malformed.
        ValueError: the model is a sequence-mode export, or its inputs do not match its metadata.
    """

    def __init__(self, model: ModelLike, session: Any | None = None, **session_kw: Any) -> None:
        states = step_states(
            model,
            "StreamingSession",
            "export (one call per sequence); export with snncompile.export_onnx(..., "
            "mode='step') to stream, or run it with run_sequence_model.",
        )
        self.session = session if session is not None else make_session(model, **session_kw)
        pairs = {s["input"]: s["output"] for s in states}
        inputs = [i.name for i in self.session.get_inputs()]
        self.input_name = inputs[0]
        self.state_inputs = inputs[1:]
        missing = [s for s in self.state_inputs if s not in pairs]
        if missing or len(self.state_inputs) != len(pairs):
            raise ValueError(
                f"StreamingSession: the state inputs {self.state_inputs} of "
                f"{describe_model(model)} do not match its snncompile.states metadata "
                f"({sorted(pairs)}); was it exported with snncompile.export_onnx(mode='step')?"
            )
        outputs = [o.name for o in self.session.get_outputs()]
        state_outs = [pairs[s] for s in self.state_inputs]
        self.data_outputs = [o for o in outputs if o not in set(state_outs)]
        self._fetch = self.data_outputs + state_outs
        self._n_data = len(self.data_outputs)
        # Initial states for batch 1; other batch sizes repeat them along the batch axis.
        self._init_one = onnx_initial_states(model, 1)
        self._states: list[np.ndarray] | None = None
        self._batch: int | None = None

    @property
    def batch_size(self) -> int | None:
        """The batch size of the running sequence (``None`` before its first step)."""
        return self._batch

    @property
    def states(self) -> dict[str, np.ndarray] | None:
        """The current neuron states, ``{state input name: [N, ...] array}`` (``None`` when no
        step ran since the last reset)."""
        if self._states is None:
            return None
        return dict(zip(self.state_inputs, self._states, strict=True))

    def reset(self) -> None:
        """Forget the states: the next step starts from the initial membrane potentials."""
        self._states = None
        self._batch = None

    def step(self, x_t: Any) -> np.ndarray | list[np.ndarray]:
        """Run one time step on ``x_t`` (``[N, ...]``); return that step's output(s).

        Raises:
            ValueError: ``x_t``'s batch size differs from the running sequence's (call
                :meth:`reset` first to start a sequence of another batch size).
        """
        x = _as_numpy(x_t)
        if self._states is None:
            n = int(x.shape[0]) if x.ndim else 0
            self._states = [np.repeat(self._init_one[k], n, axis=0) for k in self.state_inputs]
            self._batch = n
        elif x.ndim == 0 or x.shape[0] != self._batch:
            raise ValueError(
                f"StreamingSession.step: x_t has batch size {x.shape[0] if x.ndim else None}, "
                f"but the running sequence has {self._batch}; call reset() before a sequence "
                "of another batch size."
            )
        feeds = dict(zip(self.state_inputs, self._states, strict=True))
        feeds[self.input_name] = x
        res = self.session.run(self._fetch, feeds)
        n = self._n_data
        self._states = res[n:]
        return res[0] if n == 1 else res[:n]


class StepRunner(StreamingSession):
    """:class:`StreamingSession` under its earlier name; a step with another batch size than
    the running sequence's starts a new sequence (from the initial states) instead of raising."""

    def step(self, x_t: Any) -> np.ndarray | list[np.ndarray]:
        """Run one time step on ``x_t`` (``[N, ...]``); return that step's output(s)."""
        x = _as_numpy(x_t)
        if self._states is not None and x.shape[0] != self._batch:
            self.reset()
        return super().step(x)


def run_step_model(
    model: ModelLike, x_seq: Any, *, session: Any | None = None, **session_kw: Any
) -> np.ndarray | list[np.ndarray]:
    """Run a step-mode export over ``x_seq`` (``[T, N, ...]``) and stack the outputs over ``T``.

    States start from the model's initial values and are carried from step to step in Python.
    """
    runner = StreamingSession(model, session, **session_kw)
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
