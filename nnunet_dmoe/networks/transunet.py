"""The paper's 2D TransUNet (and the stem-and-skips network of earlier versions) behind the attribute front end.

TransUNet's ``"decoder"`` in the configuration's ``"transformer"`` block: ``"paper"`` (the paper's network, which the
trainers write into the plans) or ``"skips"`` (a conv stem whose stages give the decoder skips: the network of earlier
versions, which plans without the key build). Sizes default to ViT-B/16 (:data:`TRANSUNET_DEFAULTS`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from nnunet_dmoe.networks.transformer import (AttributeTransformer, TokenBackbone, check_patch, num_attributes,
                                              transformer_routing)
from nnunet_dmoe.plans.blocks import TRANSFORMER_KEY, read_transformer_block, transformer_settings

__all__ = ["DECODER_KEY", "DECODERS", "TRANSUNET_DECODER", "TRANSUNET_DEFAULTS", "transunet_settings", "ViTEncoder",
           "TransUNetDecoder", "TransUNet", "StemViTEncoder", "StemSkipTransUNet", "build_transunet_network",
           "transunet_deep_supervision_scales"]

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


def transunet_settings(configuration_manager) -> dict:
    """:func:`transformer_settings` of TransUNet, checked: a known ``"decoder"``, no key of the other decoder."""
    block = read_transformer_block(configuration_manager)
    s = transformer_settings(configuration_manager, TRANSUNET_DEFAULTS)
    if s[DECODER_KEY] not in DECODERS:
        raise ValueError(f"\"{DECODER_KEY}\" in the plans' \"{TRANSFORMER_KEY}\" block must be one of {DECODERS}, got "
                         f"{s[DECODER_KEY]!r}")
    wrong = sorted(k for k in block if _DECODER_ONLY.get(k, s[DECODER_KEY]) != s[DECODER_KEY])
    if wrong:
        raise ValueError(f"{wrong} in the plans' \"{TRANSFORMER_KEY}\" block belong to \"{DECODER_KEY}\": "
                         f"\"{_DECODER_ONLY[wrong[0]]}\", this block builds \"{s[DECODER_KEY]}\"")
    return s


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
        check_patch(patch_size, token_patch)
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
        check_patch(patch_size, token_patch)
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


def transunet_deep_supervision_scales(configuration_manager) -> list:
    """The scales of TransUNet's deep-supervision outputs (full resolution first), in nnU-Net's format
    (``_get_deep_supervision_scales``): ``"skips"``: one per stem stage; ``"paper"``: its one output."""
    settings = transunet_settings(configuration_manager)
    dim = len(configuration_manager.patch_size)
    outputs = len(settings["stem_features"]) if settings[DECODER_KEY] == "skips" else 1
    return [[0.5 ** s] * dim for s in range(outputs)]


def build_transunet_network(plans_manager, configuration_manager, num_input_channels: int, num_output_channels: int,
                            enable_deep_supervision: bool = True, *, routing: Optional[str] = None,
                            unknown_router: bool = True) -> nn.Module:
    """TransUNet behind :class:`AttributeTransformer`: :class:`TransUNet` for ``"decoder": "paper"``,
    :class:`StemSkipTransUNet` for ``"skips"`` or no ``"decoder"`` (plans of earlier versions); sizes from the
    configuration's ``"transformer"`` block (defaults :data:`TRANSUNET_DEFAULTS`). ``routing`` as in
    :func:`nnunet_dmoe.networks.unet.build_attribute_network` (``None``: attribute-blind baseline)."""
    s = transunet_settings(configuration_manager)
    config, placement, channel = transformer_routing(configuration_manager, routing, unknown_router)
    image_channels, patch = num_input_channels - num_attributes(channel), configuration_manager.patch_size
    vit = (s["embed_dim"], s["depth"], s["num_heads"], s["mlp_ratio"], s["patch_size"])
    if s[DECODER_KEY] == "paper":
        net = TransUNet(image_channels, num_output_channels, patch, *vit, s["decoder_features"], s["drop_path_rate"],
                        s["dropout"], enable_deep_supervision)
    else:
        net = StemSkipTransUNet(image_channels, num_output_channels, patch, *vit, s["stem_features"],
                                s["drop_path_rate"], enable_deep_supervision)
    return AttributeTransformer(net, num_input_channels, channel, config, placement)
