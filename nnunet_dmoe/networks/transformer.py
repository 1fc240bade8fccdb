"""What the transformer networks share: the attribute front end with (d)MoE blocks on the tokens
(:class:`AttributeTransformer`), the :class:`TokenBackbone` split a network must offer for it, and the plans' patch
rounded to whole tokens.

Placement as in the paper's reference code for TransUNet: **one** (d)MoE block on the transformer's tokens, shared
by all transformer blocks and applied residually after every block (``h <- h + sum_k g_k E_k(h)``, see
:mod:`nnunet_dmoe.method.dmoe`). ``"transformer_placement": "per_block"`` in the configuration's ``"dmoe"`` block of
the plans gives every transformer block its own (d)MoE block instead. The networks: :mod:`.transunet` (the paper's
2D TransUNet) and :mod:`.primus` (nnU-Net's 3D Primus); their sizes come from the configuration's ``"transformer"``
block (:mod:`nnunet_dmoe.plans.blocks`).
"""
from __future__ import annotations

from copy import deepcopy
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from nnunet_dmoe.method.config import PLACEMENTS, DMoEConfig
from nnunet_dmoe.method.routing import ROUTINGS
from nnunet_dmoe.networks.attribute_input import AttributeInput
from nnunet_dmoe.plans.blocks import read_dmoe_block, transformer_settings

__all__ = ["AttributeTransformer", "TokenBackbone", "check_patch", "num_attributes", "round_patch_size",
           "transformer_routing"]

_PATCH_NOT_DIVISIBLE = ("The patch size {patch} of the plans is not a multiple of {multiple} on every axis, as the "
                        "patch embedding of this network needs (tokens of {multiple} voxels per axis). The plugin's "
                        "transformer trainers round the plans' patch down to a multiple of {multiple}; set "
                        "\"patch_size\" in the plans' configuration to a multiple of {multiple}.")
_NO_CHANNEL = ("The plans lack the attribute channel (\"dmoe\": {\"attribute_channel\": ...} in the configuration); "
               "the plugin's trainers write it from dataset.json (nnUNetv2_dmoe_list_trainers).")


def transformer_routing(configuration_manager, routing: Optional[str],
                        unknown_router: bool = True) -> Tuple[Optional[DMoEConfig], str, int]:
    """(d)MoE config (None without routing), placement and attribute channel from the configuration's ``"dmoe"``
    block (:func:`nnunet_dmoe.plans.blocks.read_dmoe_block`)."""
    if routing is not None and routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS} or None, got {routing!r}")
    block = read_dmoe_block(configuration_manager)
    if isinstance(block.get("stages"), (list, tuple)):  # the named rules concern U-Nets only
        raise ValueError(f"\"stages\" in the plans' \"dmoe\" block ({block['stages']}) places blocks after "
                         f"U-Net encoder stages; transformers use \"transformer_placement\" ({PLACEMENTS})")
    config = DMoEConfig.from_block(block, unknown_router=unknown_router, **({"mode": routing} if routing else {}))
    if any(c < 0 for c in config.attribute_channels):
        raise RuntimeError(_NO_CHANNEL)
    return (config if routing else None), config.transformer_placement, config.attribute_channel


def num_attributes(channel) -> int:
    return len(channel) if isinstance(channel, (list, tuple)) else 1


def round_patch_size(plans: dict, configuration: str, defaults: dict) -> Tuple[dict, list, list]:
    """``(plans, old, new)``: a copy of ``plans`` whose configuration's patch size is rounded down to a multiple of
    the network's token size (``"patch_size"`` of its settings: ``defaults`` and the ``"transformer"`` block) on
    every axis, at least one token; ``plans`` itself when it already is one."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(plans).get_configuration(configuration)
    multiple = int(transformer_settings(cm, defaults)["patch_size"])
    old = [int(p) for p in cm.patch_size]
    new = [max(multiple, p // multiple * multiple) for p in old]
    if new == old:
        return plans, old, new
    plans = deepcopy(plans)
    plans["configurations"][configuration]["patch_size"] = new
    return plans, old, new


def check_patch(patch_size: Sequence[int], multiple: int):
    if any(p % multiple for p in patch_size):
        raise ValueError(_PATCH_NOT_DIVISIBLE.format(patch=list(patch_size), multiple=multiple))


class TokenBackbone(nn.Module):
    """A transformer segmentation network split where a (d)MoE goes in: ``embed(x) -> (tokens, context)`` with
    tokens (b, n, c); ``run_block(block, tokens, context)`` for each of ``blocks``; ``head(tokens, context)`` ->
    the network's output. ``forward`` runs all three; ``embed_dim`` is c."""

    embed_dim: int
    blocks: nn.ModuleList

    def embed(self, x: torch.Tensor):
        raise NotImplementedError

    def run_block(self, block: nn.Module, tokens: torch.Tensor, context) -> torch.Tensor:
        return block(tokens)

    def head(self, tokens: torch.Tensor, context):
        raise NotImplementedError

    def forward(self, x: torch.Tensor):
        tokens, context = self.embed(x)
        for block in self.blocks:
            tokens = self.run_block(block, tokens, context)
        return self.head(tokens, context)


class AttributeTransformer(AttributeInput):
    """A :class:`TokenBackbone` behind the attribute-channel front end, with (d)MoE blocks on its tokens.

    Parameters
    ----------
    backbone : TokenBackbone
        Built for the image channels only.
    num_input_channels : int
        Channels of the input tensor, attribute channel(s) included.
    attribute_channel : int or list of int
        The attribute channel's index (one per attribute for several attributes).
    config : DMoEConfig or None
        ``None``: the attribute is stripped and unused (attribute-blind baseline).
    placement : "shared" or "per_block"
        One (d)MoE block applied after every transformer block (the reference code), or one per block.

    ``forward(x)`` decodes the level per sample from the channel; ``forward(x, attribute)`` takes the levels (long,
    -1 = unknown).
    """

    def __init__(self, backbone: TokenBackbone, num_input_channels: int, attribute_channel,
                 config: Optional[DMoEConfig] = None, placement: str = "shared"):
        super().__init__(num_input_channels, attribute_channel, config)
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.backbone = backbone
        self.placement = placement
        if config is None:
            self.moe = None
        else:
            n = 1 if placement == "shared" else len(backbone.blocks)
            self.moe = nn.ModuleList([self.moe_block(backbone.embed_dim) for _ in range(n)])

    @property
    def decoder(self):
        # nnU-Net's set_deep_supervision_enabled sets network.decoder.deep_supervision (TransUNet)
        return self.backbone.decoder

    def forward(self, x: torch.Tensor, attribute: Optional[torch.Tensor] = None):
        x, router_index = self.split_and_route(x, attribute)
        if router_index is None:
            return self.backbone(x)
        tokens, context = self.backbone.embed(x)
        for i, block in enumerate(self.backbone.blocks):
            tokens = self.backbone.run_block(block, tokens, context)
            moe = self.moe[0 if self.placement == "shared" else i]
            # the block takes (b, c, *spatial): tokens as (b, c, n), a view; the result's memory is (b, n, c) again
            tokens = moe(tokens.transpose(1, 2), router_index).transpose(1, 2)
        return self.backbone.head(tokens, context)
