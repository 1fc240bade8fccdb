from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase


class nnUNetTrainerDMoE(nnUNetTrainerAttributeBase):
    """Distribution-aware MoE (Oh et al., ICML 2025): the plans' U-Net with a dMoE block after every encoder stage,
    routed by one router per attribute level (plus one, trained by hiding the level of a share of the samples, for
    cases whose attribute is unknown)."""

    routing = "dmoe"
