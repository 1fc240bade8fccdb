"""Losses of the fairness comparators that need each sample's group: Group DRO, FEBS and the adversary's loss.

Each is a :class:`GroupLoss`: the trainer hands it the levels of the batch's samples (``set_groups``, from
``batch["attribute"]``) before nnU-Net calls the loss, so nnU-Net's ``train_step`` stays unchanged. Formulas and
their sources: ``documentation/reference/fairness-comparators.md``.

- :class:`GroupDROLoss` wraps nnU-Net's whole loss (Dice+CE with deep supervision): per-sample losses, the
  batch's mean loss ``L_g`` per group, an exponentiated-gradient step on the group weights ``q`` from them and
  the loss ``sum_g q_g L_g`` (Sagawa et al., ICLR 2020, as their code computes it).
- :class:`FEBSDiceLoss` replaces the Dice term inside nnU-Net's Dice+CE: the softmax probabilities of each sample
  are scaled by its group's weight ``tanh((min_h L_h / L_g)^gamma)`` before the Dice (fair error-bound scaling,
  Tian et al., ICLR 2024, as in the FairSeg code).
- :class:`AdversarialLoss` adds the attribute classifier's cross-entropy to nnU-Net's loss (the classifier sits
  behind a gradient-reversal layer in :class:`nnunet_dmoe.fairness.adversary.AdversarialNetwork`).

Group statistics are all-reduced over DistributedDataParallel ranks (small tensors, no host synchronisation);
nothing here reads a value back to the host during a step.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nnunet_dmoe.data.attribute import UNKNOWN_LEVEL as UNKNOWN_GROUP

__all__ = ["GroupLoss", "group_sums", "all_reduce_sum", "group_dro_step", "GroupDROLoss", "soft_dice_sums",
           "febs_weights", "FEBSDiceLoss", "with_febs_dice", "AdversarialLoss", "UNKNOWN_GROUP"]


# ------------------------------------------------------------------------------------------------------ helpers
def all_reduce_sum(t: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``t`` summed over the DistributedDataParallel ranks (a copy) and the world size; ``(t, 1)`` without DDP."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        return t, dist.get_world_size()
    return t, 1


def group_sums(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-group sums of per-sample ``values`` (b, ...) and per-group counts, for group indices ``groups`` (b,).

    Returns ``(sums (G, ...), counts (G,))``; gradients flow through ``sums``. One matrix product, no host sync.
    """
    onehot = F.one_hot(groups.long(), num_groups).to(values.dtype)  # (b, G)
    sums = (onehot.T @ values.reshape(values.shape[0], -1)).reshape(num_groups, *values.shape[1:])
    return sums, onehot.sum(0)


def _sample(x, i: int):
    """Sample ``i`` of a batch (a tensor, or nnU-Net's list of deep-supervision outputs/targets), batch dim kept."""
    if isinstance(x, (list, tuple)):
        return [o[i:i + 1] for o in x]
    return x[i:i + 1]


class GroupLoss(nn.Module):
    """A loss that needs the group of each sample of the batch.

    ``group_names`` are the attribute's levels, plus ``"unknown"`` last when unknown cases form their own group.
    :meth:`set_groups` takes the batch's level indices (-1 = unknown) and whether this is a training step (state
    and statistics change only then). :meth:`epoch_stats` returns the statistics of the epoch (and resets them),
    one list per key (one value per group) or a number; :meth:`restore` sets the state back from those logged
    values when training resumes from a checkpoint.
    """

    def __init__(self, group_names: Sequence[str], num_levels: Optional[int] = None):
        super().__init__()
        self.group_names = [str(g) for g in group_names]
        # levels are groups 0..num_levels-1; with an unknown group, level -1 -> group num_levels
        self.num_levels = len(self.group_names) if num_levels is None else num_levels
        self.groups: Optional[torch.Tensor] = None
        self.updating = False

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def set_groups(self, levels: torch.Tensor, train: bool) -> None:
        if self.num_groups > self.num_levels:
            levels = torch.where(levels < 0, torch.full_like(levels, self.num_levels), levels)
        self.groups = levels
        self.updating = train

    def _require_groups(self, batch_size: int) -> torch.Tensor:
        if self.groups is None or self.groups.shape[0] != batch_size:
            got = None if self.groups is None else tuple(self.groups.shape)
            raise RuntimeError(f"{type(self).__name__} needs the groups of this batch of {batch_size} samples "
                               f"(set_groups, called by the trainer's batch hook prepare_attribute); got {got}")
        return self.groups

    def epoch_stats(self) -> Dict[str, object]:
        return {}

    def describe(self, stats: Dict[str, object]) -> List[str]:
        return [f"{k}: " + (", ".join(f"{g} {v:.4f}" for g, v in zip(self.group_names, val))
                            if isinstance(val, list) else f"{val:.4f}") for k, val in stats.items()]

    def restore(self, history: Dict[str, list]) -> None:
        pass


