from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase


class nnUNetTrainerMoE(nnUNetTrainerAttributeBase):
    """The paper's MoE ablation: the plans' U-Net with an MoE block after every encoder stage, one router for all."""

    routing = "moe"
