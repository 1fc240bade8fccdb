"""One builder for every network family of the plugin, as the trainers declare it (``network_family``,
``routing``, ``keep_attribute_channel``, ``unknown_router``: see ``nnUNetTrainerAttributeBase``)."""
from __future__ import annotations

from typing import Optional

from torch import nn

__all__ = ["NETWORK_FAMILIES", "build_network"]

NETWORK_FAMILIES = ("unet", "film", "transunet", "primus")


def build_network(family: str, plans_manager, configuration_manager, num_input_channels: int,
                  num_output_channels: int, enable_deep_supervision: bool = True, *, routing: Optional[str] = None,
                  keep_attribute_channel: bool = False, unknown_router: bool = True) -> nn.Module:
    """The network of ``family`` from the plans.

    ``"unet"``: the plans' U-Net (:func:`nnunet_dmoe.networks.unet.build_attribute_network`); ``"film"``: the same
    with FiLM (:mod:`nnunet_dmoe.networks.film`); ``"transunet"`` / ``"primus"``: the transformers
    (:mod:`nnunet_dmoe.networks.transunet`, :mod:`nnunet_dmoe.networks.primus`). ``routing`` (``None``, ``"moe"``,
    ``"dmoe"``) and ``unknown_router`` place and route the (d)MoE blocks; ``keep_attribute_channel`` (U-Net only)
    feeds the attribute channel to the network as an ordinary input."""
    if family not in NETWORK_FAMILIES:
        raise ValueError(f"network_family must be one of {NETWORK_FAMILIES}, got {family!r}")
    if keep_attribute_channel and family != "unet":
        raise ValueError(f"keep_attribute_channel is for the U-Net only, not {family!r}")
    args = (plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)
    if family == "unet":
        from nnunet_dmoe.networks.unet import build_attribute_network
        return build_attribute_network(*args, routing=routing, keep_attribute_channel=keep_attribute_channel,
                                       unknown_router=unknown_router)
    if family == "film":
        if routing is not None:
            raise ValueError("FiLM conditions on the attribute without (d)MoE blocks: routing must be None")
        from nnunet_dmoe.networks.film import build_film_network
        return build_film_network(*args)
    if family == "transunet":
        from nnunet_dmoe.networks.transunet import build_transunet_network
        return build_transunet_network(*args, routing=routing, unknown_router=unknown_router)
    from nnunet_dmoe.networks.primus import build_primus_network
    return build_primus_network(*args, routing=routing, unknown_router=unknown_router)
