from nnunet_dmoe.networks.unet import build_attribute_network
from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase


class nnUNetTrainerAttributeChannel(nnUNetTrainerAttributeBase):
    """Naive conditioning: the plans' U-Net with the attribute channel kept as an ordinary input channel (clean
    codes in training, as the dMoE gets them)."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True):
        return build_attribute_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                       enable_deep_supervision, keep_attribute_channel=True)
