"""FiLM conditioning on the attribute: a learned per-level scale and shift of the U-Net's encoder features.

Perez, Strub, de Vries, Dumoulin, Courville, *FiLM: Visual Reasoning with a General Conditioning Layer*, AAAI
2018: ``FiLM(F | c) = gamma(c) * F + beta(c)``, one ``(gamma, beta)`` per feature channel. The condition here is the
sample's attribute level (categorical), so the FiLM generator is a lookup table: one ``gamma`` and ``beta`` (C,)
per level, initialised to the identity (``gamma = 1``, ``beta = 0``); a sample of unknown level (-1) passes
unchanged. With several attributes the modulations add up: ``gamma = 1 + sum_a (gamma_a[l_a] - 1)``,
``beta = sum_a beta_a[l_a]`` (an unknown attribute contributes nothing).

:class:`FiLMUNet` is the plans' U-Net behind the attribute-channel front end (as
:class:`nnunet_dmoe.networks.unet.AttributeUNet`) with a :class:`FiLM` after the encoder stages that the dMoE uses
(the same rule: :meth:`nnunet_dmoe.method.config.DMoEConfig.stage_indices` of the plans' ``"dmoe"`` settings).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from nnunet_dmoe.method.config import DMoEConfig
from nnunet_dmoe.networks.attribute_input import decode_levels
from nnunet_dmoe.networks.unet import (UNetBehindAttributeInput, build_attribute_network, stage_blocks_and_sizes,
                                       unet_with_stage_blocks)
from nnunet_dmoe.plans.blocks import read_dmoe_config

__all__ = ["FiLM", "FiLMUNet", "film_levels", "build_film_network"]


class FiLM(nn.Module):
    """Per-level feature-wise affine modulation of (b, C, *spatial) features.

    ``num_levels``: the attribute's levels (a list: one entry per attribute). ``gamma`` and ``beta`` are
    (sum of levels, C) tables, attribute ``a``'s rows after those of attributes ``0..a-1``.
    """

    def __init__(self, channels: int, num_levels: Union[int, Sequence[int]]):
        super().__init__()
        counts = [int(num_levels)] if isinstance(num_levels, (int, np.integer)) else [int(n) for n in num_levels]
        if not counts or any(n < 1 for n in counts):
            raise ValueError(f"FiLM needs at least one level per attribute, got {num_levels}")
        self.levels_per_attribute = counts
        self.gamma = nn.Parameter(torch.ones(sum(counts), channels))
        self.beta = nn.Parameter(torch.zeros(sum(counts), channels))
        # first row of each attribute; a buffer, so the forward copies nothing to the device
        self.register_buffer("offsets", torch.tensor(np.cumsum([0] + counts[:-1]), dtype=torch.long),
                             persistent=False)

    def forward(self, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """``levels``: level index per sample (b,), or (b, A) for several attributes; -1 = unknown (identity)."""
        b = x.shape[0]
        levels = levels.reshape(b, -1)
        if levels.shape[1] != len(self.levels_per_attribute):
            raise ValueError(f"levels of shape {tuple(levels.shape)} for {len(self.levels_per_attribute)} "
                             f"attribute(s)")
        known = (levels >= 0).unsqueeze(-1).to(self.gamma.dtype)  # (b, A, 1)
        rows = levels.clamp_min(0) + self.offsets  # (b, A)
        gamma = 1 + ((self.gamma[rows] - 1) * known).sum(1)  # (b, C)
        beta = (self.beta[rows] * known).sum(1)
        shape = (b, -1) + (1,) * (x.ndim - 2)
        return x * gamma.view(shape).to(x.dtype) + beta.view(shape).to(x.dtype)


def film_levels(channel: torch.Tensor, attribute: Optional[torch.Tensor], levels_per_attribute: List[int],
                training: bool) -> torch.Tensor:
    """Level per sample and attribute (b, A), -1 = unknown: ``attribute`` when given, else decoded from the
    attribute channels (b, A, *spatial) as the dMoE decodes them (a code above the levels is an error at
    inference; trainers write clean codes)."""
    if attribute is None:
        attribute = torch.stack([decode_levels(channel[:, a:a + 1], n, check=not training)
                                 for a, n in enumerate(levels_per_attribute)], dim=1)
    return attribute.to(channel.device).long().reshape(channel.shape[0], -1)


class FiLMUNet(UNetBehindAttributeInput):
    """The plans' U-Net (``unet``, built for the image channels) with a :class:`FiLM` after the dMoE's encoder
    stages (``config.stage_indices``), conditioned on the attribute level(s) from the attribute channel(s)."""

    def __init__(self, unet: nn.Module, num_input_channels: int, attribute_channel, config: DMoEConfig):
        super().__init__(num_input_channels, attribute_channel)
        self.unet = unet
        self.levels_per_attribute = config.levels_per_attribute
        stages = config.stage_indices(unet.encoder.strides)  # the dMoE's placement rule
        self.film = nn.ModuleList([FiLM(c, config.num_levels) if s in stages else nn.Identity()
                                   for s, c in enumerate(unet.encoder.output_channels)])

    def forward(self, x: torch.Tensor, attribute: Optional[torch.Tensor] = None):
        x, channel = self.split_attribute(x)
        levels = film_levels(channel, attribute, self.levels_per_attribute, self.training)
        return unet_with_stage_blocks(self.unet, x, self.film, lambda film, h: film(h, levels))

    def compute_conv_feature_map_size(self, input_size) -> np.int64:
        """The U-Net's, plus the output of every FiLM (one feature map of its stage's size)."""
        total = self.unet.compute_conv_feature_map_size(input_size)
        for film, size in stage_blocks_and_sizes(self.unet, self.film, input_size):
            total += np.int64(film.gamma.shape[1]) * np.prod(size, dtype=np.int64)
        return total


def build_film_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                       enable_deep_supervision: bool = True) -> FiLMUNet:
    """The plans' U-Net (attribute channel stripped, as the baseline) with FiLM after the dMoE's stages; levels,
    channel(s) and stages from the configuration's ``"dmoe"`` block (:func:`nnunet_dmoe.plans.blocks.read_dmoe_config`)."""
    base = build_attribute_network(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision)
    config = read_dmoe_config(configuration_manager)
    return FiLMUNet(base.unet, num_input_channels, base.attribute_channel, config)
