from nnunet_dmoe.transformer_networks import (TRANSUNET_DEFAULTS, build_transunet_network, load_vit_weights,
                                              transformer_settings, transunet_deep_supervision_scales)
from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase
from nnunet_dmoe.trainers.token_patch import RoundPatchToTokens


class nnUNetTrainerTransUNet(RoundPatchToTokens, nnUNetTrainerAttributeBase):
    """Attribute-blind 2D transformer baseline: TransUNet-style (conv stem, ViT-B/16, CNN decoder with skips), the
    attribute channel stripped.

    The paper's 2D setting. The plans' patch is rounded down to a multiple of the token size (16), deep supervision
    uses the decoder's own scales (one per stem stage), and ``"pretrained"`` in the plans' ``"transformer"`` block
    names a ViT checkpoint file (timm's keys) that initialises the transformer blocks before training."""

    transformer_defaults = TRANSUNET_DEFAULTS

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True):
        return build_transunet_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                       enable_deep_supervision)

    def _get_deep_supervision_scales(self):
        return transunet_deep_supervision_scales(self.configuration_manager) if self.enable_deep_supervision else None

    def initialize(self):
        super().initialize()
        path = transformer_settings(self.configuration_manager, self.transformer_defaults)["pretrained"]
        if path:
            network = self.network.module if self.is_ddp else self.network
            network = getattr(network, "_orig_mod", network)
            loaded = load_vit_weights(network.backbone.encoder, path)
            self.print_to_log_file(f"Initialised {len(loaded)} ViT tensors from {path}.")
