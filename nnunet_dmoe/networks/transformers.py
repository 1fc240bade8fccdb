"""Transformer networks with a (distribution-aware) MoE on their tokens: the paper's 2D TransUNet and nnU-Net's 3D
Primus.

Placement as in the paper's reference code for TransUNet: **one** (d)MoE block on the transformer's tokens, shared
by all transformer blocks and applied residually after every block (``h <- h + sum_k g_k E_k(h)``, see
:mod:`nnunet_dmoe.method.dmoe`). ``"transformer_placement": "per_block"`` in the configuration's ``"dmoe"`` block of the
plans gives every transformer block its own (d)MoE block instead.

Both networks are a :class:`TokenBackbone` (``embed`` -> ``blocks`` -> ``head``) behind
:class:`AttributeTransformer`, the attribute front end (strip the attribute channel, decode the level, route), the
same as :class:`nnunet_dmoe.networks.unet.AttributeUNet` gives the U-Nets.

Network sizes are read from the configuration's ``"transformer"`` block of the plans (defaults when absent:
ViT-B/16 for TransUNet, nnU-Net's Primus-M for Primus), so a model folder rebuilds the same network. TransUNet's
``"decoder"``: ``"paper"`` (the paper's network, which the trainers write into the plans) or ``"skips"`` (a conv stem
whose stages give the decoder skips: the network of earlier versions, which plans without the key build).
"""
from __future__ import annotations

import math
from copy import deepcopy
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from nnunet_dmoe.method.dmoe import DMoEConfig, DistributionAwareMoE
from nnunet_dmoe.networks.unet import ROUTINGS, AttributeInput, attribute_router_index, dmoe_settings
from nnunet_dmoe.networks.vit_weights import load_vit_weights  # noqa: F401 (re-exported: the trainers' import)

__all__ = ["TRANSFORMER_KEY", "PLACEMENTS", "DECODER_KEY", "DECODERS", "TRANSUNET_DECODER", "TRANSUNET_DEFAULTS",
           "PRIMUS_DEFAULTS", "transformer_settings", "transunet_settings", "with_transformer_defaults",
           "round_patch_size", "TokenBackbone", "ViTEncoder", "TransUNetDecoder", "TransUNet", "StemViTEncoder",
           "StemSkipTransUNet", "PrimusBackbone", "AttributeTransformer", "build_transunet_network",
           "build_primus_network", "transunet_deep_supervision_scales", "load_vit_weights"]

# the configuration's key in the plans that holds the network sizes of the transformer trainers
TRANSFORMER_KEY = "transformer"
# where the (d)MoE blocks sit: one shared by all transformer blocks (the reference code), or one per block
PLACEMENTS = ("shared", "per_block")

# TransUNet's decoders: "paper" (Oh et al., ICML 2025, Table 4 and its code, TransUNet's ViT-B_16 without ResNet: a
# 16x16 patch embedding on the image, no skips) and "skips" (a light nnU-Net conv stem in front of the patch embedding
# whose stages give the decoder skips: the network of this plugin's earlier versions)
DECODER_KEY = "decoder"
DECODERS = ("paper", "skips")
# what the TransUNet trainers write into the plans' "transformer" block when it has no "decoder"
TRANSUNET_DECODER = "paper"
# ViT-B/16 (Dosovitskiy et al., ICLR 2021) as TransUNet uses it (Chen et al., arXiv:2102.04306): 768 wide, 12
# blocks of 12 heads, MLP 3072, tokens of 16x16 pixels. These are the values of keys the plans' block lacks: a block
# without "decoder" is one of an earlier version, so "skips". Only for "paper": ``decoder_features`` (TransUNet's
# 3x3 conv on the token grid to 512, then one up-block per further entry, 2x bilinear each) and ``dropout``
# (TransUNet's 0.1 after the position embedding and in the MLPs). Only for "skips": ``stem_features`` (the stem's
# stages, stride 2 between them). ``pretrained``: a ViT checkpoint file (:mod:`nnunet_dmoe.networks.vit_weights`).
TRANSUNET_DEFAULTS = {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0, "patch_size": 16,
                      "drop_path_rate": 0.0, "pretrained": None, DECODER_KEY: "skips",
                      "decoder_features": [512, 256, 128, 64, 16], "dropout": 0.1,
                      "stem_features": [32, 64, 128, 256]}
