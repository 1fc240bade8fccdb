from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase


class nnUNetTrainerNoAttribute(nnUNetTrainerAttributeBase):
    """Attribute-blind baseline: the plans' U-Net; the attribute channel is stripped from the input."""
