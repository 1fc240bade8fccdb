"""Routing: which router each sample's tokens use, from its attribute level(s).

The routing names are defined here once: ``"dmoe"`` (one router per attribute level, plus one for "unknown") and
``"moe"`` (one router for everyone, the paper's ablation).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

__all__ = ["ROUTINGS", "route_index_for_levels"]

# routing of the (d)MoE blocks: one router per attribute level (+ unknown), or one router for everyone
ROUTINGS = ("dmoe", "moe")


def route_index_for_levels(levels: torch.Tensor, num_levels: Union[int, Sequence[int]], mode: str,
                           unknown_router: bool = True) -> torch.Tensor:
    """Router index per sample. ``levels`` holds level indices, ``-1`` for unknown.

    One attribute (``levels`` (b,), ``num_levels`` an int): dMoE: level ``i`` -> router ``i``; unknown -> router
    ``num_levels`` (trained on samples whose attribute the trainer hides at a small rate). MoE: everyone -> router 0.

    Several attributes (``levels`` (b, A), ``num_levels`` one entry per attribute): returns (b, A), attribute
    ``a``'s routers following those of attributes ``0..a-1`` (``num_levels[j] + 1`` each). The router sums the
    logits of a sample's A routers, so a combination of levels that no training case had still routes (each
    attribute's router was trained). MoE: everyone -> router 0, shape (b,).

    ``unknown_router=False`` (the paper's setting): each attribute has its level routers only; callers make sure
    that no level is unknown (:func:`nnunet_dmoe.networks.unet.attribute_router_index` refuses it at inference).
    """
    counts = [int(num_levels)] if isinstance(num_levels, int) else [int(n) for n in num_levels]
    if (levels.ndim == 1 and len(counts) > 1) or (levels.ndim == 2 and levels.shape[1] != len(counts)):
        raise ValueError(f"levels of shape {tuple(levels.shape)} for {len(counts)} attribute(s) (num_levels "
                         f"{num_levels}): give one level per sample and attribute, shape (b, {len(counts)})"
                         + ("" if len(counts) > 1 else " or (b,)"))
    if mode == "moe":
        return torch.zeros_like(levels if levels.ndim == 1 else levels[:, 0])
    if levels.ndim == 1:
        return torch.where(levels < 0, torch.full_like(levels, counts[0]), levels) if unknown_router else levels
    # Python numbers only (no host-to-device copy of an offsets tensor in the forward pass)
    routers, offset = [], 0
    for a, n in enumerate(counts):
        level = levels[:, a]
        routers.append(offset + (torch.where(level < 0, torch.full_like(level, n), level) if unknown_router
                                 else level))
        offset += n + (1 if unknown_router else 0)
    return torch.stack(routers, dim=1)
