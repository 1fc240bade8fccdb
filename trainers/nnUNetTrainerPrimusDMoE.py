from nnunet_dmoe.trainers.nnUNetTrainerPrimusMoE import nnUNetTrainerPrimusMoE


class nnUNetTrainerPrimusDMoE(nnUNetTrainerPrimusMoE):
    """3D: nnU-Net's Primus-M + distribution-aware MoE on its tokens, one router per level (+ one for unknown).

    One dMoE block shared by all transformer blocks and applied after each (``"transformer_placement": "per_block"``
    in the plans' ``"dmoe"`` block: one per block). Training as nnU-Net's ``nnUNet_Primus_M_Trainer``."""

    routing = "dmoe"