_DECODER_ONLY = {"decoder_features": "paper", "dropout": "paper", "stem_features": "skips"}
# Primus-M as nnU-Net 2.8's nnUNet_Primus_M_Trainer builds it (nnunetv2/training/nnUNetTrainer/primus/); a test
# checks that the defaults give that trainer's network
PRIMUS_DEFAULTS = {"embed_dim": 864, "depth": 16, "num_heads": 12, "patch_size": 8, "drop_path_rate": 0.2,
                   "init_values": 0.1, "scale_attn_inner": True}

_PATCH_NOT_DIVISIBLE = ("The patch size {patch} of the plans is not a multiple of {multiple} on every axis, as the "
                        "patch embedding of this network needs (tokens of {multiple} voxels per axis). The plugin's "
                        "transformer trainers round the plans' patch down to a multiple of {multiple}; set "
                        "\"patch_size\" in the plans' configuration to a multiple of {multiple}.")
_NO_CHANNEL = ("The plans lack the attribute channel (\"dmoe\": {\"attribute_channel\": ...} in the configuration); "
               "the plugin's trainers write it from dataset.json (nnUNetv2_dmoe_list_trainers).")


# ------------------------------------------------------------------------------------------------------ settings
def transformer_settings(configuration_manager, defaults: dict) -> dict:
    """``defaults`` updated with the configuration's ``"transformer"`` block of the plans. A key that ``defaults``
    lacks is an error naming it and the known keys."""
    block = configuration_manager.configuration.get(TRANSFORMER_KEY) or {}
    unknown = sorted(set(block) - set(defaults))
    if unknown:
        raise ValueError(f"unknown settings {unknown} in the plans' \"{TRANSFORMER_KEY}\" block of this "
                         f"configuration; this network knows {sorted(defaults)}")
    return {**defaults, **block}


def transunet_settings(configuration_manager) -> dict:
    """:func:`transformer_settings` of TransUNet, checked: a known ``"decoder"``, no key of the other decoder."""
    block = configuration_manager.configuration.get(TRANSFORMER_KEY) or {}
    s = transformer_settings(configuration_manager, TRANSUNET_DEFAULTS)
    if s[DECODER_KEY] not in DECODERS:
        raise ValueError(f"\"{DECODER_KEY}\" in the plans' \"{TRANSFORMER_KEY}\" block must be one of {DECODERS}, got "
                         f"{s[DECODER_KEY]!r}")
    wrong = sorted(k for k in block if _DECODER_ONLY.get(k, s[DECODER_KEY]) != s[DECODER_KEY])
    if wrong:
        raise ValueError(f"{wrong} in the plans' \"{TRANSFORMER_KEY}\" block belong to \"{DECODER_KEY}\": "
                         f"\"{_DECODER_ONLY[wrong[0]]}\", this block builds \"{s[DECODER_KEY]}\"")
    return s


def with_transformer_defaults(plans: dict, configuration: str, settings: dict) -> dict:
    """``plans`` with ``settings`` written into the configuration's ``"transformer"`` block where the block (after
    nnU-Net's configuration inheritance) lacks them; ``plans`` itself when nothing is missing, else a copy."""
    configs = plans["configurations"]
    if configuration not in configs:
        raise ValueError(f"configuration {configuration!r} is not in the plans; it has {sorted(configs)}")
    name, chain = configuration, []
    while name is not None:  # nnU-Net's inheritance: the child's keys win, a child's block replaces its parent's
        chain.append(configs[name])
        name = configs[name].get("inherits_from")
    block = dict(next((c[TRANSFORMER_KEY] for c in chain if TRANSFORMER_KEY in c), None) or {})
    missing = {k: v for k, v in settings.items() if k not in block}
    if not missing:
        return plans
    plans = deepcopy(plans)
    plans["configurations"][configuration][TRANSFORMER_KEY] = {**block, **missing}
    return plans


