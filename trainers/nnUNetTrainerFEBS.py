from nnunet_dmoe.fairness.losses import with_febs_dice
from nnunet_dmoe.trainers.seam.fairness_loss_base import nnUNetTrainerFairnessLossBase


class nnUNetTrainerFEBS(nnUNetTrainerFairnessLossBase):
    """Fair error-bound scaling (FEBS, Tian et al., ICLR 2024): the plans' U-Net, nnU-Net's Dice term computed on
    probabilities scaled per attribute group by tanh((min loss / group loss)^febs_gamma), from the batch's
    per-group Dice losses.

    FairSeg applies FEBS when fine-tuning a trained model; here: nnUNetv2_train ... -tr nnUNetTrainerFEBS
    -pretrained_weights <an nnUNetTrainerNoAttribute checkpoint of the same plans> (nnU-Net loads every weight but
    the segmentation heads, then trains with its own schedule)."""

    febs_gamma = 1.0  # the FairSeg code's default

    def _build_loss(self):
        return with_febs_dice(super()._build_loss(), self.group_names(), self.febs_gamma,
                              num_levels=self.attribute.num_levels)


class nnUNetTrainerFEBS_gamma2(nnUNetTrainerFEBS):
    """FEBS with gamma 2."""
    febs_gamma = 2.0
