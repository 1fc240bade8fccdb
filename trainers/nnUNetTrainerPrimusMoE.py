from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import nnUNet_Primus_M_Trainer

from nnunet_dmoe.networks.primus import PRIMUS_DEFAULTS
from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase
from nnunet_dmoe.trainers.seam.token_patch import RoundPatchToTokens


class nnUNetTrainerPrimusMoE(RoundPatchToTokens, nnUNetTrainerAttributeBase, nnUNet_Primus_M_Trainer):
    """3D: nnU-Net's Primus-M + MoE on its tokens, one router for all.

    One MoE block shared by all transformer blocks and applied after each (``"transformer_placement": "per_block"``
    in the plans' ``"dmoe"`` block: one per block). Training as nnU-Net's ``nnUNet_Primus_M_Trainer`` (inherited:
    AdamW, warm-up, no deep supervision), the attribute path as every plugin trainer. The plans' patch is rounded
    down to a multiple of the token size (8); the plans' ``"transformer"`` block may change the Primus size
    (``embed_dim``, ``depth``, ``num_heads``)."""

    network_family = "primus"
    routing = "moe"
    transformer_defaults = PRIMUS_DEFAULTS
