"""AGC under FSDP2: fully_shard splits parameters by output rows, so a matrix's unit norms are
local; a sharded vector is one unit and needs a sum over ranks. Proven by comparison with one process."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nfnet_hub.agc import adaptive_clip_grad_, agc_parameters


def _model():
    import timm
    from conftest import randomise

    torch.manual_seed(0)
    return randomise(timm.create_model("nfnet_hub_nano", num_classes=10, drop_rate=0.0), seed=5).train()


def _grads_scaled(model):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model(x).logsumexp(1).mean().mul(50.0).backward()  # large enough that many units clip


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for stage in model.stages:
        for block in stage:
            fully_shard(block)
    fully_shard(model)
    _grads_scaled(model)
    adaptive_clip_grad_(agc_parameters(model), 0.01)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(grads, out)
    dist.barrier()  # leave together: a rank exiting while the other still talks to gloo can abort
    dist.destroy_process_group()


def test_fsdp2_clipping_equals_single_process(tmp_path):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "fsdp_grads.pt")
    mp.spawn(_worker, args=(2, port, out), nprocs=2)
    sharded = torch.load(out, weights_only=True)

    model = _model()
    _grads_scaled(model)
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    adaptive_clip_grad_(agc_parameters(model), 0.01)
    clipped_some = False
    for n, p in model.named_parameters():
        torch.testing.assert_close(sharded[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
        clipped_some |= not torch.equal(p.grad, raw[n])
    assert clipped_some
    vectors = [n for n, p in model.named_parameters() if p.ndim == 1 and p.numel() > 1]
    assert any(not torch.equal(model.get_parameter(n).grad, raw[n]) for n in vectors), "no sharded vector clipped"