def _routing(configuration_manager, routing: Optional[str]) -> Tuple[Optional[DMoEConfig], str, int]:
    """(d)MoE config (None without routing), placement and attribute channel from the configuration's ``"dmoe"``
    block."""
    if routing is not None and routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS} or None, got {routing!r}")
    settings, _ = dmoe_settings(configuration_manager)
    placement = settings.pop("dmoe_transformer_placement", "shared")
    if placement not in PLACEMENTS:
        raise ValueError(f"\"transformer_placement\" in the plans' \"dmoe\" block must be one of {PLACEMENTS}, got "
                         f"{placement!r}")
    if isinstance(settings.get("dmoe_stages"), (list, tuple)):  # the named rules concern U-Nets only
        raise ValueError(f"\"stages\" in the plans' \"dmoe\" block ({settings['dmoe_stages']}) places blocks after "
                         f"U-Net encoder stages; transformers use \"transformer_placement\" ({PLACEMENTS})")
    config = DMoEConfig.pop_from_arch_kwargs(settings, **({"mode": routing} if routing else {}))
    if any(c < 0 for c in config.attribute_channels):
        raise RuntimeError(_NO_CHANNEL)
    return (config if routing else None), placement, config.attribute_channel


def _num_attributes(channel) -> int:
    return len(channel) if isinstance(channel, (list, tuple)) else 1


def round_patch_size(plans: dict, configuration: str, defaults: dict) -> Tuple[dict, list, list]:
    """``(plans, old, new)``: a copy of ``plans`` whose configuration's patch size is rounded down to a multiple of
    the network's token size (``"patch_size"`` of its settings: ``defaults`` and the ``"transformer"`` block) on
    every axis, at least one token; ``plans`` itself when it already is one."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(plans).get_configuration(configuration)
    multiple = int(transformer_settings(cm, defaults)["patch_size"])
    old = [int(p) for p in cm.patch_size]
    new = [max(multiple, p // multiple * multiple) for p in old]
    if new == old:
        return plans, old, new
    plans = deepcopy(plans)
    plans["configurations"][configuration]["patch_size"] = new
    return plans, old, new


def _check_patch(patch_size: Sequence[int], multiple: int):
    if any(p % multiple for p in patch_size):
        raise ValueError(_PATCH_NOT_DIVISIBLE.format(patch=list(patch_size), multiple=multiple))


# ------------------------------------------------------------------------------------------------------ backbones
class TokenBackbone(nn.Module):
    """A transformer segmentation network split where a (d)MoE goes in: ``embed(x) -> (tokens, context)`` with
    tokens (b, n, c); ``run_block(block, tokens, context)`` for each of ``blocks``; ``head(tokens, context)`` ->
    the network's output. ``forward`` runs all three; ``embed_dim`` is c."""

    embed_dim: int
    blocks: nn.ModuleList

    def embed(self, x: torch.Tensor):
        raise NotImplementedError

    def run_block(self, block: nn.Module, tokens: torch.Tensor, context) -> torch.Tensor:
        return block(tokens)

    def head(self, tokens: torch.Tensor, context):
        raise NotImplementedError

    def forward(self, x: torch.Tensor):
        tokens, context = self.embed(x)
        for block in self.blocks:
            tokens = self.run_block(block, tokens, context)
        return self.head(tokens, context)


def _check_2d(patch_size: Sequence[int]):
    if len(patch_size) != 2:
        raise ValueError(f"TransUNet is 2D (the paper's setting), got a {len(patch_size)}D patch {list(patch_size)}; "
                         f"for 3D use nnUNetTrainerPrimusMoE / nnUNetTrainerPrimusDMoE")


