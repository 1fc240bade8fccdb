"""The comparators' weighting and gradient logic against values computed by hand: Group DRO, FEBS, gradient
reversal, the adversary's loss; and the adversarial network's two modes."""
import math

import pytest
import torch
from torch import nn

from nnunet_dmoe.plans.configuration import unet_configuration
from nnunet_dmoe.fairness.adversary import AdversarialNetwork, AdversarialOutput, reverse_gradient
from nnunet_dmoe.fairness.losses import (AdversarialLoss, FEBSDiceLoss, GroupDROLoss, febs_weights, group_dro_step,
                                         group_sums, with_febs_dice)
from nnunet_dmoe.networks.unet import build_attribute_network


class AbsLoss(nn.Module):
    """Per-sample loss |o| (mean over the sample), so the per-sample losses are the outputs themselves."""

    def forward(self, output, target):
        return (output - target).abs().mean()


def softmax(values):
    e = [math.exp(v) for v in values]
    return [x / sum(e) for x in e]


def test_group_sums():
    sums, counts = group_sums(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([2, 0, 2]), 3)
    assert sums.tolist() == [2.0, 0.0, 5.0] and counts.tolist() == [1.0, 0.0, 2.0]


def sagawa_reference(q, per_sample, groups, eta, adj=None):
    """Sagawa et al.'s LossComputer (compute_group_avg + compute_robust_loss) in plain Python: the batch's mean loss
    per group (0 for an absent group), q_g <- q_g exp(eta (L_g + adj_g)) / sum, loss sum_g q_g L_g with the new q.
    Returns (new q, loss, d loss / d l_i)."""
    n = len(q)
    counts = [sum(1 for g in groups if g == k) for k in range(n)]
    mean = [sum(l for l, g in zip(per_sample, groups) if g == k) / max(counts[k], 1) for k in range(n)]
    adj = adj or [0.0] * n
    q = [qk * math.exp(eta * (mk + ak)) for qk, mk, ak in zip(q, mean, adj)]
    q = [qk / sum(q) for qk in q]
    return q, sum(qk * mk for qk, mk in zip(q, mean)), [q[g] / counts[g] for g in groups]


def test_group_dro_three_steps_against_sagawa_by_hand():
    """Two groups, step size 1, no offset. Step 1: group 0 only, losses 1 and 3: L = (2, 0), log q = (2, 0), loss
    q_0 * 2, each sample's gradient q_0 / 2. Step 2: losses 1 (group 0), 2 (group 1): log q = (3, 2), loss
    q_0 + 2 q_1. Step 3: group 1 only, losses 4 and 6: L = (0, 5), log q = (3, 7). Validation changes nothing."""
    loss = GroupDROLoss(AbsLoss(), ["a", "b"], step_size=1.0, loss_offset=0.0)
    steps = [([1.0, 3.0], [0, 0], softmax([2.0, 0.0])), ([1.0, 2.0], [0, 1], softmax([3.0, 2.0])),
             ([4.0, 6.0], [1, 1], softmax([3.0, 7.0]))]
    q_ref = [0.5, 0.5]
    for values, groups, q_hand in steps:
        out = torch.tensor([[v] for v in values], requires_grad=True)
        loss.set_groups(torch.tensor(groups), train=True)
        value = loss(out, torch.zeros(2, 1))
        value.backward()
        q_ref, value_ref, grad_ref = sagawa_reference(q_ref, values, groups, 1.0)
        assert q_ref == pytest.approx(q_hand)
        torch.testing.assert_close(loss.q, torch.tensor(q_hand))
        assert value.item() == pytest.approx(value_ref, rel=1e-6)
        torch.testing.assert_close(out.grad[:, 0], torch.tensor(grad_ref))
    q3 = softmax([3.0, 7.0])
    assert value.item() == pytest.approx(q3[1] * 5, rel=1e-6)
    # at uniform q a batch of one group trains on half its mean loss (Sagawa's sum_g q_g L_g), not the mean
    fresh = GroupDROLoss(AbsLoss(), ["a", "b"], step_size=1e-9, loss_offset=0.0)
    fresh.set_groups(torch.tensor([1, 1]), train=True)
    assert fresh(torch.tensor([[4.0], [6.0]]), torch.zeros(2, 1)).item() == pytest.approx(2.5, rel=1e-6)

    loss.set_groups(torch.tensor([0, 0]), train=False)
    loss(torch.tensor([[5.0], [5.0]]), torch.zeros(2, 1))
    torch.testing.assert_close(loss.q, torch.tensor(q3))
    stats = loss.epoch_stats()
    assert stats["dro_weights"] == pytest.approx(q3)
    assert stats["dro_group_loss"] == pytest.approx([5 / 3, 4.0])  # the epoch's mean per group (training only)
    assert all(math.isnan(v) for v in loss.epoch_stats()["dro_group_loss"])  # reset: no group seen since


