from nnunet_dmoe.trainers.nnUNetTrainerTransUNet import nnUNetTrainerTransUNet


class nnUNetTrainerTransUNetMoE(nnUNetTrainerTransUNet):
    """TransUNet + MoE on the ViT's tokens, one router for all (the paper's ablation).

    The paper's TransUNet (see :class:`nnUNetTrainerTransUNet`) with one MoE block shared by all transformer blocks
    and applied after each, as in the paper's reference code; ``"transformer_placement": "per_block"`` in the plans'
    ``"dmoe"`` block gives one per block."""

    routing = "moe"
