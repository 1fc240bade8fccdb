from nnunet_dmoe.fairness_losses import GroupDROLoss
from nnunet_dmoe.trainers.fairness_loss_base import nnUNetTrainerFairnessLossBase


class nnUNetTrainerGroupDRO(nnUNetTrainerFairnessLossBase):
    """Group DRO (Sagawa et al., ICLR 2020): the plans' U-Net, each sample's nnU-Net loss weighted by its attribute
    group's weight, the weights updated online towards the groups with the highest loss (step size dro_step_size).
    Weights are logged each epoch (log, fairness_progress.png)."""

    dro_step_size = 0.01  # Sagawa et al.'s default
    dro_ema = 0.1  # weight of the newest batch in each group's running loss

    def _build_loss(self):
        return GroupDROLoss(super()._build_loss(), self.group_names(), self.dro_step_size, self.dro_ema,
                            num_levels=self.attribute.num_levels)


class nnUNetTrainerGroupDRO_eta0p001(nnUNetTrainerGroupDRO):
    """Group DRO with step size 0.001."""
    dro_step_size = 0.001


class nnUNetTrainerGroupDRO_eta0p1(nnUNetTrainerGroupDRO):
    """Group DRO with step size 0.1."""
    dro_step_size = 0.1


class nnUNetTrainerGroupDRO_eta1(nnUNetTrainerGroupDRO):
    """Group DRO with step size 1."""
    dro_step_size = 1.0
