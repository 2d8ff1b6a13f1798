"""DDP and FSDP2 on CPU (gloo, two processes): a patched LoRA model gives the single-process losses and
gradients on the same global batch (fp32, 1e-5 relative), with gradient accumulation."""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import distributed_lora as ex  # noqa: E402


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, jobs, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {key: ex.train(rank, world, **kw) for key, kw in jobs.items()}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _rel(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12)).item()


JOBS = {
    "ddp": dict(strategy="ddp"),
    "fsdp2": dict(strategy="fsdp2"),
    "fsdp2-triton": dict(strategy="fsdp2", backend="triton", steps=1, micro=1),
    "fsdp2-bf16": dict(strategy="fsdp2", bf16=True, steps=1, micro=1),
    "ddp-patch-after-wrap": dict(strategy="ddp", patch="after", steps=1, micro=1),
    "fsdp2-patch-after-wrap": dict(strategy="fsdp2", patch="after", steps=1, micro=1),
    **{f"{s}-{m}": dict(strategy=s, method=m, steps=2, micro=2) for s in ("ddp", "fsdp2") for m in ("prefix", "sparse", "side")},
}


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    mp.spawn(_worker, args=(2, _port(), JOBS, str(out)), nprocs=2, join=True)
    return torch.load(out)


@pytest.mark.parametrize("key", ["ddp", "fsdp2", "fsdp2-triton", "ddp-patch-after-wrap", "fsdp2-patch-after-wrap",
                                 *(f"{s}-{m}" for s in ("ddp", "fsdp2") for m in ("prefix", "sparse", "side"))])
def test_two_ranks_equal_one_process(distributed_results, key):
    kw = {k: v for k, v in JOBS[key].items() if k not in ("strategy", "patch")}
    want_losses, want_grads, want_params = ex.train(0, 1, "single", **kw)
    losses, grads, params = distributed_results[key]
    for a, b in zip(losses, want_losses):
        assert abs(a - b) <= 1e-5 * abs(b), (losses, want_losses)
    assert grads.keys() == want_grads.keys() and len(grads) >= 1
    for n in want_grads:
        assert _rel(grads[n], want_grads[n]) <= 1e-5, n
        assert _rel(params[n], want_params[n]) <= 1e-5, n


def test_fsdp2_bf16_mixed_precision_is_close(distributed_results):
    want_losses, want_grads, _ = ex.train(0, 1, "single", steps=1, micro=1)
    losses, grads, _ = distributed_results["fsdp2-bf16"]
    assert abs(losses[0] - want_losses[0]) <= 2e-2 * abs(want_losses[0])
    worst = max(_rel(grads[n], want_grads[n]) for n in want_grads)
    assert worst <= 5e-2, worst
