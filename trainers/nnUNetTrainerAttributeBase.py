"""The seam every attribute-aware trainer builds on.

``nnUNetTrainerAttributeBase`` is nnU-Net's trainer plus five small pieces, each in one place:

1. **dataset.json -> plans** (``__init__``): reads and validates the ``attribute`` block and writes ``num_levels``
   and ``attribute_channel`` into the configuration's ``"dmoe"`` block of the plans, so that a model folder
   rebuilds the same network at prediction time.
2. **seeding** (:mod:`nnunet_dmoe.trainers.seam.seeding`): every fold a replicate with its own seed.
3. **the attribute of a batch** (:meth:`prepare_attribute`, the one batch hook): each sample's level from
   dataset.json through the batch's case keys; the channel holds the clean code (intensity augmentation is kept off
   it: :mod:`nnunet_dmoe.trainers.seam.attribute_augmentation`); a share of training samples is shown as "unknown".
4. **the start-up check** (:mod:`nnunet_dmoe.trainers.seam.attribute_checks`): dataset.json and the preprocessed channel
   agree for every case.
5. **CPU speed** (:meth:`configure_optimizers`, :meth:`on_train_start`): nnU-Net's SGD as torch's fused kernel,
   and glibc told to reuse freed memory (:mod:`nnunet_dmoe.trainers.seam.cpu_memory`); nothing changes on GPU.

A trainer of the plugin is one short subclass. Its network it declares with four class attributes, from which
this base's :meth:`build_network_architecture` builds it (:func:`nnunet_dmoe.networks.build.build_network`):
``network_family`` (``"unet"``, ``"film"``, ``"transunet"``, ``"primus"``), ``routing`` (``None``, ``"moe"``,
``"dmoe"``), ``keep_attribute_channel`` and ``unknown_router``; this base is the attribute-blind U-Net. The loss or
the use of the levels: :meth:`prepare_attribute` or nnU-Net's own hooks (``train_step``, ``_build_loss``, ...),
reading ``batch["attribute"]``.
"""
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_dmoe.data.attribute import (AttributeSpec, attribute_settings, attribute_specs_from_dataset_json,
                                        strip_attribute_tables)
from nnunet_dmoe.networks.build import build_network
from nnunet_dmoe.plans.blocks import with_dmoe_block
from nnunet_dmoe.trainers.seam.attribute_augmentation import protect_attribute_channel
from nnunet_dmoe.trainers.seam.attribute_checks import check_preprocessed_attribute
from nnunet_dmoe.trainers.seam.cpu_memory import keep_freed_memory
from nnunet_dmoe.trainers.seam.pretrained_weights import install as install_upcycling
from nnunet_dmoe.trainers.seam.seeding import fold_seed, seed_everything

__all__ = ["nnUNetTrainerAttributeBase", "with_attribute_settings"]


def with_attribute_settings(plans: dict, configuration: str,
                            specs: Union[AttributeSpec, Sequence[AttributeSpec]]) -> dict:
    """A copy of ``plans`` whose configuration's ``"dmoe"`` block holds ``num_levels`` and ``attribute_channel`` of
    the attribute(s) ``specs`` (lists for several attributes: :func:`nnunet_dmoe.data.attribute.attribute_settings`),
    the settings it inherits and the current defaults of the rest
    (:func:`nnunet_dmoe.plans.blocks.with_dmoe_block`), so that the model folder records the network it trains."""
    specs = [specs] if isinstance(specs, AttributeSpec) else list(specs)
    return with_dmoe_block(plans, configuration, attribute_settings(specs))


