"""The comparators under DistributedDataParallel (gloo, CPU, 2 ranks): Group DRO and FEBS all-reduce their group
statistics (both ranks hold the weights of the whole batch), and the adversarial network trains without
find_unused_parameters even when one rank's samples are all of unknown level."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import exit_worker, free_port


def _batch():
    """A global batch of 4 samples (2 per rank) and the groups of its samples (two Group DRO steps: the second
    with one group only on rank 0 and another only on rank 1)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 2, 6, 6, generator=g)
    target = torch.randint(0, 2, (4, 1, 6, 6), generator=g).float()
    return logits, target, torch.tensor([0, 0, 1, 2])


DRO_STEPS = (torch.tensor([0, 0, 1, 2]), torch.tensor([2, 2, 1, 1]))


def _dro_steps(dro, logits, target, mine=slice(None)):
    """The Group DRO steps on ``logits[mine]``: (q after each step, loss values, gradients of the last step)."""
    qs, values = [], []
    for groups in DRO_STEPS:
        x = logits[mine].clone().requires_grad_()
        dro.set_groups(groups[mine], train=True)
        value = dro(x, target[mine])
        value.backward()
        qs.append(dro.q.clone())
        values.append(value.detach())
    return torch.stack(qs), torch.stack(values), x.grad


def _losses():
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunet_dmoe.fairness.losses import FEBSDiceLoss, GroupDROLoss

    def dc_ce():
        return DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": dist.is_initialized()},
                              {}, dice_class=MemoryEfficientSoftDiceLoss)
    return GroupDROLoss(dc_ce(), ["a", "b", "c"], step_size=1.0), FEBSDiceLoss(dc_ce().dc, ["a", "b", "c"])


def _worker(rank, world, port, out_dir):
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits, target, groups = _batch()
        mine = slice(2 * rank, 2 * rank + 2)
        dro, febs = _losses()
        q, values, grad = _dro_steps(dro, logits, target, mine)
        febs.set_groups(groups[mine], train=False)
        w = febs.group_weights(torch.softmax(logits[mine], 1), target[mine])
        torch.save({"q": q, "values": values, "febs": w, "grad": grad}, os.path.join(out_dir, f"losses{rank}.pt"))

        # the adversary: rank 1 has only samples of unknown level
        from nnunet_dmoe.plans.configuration import unet_configuration
        from nnunet_dmoe.fairness.adversary import AdversarialNetwork
        from nnunet_dmoe.fairness.losses import AdversarialLoss
        from nnunet_dmoe.networks.unet import build_attribute_network
        torch.manual_seed(0)
        cm = unet_configuration(2, (8, 16, 32), num_levels=3, attribute_channel=1)
        net = AdversarialNetwork(build_attribute_network(None, cm, 2, 2, True), 3, reversal_scale=0.5)
        ddp = torch.nn.parallel.DistributedDataParallel(net)  # find_unused_parameters=False, as nnU-Net
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        loss = AdversarialLoss(lambda out, t: sum(o.float().pow(2).mean() for o in out), ["a", "b", "c"])
        torch.manual_seed(100 + rank)
        for _ in range(3):
            loss.set_groups(torch.tensor([0, 2]) if rank == 0 else torch.tensor([-1, -1]), train=True)
            value = loss(ddp(torch.randn(2, 2, 16, 16)), None)
            opt.zero_grad()
            value.backward()
            opt.step()
        flat = torch.cat([p.detach().flatten() for p in net.parameters()])
        torch.save({"params": flat, "accuracy": loss.epoch_stats()["adversary_accuracy"]},
                   os.path.join(out_dir, f"adversary{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_worker()


def test_group_statistics_all_reduced_and_adversary_under_ddp(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"losses{r}.pt") for r in (0, 1))
    # single process on the whole batch of 4
    logits, target, groups = _batch()
    dro, febs = _losses()
    q, values, grad = _dro_steps(dro, logits, target)
    febs.set_groups(groups, train=False)
    w = febs.group_weights(torch.softmax(logits, 1), target)
    for r in (r0, r1):
        torch.testing.assert_close(r["q"], q)  # every rank holds the q of the global batch, step after step
        torch.testing.assert_close(r["febs"], w)
    # DDP averages the ranks' gradients (and the logged losses): (rank r's) / world summed = the global batch's
    torch.testing.assert_close((r0["values"] + r1["values"]) / 2, values)
    torch.testing.assert_close(torch.cat([r0["grad"], r1["grad"]]) / 2, grad)

    a0, a1 = (torch.load(tmp_path / f"adversary{r}.pt") for r in (0, 1))
    torch.testing.assert_close(a0["params"], a1["params"], rtol=0, atol=0)
    assert a0["accuracy"] == a1["accuracy"] and 0 <= a0["accuracy"] <= 1  # 6 known samples, all on rank 0