def test_group_dro_offset_and_adjustment_move_only_the_update():
    """The offset (+1) is added to the losses of the groups present, Sagawa's adjustment C / sqrt(n_g) to every
    group, both in the update of q only: the loss is sum_g q_g L_g of the raw losses."""
    loss = GroupDROLoss(AbsLoss(), ["a", "b", "c"], step_size=0.5, loss_offset=1.0,
                        adjustment=[0.3, 0.0, 0.6])
    loss.set_groups(torch.tensor([0, 2, 2]), train=True)
    value = loss(torch.tensor([[2.0], [1.0], [3.0]]), torch.zeros(3, 1))
    # Sagawa's update on the shifted per-sample losses (the absent group b keeps L_b = 0, no offset)
    q, _, _ = sagawa_reference([1 / 3] * 3, [3.0, 2.0, 4.0], [0, 2, 2], 0.5, [0.3, 0.0, 0.6])
    torch.testing.assert_close(loss.q, torch.tensor(q))
    assert value.item() == pytest.approx(q[0] * 2.0 + q[2] * 2.0, rel=1e-6)
    with pytest.raises(ValueError, match="one finite value per group"):
        loss.set_adjustment([1.0, 2.0])


def test_group_dro_step_is_the_exponentiated_gradient_rule():
    """q_g <- q_g exp(eta (l_g + adj_g)) / sum (Sagawa et al.'s update)."""
    q = torch.tensor([0.2, 0.3, 0.5])
    losses = torch.tensor([0.7, 0.1, 0.0])
    expected = q * torch.exp(0.5 * losses)
    torch.testing.assert_close(group_dro_step(q.log(), losses, 0.5).exp(), expected / expected.sum())
    adj = torch.tensor([0.1, 0.0, 0.2])
    expected = q * torch.exp(0.5 * (losses + adj))
    torch.testing.assert_close(group_dro_step(q.log(), losses, 0.5, adj).exp(), expected / expected.sum())


def test_group_dro_unknown_group_and_restore():
    loss = GroupDROLoss(AbsLoss(), ["T1", "T2", "unknown"], step_size=1.0, loss_offset=0.0, num_levels=2)
    loss.set_groups(torch.tensor([-1, 1]), train=True)  # level -1 -> the unknown group (index 2)
    loss(torch.tensor([[2.0], [1.0]]), torch.zeros(2, 1))
    torch.testing.assert_close(loss.q, torch.tensor(softmax([0.0, 1.0, 2.0])))
    stats = loss.epoch_stats()
    assert math.isnan(stats["dro_group_loss"][0]) and stats["dro_group_loss"][1:] == [1.0, 2.0]
    fresh = GroupDROLoss(AbsLoss(), ["T1", "T2", "unknown"], step_size=1.0, loss_offset=0.0, num_levels=2)
    fresh.restore({"dro_weights": [None, stats["dro_weights"]], "dro_group_loss": [None, stats["dro_group_loss"]]})
    torch.testing.assert_close(fresh.q, loss.q)
    with pytest.raises(ValueError, match="have 2 groups, this trainer has 3"):
        fresh.restore({"dro_weights": [[0.5, 0.5]]})