class nnUNetTrainerAttributeBase(nnUNetTrainer):
    """Attribute-blind baseline and base of every attribute-aware trainer: the plans' U-Net, the attribute channel
    stripped from its input."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        where = f"dataset.json of {plans.get('dataset_name', 'this dataset')}"
        # every attribute (dataset.json's "attribute" block, or each of its "attributes"); the first is the one
        # that trainers grouping by one attribute (the fairness comparators) use
        self.attributes: List[AttributeSpec] = attribute_specs_from_dataset_json(dataset_json, where=where)
        self.attribute = self.attributes[0]
        plans = with_attribute_settings(plans, configuration, self.attributes)
        # nnU-Net writes the dataset.json it is given into the model folder (dataset.json, each checkpoint's
        # init_args, debug.json): without the per-case tables, so that the folder can be shared; the trainer keeps
        # them in self.attributes
        super().__init__(plans, configuration, fold, strip_attribute_tables(dataset_json), device)
        # Some hyperparameters for you to fiddle with
        # share of training samples whose attribute is shown as unknown (trains the dMoE's "unknown" router, and
        # teaches the attribute-channel comparator the same fallback)
        self.unknown_attribute_rate = 0.1
        self.random_seed = fold_seed(fold, self.local_rank)
        self._attribute_rng = seed_everything(self.random_seed)
        install_upcycling()  # -pretrained_weights: a plain nnU-Net checkpoint into a (d)MoE U-Net

    # What the trainer trains (a subclass sets what differs; the builder: nnunet_dmoe.networks.build.build_network)
    network_family = "unet"  # "unet", "film", "transunet" or "primus"
    routing = None  # None (no (d)MoE blocks), "moe" (one router for all) or "dmoe" (one router per level)
    keep_attribute_channel = False  # U-Net only: the attribute channel as an ordinary input channel
    unknown_router = True  # dMoE: a router for cases whose attribute is unknown

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True) -> torch.nn.Module:
        # nnU-Net calls it on the class (the predictor) and on the trainer: a classmethod serves both
        return build_network(cls.network_family, plans_manager, configuration_manager, num_input_channels,
                             num_output_channels, enable_deep_supervision, routing=cls.routing,
                             keep_attribute_channel=cls.keep_attribute_channel, unknown_router=cls.unknown_router)

    # --- the attribute of a batch ---------------------------------------------------------------------------------
    def attribute_levels(self, keys: List[str], spec: Optional[AttributeSpec] = None) -> np.ndarray:
        """Level index per case key (-1 = unknown) from the ``cases`` of ``spec`` (default: the first attribute)."""
        spec = self.attribute if spec is None else spec
        missing = [k for k in keys if k not in spec.cases]
        if missing:
            raise ValueError(f"cases {missing} are not in the cases of dataset.json's attribute '{spec.name}'; add "
                             f"them")
        return np.array([-1 if (i := spec.case_level_index(k)) is None else i for k in keys])

    def prepare_attribute(self, batch: dict, train: bool) -> dict:
        """The batch hook. Sets ``batch["attribute"]`` (long tensor, level index per sample from dataset.json, -1 =
        unknown; the first attribute's) and ``batch["attributes"]`` (b, A: every attribute's), and writes each
        attribute channel as it is at prediction time: the sample's code (level + 1) inside the image footprint
        (where the channel, moved along by the spatial augmentation, is above 0.5), 0 outside. In training a share
        ``unknown_attribute_rate`` of the samples is shown as unknown (channel 0), drawn for each attribute
        independently; ``batch["attribute(s)"]`` keep their true levels."""
        data = batch["data"]
        all_levels = []
        for spec in self.attributes:
            levels = self.attribute_levels(batch["keys"], spec)
            codes = levels + 1
            if train and self.unknown_attribute_rate > 0:
                codes[self._attribute_rng.random(len(codes)) < self.unknown_attribute_rate] = 0
            channel = data[:, spec.channel]
            codes = torch.as_tensor(codes, dtype=data.dtype, device=data.device).view(-1, *([1] * (channel.ndim - 1)))
            data[:, spec.channel] = torch.where(channel > 0.5, codes, torch.zeros_like(channel))
            all_levels.append(levels)
        batch["attribute"] = torch.as_tensor(all_levels[0], dtype=torch.long)
        batch["attributes"] = torch.as_tensor(np.stack(all_levels, axis=1), dtype=torch.long)
        return batch

    def train_step(self, batch: dict) -> dict:
        return super().train_step(self.prepare_attribute(batch, train=True))

    def configure_optimizers(self, *args, **kwargs):
        """nnU-Net's SGD and schedule; on CPU the SGD runs as torch's fused kernel (the same update, equal up to
        float rounding: one pass over each parameter instead of five elementwise passes). The (d)MoE experts
        multiply the parameters (the demo's 2D U-Net: 7.8 -> 30.2 M), so on CPU the loop was a large share of
        their step. A checkpoint's optimizer state brings its own setting back when training resumes. Arguments
        pass through (nnU-Net's warm-up trainers, Primus among them, give a stage)."""
        optimizer, lr_scheduler = super().configure_optimizers(*args, **kwargs)
        if self.device.type == "cpu" and type(optimizer) is torch.optim.SGD:
            for group in optimizer.param_groups:
                group["fused"] = True
        return optimizer, lr_scheduler

    def validation_step(self, batch: dict) -> dict:
        return super().validation_step(self.prepare_attribute(batch, train=False))

    def get_training_transforms(self, *args, **kwargs):
        # nnU-Net defines it as a staticmethod but calls it through the instance
        return protect_attribute_channel(super().get_training_transforms(*args, **kwargs),
                                         [spec.channel for spec in self.attributes])

    # --- start-up check -------------------------------------------------------------------------------------------
    def check_attribute_channel(self):
        n = check_preprocessed_attribute(self.dataset_class(self.preprocessed_dataset_folder), self.attributes)
        for spec in self.attributes:
            self.print_to_log_file(f"Attribute '{spec.name}': dataset.json and the attribute channel agree for all "
                                   f"{n} cases.")

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self.check_attribute_channel()
        if self.device.type == "cpu":
            self.print_to_log_file(keep_freed_memory())
        super().on_train_start()
