"""Network builders: the plans' U-Net (``PlainConvUNet`` or ``ResidualEncoderUNet``, 2D or 3D) wrapped so that it
takes the attribute channel, optionally with a (distribution-aware) MoE block after encoder stages.

``AttributeUNet.forward(x)`` takes nnU-Net's input tensor *with* the attribute channel: the channel is removed
before the U-Net and, for (d)MoE, decoded into a level per sample (most frequent rounded positive value; no
positive value = unknown). ``forward(x, attribute)`` takes the levels explicitly (long tensor, -1 = unknown).
With several attributes (dataset.json's ``"attributes"``) every attribute has its channel, all are removed, and
the routers of a sample's levels are summed (:func:`nnunet_dmoe.method.dmoe.route_index_for_levels`).
The placement is the paper's Table 5 for the 3D ResUNet: one block after every encoder stage, bottleneck included.
"""
from __future__ import annotations

from typing import List, Mapping, Optional

import numpy as np
import torch
from torch import nn

from nnunet_dmoe.method.dmoe import EARLIER_VALUES, DMoEConfig, DistributionAwareMoE, route_index_for_levels

__all__ = ["AttributeInput", "AttributeUNet", "decode_levels", "attribute_router_index", "build_attribute_network",
           "UNetBehindAttributeInput", "dmoe_settings", "current_settings", "unet_with_stage_blocks", "stage_blocks_and_sizes", "ROUTINGS",
           "PLANS_KEY"]

