"""Common base of the attribute-aware trainers: reads dataset.json's ``attribute`` block, records the settings the
network needs in the plans, hands each training sample its level from ``attribute.cases`` (through the batch's case
keys) and checks at start that dataset.json and the preprocessed attribute channel agree.
"""
import random
from copy import deepcopy
from typing import List

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_dmoe.attribute import AttributeSpec, decode_attribute_channel
from nnunet_dmoe.networks import build_attribute_network

_CASES_DISAGREE = (
    "dataset.json's attribute block and the preprocessed attribute channel (channel {channel}) disagree for "
    "{n} case(s):\n{lines}\nFix the attribute block or rewrite the channel (nnUNetv2_dmoe_attach_attribute), then "
    "run nnUNetv2_plan_and_preprocess again."
)


def with_attribute_settings(plans: dict, configuration: str, spec: AttributeSpec) -> dict:
    """A copy of ``plans`` whose configuration's ``arch_kwargs`` hold ``dmoe_num_levels`` and
    ``dmoe_attribute_channel``, so that a model folder rebuilds the same network at prediction time."""
    plans = deepcopy(plans)
    configs = plans["configurations"]
    if configuration not in configs:
        raise ValueError(f"configuration {configuration!r} is not in the plans; it has {sorted(configs)}")
    cfg, name = configs[configuration], configuration
    while "architecture" not in configs[name]:  # inherited: give this configuration its own copy
        name = configs[name]["inherits_from"]
    if name != configuration:
        cfg["architecture"] = deepcopy(configs[name]["architecture"])
    arch_kwargs = cfg["architecture"]["arch_kwargs"]
    arch_kwargs["dmoe_num_levels"] = spec.num_levels
    arch_kwargs["dmoe_attribute_channel"] = spec.channel
    return plans


class nnUNetTrainerAttributeBase(nnUNetTrainer):
    """Subclasses set ``attribute_mode`` (see ``nnunet_dmoe.networks.ATTRIBUTE_MODES``)."""

    attribute_mode = "none"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        where = f"dataset.json of {plans.get('dataset_name', 'this dataset')}"
        self.attribute = AttributeSpec.from_dataset_json(dataset_json, where=where)
        plans = with_attribute_settings(plans, configuration, self.attribute)
        super().__init__(plans, configuration, fold, dataset_json, device)
        # Some hyperparameters for you to fiddle with
        # share of training samples whose attribute is hidden, so that the "unknown" router of the dMoE is trained
        self.unknown_attribute_rate = 0.1
        # every fold is a replicate with its own seed (network init, augmentation in this process, attribute hiding);
        # DDP ranks differ in their data (DDP broadcasts rank 0's initial weights)
        self.random_seed = 12345 + (fold if isinstance(fold, int) else 99) + 1000 * self.local_rank
        random.seed(self.random_seed)
        np.random.seed(self.random_seed)
        torch.manual_seed(self.random_seed)
        self._attribute_rng = np.random.default_rng(self.random_seed)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True) -> torch.nn.Module:
        return build_attribute_network(plans_manager, configuration_manager, num_input_channels,
                                       num_output_channels, enable_deep_supervision, cls.attribute_mode)

    def attribute_levels(self, keys: List[str]) -> np.ndarray:
        """Level index per case key (-1 = unknown) from dataset.json's ``attribute.cases``."""
        missing = [k for k in keys if k not in self.attribute.cases]
        if missing:
            raise ValueError(f"cases {missing} are not in dataset.json's attribute.cases; add them")
        return np.array([-1 if (i := self.attribute.case_level_index(k)) is None else i for k in keys])

    def write_attribute_channel(self, data: torch.Tensor, keys: List[str], hide_rate: float) -> torch.Tensor:
        """Overwrite the (possibly augmented) attribute channel with the clean code of each sample's level, hiding
        the level (code 0, "unknown") of a ``hide_rate`` share of the samples."""
        codes = self.attribute_levels(keys) + 1
        if hide_rate > 0:
            codes[self._attribute_rng.random(len(codes)) < hide_rate] = 0
        codes = torch.as_tensor(codes, dtype=data.dtype, device=data.device)
        data[:, self.attribute.channel] = codes.view(-1, *([1] * (data.ndim - 2)))
        return data

    def train_step(self, batch: dict) -> dict:
        if self.attribute_mode in ("moe", "dmoe"):
            batch['data'] = self.write_attribute_channel(batch['data'], batch['keys'], self.unknown_attribute_rate)
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        if self.attribute_mode in ("moe", "dmoe"):
            batch['data'] = self.write_attribute_channel(batch['data'], batch['keys'], 0.0)
        return super().validation_step(batch)

    def check_attribute_channel(self):
        """Compare dataset.json's level of every preprocessed case with what its attribute channel decodes to."""
        dataset = self.dataset_class(self.preprocessed_dataset_folder)
        problems = []
        for key in dataset.identifiers:
            if key not in self.attribute.cases:
                problems.append(f"  {key}: missing from attribute.cases")
                continue
            data = dataset.load_case(key)[0]
            try:
                found = decode_attribute_channel(np.asarray(data[self.attribute.channel]), self.attribute.num_levels,
                                                 case=key)
            except ValueError as e:
                problems.append(f"  {key}: {e}")
                continue
            expected = self.attribute.case_level_index(key)
            if found != expected:
                name = (lambda i: "unknown" if i is None else self.attribute.levels[i])
                problems.append(f"  {key}: dataset.json says {name(expected)}, the channel holds {name(found)}")
        if problems:
            raise ValueError(_CASES_DISAGREE.format(channel=self.attribute.channel, n=len(problems),
                                                    lines="\n".join(problems)))
        self.print_to_log_file(f"Attribute '{self.attribute.name}': dataset.json and the attribute channel agree "
                               f"for all {len(dataset.identifiers)} cases.")

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self.check_attribute_channel()
        super().on_train_start()
