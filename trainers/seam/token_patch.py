"""The transformer trainers' patch: rounded down to a multiple of the network's token size."""
import torch

from nnunet_dmoe.networks.transformer import round_patch_size

__all__ = ["RoundPatchToTokens"]


class RoundPatchToTokens:
    """Trainer mixin (before the trainer base): the plans' patch rounded down to a multiple of the token size of the
    network's settings (``transformer_defaults`` and the plans' ``"transformer"`` block), before nnU-Net reads it.
    The rounded plans go into the model folder, so the predictor's sliding window uses the same patch."""

    transformer_defaults: dict = None  # TRANSUNET_DEFAULTS / PRIMUS_DEFAULTS

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        plans, old, new = round_patch_size(plans, configuration, self.transformer_defaults)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if new != old:
            self.print_to_log_file(f"Patch size {old} of the plans rounded to {new}, a multiple of the token size.")
