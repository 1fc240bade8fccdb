from nnunet_dmoe.networks.unet import build_attribute_network
from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase


class nnUNetTrainerDMoE(nnUNetTrainerAttributeBase):
    """Distribution-aware MoE (Oh et al., ICML 2025): the plans' U-Net with a dMoE block after every encoder stage,
    routed by one router per attribute level (plus one, trained by hiding the level of a share of the samples, for
    cases whose attribute is unknown)."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True):
        return build_attribute_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                       enable_deep_supervision, routing="dmoe")
