"""A compiled SNN trains under ``DistributedDataParallel`` exactly like single-process training.

Two CPU processes (gloo on the loopback interface) each take half of a global batch, wrap the
module returned by ``snncompile.optimize(..., mode='train')`` in
``torch.nn.parallel.DistributedDataParallel``, run a few SGD steps with
``functional.reset_net(ddp_model)`` between them, and rank 0 saves every step's gradients and
the final weights. One process training the same model on the whole global batch must give the
same gradients and weights: DDP averages the ranks' gradients, and the loss is a mean over the
batch, so the average of the two half-batch gradients is the full-batch gradient (up to float
summation order).

The network is a spiking CNN without BatchNorm on purpose: per-rank BN statistics over half a
batch differ from full-batch statistics (that would need ``SyncBatchNorm``, which needs a GPU),
so BN would make the comparison meaningless rather than test DDP.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snncompile import functional, layer, neuron

T, GLOBAL_BATCH, STEPS, LR, WORLD = 4, 8, 3, 0.5, 2
HANG_SECONDS = 300  # ~10 s on an idle 2-core machine; this only guards against a hang


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _build(backend: str) -> tuple[nn.Module, nn.Module]:
    """Return ``(model, compiled)``: a seeded spiking CNN and its training-mode compilation."""
    import snncompile

    torch.manual_seed(0)
    model = nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1),
        neuron.LIFNode(tau=2.0),
        layer.MaxPool2d(2),
        layer.Flatten(),
        layer.Linear(4 * 4 * 4, 10),
        neuron.LIFNode(tau=2.0),
    )
    functional.set_step_mode(model, "m")
    example = _data()[0][0, :, : GLOBAL_BATCH // WORLD]
    compiled = snncompile.optimize(model, example, mode="train", backend=backend)
    return model, compiled


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Return every step's global batch: inputs ``[STEPS, T, N, 1, 8, 8]``, targets ``[STEPS, N]``.
    """
    g = torch.Generator().manual_seed(1)
    # Large enough inputs that the neurons fire and every parameter gets a gradient.
    x = torch.rand(STEPS, T, GLOBAL_BATCH, 1, 8, 8, generator=g) * 3.0
    y = torch.randint(0, 10, (STEPS, GLOBAL_BATCH), generator=g)
    return x, y


def _train(module: nn.Module, params: list[nn.Parameter], xs, ys) -> dict[str, list]:
    """Run ``STEPS`` SGD steps on ``module``; return per-step gradients and the final weights."""
    opt = torch.optim.SGD(params, lr=LR)
    grads = []
    for x, y in zip(xs, ys, strict=True):
        rate = module(x).mean(0)  # [N, 10] firing rate
        loss = F.mse_loss(rate, F.one_hot(y, 10).float())  # a mean over the batch
        opt.zero_grad(set_to_none=False)
        loss.backward()
        grads.append([p.grad.detach().clone() for p in params])
        opt.step()
        functional.reset_net(module)
    return {"grads": grads, "weights": [p.detach().clone() for p in params]}


def _worker(rank: int, port: int, backends: tuple[str, ...], out: str) -> None:
    """One DDP rank: for each backend, train a fresh compiled model on this rank's half of
    every global batch; rank 0 saves the results (a dict keyed by backend)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        xs, ys = _data()
        half = GLOBAL_BATCH // WORLD
        part = slice(rank * half, (rank + 1) * half)
        results = {}
        for backend in backends:
            _, compiled = _build(backend)
            ddp = DDP(compiled)
            results[backend] = _train(ddp, list(ddp.parameters()), xs[:, :, part], ys[:, part])
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


BACKENDS = ("auto", "torch")  # 'auto' runs the fused C kernel here (T >= 2), 'torch' the loop


@pytest.mark.slow
def test_ddp_matches_single_process(tmp_path: Path, monkeypatch) -> None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    import torch.multiprocessing as mp

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in os.environ:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # stay on loopback whatever the hostname
    out = tmp_path / "rank0.pt"
    start = time.perf_counter()
    workers = mp.spawn(
        _worker, args=(_free_port(), BACKENDS, str(out)), nprocs=WORLD, join=False
    )
    while not workers.join(timeout=1.0):  # re-raises a worker's exception with its traceback
        if time.perf_counter() - start > HANG_SECONDS:
            for proc in workers.processes:
                proc.kill()
            pytest.fail(f"the DDP workers did not finish in {HANG_SECONDS} s (gloo rendezvous?)")
    results = torch.load(out)

    xs, ys = _data()
    for backend in BACKENDS:
        _, compiled = _build(backend)
        want = _train(compiled, list(compiled.parameters()), xs, ys)
        got = results[backend]
        assert len(got["grads"]) == STEPS
        for step, (g_ddp, g_ref) in enumerate(zip(got["grads"], want["grads"], strict=True)):
            assert all(g.abs().sum() > 0 for g in g_ref), "every parameter should get a gradient"
            for a, b in zip(g_ddp, g_ref, strict=True):
                where = f"backend={backend}, step {step}"
                torch.testing.assert_close(
                    a, b, atol=1e-6, rtol=1e-5, msg=lambda m, w=where: f"{w}: {m}"
                )
        for a, b in zip(got["weights"], want["weights"], strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
