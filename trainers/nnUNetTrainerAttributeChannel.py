from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase


class nnUNetTrainerAttributeChannel(nnUNetTrainerAttributeBase):
    """Naive conditioning: the plans' U-Net with the attribute channel kept as an ordinary input channel (clean
    codes in training, as the dMoE gets them)."""

    keep_attribute_channel = True