def _vit_blocks(embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path_rate: float,
                dropout: float = 0.0) -> nn.ModuleList:
    """timm's ViT ``Block``s (pre-norm, qkv with bias, GELU MLP, LayerNorm eps 1e-6: TransUNet's ``Block``), dropout
    ``dropout`` in the MLP (after the GELU and after the second linear, as TransUNet's ``Mlp``), none on attention."""
    from timm.models.vision_transformer import Block

    rates = np.linspace(0, drop_path_rate, depth)
    blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=float(r)) for r in rates])
    for block in blocks:
        block.mlp.drop1.p = block.mlp.drop2.p = float(dropout)
    return blocks


class _TokenGrid(nn.Module):
    """Position embedding and final norm of a TransUNet encoder: ``grid`` (the plans' token grid), ``pos_embed``
    (1, n, c), ``norm``."""

    grid: Tuple[int, ...]
    pos_embed: nn.Parameter
    norm: nn.LayerNorm

    def position_embedding(self, grid: Sequence[int]) -> torch.Tensor:
        """The position embedding for a token grid (resampled bicubically when it is not the plans' patch grid)."""
        if tuple(grid) == self.grid:
            return self.pos_embed
        from timm.layers import resample_abs_pos_embed
        return resample_abs_pos_embed(self.pos_embed, list(grid), list(self.grid), num_prefix_tokens=0)

    def token_map(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        """Normed tokens (b, n, c) as a feature map (b, c, *grid), the decoder's input."""
        return self.norm(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

    def _init_tokens(self):
        from timm.models.vision_transformer import init_weights_vit_timm

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for block in self.blocks:
            block.apply(init_weights_vit_timm)


class ViTEncoder(_TokenGrid):
    """The paper's TransUNet encoder (TransUNet's ``Transformer`` for ViT-B_16, no ResNet): patch embedding (a conv
    of kernel and stride ``token_patch`` on the image channels) + learned position embedding, dropout -> ViT blocks
    -> LayerNorm."""

    embeds_pixels = True  # the patch embedding takes the image: a ViT checkpoint's patch embedding fits it

    def __init__(self, input_channels: int, patch_size: Sequence[int], embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, token_patch: int = 16, drop_path_rate: float = 0.0,
                 dropout: float = 0.1):
        super().__init__()
        _check_2d(patch_size)
        _check_patch(patch_size, token_patch)
        self.patch_embed = nn.Conv2d(input_channels, embed_dim, token_patch, token_patch)
        self.grid = tuple(int(p) // token_patch for p in patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, int(np.prod(self.grid)), embed_dim))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = _vit_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path_rate, dropout)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.embed_dim = embed_dim
        self._init_tokens()

    def embed(self, x: torch.Tensor):
        t = self.patch_embed(x)
        grid = tuple(t.shape[2:])
        return self.pos_drop(t.flatten(2).transpose(1, 2) + self.position_embedding(grid)), grid


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """TransUNet's ``Conv2dReLU``: 3x3 conv without bias, BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class TransUNetDecoder(nn.Module):
    """TransUNet's ``DecoderCup`` without skips and its ``SegmentationHead``: a 3x3 conv-BN-ReLU from the token map to
    ``features[0]`` channels, then per further entry an up-block (2x bilinear upsampling, corners aligned, and two
    conv-BN-ReLU), then a 3x3 conv to the classes. No deep supervision: with ``deep_supervision`` the one output comes
    as a list of one (nnU-Net's format), full resolution."""

    def __init__(self, embed_dim: int, features: Sequence[int], num_classes: int, deep_supervision: bool = False):
        super().__init__()
        self.conv = _conv_bn_relu(embed_dim, features[0])
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), _conv_bn_relu(a, b),
                          _conv_bn_relu(b, b)) for a, b in zip(features[:-1], features[1:])])
        self.seg_layer = nn.Conv2d(features[-1], num_classes, 3, padding=1)
        self.deep_supervision = deep_supervision

    def forward(self, x: torch.Tensor):
        x = self.conv(x)
        for block in self.blocks:
            x = block(x)
        out = self.seg_layer(x)
        return [out] if self.deep_supervision else out