def test_group_dro_per_sample_nnunet_loss():
    """Wrapped around nnU-Net's Dice+CE with deep supervision: the per-sample losses are nnU-Net's loss of each
    sample alone; at uniform q the loss is sum_g L_g / G; the loss offset shifts only the weight update."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    def nnunet_loss(ddp):
        return DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False,
                                                      "ddp": ddp}, {}, dice_class=MemoryEfficientSoftDiceLoss),
                                      [4 / 7, 2 / 7, 1 / 7])
    torch.manual_seed(0)
    out = [torch.randn(3, 2, 8, 8), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 2, 2)]
    tgt = [torch.randint(0, 2, (3, 1, 8, 8)).float(), torch.randint(0, 2, (3, 1, 4, 4)).float(),
           torch.randint(0, 2, (3, 1, 2, 2)).float()]
    reference = nnunet_loss(False)
    per_sample = [reference([o[i:i + 1] for o in out], [t[i:i + 1] for t in tgt]) for i in range(3)]
    dro = GroupDROLoss(nnunet_loss(True), ["a", "b"], step_size=0.01)  # as the trainer builds it under DDP
    assert all(not m.ddp for m in dro.modules() if hasattr(m, "ddp"))
    dro.set_groups(torch.tensor([0, 1, 1]), train=False)
    expected = 0.5 * per_sample[0] + 0.5 * (per_sample[1] + per_sample[2]) / 2
    assert dro(out, tgt).item() == pytest.approx(expected.item(), rel=1e-5)


def test_febs_weights_on_a_known_loss_vector():
    losses = torch.tensor([0.2, 0.4, 0.8, 0.1])
    present = torch.tensor([True, True, True, False])  # the absent group does not set the minimum
    torch.testing.assert_close(febs_weights(losses, present, 1.0),
                               torch.tensor([math.tanh(1.0), math.tanh(0.5), math.tanh(0.25), 0.0]))
    torch.testing.assert_close(febs_weights(losses, present, 2.0),
                               torch.tensor([math.tanh(1.0), math.tanh(0.25), math.tanh(0.0625), 0.0]))


def test_febs_dice_by_hand():
    """Two samples (groups 0 and 1), background + target over 4 voxels, nnU-Net's batch Dice without background.
    Group 0: p = (.9 .8 .1 .2), y = (1 1 0 0): Dice = 2*1.7 / (2.0 + 2) = 0.85, L = 0.15.
    Group 1: p = (.6 .4 .3 .5), y = (1 1 0 0): Dice = 2*1.0 / (1.8 + 2), L = 1 - 2/3.8.
    w = tanh(1), tanh(0.15 / L_1); the loss is nnU-Net's Dice of the scaled probabilities."""
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.helpers import softmax_helper_dim1

    fg = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.6, 0.4, 0.3, 0.5]])
    probs = torch.stack([1 - fg, fg], 1)  # (2, 2, 4)
    logits = probs.log().requires_grad_()
    y = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])[:, None].float()
    dice = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=True, do_bg=False, smooth=0.0,
                                       ddp=False)
    febs = FEBSDiceLoss(dice, ["g0", "g1"], gamma=1.0)
    assert dice.apply_nonlin is softmax_helper_dim1  # nnU-Net's module is left as it was
    febs.set_groups(torch.tensor([0, 1]), train=True)
    l1 = 1 - 2 * 1.0 / 3.8
    w = [math.tanh(1.0), math.tanh(0.15 / l1)]
    torch.testing.assert_close(febs.group_weights(probs, y), torch.tensor(w))
    value = febs(logits, y)
    inter = w[0] * 1.7 + w[1] * 1.0
    pred = w[0] * 2.0 + w[1] * 1.8
    assert value.item() == pytest.approx(-2 * inter / (pred + 4), rel=1e-5)
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert febs.epoch_stats()["febs_weights"] == pytest.approx(w, rel=1e-5)


