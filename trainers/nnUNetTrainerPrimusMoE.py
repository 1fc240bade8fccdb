import torch
from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import nnUNet_Primus_M_Trainer

from nnunet_dmoe.transformer_networks import PRIMUS_DEFAULTS, build_primus_network, round_patch_size
from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase


class nnUNetTrainerPrimusMoE(nnUNetTrainerAttributeBase, nnUNet_Primus_M_Trainer):
    """3D: nnU-Net's Primus-M + MoE on its tokens, one router for all.

    One MoE block shared by all transformer blocks and applied after each (``"transformer_placement": "per_block"``
    in the plans' ``"dmoe"`` block: one per block). Training as nnU-Net's ``nnUNet_Primus_M_Trainer`` (AdamW, warm-up, no deep supervision; inherited), the
    attribute path as every plugin trainer. The plans' patch is rounded down to a multiple of the token size (8);
    the ``"transformer"`` block of the plans may change the Primus size (``embed_dim``, ``depth``, ``num_heads``)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        plans, old, new = round_patch_size(plans, configuration, PRIMUS_DEFAULTS)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if new != old:
            self.print_to_log_file(f"Patch size {old} of the plans rounded to {new}, a multiple of the token size.")

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = False):
        return build_primus_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                    enable_deep_supervision, routing="moe")
