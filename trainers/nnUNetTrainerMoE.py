from nnunet_dmoe.networks.unet import build_attribute_network
from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase


class nnUNetTrainerMoE(nnUNetTrainerAttributeBase):
    """The paper's MoE ablation: the plans' U-Net with an MoE block after every encoder stage, one router for all."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True):
        return build_attribute_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                       enable_deep_supervision, routing="moe")