class _ViTEncoderDecoder(TokenBackbone):
    """A TransUNet: ``self.encoder`` embeds and holds the ViT blocks, ``self.decoder`` follows ``head``."""

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.blocks

    def embed(self, x: torch.Tensor):
        return self.encoder.embed(x)


class TransUNet(_ViTEncoderDecoder):
    """The paper's 2D TransUNet (Oh et al., ICML 2025, Table 4; TransUNet's ViT-B_16 with ``n_skip`` 0):
    :class:`ViTEncoder` and :class:`TransUNetDecoder`. ``decoder_features`` needs one up-block per halving of the
    token size (16: 512, then 256, 128, 64, 16)."""

    def __init__(self, input_channels: int, num_classes: int, patch_size: Sequence[int], embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, token_patch: int = 16,
                 decoder_features: Sequence[int] = (512, 256, 128, 64, 16), drop_path_rate: float = 0.0,
                 dropout: float = 0.1, deep_supervision: bool = False):
        super().__init__()
        if 2 ** (len(decoder_features) - 1) != token_patch:
            raise ValueError(f"\"decoder_features\" {list(decoder_features)} gives {len(decoder_features) - 1} "
                             f"up-blocks (2x each), the token size {token_patch} needs {int(math.log2(token_patch))} "
                             f"(one more entry than up-blocks: the first is the conv on the token grid)")
        self.encoder = ViTEncoder(input_channels, patch_size, embed_dim, depth, num_heads, mlp_ratio, token_patch,
                                  drop_path_rate, dropout)
        self.decoder = TransUNetDecoder(embed_dim, list(decoder_features), num_classes, deep_supervision)
        self.embed_dim = embed_dim

    def head(self, tokens: torch.Tensor, grid):
        return self.decoder(self.encoder.token_map(tokens, grid))


class StemViTEncoder(_TokenGrid):
    """The ``"skips"`` encoder (this plugin's earlier TransUNet): conv stem (nnU-Net's ``PlainConvEncoder``: two
    conv-norm-nonlin per stage, stride 2 between stages) -> patch embedding (strided conv on the stem's last stage)
    + learned position embedding -> ViT blocks (timm's ``Block``) -> LayerNorm. Exposes the metadata
    ``UNetDecoder`` reads from an encoder: the stem's stages and the token grid are its ``output_channels`` /
    ``strides``."""

    embeds_pixels = False  # the patch embedding takes the stem's features: a ViT checkpoint's does not fit

    def __init__(self, input_channels: int, patch_size: Sequence[int], embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, token_patch: int = 16,
                 stem_features: Sequence[int] = (32, 64, 128, 256), drop_path_rate: float = 0.0):
        super().__init__()
        from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He

        _check_2d(patch_size)
        n = len(stem_features)
        stem_stride = 2 ** (n - 1)
        if token_patch % stem_stride:
            raise ValueError(f"patch_size {token_patch} must be a multiple of the stem's stride {stem_stride} "
                             f"({n} stem stages)")
        _check_patch(patch_size, token_patch)
        embed_stride = token_patch // stem_stride
        self.stem = PlainConvEncoder(
            input_channels, n, list(stem_features), nn.Conv2d, [[3, 3]] * n, [[1, 1]] + [[2, 2]] * (n - 1), 2,
            conv_bias=True,
            norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
            nonlin_kwargs={"inplace": True}, return_skips=True)
        self.patch_embed = nn.Conv2d(stem_features[-1], embed_dim, embed_stride, embed_stride)
        self.grid = tuple(int(p) // token_patch for p in patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, int(np.prod(self.grid)), embed_dim))
        self.blocks = _vit_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path_rate)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.embed_dim = embed_dim
        # what UNetDecoder reads from its encoder: the stem's stages, then the token grid as the bottleneck
        self.output_channels = list(stem_features) + [embed_dim]
        self.strides = [list(s) for s in self.stem.strides] + [[embed_stride] * 2]
        self.kernel_sizes = [list(k) for k in self.stem.kernel_sizes] + [[embed_stride] * 2]
        for name in ("conv_op", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs",
                     "nonlin", "nonlin_kwargs"):
            setattr(self, name, getattr(self.stem, name))
        self.stem.apply(InitWeights_He(1e-2))
        InitWeights_He(1e-2)(self.patch_embed)
        self._init_tokens()

    def embed(self, x: torch.Tensor):
        skips = self.stem(x)
        t = self.patch_embed(skips[-1])
        grid = tuple(t.shape[2:])
        return t.flatten(2).transpose(1, 2) + self.position_embedding(grid), (skips, grid)

    def forward(self, x: torch.Tensor):
        tokens, (skips, grid) = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens)
        return skips + [self.token_map(tokens, grid)]


