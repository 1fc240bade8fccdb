"""dMoE-aware experiment planners: nnU-Net's planning with the (d)MoE blocks counted in the memory estimate, so
that patch and batch size leave room for the experts' activations, and the dMoE settings written into the plans.

Preprocessing is unchanged, so the 2d/3d_fullres data of ``nnUNetPlans`` is reused (as nnU-Net's ResEnc planners
do). All trainers of the plugin can train on these plans; baselines then use the same patch and batch size.
"""
from typing import List, Tuple, Union

import torch
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import \
    nnUNetPlannerResEncM
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_dmoe.data.attribute import attribute_settings, attribute_specs_from_dataset_json
from nnunet_dmoe.method.config import DMoEConfig
from nnunet_dmoe.networks.unet import AttributeUNet
from nnunet_dmoe.plans.blocks import DMOE_KEY, planned_dmoe_block


class DMoEPlannerMixin:
    """Counts the dMoE blocks in the VRAM estimate and writes the dMoE settings into each configuration's ``"dmoe"``
    block (beside ``architecture``, not in its ``arch_kwargs``: nnU-Net's own trainers build the plain U-Net from
    the same plans)."""

    # Some hyperparameters for you to fiddle with (written into the plans; the trainer decides dmoe vs moe routing)
    dmoe_defaults = DMoEConfig()

    def _dmoe_config(self) -> DMoEConfig:
        specs = attribute_specs_from_dataset_json(self.dataset_json, where=f"dataset.json of {self.dataset_name}")
        return DMoEConfig(**{**self.dmoe_defaults.__dict__, **attribute_settings(specs)})

    def static_estimate_VRAM_usage(self, patch_size, input_channels, output_channels, arch_class_name, arch_kwargs,
                                   arch_kwargs_req_import):
        config = self._dmoe_config()
        with torch.device("meta"):  # only shapes are needed
            unet = get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import,
                                          input_channels - len(config.attribute_channels),
                                          output_channels, allow_init=False)
            net = AttributeUNet(unet, input_channels, config.attribute_channel, config)
        return net.compute_conv_feature_map_size(patch_size)

    def get_plans_for_configuration(self, *args, **kwargs) -> dict:
        plan = super().get_plans_for_configuration(*args, **kwargs)
        plan[DMOE_KEY] = planned_dmoe_block(self._dmoe_config())  # the routing is the trainer's choice
        return plan


class nnUNetPlannerDMoE(DMoEPlannerMixin, ExperimentPlanner):
    """nnU-Net's default planner (PlainConvUNet) sized for the dMoE. Plans: ``nnUNetDMoEPlans``."""

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = 'DefaultPreprocessor', plans_name: str = 'nnUNetDMoEPlans',
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)

    def generate_data_identifier(self, configuration_name: str) -> str:
        if configuration_name in ('2d', '3d_fullres'):
            return 'nnUNetPlans_' + configuration_name  # same preprocessing as nnUNetPlans
        return super().generate_data_identifier(configuration_name)


class nnUNetPlannerResEncMDMoE(DMoEPlannerMixin, nnUNetPlannerResEncM):
    """nnU-Net's ResEnc-M planner sized for the dMoE. Plans: ``nnUNetResEncUNetMDMoEPlans``."""

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = 'DefaultPreprocessor', plans_name: str = 'nnUNetResEncUNetMDMoEPlans',
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)


PLANNERS = {c.__name__: c for c in (nnUNetPlannerDMoE, nnUNetPlannerResEncMDMoE)}
