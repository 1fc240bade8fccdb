"""The dMoE's settings: :class:`DMoEConfig`, what the configuration's ``"dmoe"`` block of the plans holds."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Mapping, Sequence, Union

import numpy as np

from nnunet_dmoe.method.routing import ROUTINGS

__all__ = ["DMoEConfig", "EARLIER_VALUES", "PLACEMENTS", "ROUTER_INITS", "STAGE_RULES"]


STAGE_RULES = ("downsampling", "all")
ROUTER_INITS = ("linear", "zero")
# where the (d)MoE blocks of a transformer sit: one shared by all transformer blocks (the reference code), or one per
# block
PLACEMENTS = ("shared", "per_block")
# The settings whose default changed after version 0.2. Blocks written since record them; a block without them was
# written by an earlier version, and its model is rebuilt with the earlier value (:mod:`nnunet_dmoe.plans.blocks`).
EARLIER_VALUES = {"stages": "all", "router_init": "zero"}
# how an error names a setting: as the user finds it in the plans
_KEY = "\"{}\" in the plans' \"dmoe\" block"


@dataclass
class DMoEConfig:
    """dMoE hyperparameters, stored in the configuration's ``"dmoe"`` block of the plans (:meth:`to_block`,
    :meth:`from_block`; reading and writing the block: :mod:`nnunet_dmoe.plans.blocks`).

    Experts
        num_experts, top_k, expert_ratio (hidden width = ratio * C), expert_dropout.
    Routing
        mode ("dmoe": one router per level plus one for "unknown"; "moe": one shared router), router_noise
        (noisy top-k gating in training; eval is always deterministic), num_levels (attribute levels).
    Placement
        stages: encoder stages followed by a (d)MoE block: ``"downsampling"`` (the paper's Table 5: every stage
        whose stride is not 1, bottleneck included; in nnU-Net's plans all but stage 0), ``"all"`` (stage 0 at
        full resolution too; ``None`` means the same, as plans of versions up to 0.2 wrote it) or a list.
    Router
        router_init: ``"linear"`` (the paper's code: ``nn.Linear(C, E)`` with a bias and PyTorch's default
        initialisation, for the logits and the noise scale) or ``"zero"`` (no bias, zero weights: versions up to
        0.2).
    Transformers
        transformer_placement: ``"shared"`` (one (d)MoE block shared by all transformer blocks and applied after
        each, the paper's reference code) or ``"per_block"`` (one per transformer block). U-Nets ignore it.
    Input
        attribute_channel: index of the attribute channel in the network input (stripped before the U-Net).

    Several attributes (dataset.json's ``"attributes"``): ``num_levels`` and ``attribute_channel`` are lists, one
    entry per attribute. Each attribute gets its routers (one per level plus unknown) and a token's router logits
    are the sum of its attributes' routers (see :func:`route_index_for_levels`). Single values are one attribute.
    """

    # experts
    num_experts: int = 8
    top_k: int = 2
    expert_ratio: int = 4
    expert_dropout: float = 0.1
    # routing
    mode: str = "dmoe"
    router_noise: bool = True
    num_levels: Union[int, Sequence[int]] = 1
    # placement
    stages: Union[None, str, Sequence[int]] = "downsampling"
    router_init: str = "linear"
    # transformers: one block shared by all transformer blocks ("shared") or one per block ("per_block")
    transformer_placement: str = "shared"
    # input
    attribute_channel: Union[int, Sequence[int]] = -1
    # chosen by the trainer, not the plans: False = one router per level only (the paper's setting); an unknown
    # attribute is then an error
    unknown_router: bool = True

    def __post_init__(self):
        if self.mode not in ROUTINGS:
            raise ValueError(f"{_KEY.format('mode')} must be 'dmoe' or 'moe', got {self.mode!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"{_KEY.format('top_k')} must be in 1..num_experts={self.num_experts}, got {self.top_k}")
        if self.expert_ratio < 1:
            raise ValueError(f"{_KEY.format('expert_ratio')} must be >= 1, got {self.expert_ratio}")
        if not 0.0 <= self.expert_dropout < 1.0:
            raise ValueError(f"{_KEY.format('expert_dropout')} must be in [0, 1), got {self.expert_dropout}")
        lists = [isinstance(v, (list, tuple)) for v in (self.num_levels, self.attribute_channel)]
        if any(lists):
            if not all(lists) or len(self.num_levels) != len(self.attribute_channel):
                raise ValueError(f"num_levels {self.num_levels} and attribute_channel {self.attribute_channel} in "
                                 f"the plans' \"dmoe\" block must be two lists of the same length (one entry per "
                                 f"attribute) or two numbers (one attribute)")
            self.num_levels = [int(n) for n in self.num_levels]
            self.attribute_channel = [int(c) for c in self.attribute_channel]
        if any(n < 1 for n in self.levels_per_attribute):
            raise ValueError(f"{_KEY.format('num_levels')} must be >= 1 (per attribute), got {self.num_levels}")
        if isinstance(self.stages, str) and self.stages not in STAGE_RULES:
            raise ValueError(f"{_KEY.format('stages')} must be one of {STAGE_RULES} or a list of stage indices, got "
                             f"{self.stages!r}")
        if self.stages is not None and not isinstance(self.stages, str):
            self.stages = [int(s) for s in self.stages]
        if self.router_init not in ROUTER_INITS:
            raise ValueError(f"{_KEY.format('router_init')} must be one of {ROUTER_INITS}, got {self.router_init!r}")
        if self.transformer_placement not in PLACEMENTS:
            raise ValueError(f"{_KEY.format('transformer_placement')} must be one of {PLACEMENTS}, got "
                             f"{self.transformer_placement!r}")

    def stage_indices(self, strides: Sequence) -> List[int]:
        """The encoder stages followed by a block, for an encoder with these per-stage ``strides``."""
        if self.stages is None or self.stages == "all":
            return list(range(len(strides)))
        if self.stages == "downsampling":
            return [s for s, stride in enumerate(strides) if np.any(np.asarray(stride) != 1)]
        bad = [s for s in self.stages if not 0 <= s < len(strides)]
        if bad:
            raise ValueError(f"{_KEY.format('stages')} names stages {bad} out of range: the encoder has "
                             f"{len(strides)} stages")
        return list(self.stages)

    @property
    def levels_per_attribute(self) -> List[int]:
        """Number of levels of each attribute (one entry for a single attribute)."""
        return list(self.num_levels) if isinstance(self.num_levels, (list, tuple)) else [self.num_levels]

    @property
    def attribute_channels(self) -> List[int]:
        """Input channel of each attribute (one entry for a single attribute)."""
        c = self.attribute_channel
        return list(c) if isinstance(c, (list, tuple)) else [c]

    @property
    def num_routers(self) -> int:
        # per attribute: one router per level + one trained for "unknown" (see route_index_for_levels)
        extra = 1 if self.unknown_router else 0
        return sum(n + extra for n in self.levels_per_attribute) if self.mode == "dmoe" else 1

    def to_block(self) -> dict:
        """The settings as the plans' ``"dmoe"`` block holds them (lists, not tuples)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_block(cls, block: Mapping, **overrides) -> "DMoEConfig":
        """The config of a plans' ``"dmoe"`` block (defaults for absent keys); a key that is not a setting is an
        error naming it and the known ones."""
        unknown = set(block) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown dMoE settings in the plans' \"dmoe\" block: {sorted(unknown)}; known: "
                             f"{sorted(cls.__dataclass_fields__)}")
        return cls(**{**block, **overrides})
