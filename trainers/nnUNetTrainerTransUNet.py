import torch

from nnunet_dmoe.networks.transunet import (DECODER_KEY, TRANSUNET_DECODER, TRANSUNET_DEFAULTS,
                                            transunet_deep_supervision_scales, transunet_settings)
from nnunet_dmoe.networks.vit_weights import load_vit_weights
from nnunet_dmoe.plans.blocks import TRANSFORMER_KEY, with_transformer_defaults
from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase
from nnunet_dmoe.trainers.seam.token_patch import RoundPatchToTokens


class nnUNetTrainerTransUNet(RoundPatchToTokens, nnUNetTrainerAttributeBase):
    """Attribute-blind 2D transformer baseline: the paper's TransUNet (ViT-B/16 on 16x16 patches of the image, a
    CNN decoder without skips), the attribute channel stripped.

    The paper's 2D setting. The trainer writes ``"decoder": "paper"`` into the plans' ``"transformer"`` block when
    it has no ``"decoder"`` (so the model folder's plans name it; plans without it build the stem-and-skips network
    of earlier versions, ``"skips"``). The plans' patch is rounded down to a multiple of the token size (16). The
    paper's network has one output, so no deep supervision (``"skips"``: one output per stem stage). ``"pretrained"``
    in the block names a ViT checkpoint file (Google's ``.npz`` or timm's state dict) loaded before training."""

    network_family = "transunet"
    transformer_defaults = TRANSUNET_DEFAULTS

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        plans = with_transformer_defaults(plans, configuration, {DECODER_KEY: TRANSUNET_DECODER})
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.decoder_kind = transunet_settings(self.configuration_manager)[DECODER_KEY]
        if self.decoder_kind == "paper":
            self.enable_deep_supervision = False

    def _get_deep_supervision_scales(self):
        return transunet_deep_supervision_scales(self.configuration_manager) if self.enable_deep_supervision else None

    def set_deep_supervision_enabled(self, enabled: bool):
        # nnU-Net switches it on again after validation; the paper's network has none
        super().set_deep_supervision_enabled(enabled and self.enable_deep_supervision)

    def initialize(self):
        super().initialize()
        path = transunet_settings(self.configuration_manager)["pretrained"]
        if path:
            loaded = load_vit_weights(self._plain_network().backbone.encoder, path)
            self.print_to_log_file(f"Initialised {len(loaded)} ViT tensors from {path}.")

    def _plain_network(self):
        network = self.network.module if self.is_ddp else self.network
        return getattr(network, "_orig_mod", network)

    def load_checkpoint(self, filename_or_checkpoint):
        """nnU-Net's, with a clear error for a checkpoint of the other decoder (e.g. ``--c`` on a model folder of an
        earlier version, whose plans lacked ``"decoder"``: the trainer now builds the paper's network)."""
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):
            checkpoint = torch.load(checkpoint, map_location=self.device, weights_only=False)
        if not self.was_initialized:
            self.initialize()
        stem = any(".encoder.stem." in k for k in checkpoint["network_weights"])
        if stem != (self.decoder_kind == "skips"):
            other = "skips" if stem else "paper"
            raise RuntimeError(f"this checkpoint holds the \"{other}\" TransUNet, the plans build "
                               f"\"{self.decoder_kind}\"; set \"{DECODER_KEY}\": \"{other}\" in the plans' "
                               f"\"{TRANSFORMER_KEY}\" block of this configuration to continue it")
        super().load_checkpoint(checkpoint)