# routing of the (d)MoE blocks: one router per attribute level (+ unknown), or one router for everyone
ROUTINGS = ("dmoe", "moe")
# the configuration's key in the plans that holds the dMoE settings (kept out of ``arch_kwargs``, so that nnU-Net's
# own trainers can build the plans' U-Net from the same plans)
PLANS_KEY = "dmoe"


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
    :meth:`split_attribute` separates them."""

    def __init__(self, num_input_channels: int, attribute_channel):
        super().__init__()
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


class UNetBehindAttributeInput(AttributeInput):
    """A plans' U-Net (``self.unet``) behind the attribute front end; exposes its encoder and decoder as nnU-Net's
    trainer expects them."""

    @property
    def decoder(self):
        # nnU-Net's set_deep_supervision_enabled sets network.decoder.deep_supervision
        return self.unet.decoder

    @property
    def encoder(self):
        return self.unet.encoder


class AttributeUNet(UNetBehindAttributeInput):
    """A plans' U-Net behind an attribute-channel front end, with optional (d)MoE blocks after encoder stages.

    Parameters
    ----------
    unet : nn.Module
        ``PlainConvUNet`` / ``ResidualEncoderUNet`` built for the image channels only.
    num_input_channels : int
        Channels of the input tensor, attribute channel(s) included.
    attribute_channel : int or list of int
        Its index (one per attribute for several attributes).
    config : DMoEConfig or None
        ``None``: the attribute is stripped and unused (attribute-blind baseline).
    """

    def __init__(self, unet: nn.Module, num_input_channels: int, attribute_channel,
                 config: Optional[DMoEConfig] = None):
        super().__init__(num_input_channels, attribute_channel)
        self.unet = unet
        self.config = config
        if config is None:
            self.moe = None
        else:
            encoder = unet.encoder
            stages = config.stage_indices(encoder.strides)
            self.moe = nn.ModuleList([
                DistributionAwareMoE(c, config.num_experts, config.num_routers, config.top_k, config.expert_ratio,
                                     config.expert_dropout, config.router_noise, router_init=config.router_init)
                if s in stages else nn.Identity()
                for s, c in enumerate(encoder.output_channels)])

    def forward(self, x: torch.Tensor, attribute: Optional[torch.Tensor] = None):
        x, channel = self.split_attribute(x)
        if self.moe is None:
            return self.unet(x)
        router_index = attribute_router_index(channel, attribute, self.config, self.training)
        return unet_with_stage_blocks(self.unet, x, self.moe, lambda moe, h: moe(h, router_index))

    def load_plain_unet(self, weights: Mapping[str, torch.Tensor]) -> List[str]:
        """Upcycle a trained nnU-Net: load the U-Net weights of a plain nnU-Net checkpoint of the same plans
        (``nnUNetTrainer``: keys ``encoder.*``, ``decoder.*``; the plugin's ``nnUNetTrainerNoAttribute``: ``unet.*``)
        and start every (d)MoE block as the identity (its experts' output layer zero; the blocks are residual), so
        that the network computes what the loaded one computed until fine-tuning moves the experts.

        A checkpoint whose network read the attribute channel(s) as image input (``nnUNetTrainer`` on the dataset
        with the channel) loses those input weights: this network routes by the attribute instead. Segmentation
        layers of another shape (other labels) keep their initialisation. Returns notes on what was not loaded."""
        prefix = "unet." if any(k.startswith("unet.") for k in weights) else ""
        source = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        own = self.unet.state_dict()
        missing = sorted(k for k in own if k not in source)
        if missing:
            raise ValueError(f"the checkpoint is not an nnU-Net U-Net of these plans: it lacks {len(missing)} of this "
                             f"network's weights ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}). "
                             f"Upcycle a checkpoint trained with the same plans and configuration.")
        notes, loaded, input_dropped = [], {}, False
        for key, mine in own.items():
            theirs = source[key]
            same_but_input = (theirs.dim() > 2 and theirs.shape[1] == self.num_input_channels
                              and mine.shape[1] == len(self.image_channels)
                              and theirs.shape[:1] + theirs.shape[2:] == mine.shape[:1] + mine.shape[2:])
            if theirs.shape == mine.shape:
                loaded[key] = theirs
            elif same_but_input:  # the first convolution (nnU-Net lists it under several names)
                loaded[key] = theirs[:, list(self.image_channels)]
                if not input_dropped:
                    input_dropped = True
                    notes.append(f"{key}: the input weights of the attribute channel(s) "
                                 f"{list(self.attribute_channels)} are dropped (this network routes by the attribute "
                                 f"instead of reading it as an image)")
            elif ".seg_layers." in key:
                loaded[key] = mine
                notes.append(f"{key}: other shape {tuple(theirs.shape)} (other labels?), not loaded")
            else:
                raise ValueError(f"the checkpoint's {key} has the shape {tuple(theirs.shape)}, this network's "
                                 f"{tuple(mine.shape)}: it was trained with other plans. Upcycle a checkpoint of the "
                                 f"same plans and configuration.")
        self.unet.load_state_dict(loaded)
        for block in self.moe or ():
            if not isinstance(block, nn.Identity):
                with torch.no_grad():
                    block.experts.w2.zero_()
                    block.experts.b2.zero_()
        return notes

    def compute_conv_feature_map_size(self, input_size) -> np.int64:
        total = self.unet.compute_conv_feature_map_size(input_size)
        if self.moe is not None:
            total += sum(moe.compute_conv_feature_map_size(size)
                         for moe, size in stage_blocks_and_sizes(self.unet, self.moe, input_size))
        return total


def unet_with_stage_blocks(unet: nn.Module, x: torch.Tensor, blocks: nn.ModuleList, apply) -> torch.Tensor:
    """nnU-Net's U-Net forward with ``apply(block, features)`` after each encoder stage whose entry of ``blocks`` is
    not an ``nn.Identity`` (the skips carry the blocks' outputs)."""
    encoder = unet.encoder
    if getattr(encoder, "stem", None) is not None:
        x = encoder.stem(x)
    skips = []
    for stage, block in zip(encoder.stages, blocks):
        x = stage(x)
        if not isinstance(block, nn.Identity):
            x = apply(block, x)
        skips.append(x)
    return unet.decoder(skips)


def stage_blocks_and_sizes(unet: nn.Module, blocks: nn.ModuleList, input_size):
    """(block, spatial size of its stage's output) for each entry of ``blocks`` that is not an ``nn.Identity``."""
    size = np.array(input_size, dtype=np.int64)
    for stride, block in zip(unet.encoder.strides, blocks):
        size = size // np.array(stride, dtype=np.int64)
        if not isinstance(block, nn.Identity):
            yield block, tuple(int(v) for v in size)


def dmoe_settings(configuration_manager) -> tuple:
    """The dMoE settings of a configuration and its ``arch_kwargs`` without them.

    Settings live in the configuration's ``"dmoe"`` block of the plans (keys without prefix, e.g.
    ``{"num_experts": 8, "num_levels": 4, "attribute_channel": 1}``). Plans written by nnunet_dmoe 0.1 kept them
    in ``arch_kwargs`` with the prefix ``dmoe_``: those are read too, and removed from the returned kwargs.
    A setting whose default changed since (:data:`nnunet_dmoe.method.dmoe.EARLIER_VALUES`: the stages, the router
    initialisation) takes its earlier value when the plans do not record it, so that a model folder of an earlier
    version rebuilds its network; the trainers and the planner write every setting (:func:`current_settings`).
    Returns ``(settings with the dmoe_ prefix, arch_kwargs)``, ready for :meth:`DMoEConfig.pop_from_arch_kwargs`.
    """
    arch_kwargs = dict(configuration_manager.network_arch_init_kwargs)
    settings = {k: arch_kwargs.pop(k) for k in list(arch_kwargs) if k.startswith("dmoe_")}
    block = configuration_manager.configuration.get(PLANS_KEY) or {}
    settings.update({f"dmoe_{k}": v for k, v in block.items()})
    for key, value in EARLIER_VALUES.items():
        settings.setdefault(f"dmoe_{key}", value)
    return settings, arch_kwargs


def current_settings(block: Optional[dict] = None) -> dict:
    """A plans ``"dmoe"`` block with the current defaults of the settings that changed after version 0.2 filled in
    where ``block`` does not set them (what a trainer writes when it starts a new training)."""
    defaults = DMoEConfig()
    return {**{key: getattr(defaults, key) for key in EARLIER_VALUES}, **(block or {})}


def build_attribute_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                            enable_deep_supervision: bool = True, *, routing: Optional[str] = None,
                            keep_attribute_channel: bool = False, unknown_router: bool = True) -> nn.Module:
    """Build a trainer's network from the plans.

    Parameters
    ----------
    routing : "dmoe", "moe" or None
        ``None``: no (d)MoE blocks. ``"dmoe"``: a distribution-aware MoE after the encoder stages, one router per
        attribute level plus one for unknown; ``"moe"``: the same blocks with one router for everyone. The other
        settings come from the configuration's ``"dmoe"`` block (:func:`dmoe_settings`), defaults where absent.
    keep_attribute_channel : bool
        ``True``: the plans' U-Net over all input channels, the attribute channel being an ordinary input (only
        without routing). ``False``: the channel is stripped before the U-Net (and decoded for routing).
    unknown_router : bool
        ``False``: the dMoE has one router per level only (the paper's setting); predicting a case whose attribute
        is unknown is an error that says so.

    ``num_levels`` and ``attribute_channel`` are written into the plans by the trainers, so a model folder
    rebuilds the same network at prediction time.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    if routing is not None and routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS} or None, got {routing!r}")
    if routing is not None and keep_attribute_channel:
        raise ValueError("a (d)MoE network decodes the attribute channel and strips it: keep_attribute_channel must "
                         "be False with routing")
    settings, arch_kwargs = dmoe_settings(configuration_manager)
    config = DMoEConfig.pop_from_arch_kwargs(settings, unknown_router=unknown_router,
                                             **({"mode": routing} if routing else {}))

    def unet(in_channels):
        return get_network_from_plans(configuration_manager.network_arch_class_name, arch_kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import, in_channels,
                                      num_output_channels, allow_init=True, deep_supervision=enable_deep_supervision)

    if keep_attribute_channel:
        return unet(num_input_channels)
    if any(c < 0 for c in config.attribute_channels):
        raise RuntimeError("The plans lack the attribute channel (\"dmoe\": {\"attribute_channel\": ...} in the "
                           "configuration). nnunet_dmoe trainers write it (with num_levels) into the plans from "
                           "dataset.json's attribute block; train with one of them (nnUNetv2_dmoe_list_trainers).")
    return AttributeUNet(unet(num_input_channels - len(config.attribute_channels)), num_input_channels,
                         config.attribute_channel, config if routing else None)
