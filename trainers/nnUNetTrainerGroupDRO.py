import math

from nnunet_dmoe.fairness.losses import GroupDROLoss
from nnunet_dmoe.trainers.seam.group_sampling import GroupBalancedSampling
from nnunet_dmoe.trainers.seam.fairness_loss_base import nnUNetTrainerFairnessLossBase


class nnUNetTrainerGroupDRO(GroupBalancedSampling, nnUNetTrainerFairnessLossBase):
    """Group DRO (Sagawa et al., ICLR 2020, as their code computes it): the plans' U-Net trained on
    sum_g q_g L_g (L_g the batch's mean loss of group g), q_g <- q_g exp(dro_step_size L_g) each step, groups
    drawn equally often. Weights are logged each epoch (log, fairness_progress.png)."""

    dro_step_size = 0.01  # Sagawa et al.'s default
    # Sagawa et al.'s generalization adjustment C (--generalization_adjustment): C / sqrt(n_g) is added to each
    # group's loss in the update of q (n_g: the group's training cases of this fold); 0 = off, their default
    dro_adjustment = 0.0
    group_balanced_sampling = True  # their --reweight_groups

    def _build_loss(self):
        return GroupDROLoss(super()._build_loss(), self.group_names(), self.dro_step_size,
                            num_levels=self.attribute.num_levels)

    def get_dataloaders(self):
        loaders = super().get_dataloaders()
        if self.dro_adjustment:
            counts = self.group_counts(self._training_set.identifiers)
            adjustment = [self.dro_adjustment / math.sqrt(counts[name]) if counts.get(name) else 0.0
                          for name in self.group_names()]
            for loss in self.group_losses():
                loss.set_adjustment(adjustment)
            self.print_to_log_file(f"GroupDRO adjustment C / sqrt(n_g) (C = {self.dro_adjustment}): " + ", ".join(
                f"{n} {a:.4f}" for n, a in zip(self.group_names(), adjustment)))
        return loaders


class nnUNetTrainerGroupDRO_eta0p001(nnUNetTrainerGroupDRO):
    """Group DRO with step size 0.001."""
    dro_step_size = 0.001


class nnUNetTrainerGroupDRO_eta0p1(nnUNetTrainerGroupDRO):
    """Group DRO with step size 0.1."""
    dro_step_size = 0.1


class nnUNetTrainerGroupDRO_eta1(nnUNetTrainerGroupDRO):
    """Group DRO with step size 1."""
    dro_step_size = 1.0
