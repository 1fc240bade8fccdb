"""Network builders: the plans' U-Net (``PlainConvUNet`` or ``ResidualEncoderUNet``, 2D or 3D) wrapped so that it
takes the attribute channel, optionally with a (distribution-aware) MoE block after encoder stages.

``AttributeUNet.forward(x)`` takes nnU-Net's input tensor *with* the attribute channel: the channel is removed
before the U-Net and, for (d)MoE, decoded into a level per sample (most frequent rounded positive value; no
positive value = unknown). ``forward(x, attribute)`` takes the levels explicitly (long tensor, -1 = unknown).
The placement is the paper's Table 5 for the 3D ResUNet: one block after every encoder stage, bottleneck included.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from nnunet_dmoe.dmoe import DMoEConfig, DistributionAwareMoE, route_index_for_levels

__all__ = ["AttributeUNet", "decode_levels", "build_attribute_network", "ATTRIBUTE_MODES"]

# how a trainer uses the attribute
ATTRIBUTE_MODES = ("none", "channel", "moe", "dmoe")

_BAD_CODE = ("The attribute channel of sample {sample} in this batch decodes to code {code}, but the model knows "
             "{n} levels (codes 1..{n}, 0 = unknown). Write the channel with nnUNetv2_dmoe_attach_attribute using the "
             "levels of the model's dataset.json.")


def decode_levels(channel: torch.Tensor, num_levels: int, check: bool = True) -> torch.Tensor:
    """Level index per sample from the attribute channel (b, 1, *spatial) or (b, *spatial); -1 = unknown.

    The most frequent rounded positive value wins, so resampling blur at the footprint border does not matter.
    With ``check`` (eager mode only) a code above ``num_levels`` raises ``ValueError``.
    """
    from nnunet_dmoe.attribute import decode_attribute_levels  # the one decoding rule, shared with the numpy side
    return decode_attribute_levels(channel, num_levels, check=check)


class AttributeUNet(nn.Module):
    """A plans' U-Net behind an attribute-channel front end, with optional (d)MoE blocks after encoder stages.

    Parameters
    ----------
    unet : nn.Module
        ``PlainConvUNet`` / ``ResidualEncoderUNet`` built for the image channels only.
    num_input_channels : int
        Channels of the input tensor, attribute channel included.
    attribute_channel : int
        Its index.
    config : DMoEConfig or None
        ``None``: the attribute is stripped and unused (attribute-blind baseline).
    """

    def __init__(self, unet: nn.Module, num_input_channels: int, attribute_channel: int,
                 config: Optional[DMoEConfig] = None):
        super().__init__()
        if not 0 <= attribute_channel < num_input_channels:
            raise ValueError(f"attribute channel {attribute_channel} is not one of the {num_input_channels} input "
                             f"channels; check attribute.channel in dataset.json")
        self.unet = unet
        self.num_input_channels = num_input_channels
        self.attribute_channel = attribute_channel
        self.config = config
        if config is None:
            self.moe = None
        else:
            encoder = unet.encoder
            stages = range(len(encoder.stages)) if config.stages is None else config.stages
            bad = [s for s in stages if not 0 <= s < len(encoder.stages)]
            if bad:
                raise ValueError(f"dmoe_stages {bad} out of range: the encoder has {len(encoder.stages)} stages")
            self.moe = nn.ModuleList([
                DistributionAwareMoE(c, config.num_experts, config.num_routers, config.top_k, config.expert_ratio,
                                     config.expert_dropout, config.router_noise) if s in stages else nn.Identity()
                for s, c in enumerate(encoder.output_channels)])

    @property
    def decoder(self):
        # nnU-Net's set_deep_supervision_enabled sets network.decoder.deep_supervision
        return self.unet.decoder

    @property
    def encoder(self):
        return self.unet.encoder

    def split_attribute(self, x: torch.Tensor):
        if x.shape[1] != self.num_input_channels:
            raise ValueError(f"the network expects {self.num_input_channels} input channels (the attribute channel "
                             f"at index {self.attribute_channel} included), got {x.shape[1]}")
        a = self.attribute_channel
        return torch.cat([x[:, :a], x[:, a + 1:]], dim=1), x[:, a:a + 1]

    def forward(self, x: torch.Tensor, attribute: Optional[torch.Tensor] = None):
        x, channel = self.split_attribute(x)
        if self.moe is None:
            return self.unet(x)
        cfg = self.config
        if attribute is None:
            # trainers write clean codes; check (one host sync per forward, not per block) only at inference
            attribute = decode_levels(channel, cfg.num_levels, check=not self.training)
        router_index = route_index_for_levels(attribute.to(x.device).long(), cfg.num_levels, cfg.mode)
        encoder = self.unet.encoder
        if getattr(encoder, "stem", None) is not None:
            x = encoder.stem(x)
        skips = []
        for stage, moe in zip(encoder.stages, self.moe):
            x = stage(x)
            if isinstance(moe, DistributionAwareMoE):
                x = moe(x, router_index)
            skips.append(x)
        return self.unet.decoder(skips)

    def compute_conv_feature_map_size(self, input_size) -> np.int64:
        total = self.unet.compute_conv_feature_map_size(input_size)
        if self.moe is not None:
            size = np.array(input_size, dtype=np.int64)
            for stride, moe in zip(self.unet.encoder.strides, self.moe):
                size = size // np.array(stride, dtype=np.int64)
                if isinstance(moe, DistributionAwareMoE):
                    total += moe.compute_conv_feature_map_size(tuple(size))
        return total


def build_attribute_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                            enable_deep_supervision: bool, attribute_mode: str) -> nn.Module:
    """Build the network for a trainer's ``attribute_mode`` from the plans (see ``ATTRIBUTE_MODES``).

    The ``dmoe_*`` settings are read from (and removed from a copy of) the configuration's ``arch_kwargs``; missing
    ones take :class:`DMoEConfig` defaults. ``dmoe_num_levels`` and ``dmoe_attribute_channel`` are written into the
    plans by the trainer, so a model folder rebuilds the same network at prediction time.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    if attribute_mode not in ATTRIBUTE_MODES:
        raise ValueError(f"attribute_mode must be one of {ATTRIBUTE_MODES}, got {attribute_mode!r}")
    arch_kwargs = dict(configuration_manager.network_arch_init_kwargs)
    config = DMoEConfig.pop_from_arch_kwargs(arch_kwargs, **({"mode": attribute_mode}
                                                             if attribute_mode in ("moe", "dmoe") else {}))

    def unet(in_channels):
        return get_network_from_plans(configuration_manager.network_arch_class_name, arch_kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import, in_channels,
                                      num_output_channels, allow_init=True, deep_supervision=enable_deep_supervision)

    if attribute_mode == "channel":
        return unet(num_input_channels)
    if config.attribute_channel < 0:
        raise RuntimeError("The plans lack dmoe_attribute_channel. nnunet_dmoe trainers write it (with "
                           "dmoe_num_levels) into the plans from dataset.json's attribute block; retrain with one "
                           "of them or add the keys to the configuration's arch_kwargs.")
    return AttributeUNet(unet(num_input_channels - 1), num_input_channels, config.attribute_channel,
                         config if attribute_mode in ("moe", "dmoe") else None)
