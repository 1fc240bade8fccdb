"""The one reader and writer of the plugin's blocks in a configuration of nnU-Net plans.

- ``"dmoe"``: the (d)MoE settings (:class:`nnunet_dmoe.method.config.DMoEConfig`, keys without prefix, e.g.
  ``{"num_experts": 8, "num_levels": 4, "attribute_channel": 1}``). It sits beside ``"architecture"``, not in its
  ``arch_kwargs``, so that nnU-Net's own trainers build the plain U-Net from the same plans.
- ``"transformer"``: the sizes of the transformer networks (TransUNet, Primus).

Plans of earlier versions still load: version 0.1 kept the dMoE settings in ``arch_kwargs`` with the prefix
``dmoe_`` (read here, and nowhere else); a setting whose default changed after version 0.2
(:data:`~nnunet_dmoe.method.config.EARLIER_VALUES`) takes its earlier value when a block does not record it. Every
writer here records every setting with the current defaults (:func:`current_dmoe_block`), so that a model folder
rebuilds the network it trained.
"""
from __future__ import annotations

from copy import deepcopy
from typing import List, Mapping, Optional

from nnunet_dmoe.method.config import EARLIER_VALUES, DMoEConfig

__all__ = ["DMOE_KEY", "TRANSFORMER_KEY", "configuration_chain", "read_dmoe_block", "read_dmoe_config",
           "unet_arch_kwargs", "current_dmoe_block", "planned_dmoe_block", "write_dmoe_block", "with_dmoe_block",
           "read_transformer_block", "transformer_settings", "write_transformer_block", "with_transformer_defaults"]

DMOE_KEY = "dmoe"
TRANSFORMER_KEY = "transformer"
# where version 0.1 kept the dMoE settings: the configuration's arch_kwargs, each key with this prefix
_LEGACY_PREFIX = "dmoe_"
# chosen by the trainer class, not written by the planner: the routing (nnUNetTrainerMoE / nnUNetTrainerDMoE), the
# "unknown" router (nnUNetTrainerDMoE_noUnknown) and the transformers' placement (its default, unless a user sets it)
_TRAINER_CHOICES = ("mode", "unknown_router", "transformer_placement")


def configuration_chain(plans: Mapping, configuration: str) -> List[dict]:
    """The configuration and those it inherits from (nnU-Net's ``"inherits_from"``), the configuration first."""
    configs = plans["configurations"]
    if configuration not in configs:
        raise ValueError(f"configuration {configuration!r} is not in the plans; it has {sorted(configs)}")
    chain, name = [], configuration
    while name is not None:
        chain.append(configs[name])
        name = configs[name].get("inherits_from")
    return chain


# ------------------------------------------------------------------------------------------------------------ dmoe
def read_dmoe_block(configuration_manager) -> dict:
    """The configuration's ``"dmoe"`` settings: its block, the ``dmoe_`` keys of version 0.1's ``arch_kwargs`` and
    the earlier values of the settings the plans do not record."""
    arch_kwargs = configuration_manager.network_arch_init_kwargs
    block = {k[len(_LEGACY_PREFIX):]: v for k, v in arch_kwargs.items() if k.startswith(_LEGACY_PREFIX)}
    block.update(configuration_manager.configuration.get(DMOE_KEY) or {})
    for key, value in EARLIER_VALUES.items():
        block.setdefault(key, value)
    return block


def read_dmoe_config(configuration_manager, **overrides) -> DMoEConfig:
    """:class:`DMoEConfig` of the configuration's ``"dmoe"`` settings (:func:`read_dmoe_block`), ``overrides``
    (the trainer's choices, e.g. ``mode``) applied."""
    return DMoEConfig.from_block(read_dmoe_block(configuration_manager), **overrides)


def unet_arch_kwargs(configuration_manager) -> dict:
    """The configuration's ``arch_kwargs`` for nnU-Net's U-Net: without the ``dmoe_`` keys of version 0.1."""
    return {k: v for k, v in configuration_manager.network_arch_init_kwargs.items()
            if not k.startswith(_LEGACY_PREFIX)}


def current_dmoe_block(block: Optional[Mapping] = None) -> dict:
    """``block`` with the current defaults of the settings that changed after version 0.2 filled in where it does not
    set them (what a trainer writes when it starts a new training)."""
    defaults = DMoEConfig()
    return {**{key: getattr(defaults, key) for key in EARLIER_VALUES}, **(block or {})}


def planned_dmoe_block(config: DMoEConfig) -> dict:
    """The block a planner writes for ``config``: every setting but the trainer's choices."""
    return {k: v for k, v in config.to_block().items() if k not in _TRAINER_CHOICES}


def write_dmoe_block(configuration: dict, **settings) -> dict:
    """Set ``settings`` in a configuration's ``"dmoe"`` block (a plans' configuration dict, changed in place; its
    other settings kept, current defaults filled in). Returns the block."""
    configuration[DMOE_KEY] = current_dmoe_block({**(configuration.get(DMOE_KEY) or {}), **settings})
    return configuration[DMOE_KEY]


def with_dmoe_block(plans: Mapping, configuration: str, settings: Mapping) -> dict:
    """A copy of ``plans`` whose configuration's ``"dmoe"`` block holds ``settings``, the settings it inherits
    (key by key: a child's block adds to its parent's, as the trainers write only the keys they know) and the
    current defaults of the rest."""
    block = {}
    for cfg in reversed(configuration_chain(plans, configuration)):
        block.update(cfg.get(DMOE_KEY) or {})
    plans = deepcopy(plans)
    plans["configurations"][configuration][DMOE_KEY] = current_dmoe_block({**block, **settings})
    return plans


# ----------------------------------------------------------------------------------------------------- transformer
def read_transformer_block(configuration_manager) -> dict:
    """The configuration's ``"transformer"`` block (empty when it has none)."""
    return dict(configuration_manager.configuration.get(TRANSFORMER_KEY) or {})


def transformer_settings(configuration_manager, defaults: Mapping) -> dict:
    """``defaults`` updated with the configuration's ``"transformer"`` block. A key that ``defaults`` lacks is an
    error naming it and the known keys."""
    block = read_transformer_block(configuration_manager)
    unknown = sorted(set(block) - set(defaults))
    if unknown:
        raise ValueError(f"unknown settings {unknown} in the plans' \"{TRANSFORMER_KEY}\" block of this "
                         f"configuration; this network knows {sorted(defaults)}")
    return {**defaults, **block}


def write_transformer_block(configuration: dict, block: Mapping) -> None:
    """Replace a configuration's ``"transformer"`` block (a plans' configuration dict, changed in place)."""
    configuration[TRANSFORMER_KEY] = deepcopy(dict(block))


def with_transformer_defaults(plans: dict, configuration: str, settings: Mapping) -> dict:
    """``plans`` with ``settings`` written into the configuration's ``"transformer"`` block where the block (after
    nnU-Net's configuration inheritance: a child's block replaces its parent's) lacks them; ``plans`` itself when
    nothing is missing, else a copy."""
    chain = configuration_chain(plans, configuration)
    block = dict(next((c[TRANSFORMER_KEY] for c in chain if TRANSFORMER_KEY in c), None) or {})
    missing = {k: v for k, v in settings.items() if k not in block}
    if not missing:
        return plans
    plans = deepcopy(plans)
    plans["configurations"][configuration][TRANSFORMER_KEY] = {**block, **missing}
    return plans
