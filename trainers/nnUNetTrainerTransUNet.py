import torch

from nnunet_dmoe.transformer_networks import (TRANSUNET_DEFAULTS, build_transunet_network, load_vit_weights,
                                              round_patch_size, transformer_settings,
                                              transunet_deep_supervision_scales)
from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase


class nnUNetTrainerTransUNet(nnUNetTrainerAttributeBase):
    """Attribute-blind 2D transformer baseline: TransUNet-style (conv stem, ViT-B/16, CNN decoder with skips), the
    attribute channel stripped.

    The paper's 2D setting. The plans' patch is rounded down to a multiple of the token size (16), deep supervision uses the decoder's own
    scales (one per stem stage), and ``"pretrained"`` in the plans' ``"transformer"`` block names a ViT checkpoint
    file (timm's keys) that initialises the transformer blocks before training."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        plans, old, new = round_patch_size(plans, configuration, TRANSUNET_DEFAULTS)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if new != old:
            self.print_to_log_file(f"Patch size {old} of the plans rounded to {new}, a multiple of the token size.")

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True):
        return build_transunet_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                       enable_deep_supervision)

    def _get_deep_supervision_scales(self):
        return transunet_deep_supervision_scales(self.configuration_manager) if self.enable_deep_supervision else None

    def initialize(self):
        super().initialize()
        path = transformer_settings(self.configuration_manager, TRANSUNET_DEFAULTS)["pretrained"]
        if path:
            network = self.network.module if self.is_ddp else self.network
            network = getattr(network, "_orig_mod", network)
            loaded = load_vit_weights(network.backbone.encoder, path)
            self.print_to_log_file(f"Initialised {len(loaded)} ViT tensors from {path}.")
