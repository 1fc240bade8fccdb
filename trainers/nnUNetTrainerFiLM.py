from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase


class nnUNetTrainerFiLM(nnUNetTrainerAttributeBase):
    """FiLM (Perez et al., AAAI 2018): the plans' U-Net with a learned per-level scale and shift of each feature
    channel after the dMoE's encoder stages (identity at initialisation and for unknown; several attributes add
    up)."""

    network_family = "film"
