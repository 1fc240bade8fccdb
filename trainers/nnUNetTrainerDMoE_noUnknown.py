import torch

from nnunet_dmoe.data.attribute import fmt_cases
from nnunet_dmoe.trainers.nnUNetTrainerDMoE import nnUNetTrainerDMoE


class nnUNetTrainerDMoE_noUnknown(nnUNetTrainerDMoE):
    """The paper's setting: the dMoE with one router per attribute level and no router for "unknown", so no level is
    hidden in training. Every training case needs its level, and predicting a case without one is an error (use
    nnUNetTrainerDMoE for data with unknown attributes)."""

    # one router per level only: nnUNetv2_dmoe_predict refuses cases without a level before predicting
    unknown_router = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.unknown_attribute_rate = 0.0
        unknown = sorted(f"{case} ({spec.name})" for spec in self.attributes
                         for case, level in spec.cases.items() if level is None)
        if unknown:
            raise ValueError(f"nnUNetTrainerDMoE_noUnknown needs the attribute of every training case, but "
                             f"{len(unknown)} are unknown in dataset.json: {fmt_cases(unknown)}. Give them their "
                             f"levels, or train nnUNetTrainerDMoE, which has a router for unknown attributes.")
