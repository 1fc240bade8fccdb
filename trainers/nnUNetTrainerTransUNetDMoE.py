from nnunet_dmoe.trainers.nnUNetTrainerTransUNet import nnUNetTrainerTransUNet


class nnUNetTrainerTransUNetDMoE(nnUNetTrainerTransUNet):
    """TransUNet + distribution-aware MoE on the ViT's tokens, one router per level (+ one for unknown).

    The paper's 2D setting (its TransUNet, see :class:`nnUNetTrainerTransUNet`): one dMoE block shared by all
    transformer blocks and applied after each, as in its reference code; ``"transformer_placement": "per_block"`` in
    the plans' ``"dmoe"`` block gives one per block."""

    routing = "dmoe"