class StemSkipTransUNet(_ViTEncoderDecoder):
    """The ``"skips"`` network (this plugin's earlier TransUNet, built for plans without ``"decoder"``):
    :class:`StemViTEncoder` and nnU-Net's ``UNetDecoder`` (transposed conv, concatenated stem skip, two convs per
    stage) from the token grid up to full resolution. With ``deep_supervision`` the decoder returns one output per
    stem stage (full resolution first, then 1/2, 1/4, ...: :func:`transunet_deep_supervision_scales`)."""

    def __init__(self, input_channels: int, num_classes: int, patch_size: Sequence[int], embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, token_patch: int = 16,
                 stem_features: Sequence[int] = (32, 64, 128, 256), drop_path_rate: float = 0.0,
                 deep_supervision: bool = False):
        super().__init__()
        from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He

        self.encoder = StemViTEncoder(input_channels, patch_size, embed_dim, depth, num_heads, mlp_ratio,
                                      token_patch, stem_features, drop_path_rate)
        self.decoder = UNetDecoder(self.encoder, num_classes, 2, deep_supervision)
        for name in ("stages", "transpconvs", "seg_layers"):
            getattr(self.decoder, name).apply(InitWeights_He(1e-2))
        self.embed_dim = embed_dim

    def head(self, tokens: torch.Tensor, context):
        skips, grid = context
        return self.decoder(skips + [self.encoder.token_map(tokens, grid)])


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


# ------------------------------------------------------------------------------------------ attribute front end
class AttributeTransformer(AttributeInput):
    """A :class:`TokenBackbone` behind the attribute-channel front end, with (d)MoE blocks on its tokens.

    Parameters
    ----------
    backbone : TokenBackbone
        Built for the image channels only.
    num_input_channels : int
        Channels of the input tensor, attribute channel(s) included.
    attribute_channel : int or list of int
        The attribute channel's index (one per attribute for several attributes).
    config : DMoEConfig or None
        ``None``: the attribute is stripped and unused (attribute-blind baseline).
    placement : "shared" or "per_block"
        One (d)MoE block applied after every transformer block (the reference code), or one per block.

    ``forward(x)`` decodes the level per sample from the channel; ``forward(x, attribute)`` takes the levels (long,
    -1 = unknown).
    """

    def __init__(self, backbone: TokenBackbone, num_input_channels: int, attribute_channel,
                 config: Optional[DMoEConfig] = None, placement: str = "shared"):
        super().__init__(num_input_channels, attribute_channel)
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.backbone = backbone
        self.config = config
        self.placement = placement
        if config is None:
            self.moe = None
        else:
            n = 1 if placement == "shared" else len(backbone.blocks)
            self.moe = nn.ModuleList([
                DistributionAwareMoE(backbone.embed_dim, config.num_experts, config.num_routers, config.top_k,
                                     config.expert_ratio, config.expert_dropout, config.router_noise,
                                     router_init=config.router_init)
                for _ in range(n)])

    @property
    def decoder(self):
        # nnU-Net's set_deep_supervision_enabled sets network.decoder.deep_supervision (TransUNet)
        return self.backbone.decoder

    def forward(self, x: torch.Tensor, attribute: Optional[torch.Tensor] = None):
        x, channel = self.split_attribute(x)
        if self.moe is None:
            return self.backbone(x)
        router_index = attribute_router_index(channel, attribute, self.config, self.training)
        tokens, context = self.backbone.embed(x)
        for i, block in enumerate(self.backbone.blocks):
            tokens = self.backbone.run_block(block, tokens, context)
            moe = self.moe[0 if self.placement == "shared" else i]
            # the block takes (b, c, *spatial): tokens as (b, c, n), a view; the result's memory is (b, n, c) again
            tokens = moe(tokens.transpose(1, 2), router_index).transpose(1, 2)
        return self.backbone.head(tokens, context)


