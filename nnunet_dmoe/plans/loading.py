"""The plans of a preprocessed dataset (``$nnUNet_preprocessed/DatasetXXX_Name/<plans>.json``), loaded in one place.

:func:`load_plans` and :func:`plans_configuration` read a plans file and pick a configuration, with errors that name
the file and the flags that chose it; :func:`load_configuration` gives everything the cost commands build a network
from (the configuration, the attribute's levels and channel, the input channels and outputs, the patch size).
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple, Tuple

__all__ = ["DatasetConfiguration", "load_plans", "plans_configuration", "load_configuration"]


class DatasetConfiguration(NamedTuple):
    """A configuration of a preprocessed dataset and what its network takes and gives."""
    configuration_manager: object  # nnU-Net's ConfigurationManager
    num_levels: int
    num_input_channels: int
    num_outputs: int
    attribute_channel: int
    patch_size: Tuple[int, ...]


def load_plans(dataset_folder: str, plans_identifier: str, flags: str):
    """nnU-Net's ``PlansManager`` of ``<dataset_folder>/<plans_identifier>.json``. ``flags``: the command-line flags
    that chose the plans, named in the error when the file does not exist (e.g. ``-d 4 -p nnUNetPlans``)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_file = os.path.join(dataset_folder, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise ValueError(f"no plans {plans_file} ({flags}); run nnUNetv2_plan_and_preprocess first or check -p")
    with open(plans_file) as f:
        return PlansManager(json.load(f))


def plans_configuration(plans, configuration: str, dataset_folder: str, plans_identifier: str,
                        flag: str = "configuration"):
    """The ``ConfigurationManager`` of ``configuration`` in ``plans`` (loaded by :func:`load_plans` from
    ``dataset_folder``); an error naming ``flag``, the plans file and its configurations if it has none such."""
    if configuration not in plans.available_configurations:
        plans_file = os.path.join(dataset_folder, plans_identifier + ".json")
        raise ValueError(f"{flag} {configuration!r} is not in {plans_file}; it has {plans.available_configurations}")
    return plans.get_configuration(configuration)


def load_configuration(dataset: str, configuration: str, plans_identifier: str) -> DatasetConfiguration:
    """Configuration ``configuration`` of the plans ``plans_identifier`` of the preprocessed dataset ``dataset`` (name
    or id), with its dataset.json's attribute, channels and labels (errors name ``-d``, ``-c`` and ``-p``)."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_dmoe.data.attribute import AttributeSpec

    if nnUNet_preprocessed is None:
        raise RuntimeError("nnUNet_preprocessed is not set; set it to the folder nnUNetv2_plan_and_preprocess wrote, "
                           "or use -preset")
    folder = os.path.join(nnUNet_preprocessed, maybe_convert_to_dataset_name(dataset))
    plans = load_plans(folder, plans_identifier, f"-d {dataset} -p {plans_identifier}")
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    cm = plans_configuration(plans, configuration, folder, plans_identifier, flag="-c")
    spec = AttributeSpec.from_dataset_json(dataset_json, os.path.join(folder, "dataset.json"))
    num_outputs = plans.get_label_manager(dataset_json).num_segmentation_heads
    channels = len(dataset_json.get("channel_names", dataset_json.get("modality")))
    return DatasetConfiguration(cm, spec.num_levels, channels, num_outputs, spec.channel, tuple(cm.patch_size))