# ---------------------------------------------------------------------------------------------------- Group DRO
def group_dro_step(log_q: torch.Tensor, group_loss: torch.Tensor, step_size: float,
                   adjustment: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One online Group DRO update of the group weights (no gradient), Sagawa et al.'s
    ``LossComputer.compute_robust_loss``: ``q_g <- q_g exp(step_size * (L_g + adj_g))``, then ``q / sum q``.

    ``group_loss`` (G,) is the batch's mean loss per group, 0 for a group absent from the batch (as their
    ``compute_group_avg``); ``adjustment`` (G,) their generalization adjustment ``C / sqrt(n_g)`` (``None``: 0).
    Works in log space (``log_q`` holds ``log q``); returns the new ``log_q``.
    """
    adjusted = group_loss if adjustment is None else group_loss + adjustment
    log_q = log_q + step_size * adjusted
    return log_q - torch.logsumexp(log_q, 0)


class GroupDROLoss(GroupLoss):
    """Online Group DRO over nnU-Net's loss (Sagawa et al., "Distributionally Robust Neural Networks for Group
    Shifts", ICLR 2020, Algorithm 1 as their code computes it: ``LossComputer`` in github.com/kohpangwei/group_DRO).

    Per step: nnU-Net's loss of every sample alone (``loss``: Dice+CE with deep supervision, the Dice not pooled
    over DDP ranks), per-group sums and counts all-reduced over the ranks, the batch's mean loss ``L_g`` of each
    group present, the update :func:`group_dro_step` on ``L_g + loss_offset`` (0 for absent groups; nnU-Net's Dice
    term is -Dice, with the offset 1 a perfect prediction scores 0 like the reference's cross-entropy), then the
    loss ``sum_g q_g L_g`` over the groups of the (global) batch with the new ``q`` (times the world size on each
    rank's share, as DDP averages the ranks' gradients). ``adjustment`` (G,): Sagawa's ``adj / sqrt(n_g)``.
    """

    def __init__(self, loss: nn.Module, group_names: Sequence[str], step_size: float = 0.01,
                 loss_offset: float = 1.0, num_levels: Optional[int] = None,
                 adjustment: Optional[Sequence[float]] = None):
        super().__init__(group_names, num_levels)
        for m in loss.modules() if isinstance(loss, nn.Module) else ():
            if hasattr(m, "ddp"):  # nnU-Net's Dice would pool each "per-sample" Dice over the ranks
                m.ddp = False
        self.loss = loss
        self.step_size, self.loss_offset = float(step_size), float(loss_offset)
        g = self.num_groups
        self.register_buffer("log_q", torch.full((g,), -math.log(g)))
        self.register_buffer("adjustment", torch.zeros(g))
        self._adjust = False
        if adjustment is not None:
            self.set_adjustment(adjustment)
        self.register_buffer("_epoch_sums", torch.zeros(g))
        self.register_buffer("_epoch_counts", torch.zeros(g))

    @property
    def q(self) -> torch.Tensor:
        return self.log_q.exp()

    def set_adjustment(self, adjustment: Sequence[float]) -> None:
        """Sagawa et al.'s generalization adjustment, one value per group (``C / sqrt(n_g)``, ``n_g`` the group's
        training cases), added to every group's loss in the update of ``q`` (not to the loss)."""
        values = torch.as_tensor(adjustment, dtype=torch.float32).flatten()
        if values.numel() != self.num_groups or not torch.isfinite(values).all():
            raise ValueError(f"adjustment needs one finite value per group ({self.num_groups}), got "
                             f"{values.tolist()}")
        self.adjustment = values.to(self.log_q.device)
        self._adjust = bool((values != 0).any())  # decided here, not in the step: no host synchronisation

    def forward(self, output, target):
        b = (output[0] if isinstance(output, (list, tuple)) else output).shape[0]
        groups = self._require_groups(b)
        per_sample = torch.stack([self.loss(_sample(output, i), _sample(target, i)) for i in range(b)]).float()
        if self.log_q.device != per_sample.device:
            self.to(per_sample.device)
        g = self.num_groups
        sums, counts = group_sums(per_sample, groups.to(per_sample.device), g)
        reduced, world = all_reduce_sum(torch.cat([sums.detach(), counts]))
        total_sums, total_counts = reduced[:g], reduced[g:]
        present = total_counts > 0
        if self.updating:
            with torch.no_grad():
                mean = torch.where(present, total_sums / total_counts.clamp_min(1) + self.loss_offset,
                                   torch.zeros_like(total_sums))
                self.log_q = group_dro_step(self.log_q, mean, self.step_size,
                                            self.adjustment if self._adjust else None)
                self._epoch_sums += total_sums
                self._epoch_counts += total_counts
        # sum_g q_g L_g, L_g = (global sum of group g) / (global count): this rank's share of the sums
        return world * (self.log_q.exp() * sums / total_counts.clamp_min(1)).sum()

    def epoch_stats(self) -> Dict[str, object]:
        mean = self._epoch_sums / self._epoch_counts  # NaN for a group absent all epoch
        self._epoch_sums, self._epoch_counts = torch.zeros_like(mean), torch.zeros_like(mean)
        return {"dro_weights": self.q.tolist(), "dro_group_loss": mean.tolist()}

    def describe(self, stats: Dict[str, object]) -> List[str]:
        fmt = lambda key: ", ".join(f"{n} {v:.4f}" for n, v in zip(self.group_names, stats[key]))  # noqa: E731
        return [f"GroupDRO weights q: {fmt('dro_weights')}",
                f"GroupDRO mean group loss this epoch (nnU-Net's scale): {fmt('dro_group_loss')}"]

    def restore(self, history: Dict[str, list]) -> None:
        last = [w for w in history.get("dro_weights") or [] if w is not None]
        if not last:
            return
        q = torch.tensor(last[-1], dtype=torch.float32, device=self.log_q.device)
        if q.numel() != self.num_groups:
            raise ValueError(f"the checkpoint's GroupDRO weights have {q.numel()} groups, this trainer has "
                             f"{self.num_groups} ({self.group_names})")
        self.log_q = q.clamp_min(1e-30).log()


