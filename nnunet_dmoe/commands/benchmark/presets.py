"""The networks that the cost report compares: built-in presets, and the (baseline, (d)MoE) pair of a configuration."""
from __future__ import annotations

from copy import deepcopy
from typing import Optional, Sequence

import torch

__all__ = ["PRESETS", "PRESET_NETWORKS", "PRESET_TRANSFORMER", "PRESET_IMAGE_CHANNELS", "CUDA_PATCH",
           "resenc_m_configuration", "preset_configuration", "with_dmoe_settings", "stages_argument", "build_pair"]

# name: (dim, features, blocks per encoder stage, input size for the GFLOPs, default patch)
PRESETS = {
    # nnU-Net's ResEnc-M 3D (nnUNetPlannerResEncM) at its six-stage depth
    "resenc_m_3d": (3, (32, 64, 128, 256, 320, 320), (1, 3, 4, 6, 6, 6), (384, 384, 128), (64, 64, 64)),
    # the same ResEnc-M blocks in 2D (nnU-Net's 2D feature cap is 512)
    "2d": (2, (32, 64, 128, 256, 512, 512), (1, 3, 4, 6, 6, 6), (224, 224), (128, 128)),
    # small enough for tests
    "tiny_3d": (3, (8, 16, 32), (1, 2, 2), (32, 32, 32), (16, 16, 16)),
    # the paper's 2D network: TransUNet with ViT-B/16 (built by PRESET_NETWORKS' builder with PRESET_TRANSFORMER's
    # block; its U-Net entries only give the timing patch check its strides: 16 per token)
    "transunet_2d": (2, (32, 64, 128, 256, 768), (1, 1, 1, 1, 1), (224, 224), (224, 224)),
}
# presets that are not a plans' U-Net: their builder (build_attribute_network's signature), which the preset's
# configuration names in place of the network class
PRESET_NETWORKS = {"transunet_2d": "nnunet_dmoe.networks.transunet.build_transunet_network"}
# the plans' "transformer" block of a preset: the paper's TransUNet (no conv stem, no skips)
PRESET_TRANSFORMER = {"transunet_2d": {"decoder": "paper"}}
# image channels of a preset (default 1): the paper's ViT sees RGB (HAM10000; FairSeg's grey images repeated to 3
# channels), so its patch embedding has 3 input channels, as Table 7 counts it
PRESET_IMAGE_CHANNELS = {"transunet_2d": 3}

# default patch for timings on CUDA (nnU-Net's ResEnc-M 3D trains 128^3 patches, batch 2)
CUDA_PATCH = {"resenc_m_3d": (128, 128, 128)}


def resenc_m_configuration(dim: int = 3, features: Sequence[int] = (32, 64, 128, 256, 320, 320),
                           blocks: Sequence[int] = (1, 3, 4, 6, 6, 6)):
    """nnU-Net ``ConfigurationManager`` of a ResidualEncoderUNet with ResEnc-M settings
    (:func:`nnunet_dmoe.plans.configuration.unet_configuration`)."""
    from nnunet_dmoe.plans.configuration import unet_configuration

    return unet_configuration(dim, features, blocks)


def preset_configuration(name: str):
    if name not in PRESETS:
        raise ValueError(f"-preset must be one of {sorted(PRESETS)}, got {name!r}")
    dim, features, blocks, flops_size, _ = PRESETS[name]
    cm = resenc_m_configuration(dim, features, blocks)
    if name in PRESET_NETWORKS:  # the network's defaults; its position embedding for the GFLOPs input
        cm.configuration["architecture"]["network_class_name"] = PRESET_NETWORKS[name]
        cm.configuration["patch_size"] = list(flops_size)
    if name in PRESET_TRANSFORMER:
        from nnunet_dmoe.plans.blocks import write_transformer_block
        write_transformer_block(cm.configuration, PRESET_TRANSFORMER[name])
    return cm


def with_dmoe_settings(configuration_manager, **dmoe):
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    from nnunet_dmoe.plans.blocks import write_dmoe_block

    cfg = deepcopy(configuration_manager.configuration)
    write_dmoe_block(cfg, **dmoe)
    return ConfigurationManager(cfg)


def stages_argument(values: Sequence[str]):
    """``-stages``: one rule name (downsampling, all) or stage indices."""
    if len(values) == 1 and not values[0].isdigit():
        return values[0]
    if not all(v.isdigit() for v in values):
        raise ValueError(f"-stages: give downsampling, all, or stage indices (e.g. -stages 1 2 3), got "
                         f"{' '.join(values)}")
    return [int(v) for v in values]


def build_pair(configuration_manager, num_levels: int = 4, deep_supervision: bool = False,
               num_input_channels: int = 2, num_outputs: int = 2, attribute_channel: Optional[int] = None,
               mode: str = "dmoe", seed: int = 0):
    """(baseline, (d)MoE) networks of one configuration; the baseline is the plans' U-Net (attribute stripped)."""
    from pydoc import locate

    from nnunet_dmoe.networks.unet import build_attribute_network
    from nnunet_dmoe.plans.blocks import read_dmoe_block

    builder = build_attribute_network
    if configuration_manager.network_arch_class_name in PRESET_NETWORKS.values():
        builder = locate(configuration_manager.network_arch_class_name)
    if attribute_channel is None:
        attribute_channel = num_input_channels - 1
    cm = configuration_manager
    if "attribute_channel" not in read_dmoe_block(cm):
        cm = with_dmoe_settings(cm, num_levels=num_levels, attribute_channel=attribute_channel)
    nets = []
    for routing in (None, mode):
        torch.manual_seed(seed)
        nets.append(builder(None, cm, num_input_channels, num_outputs, deep_supervision, routing=routing))
    return tuple(nets)
