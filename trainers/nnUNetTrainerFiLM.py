from nnunet_dmoe.networks.film import build_film_network
from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase


class nnUNetTrainerFiLM(nnUNetTrainerAttributeBase):
    """FiLM (Perez et al., AAAI 2018): the plans' U-Net with a learned per-level scale and shift of each feature
    channel after the dMoE's encoder stages (identity at initialisation and for unknown; several attributes add
    up)."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True):
        return build_film_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                  enable_deep_supervision)
