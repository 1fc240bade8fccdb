"""nnU-Net ``ConfigurationManager`` of a plans' U-Net built from a few numbers, without a dataset or plans file.

Used by the cost report's presets (:mod:`nnunet_dmoe.commands.benchmark`) and by the tests. The settings are those nnU-Net's
planners write: kernel 3, first stride 1 then 2, conv bias, affine InstanceNorm, LeakyReLU, no dropout, one conv
per decoder stage.
"""
from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["unet_configuration"]

_PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
_RESIDUAL = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
_KW_REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def unet_configuration(dim: int = 3, features: Sequence[int] = (32, 64, 128, 256, 320, 320),
                       blocks_per_stage: Optional[Sequence[int]] = None, **dmoe):
    """A ``ConfigurationManager`` of a ``PlainConvUNet`` (``blocks_per_stage=None``: two convs per encoder stage)
    or a ``ResidualEncoderUNet`` (``blocks_per_stage``: residual blocks per encoder stage).

    ``dmoe`` keyword arguments go into the configuration's ``"dmoe"`` block (e.g. ``num_levels=4``), as the dMoE
    planner and trainers write them into the plans.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    n = len(features)
    kw = {"n_stages": n, "features_per_stage": list(features), "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
          "kernel_sizes": [[3] * dim] * n, "strides": [[1] * dim] + [[2] * dim] * (n - 1),
          "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
          "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
          "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
          "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    if blocks_per_stage is None:
        network_class = _PLAIN
        kw["n_conv_per_stage"] = [2] * n
    else:
        if len(blocks_per_stage) != n:
            raise ValueError(f"blocks_per_stage has {len(blocks_per_stage)} entries for {n} stages")
        network_class = _RESIDUAL
        kw["n_blocks_per_stage"] = list(blocks_per_stage)
    configuration = {"architecture": {"network_class_name": network_class, "arch_kwargs": kw,
                                      "_kw_requires_import": list(_KW_REQUIRES_IMPORT)}}
    if dmoe:  # complete, as the trainers write it
        from nnunet_dmoe.plans.blocks import write_dmoe_block
        write_dmoe_block(configuration, **dmoe)
    return ConfigurationManager(configuration)
