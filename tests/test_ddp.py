"""DistributedDataParallel (nnU-Net's -num_gpus path) without find_unused_parameters, on CPU with gloo."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import exit_worker, free_port


def _worker(rank, world, port, out_dir, mode):
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from test_networks import build, with_channel
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = build(mode, ds=True, seed=0)  # same init on both ranks
        ddp = torch.nn.parallel.DistributedDataParallel(net)  # find_unused_parameters=False, as nnU-Net
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        torch.manual_seed(100 + rank)
        # rank 0 sees only level T1, rank 1 only unknown: levels T2..T4 and most experts get no token
        codes = [1, 1] if rank == 0 else [0, 0]
        for step in range(3):
            x = with_channel(torch.randn(2, 1, 16, 16, 16), codes)
            out = ddp(x)
            loss = sum(o.float().pow(2).mean() for o in out)
            opt.zero_grad()
            loss.backward()
            opt.step()
        flat = torch.cat([p.detach().flatten() for p in net.parameters()])
        torch.save(flat, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_worker()


@pytest.mark.parametrize("mode", ["dmoe"])
def test_ddp_gloo_with_missing_levels(tmp_path, mode):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), mode), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # gradients were all-reduced for every parameter
    torch.manual_seed(0)
    from test_networks import build
    start = torch.cat([p.detach().flatten() for p in build(mode, ds=True, seed=0).parameters()])
    assert (a - start).abs().max() > 0  # and the model did train
