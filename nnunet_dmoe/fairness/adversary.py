"""Adversarial debiasing of the bottleneck: an attribute classifier behind a gradient-reversal layer.

The classifier reads the bottleneck features of the plans' U-Net (global average pool -> Linear -> LeakyReLU ->
Linear, one logit per attribute level) through :func:`reverse_gradient`: the classifier learns to predict the
level, the encoder gets the negated, scaled gradient and learns features that hide it (Ganin & Lempitsky,
"Unsupervised Domain Adaptation by Backpropagation", ICML 2015; for fairness: Madras et al., "Learning Adversarially
Fair and Transferable Representations", ICML 2018).

:class:`AdversarialNetwork` returns :class:`AdversarialOutput` in training and only the segmentation in evaluation,
so nnU-Net's predictor, validation and checkpoints work unchanged (the classifier's weights are in the checkpoint
and unused at prediction).
"""
from __future__ import annotations

from typing import NamedTuple, Union

import torch
from torch import nn

__all__ = ["reverse_gradient", "AdversarialOutput", "AttributeAdversary", "AdversarialNetwork"]


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-scale`` in the backward pass."""
    return _GradientReversal.apply(x, float(scale))


class AdversarialOutput(NamedTuple):
    """What :class:`AdversarialNetwork` returns in training."""
    segmentation: Union[torch.Tensor, list]  # nnU-Net's output (list with deep supervision)
    attribute_logits: torch.Tensor  # (b, levels)


class AttributeAdversary(nn.Module):
    """Global average pool over space, then a two-layer MLP to one logit per attribute level."""

    def __init__(self, channels: int, num_levels: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.LeakyReLU(inplace=True),
                                 nn.Linear(channels, num_levels))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features.flatten(2).mean(2))


class AdversarialNetwork(nn.Module):
    """An attribute-blind :class:`~nnunet_dmoe.networks.unet.AttributeUNet` (channel stripped, no (d)MoE) plus an
    :class:`AttributeAdversary` on its bottleneck, behind a gradient reversal of weight ``reversal_scale``."""

    def __init__(self, segmenter: nn.Module, num_levels: int, reversal_scale: float = 1.0):
        super().__init__()
        if getattr(segmenter, "moe", None) is not None:
            raise ValueError("the adversary is built on the attribute-blind U-Net (routing=None)")
        self.segmenter = segmenter
        self.reversal_scale = float(reversal_scale)
        self.adversary = AttributeAdversary(segmenter.unet.encoder.output_channels[-1], num_levels)

    @property
    def decoder(self):  # nnU-Net's set_deep_supervision_enabled
        return self.segmenter.decoder

    @property
    def encoder(self):
        return self.segmenter.encoder

    def forward(self, x: torch.Tensor):
        if not self.training:
            return self.segmenter(x)
        image, _ = self.segmenter.split_attribute(x)
        unet = self.segmenter.unet
        skips = unet.encoder(image)
        logits = self.adversary(reverse_gradient(skips[-1], self.reversal_scale))
        return AdversarialOutput(unet.decoder(skips), logits)

    def compute_conv_feature_map_size(self, input_size):
        return self.segmenter.compute_conv_feature_map_size(input_size)