# --------------------------------------------------------------------------------------------------------- FEBS
def soft_dice_sums(probs: torch.Tensor, target: torch.Tensor, loss_mask: Optional[torch.Tensor] = None,
                   do_bg: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample, per-class sums over space of ``p*y``, ``p`` and ``y`` (each (b, c)): the pieces of nnU-Net's
    soft Dice. ``target`` is a label map (b, 1, ...) or one-hot (b, c, ...); ``loss_mask`` (b, 1, ...) is 1 where
    the voxel counts."""
    with torch.no_grad():
        if target.ndim != probs.ndim:
            target = target.view(target.shape[0], 1, *target.shape[1:])
        if target.shape == probs.shape:
            onehot = target.to(probs.dtype)
        else:
            onehot = torch.zeros_like(probs).scatter_(1, target.long(), 1)
        if loss_mask is not None:
            onehot = onehot * loss_mask
    p = probs if loss_mask is None else probs * loss_mask
    if not do_bg:
        p, onehot = p[:, 1:], onehot[:, 1:]
    axes = tuple(range(2, probs.ndim))
    return (p * onehot).sum(axes), p.sum(axes), onehot.sum(axes)


def febs_weights(group_loss: torch.Tensor, present: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """FEBS group weights ``w_g = tanh((min_h L_h / L_g)^gamma)``, the minimum over the groups present; 0 for a
    group not present. The best group gets ``tanh(1) = 0.762``, worse groups less."""
    loss = group_loss.clamp_min(1e-8)
    best = torch.where(present, loss, torch.full_like(loss, math.inf)).min()
    return torch.where(present, torch.tanh((best / loss) ** gamma), torch.zeros_like(loss))


class FEBSDiceLoss(GroupLoss):
    """Fair error-bound scaling of nnU-Net's Dice term (Tian et al., "FairSeg: A Large-Scale Medical Image
    Segmentation Dataset for Fairness Learning Using Segment Anything Model with Fair Error-Bound Scaling",
    ICLR 2024; ``febs_loss`` / ``FairDiceLoss`` in github.com/Harvard-Ophthalmology-AI-Lab/FairSeg).

    Per call (each deep-supervision output): softmax probabilities ``p``; per group ``g`` present in the (global)
    batch the soft Dice loss ``L_g = 1 - mean_c Dice_c`` pooled over the group's samples (nnU-Net's Dice form, no
    gradient); weights :func:`febs_weights`; then nnU-Net's own Dice (its settings: background excluded,
    batch Dice per the plans, DDP pooling) of ``p`` with every sample's probabilities multiplied by its group's
    weight. nnU-Net's cross-entropy stays as it is (the FairSeg code: 0.5 CE + 0.5 FEBS Dice; nnU-Net: 1:1).

    ``dice`` is nnU-Net's Dice module (``DC_and_CE_loss.dc``), whose non-linearity is applied here.
    """

    def __init__(self, dice: nn.Module, group_names: Sequence[str], gamma: float = 1.0,
                 num_levels: Optional[int] = None):
        super().__init__(group_names, num_levels)
        original = getattr(dice, "_orig_mod", dice)  # nnU-Net compiles the Dice on CUDA
        self.nonlin = original.apply_nonlin
        plain = copy.copy(original)
        plain.apply_nonlin = None
        self.dice = torch.compile(plain) if original is not dice else plain
        self.do_bg, self.smooth, self.gamma = original.do_bg, float(original.smooth), float(gamma)
        self._weight_sums = torch.zeros(self.num_groups)
        self._weight_counts = torch.zeros(self.num_groups)

    def group_weights(self, probs: torch.Tensor, target: torch.Tensor,
                      loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The FEBS weight of every group (G,) for these probabilities (no gradient)."""
        groups = self._require_groups(probs.shape[0]).to(probs.device)
        with torch.no_grad():
            tp, pred, gt = soft_dice_sums(probs.float(), target, loss_mask, self.do_bg)
            sums, counts = group_sums(torch.stack([tp, pred, gt], 1), groups, self.num_groups)  # (G, 3, C)
            reduced, _ = all_reduce_sum(torch.cat([sums.flatten(), counts]))
            sums, counts = reduced[:sums.numel()].view_as(sums), reduced[sums.numel():]
            dice = (2 * sums[:, 0] + self.smooth) / (sums[:, 1] + sums[:, 2] + self.smooth).clamp_min(1e-8)
            return febs_weights(1 - dice.mean(1), counts > 0, self.gamma)

    def forward(self, x: torch.Tensor, y: torch.Tensor, loss_mask: Optional[torch.Tensor] = None):
        probs = self.nonlin(x) if self.nonlin is not None else x
        w = self.group_weights(probs, y, loss_mask)
        groups = self.groups.to(w.device)
        if self.updating:
            with torch.no_grad():
                present = F.one_hot(groups.long(), self.num_groups).sum(0) > 0
                if self._weight_sums.device != w.device:
                    self._weight_sums, self._weight_counts = self._weight_sums.to(w.device), \
                        self._weight_counts.to(w.device)
                self._weight_sums += torch.where(present, w, torch.zeros_like(w))
                self._weight_counts += present
        scale = w[groups].view(-1, *([1] * (probs.ndim - 1))).to(probs.dtype)
        return self.dice(probs * scale, y, loss_mask=loss_mask)

    def epoch_stats(self) -> Dict[str, object]:
        mean = self._weight_sums / self._weight_counts
        self._weight_sums, self._weight_counts = torch.zeros_like(mean), torch.zeros_like(mean)
        return {"febs_weights": mean.tolist()}

    def describe(self, stats: Dict[str, object]) -> List[str]:
        return ["FEBS mean group weight (present groups, all outputs): "
                + ", ".join(f"{n} {v:.4f}" for n, v in zip(self.group_names, stats["febs_weights"]))]


