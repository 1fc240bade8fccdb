"""The attribute front end every network of the plugin sits behind (the U-Nets, FiLM and the transformers).

The network input holds the image channels and one attribute channel per attribute. :class:`AttributeInput` splits
them; :func:`decode_levels` reads a level per sample from a channel (most frequent rounded positive value; no
positive value = unknown); :func:`attribute_router_index` turns the levels into router indices
(:func:`nnunet_dmoe.method.routing.route_index_for_levels`: with several attributes the routers of a sample's levels
are summed).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nnunet_dmoe.method.config import DMoEConfig
from nnunet_dmoe.method.routing import route_index_for_levels

__all__ = ["AttributeInput", "attribute_router_index", "check_levels", "decode_levels"]


@torch.compiler.disable  # runs eagerly under torch.compile too (a graph break at inference), so it cannot be skipped
def check_levels(levels: torch.Tensor, channel: torch.Tensor, num_levels: int) -> None:
    """Raise ``ValueError`` naming the samples whose channel decodes to a code above ``num_levels``. One host
    synchronisation; used at inference only."""
    from nnunet_dmoe.data.attribute import decode_attribute_levels

    if bool((levels >= num_levels).any()):  # at inference a batch holds patches of the case being predicted
        names = [f"the case being predicted (its name is in nnU-Net's last 'Predicting CASE' line; patch {i} of the "
                 f"batch)" for i in range(channel.shape[0])]
        decode_attribute_levels(channel, num_levels, check=True, names=names)  # raises, with the codes named


def decode_levels(channel: torch.Tensor, num_levels: int, check: bool = True) -> torch.Tensor:
    """Level index per sample from the attribute channel (b, 1, *spatial) or (b, *spatial); -1 = unknown.

    The most frequent rounded positive value wins, so resampling blur at the footprint border does not matter.
    With ``check`` a code above ``num_levels`` raises ``ValueError`` (also under ``torch.compile``).
    """
    from nnunet_dmoe.data.attribute import decode_attribute_levels  # the one decoding rule, shared with the numpy side
    level = decode_attribute_levels(channel, num_levels, check=False)
    if check:
        check_levels(level, channel, num_levels)
    return level


_NO_UNKNOWN_ROUTER = (
    "the case being predicted (its name is in nnU-Net's last 'Predicting CASE' line) has no attribute (its attribute "
    "channel is 0 everywhere), but this model has no router for an unknown attribute (nnUNetTrainerDMoE_noUnknown, "
    "the paper's setting). Write the case's attribute channel with nnUNetv2_dmoe_attach_attribute, or predict it "
    "with a model trained with nnUNetTrainerDMoE, which has a router for unknown attributes.")


def attribute_router_index(channel: torch.Tensor, attribute: Optional[torch.Tensor], config: DMoEConfig,
                           training: bool) -> torch.Tensor:
    """Router index per sample (see :func:`route_index_for_levels`) from the levels ``attribute`` (long, -1 =
    unknown; (b, A) for several attributes) or, when it is ``None``, decoded from the attribute ``channel`` (b, A,
    *spatial), one channel per attribute. Trainers write clean codes, so the check for a code above the number of
    levels (one host synchronisation per forward and attribute, not per block) runs only when not ``training``."""
    counts = config.levels_per_attribute
    if attribute is None:
        levels = []
        for a, n in enumerate(counts):
            level = decode_levels(channel[:, a:a + 1], n, check=False)
            if not training:
                check_levels(level, channel[:, a:a + 1], n)
            levels.append(level)
        attribute = levels[0] if isinstance(config.num_levels, int) else torch.stack(levels, dim=1)
    if not config.unknown_router and not training and bool((attribute < 0).any()):
        raise ValueError(_NO_UNKNOWN_ROUTER)
    return route_index_for_levels(attribute.to(channel.device).long(), config.num_levels, config.mode,
                                  config.unknown_router)


class AttributeInput(nn.Module):
    """The attribute-channel front end shared by the plugin's networks: the input tensor holds the image channels
    and one attribute channel per attribute (``attribute_channel``: an index, or a list for several attributes);
    :meth:`split_attribute` separates them. With a (d)MoE ``config`` (``None``: the attribute is stripped and
    unused), :meth:`moe_block` makes the network's blocks and :meth:`split_and_route` gives each sample's router."""

    def __init__(self, num_input_channels: int, attribute_channel, config: Optional[DMoEConfig] = None):
        super().__init__()
        self.config = config
        channels = list(attribute_channel) if isinstance(attribute_channel, (list, tuple)) else [attribute_channel]
        bad = [c for c in channels if not 0 <= c < num_input_channels]
        if bad or len(set(channels)) != len(channels):
            raise ValueError(f"attribute channel(s) {channels} are not distinct input channels of the "
                             f"{num_input_channels}; check the attribute channel(s) in dataset.json")
        self.num_input_channels = num_input_channels
        self.attribute_channel = attribute_channel
        self.attribute_channels = tuple(int(c) for c in channels)
        self.image_channels = tuple(c for c in range(num_input_channels) if c not in channels)

    def split_attribute(self, x: torch.Tensor):
        """``(image channels, attribute channels)`` of an input tensor; the latter (b, A, *spatial)."""
        if x.shape[1] != self.num_input_channels:
            raise ValueError(f"the network expects {self.num_input_channels} input channels (the attribute channel(s) "
                             f"at index {list(self.attribute_channels)} included), got {x.shape[1]}")
        if len(self.attribute_channels) == 1:
            a = self.attribute_channels[0]
            return torch.cat([x[:, :a], x[:, a + 1:]], dim=1), x[:, a:a + 1]
        # slices, not an index list (that would copy an index tensor to the device in every forward)
        return (torch.cat([x[:, c:c + 1] for c in self.image_channels], dim=1),
                torch.cat([x[:, c:c + 1] for c in self.attribute_channels], dim=1))

    def split_and_route(self, x: torch.Tensor, attribute: Optional[torch.Tensor] = None):
        """``(image channels, router index per sample)`` of an input tensor; the router index is ``None`` without a
        (d)MoE ``config``. ``attribute``: the levels (long, -1 = unknown); ``None`` decodes them from the channel."""
        x, channel = self.split_attribute(x)
        if self.config is None:
            return x, None
        return x, attribute_router_index(channel, attribute, self.config, self.training)

    def moe_block(self, channels: int) -> nn.Module:
        """A (d)MoE block on ``channels`` features with this network's settings."""
        from nnunet_dmoe.method.dmoe import DistributionAwareMoE

        c = self.config
        return DistributionAwareMoE(channels, c.num_experts, c.num_routers, c.top_k, c.expert_ratio,
                                    c.expert_dropout, c.router_noise, router_init=c.router_init)
