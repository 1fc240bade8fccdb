from nnunet_dmoe.trainers.seam.group_sampling import GroupBalancedSampling
from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase


class nnUNetTrainerGroupBalanced(GroupBalancedSampling, nnUNetTrainerAttributeBase):
    """Group-balanced sampling: the attribute-blind baseline (plans' U-Net, attribute channel stripped) trained on
    batches drawn so that every attribute group (each level, unknown as its own group) is seen equally often."""