# ------------------------------------------------------------------------------------------------------ builders
def transunet_deep_supervision_scales(configuration_manager) -> list:
    """The scales of TransUNet's deep-supervision outputs (full resolution first), in nnU-Net's format
    (``_get_deep_supervision_scales``): ``"skips"``: one per stem stage; ``"paper"``: its one output."""
    settings = transunet_settings(configuration_manager)
    dim = len(configuration_manager.patch_size)
    outputs = len(settings["stem_features"]) if settings[DECODER_KEY] == "skips" else 1
    return [[0.5 ** s] * dim for s in range(outputs)]


def build_transunet_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                            enable_deep_supervision: bool = True, *, routing: Optional[str] = None) -> nn.Module:
    """TransUNet behind :class:`AttributeTransformer`: :class:`TransUNet` for ``"decoder": "paper"``,
    :class:`StemSkipTransUNet` for ``"skips"`` or no ``"decoder"`` (plans of earlier versions); sizes from the
    configuration's ``"transformer"`` block (defaults :data:`TRANSUNET_DEFAULTS`). ``routing`` as in
    :func:`nnunet_dmoe.networks.unet.build_attribute_network` (``None``: attribute-blind baseline)."""
    s = transunet_settings(configuration_manager)
    config, placement, channel = _routing(configuration_manager, routing)
    image_channels, patch = num_input_channels - _num_attributes(channel), configuration_manager.patch_size
    vit = (s["embed_dim"], s["depth"], s["num_heads"], s["mlp_ratio"], s["patch_size"])
    if s[DECODER_KEY] == "paper":
        net = TransUNet(image_channels, num_output_channels, patch, *vit, s["decoder_features"], s["drop_path_rate"],
                        s["dropout"], enable_deep_supervision)
    else:
        net = StemSkipTransUNet(image_channels, num_output_channels, patch, *vit, s["stem_features"],
                                s["drop_path_rate"], enable_deep_supervision)
    return AttributeTransformer(net, num_input_channels, channel, config, placement)


def build_primus_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                         enable_deep_supervision: bool = False, *, routing: Optional[str] = None) -> nn.Module:
    """nnU-Net's 3D Primus (sizes from the configuration's ``"transformer"`` block, defaults
    :data:`PRIMUS_DEFAULTS` = Primus-M) behind :class:`AttributeTransformer`. Primus has no deep supervision."""
    from dynamic_network_architectures.architectures.primus import Primus

    s = transformer_settings(configuration_manager, PRIMUS_DEFAULTS)
    config, placement, channel = _routing(configuration_manager, routing)
    patch = configuration_manager.patch_size
    if len(patch) != 3:
        raise ValueError(f"Primus is 3D, got a {len(patch)}D patch {list(patch)}; for 2D use nnUNetTrainerTransUNet*")
    _check_patch(patch, s["patch_size"])
    primus = Primus(num_input_channels - _num_attributes(channel), s["embed_dim"], (s["patch_size"],) * 3, num_output_channels, s["depth"],
                    s["num_heads"], patch, drop_path_rate=s["drop_path_rate"], scale_attn_inner=s["scale_attn_inner"],
                    init_values=s["init_values"])
    return AttributeTransformer(PrimusBackbone(primus), num_input_channels, channel, config, placement)
