"""Keeps nnU-Net's intensity augmentation off the attribute channel.

nnU-Net's training pipeline applies noise, blur, brightness, contrast, low-resolution simulation and gamma to every
input channel. The attribute channel is a code, not an intensity: at prediction time it is clean, so in training it
must be too. :func:`protect_attribute_channel` wraps those transforms: the channel is put aside before the first of
them and written back after the last, so it still follows the spatial transforms (rotation, scaling, elastic,
mirroring) like the image, exactly as nnU-Net's resampling moves it at prediction time.
"""
from typing import List, Sequence, Union

import numpy as np

from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

__all__ = ["INTENSITY_TRANSFORMS", "StashChannel", "RestoreChannel", "protect_attribute_channel"]

INTENSITY_TRANSFORMS = (GaussianNoiseTransform, GaussianBlurTransform, MultiplicativeBrightnessTransform,
                        ContrastTransform, SimulateLowResolutionTransform, GammaTransform)
_KEY = "nnunet_dmoe_stashed_channel"


def _channels(channel: Union[int, Sequence[int]]) -> List[int]:
    return [int(channel)] if isinstance(channel, (int, np.integer)) else [int(c) for c in channel]


class StashChannel(BasicTransform):
    """Puts a copy of image channel(s) aside in the sample dict (an index, or a list for several attributes)."""

    def __init__(self, channel: Union[int, Sequence[int]]):
        super().__init__()
        self.channel = channel

    def apply(self, data_dict, **params):
        data_dict[_KEY] = data_dict["image"][_channels(self.channel)].clone()
        return data_dict


class RestoreChannel(BasicTransform):
    """Writes the channel(s) put aside by :class:`StashChannel` back into the image."""

    def __init__(self, channel: Union[int, Sequence[int]]):
        super().__init__()
        self.channel = channel

    def apply(self, data_dict, **params):
        data_dict["image"][_channels(self.channel)] = data_dict.pop(_KEY)
        return data_dict


def _is_intensity(t) -> bool:
    return isinstance(t.transform if isinstance(t, RandomTransform) else t, INTENSITY_TRANSFORMS)


def protect_attribute_channel(pipeline: ComposeTransforms, channel: Union[int, Sequence[int]]) -> ComposeTransforms:
    """``pipeline`` with the intensity transforms (:data:`INTENSITY_TRANSFORMS`, wrapped in ``RandomTransform`` or
    not) bracketed by :class:`StashChannel` / :class:`RestoreChannel` for ``channel`` (an index, or a list: one
    channel per attribute). Unchanged if it has none."""
    transforms: Sequence = pipeline.transforms
    hits = [i for i, t in enumerate(transforms) if _is_intensity(t)]
    if not hits:
        return pipeline
    first, last = hits[0], hits[-1]
    return ComposeTransforms(list(transforms[:first]) + [StashChannel(channel)] + list(transforms[first:last + 1])
                             + [RestoreChannel(channel)] + list(transforms[last + 1:]))
