"""The plans' U-Net (``PlainConvUNet`` or ``ResidualEncoderUNet``, 2D or 3D) behind the attribute front end
(:mod:`nnunet_dmoe.networks.attribute_input`), optionally with a (distribution-aware) MoE block after encoder
stages.

``AttributeUNet.forward(x)`` takes nnU-Net's input tensor *with* the attribute channel(s): they are removed before
the U-Net and, for (d)MoE, decoded into a level per sample. ``forward(x, attribute)`` takes the levels explicitly
(long tensor, -1 = unknown). The placement is the paper's Table 5 for the 3D ResUNet: one block after every encoder
stage that downsamples, bottleneck included (the configuration's ``"dmoe"`` block, ``"stages"``).
"""
from __future__ import annotations

from typing import List, Mapping, Optional

import numpy as np
import torch
from torch import nn

from nnunet_dmoe.method.config import DMoEConfig
from nnunet_dmoe.method.routing import ROUTINGS
from nnunet_dmoe.networks.attribute_input import AttributeInput
from nnunet_dmoe.plans.blocks import read_dmoe_config, unet_arch_kwargs

__all__ = ["AttributeUNet", "UNetBehindAttributeInput", "build_attribute_network", "unet_with_stage_blocks",
           "stage_blocks_and_sizes"]


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
        super().__init__(num_input_channels, attribute_channel, config)
        self.unet = unet
        if config is None:
            self.moe = None
        else:
            stages = config.stage_indices(unet.encoder.strides)
            self.moe = nn.ModuleList([self.moe_block(c) if s in stages else nn.Identity()
                                      for s, c in enumerate(unet.encoder.output_channels)])

    def forward(self, x: torch.Tensor, attribute: Optional[torch.Tensor] = None):
        x, router_index = self.split_and_route(x, attribute)
        if router_index is None:
            return self.unet(x)
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


def build_attribute_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                            enable_deep_supervision: bool = True, *, routing: Optional[str] = None,
                            keep_attribute_channel: bool = False, unknown_router: bool = True) -> nn.Module:
    """Build a trainer's network from the plans.

    Parameters
    ----------
    routing : "dmoe", "moe" or None
        ``None``: no (d)MoE blocks. ``"dmoe"``: a distribution-aware MoE after the encoder stages, one router per
        attribute level plus one for unknown; ``"moe"``: the same blocks with one router for everyone. The other
        settings come from the configuration's ``"dmoe"`` block (:func:`nnunet_dmoe.plans.blocks.read_dmoe_config`),
        defaults where absent.
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
    config = read_dmoe_config(configuration_manager, unknown_router=unknown_router,
                              **({"mode": routing} if routing else {}))
    arch_kwargs = unet_arch_kwargs(configuration_manager)

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
