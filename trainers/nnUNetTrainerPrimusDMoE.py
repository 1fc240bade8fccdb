from nnunet_dmoe.networks.transformers import build_primus_network
from nnunet_dmoe.trainers.nnUNetTrainerPrimusMoE import nnUNetTrainerPrimusMoE


class nnUNetTrainerPrimusDMoE(nnUNetTrainerPrimusMoE):
    """3D: nnU-Net's Primus-M + distribution-aware MoE on its tokens, one router per level (+ one for unknown).

    One dMoE block shared by all transformer blocks and applied after each (``"transformer_placement": "per_block"``
    in the plans' ``"dmoe"`` block: one per block). Training as nnU-Net's ``nnUNet_Primus_M_Trainer``."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = False):
        return build_primus_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                    enable_deep_supervision, routing="dmoe")