def with_febs_dice(loss: nn.Module, group_names: Sequence[str], gamma: float = 1.0,
                   num_levels: Optional[int] = None) -> nn.Module:
    """nnU-Net's loss (``DC_and_CE_loss`` / ``DC_and_BCE_loss``, bare or inside ``DeepSupervisionWrapper``) with
    its Dice term replaced by :class:`FEBSDiceLoss` around it (in place; returned for convenience)."""
    inner = getattr(loss, "loss", loss)
    if not hasattr(inner, "dc"):
        raise TypeError(f"expected nnU-Net's Dice+CE loss (a module with .dc), got {type(inner).__name__}")
    inner.dc = FEBSDiceLoss(inner.dc, group_names, gamma, num_levels)
    return loss


# --------------------------------------------------------------------------------------------------- adversary
class AdversarialLoss(GroupLoss):
    """nnU-Net's loss plus the attribute classifier's cross-entropy (mean over samples of known level; unknown
    ones weigh 0 but stay in the graph, so every parameter gets a gradient every step).

    In training the network returns :class:`nnunet_dmoe.fairness.adversary.AdversarialOutput` (segmentation, classifier
    logits); in evaluation only the segmentation, which goes to nnU-Net's loss alone. The gradient reversal and its
    weight are in the network, so the classifier learns at full rate while the encoder gets ``-weight`` times its
    gradient (Ganin & Lempitsky 2015; Madras et al. 2018).
    """

    def __init__(self, loss: nn.Module, level_names: Sequence[str]):
        super().__init__(level_names)
        self.loss = loss
        self._correct = torch.zeros(())
        self._count = torch.zeros(())

    def forward(self, output, target):
        logits = getattr(output, "attribute_logits", None)
        if logits is None:
            return self.loss(output, target)
        levels = self._require_groups(logits.shape[0]).to(logits.device)
        known = levels >= 0
        ce = F.cross_entropy(logits.float(), levels.clamp_min(0).long(), reduction="none")
        adversary = (ce * known).sum() / known.sum().clamp_min(1)
        if self.updating:
            with torch.no_grad():
                if self._correct.device != logits.device:
                    self._correct, self._count = self._correct.to(logits.device), self._count.to(logits.device)
                self._correct += ((logits.argmax(1) == levels) & known).sum()
                self._count += known.sum()
        return self.loss(output.segmentation, target) + adversary

    def epoch_stats(self) -> Dict[str, object]:
        totals, _ = all_reduce_sum(torch.stack([self._correct, self._count]).float())
        self._correct, self._count = torch.zeros_like(self._correct), torch.zeros_like(self._count)
        correct, count = totals.tolist()
        return {"adversary_accuracy": correct / count if count else math.nan}

    def describe(self, stats: Dict[str, object]) -> List[str]:
        return [f"Attribute classifier accuracy (training samples of known level): "
                f"{stats['adversary_accuracy']:.4f}"]
