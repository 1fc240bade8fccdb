"""nnU-Net's 3D Primus behind the attribute front end, split so that (d)MoE blocks sit between its blocks."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from nnunet_dmoe.networks.transformer import (AttributeTransformer, TokenBackbone, check_patch, num_attributes,
                                              transformer_routing)
from nnunet_dmoe.plans.blocks import transformer_settings

__all__ = ["PRIMUS_DEFAULTS", "PrimusBackbone", "build_primus_network"]

# Primus-M as nnU-Net 2.8's nnUNet_Primus_M_Trainer builds it (nnunetv2/training/nnUNetTrainer/primus/); a test
# checks that the defaults give that trainer's network
PRIMUS_DEFAULTS = {"embed_dim": 864, "depth": 16, "num_heads": 12, "patch_size": 8, "drop_path_rate": 0.2,
                   "init_values": 0.1, "scale_attn_inner": True}


class PrimusBackbone(TokenBackbone):
    """nnU-Net's Primus (dynamic_network_architectures, Wald et al. 2025) as ``embed`` -> Eva blocks -> ``head``,
    so that a (d)MoE can sit between its blocks. ``forward`` is Primus's own. Register tokens and patch dropout
    (Primus options nnU-Net's trainers leave off) are not supported."""

    def __init__(self, primus: nn.Module):
        super().__init__()
        if getattr(primus, "register_tokens", None) is not None or primus.eva.patch_drop is not None:
            raise ValueError("Primus with register tokens or patch dropout is not supported with a (d)MoE")
        self.primus = primus
        self.embed_dim = primus.embed_dim

    @property
    def blocks(self) -> nn.ModuleList:
        return self.primus.eva.blocks

    def embed(self, x: torch.Tensor):
        t = self.primus.down_projection(x)
        grid = tuple(t.shape[2:])
        # Eva's own absolute + rotary position embedding (no patch dropout, so no kept-token indices)
        tokens, rope, _ = self.primus.eva._pos_embed(t.flatten(2).transpose(1, 2))
        return tokens, (grid, rope)

    def run_block(self, block: nn.Module, tokens: torch.Tensor, context) -> torch.Tensor:
        return block(tokens, rope=context[1])

    def head(self, tokens: torch.Tensor, context):
        grid = context[0]
        x = self.primus.eva.norm(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
        return self.primus.up_projection(x)

    def forward(self, x: torch.Tensor):
        return self.primus(x)


def build_primus_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                         enable_deep_supervision: bool = False, *, routing: Optional[str] = None,
                         unknown_router: bool = True) -> nn.Module:
    """nnU-Net's 3D Primus (sizes from the configuration's ``"transformer"`` block, defaults
    :data:`PRIMUS_DEFAULTS` = Primus-M) behind :class:`AttributeTransformer`. Primus has no deep supervision."""
    from dynamic_network_architectures.architectures.primus import Primus

    s = transformer_settings(configuration_manager, PRIMUS_DEFAULTS)
    config, placement, channel = transformer_routing(configuration_manager, routing, unknown_router)
    patch = configuration_manager.patch_size
    if len(patch) != 3:
        raise ValueError(f"Primus is 3D, got a {len(patch)}D patch {list(patch)}; for 2D use nnUNetTrainerTransUNet*")
    check_patch(patch, s["patch_size"])
    primus = Primus(num_input_channels - num_attributes(channel), s["embed_dim"], (s["patch_size"],) * 3, num_output_channels, s["depth"],
                    s["num_heads"], patch, drop_path_rate=s["drop_path_rate"], scale_attn_inner=s["scale_attn_inner"],
                    init_values=s["init_values"])
    return AttributeTransformer(PrimusBackbone(primus), num_input_channels, channel, config, placement)