def test_with_febs_dice_replaces_only_the_dice_term():
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False},
                                                 {}, dice_class=MemoryEfficientSoftDiceLoss), [1.0])
    ce = loss.loss.ce
    with_febs_dice(loss, ["a", "b"])
    assert isinstance(loss.loss.dc, FEBSDiceLoss) and loss.loss.ce is ce
    # one group present: everyone's weight is tanh(1)
    torch.manual_seed(0)
    x, y = torch.randn(2, 2, 6, 6), torch.randint(0, 2, (2, 1, 6, 6)).float()
    loss.loss.dc.set_groups(torch.tensor([1, 1]), train=False)
    scaled = torch.softmax(x, 1) * math.tanh(1.0)
    plain = MemoryEfficientSoftDiceLoss(batch_dice=True, do_bg=False, smooth=1e-5, ddp=False)
    expected = torch.nn.functional.cross_entropy(x, y[:, 0].long()) + plain(scaled, y)
    torch.testing.assert_close(loss([x], [y]), expected)


def test_gradient_reversal_flips_sign_and_scales():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = reverse_gradient(x, 0.5)
    torch.testing.assert_close(y, x.detach())
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([-0.5, -1.0, -1.5]))


def test_adversarial_loss_masks_unknown_levels_and_counts_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]], requires_grad=True)
    loss = AdversarialLoss(AbsLoss(), ["T1", "T2"])
    loss.set_groups(torch.tensor([0, -1, 0]), train=True)
    value = loss(AdversarialOutput(torch.zeros(3, 1), logits), torch.zeros(3, 1))
    ce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(3.0))]  # samples 0 and 2, level 0
    assert value.item() == pytest.approx(sum(ce) / 2, rel=1e-6)
    value.backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0
    assert loss.epoch_stats() == {"adversary_accuracy": 0.5}  # sample 0 right, sample 2 wrong
    # evaluation output (segmentation only): nnU-Net's loss alone
    assert loss(torch.ones(3, 1), torch.zeros(3, 1)).item() == 1.0


@pytest.mark.parametrize("residual", [False, True])
def test_adversarial_network_train_and_eval_outputs(residual):
    cm = unet_configuration(2, (8, 16, 32), [1, 2, 2] if residual else None, num_levels=3, attribute_channel=1)
    torch.manual_seed(0)
    net = AdversarialNetwork(build_attribute_network(None, cm, 2, 2, True), 3, reversal_scale=0.5)
    x = torch.randn(2, 2, 16, 16)
    out = net(x)
    assert isinstance(out, AdversarialOutput) and out.attribute_logits.shape == (2, 3)
    assert out.segmentation[0].shape == (2, 2, 16, 16)
    # the classifier's loss pushes the encoder the other way, scaled: compare with the features' own gradient
    feats = {}

    def keep(module, inputs, output):
        output.retain_grad()
        feats["f"] = output
    handle = net.segmenter.unet.encoder.stages[-1].register_forward_hook(keep)
    out = net(x)
    handle.remove()
    out.attribute_logits.sum().backward()
    f = feats["f"].detach().requires_grad_()
    g, = torch.autograd.grad(net.adversary(f).sum(), f)
    torch.testing.assert_close(feats["f"].grad, -0.5 * g)
    net.eval()
    with torch.no_grad():
        assert isinstance(net(x), list)  # nnU-Net's output, deep supervision on
    net.decoder.deep_supervision = False
    with torch.no_grad():
        assert net(x).shape == (2, 2, 16, 16)
    assert any(k.startswith("adversary.") for k in net.state_dict())
