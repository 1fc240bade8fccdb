"""ViT weights for the TransUNet's encoder from a file the user gives (``"pretrained"`` in the plans'
``"transformer"`` block): Google's original ViT checkpoints (``.npz``, e.g. ``imagenet21k_ViT-B_16.npz`` as
TransUNet's ``load_from`` reads it) or a timm state dict (``vit_base_patch16_224``'s key names, ``torch.save``).

Both are read into timm's key names, the names of this plugin's ViT blocks. Rules for the ``.npz`` (Flax layout):

- ``embedding/kernel`` (kh, kw, in, D) -> ``patch_embed.proj.weight`` (D, in, kh, kw): axes (3, 2, 0, 1);
- ``MultiHeadDotProductAttention_1/{query,key,value}/kernel`` (D, heads, D/heads) -> each reshaped to (D, D) and
  transposed, stacked in the order q, k, v into ``attn.qkv.weight`` (3D, D); their biases (heads, D/heads) flattened
  and concatenated into ``attn.qkv.bias``; ``.../out/kernel`` (heads, D/heads, D) -> (D, D), transposed, into
  ``attn.proj.weight``;
- ``MlpBlock_3/Dense_{0,1}/kernel`` (in, out) -> transposed into ``mlp.fc{1,2}.weight``; biases as they are;
- ``LayerNorm_0`` / ``LayerNorm_2`` -> ``norm1`` / ``norm2``, ``Transformer/encoder_norm`` -> ``norm``
  (``scale`` -> ``weight``);
- ``Transformer/posembed_input/pos_embedding`` -> ``pos_embed``; ``cls`` and the classifier are not used.

Into the network: the blocks, the final norm, the position embedding (class token dropped, resized bilinearly,
corners aligned, to the network's token grid, as TransUNet resizes it with ``scipy.ndimage.zoom(order=1)``) and,
when the network embeds pixels (the paper's TransUNet, not the stem-and-skips variant), the patch embedding. A
checkpoint's RGB kernel on a network with one image channel is summed over RGB, which equals TransUNet's repeat of a
grey image to three channels; other channel counts repeat the RGB kernel cyclically, scaled by 3 / channels.
"""
from __future__ import annotations

import math
import os
import re
from typing import Dict, Mapping, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["read_vit_file", "npz_to_timm", "npz_key", "resize_position_embedding", "adapt_patch_kernel",
           "load_vit_weights"]

_NPZ_BLOCK = "Transformer/encoderblock_{}/"
_NPZ_ATTENTION = "MultiHeadDotProductAttention_1/"
_NPZ_LINEAR = {"attn.proj": _NPZ_ATTENTION + "out", "mlp.fc1": "MlpBlock_3/Dense_0", "mlp.fc2": "MlpBlock_3/Dense_1"}
_NPZ_NORM = {"norm1": "LayerNorm_0", "norm2": "LayerNorm_2"}
_NPZ_GLOBAL = {"patch_embed.proj.weight": "embedding/kernel", "patch_embed.proj.bias": "embedding/bias",
               "pos_embed": "Transformer/posembed_input/pos_embedding", "norm.weight": "Transformer/encoder_norm/scale",
               "norm.bias": "Transformer/encoder_norm/bias"}
_WHERE = "(\"pretrained\" in the plans' \"transformer\" block)"


class _Arrays:
    """The npz's arrays by key; a missing key is an error naming the file and the key."""

    def __init__(self, arrays: Mapping[str, np.ndarray], path: str):
        self.arrays, self.path = arrays, path

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.arrays:
            raise ValueError(f"{self.path} lacks {key!r}: not a ViT checkpoint of this size {_WHERE}")
        return torch.from_numpy(np.asarray(self.arrays[key], dtype=np.float32))


def npz_key(name: str) -> str:
    """The Google ``.npz`` key a timm name comes from (``attn.qkv``: the query's, with key and value beside it)."""
    if name in _NPZ_GLOBAL:
        return _NPZ_GLOBAL[name]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
    if m is None:
        return name
    i, part, kind = m.groups()
    module = {**_NPZ_NORM, **_NPZ_LINEAR, "attn.qkv": _NPZ_ATTENTION + "query"}.get(part, part)
    leaf = ("scale" if part in _NPZ_NORM else "kernel") if kind == "weight" else "bias"
    return _NPZ_BLOCK.format(i) + module + "/" + leaf


def npz_to_timm(arrays: Mapping[str, np.ndarray], path: str = "the checkpoint") -> dict:
    """The ViT of a Google ``.npz`` (arrays by key) in timm's key names (rules: module docstring)."""
    get = _Arrays(arrays, path)
    state = {name: get(key) for name, key in _NPZ_GLOBAL.items() if key in arrays}
    if "patch_embed.proj.weight" in state:
        state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].permute(3, 2, 0, 1)
    blocks = {int(m.group(1)) for k in arrays if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}
    for i in sorted(blocks):
        for part in _NPZ_NORM:
            for kind in ("weight", "bias"):
                state[f"blocks.{i}.{part}.{kind}"] = get(npz_key(f"blocks.{i}.{part}.{kind}"))
        for part in _NPZ_LINEAR:  # kernels (in..., out) -> weight (out, in)
            kernel = get(npz_key(f"blocks.{i}.{part}.weight"))
            state[f"blocks.{i}.{part}.weight"] = kernel.reshape(-1, kernel.shape[-1]).t()
            state[f"blocks.{i}.{part}.bias"] = get(npz_key(f"blocks.{i}.{part}.bias")).reshape(-1)
        qkv = [npz_key(f"blocks.{i}.attn.qkv.weight").replace("query", p) for p in ("query", "key", "value")]
        kernels = [get(k) for k in qkv]
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([k.reshape(k.shape[0], -1).t() for k in kernels])
        state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([get(k[:-len("kernel")] + "bias").reshape(-1) for k in qkv])
    return state


def read_vit_file(path: str) -> Tuple[dict, str]:
    """``(state, format)``: the file's ViT in timm's key names (float tensors) and ``"npz"`` or ``"timm"``. A timm
    state dict may sit in a ``"model"`` or ``"state_dict"`` entry."""
    if not os.path.isfile(path):
        raise ValueError(f"pretrained ViT checkpoint {path} does not exist {_WHERE}")
    if str(path).endswith(".npz"):
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception as e:
            raise ValueError(f"{path} is not a readable .npz ({type(e).__name__}: {e}) {_WHERE}") from None
        return npz_to_timm(arrays, path), "npz"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is neither a ViT .npz nor a torch state dict ({type(e).__name__}) {_WHERE}") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict {_WHERE}")
    return {k: v.float() for k, v in state.items() if torch.is_tensor(v)}, "timm"


def resize_position_embedding(pos: torch.Tensor, grid) -> torch.Tensor:
    """A ViT position embedding (1, prefix + side^2, D) on a token grid ``grid``: prefix tokens (class token) dropped,
    the square grid resized bilinearly with corners aligned (TransUNet's ``ndimage.zoom(order=1)``). (1, n, D)."""
    n = pos.shape[1]
    side = math.isqrt(n)
    prefix = n - side ** 2
    grid_in = pos[0, prefix:].reshape(side, side, -1).permute(2, 0, 1)[None]
    if tuple(grid) != (side, side):
        grid_in = nn.functional.interpolate(grid_in, size=tuple(grid), mode="bilinear", align_corners=True)
    return grid_in[0].flatten(1).t()[None]


def adapt_patch_kernel(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A patch-embedding kernel (D, c, k, k) for ``channels`` input channels: as it is for c channels; summed over its
    channels for one (a grey image through an RGB kernel, as TransUNet repeats it); else its channels repeated
    cyclically and scaled by c / channels."""
    c = weight.shape[1]
    if channels == c:
        return weight
    if channels == 1:
        return weight.sum(1, keepdim=True)
    return weight[:, [i % c for i in range(channels)]] * (c / channels)


def _targets(encoder: nn.Module) -> Dict[str, torch.Tensor]:
    """The encoder's tensors a ViT checkpoint fills, by timm's key name."""
    targets = {f"blocks.{k}": v for k, v in encoder.blocks.state_dict(keep_vars=True).items()}
    targets.update({f"norm.{k}": v for k, v in encoder.norm.state_dict(keep_vars=True).items()})
    if getattr(encoder, "embeds_pixels", False):  # the paper's TransUNet: patch embedding on the image
        targets["patch_embed.proj.weight"] = encoder.patch_embed.weight
        targets["patch_embed.proj.bias"] = encoder.patch_embed.bias
    return targets


def _check(state: dict, fmt: str, targets: dict, encoder: nn.Module, path: str):
    """A missing or misshapen tensor, or another depth: an error naming the file and the file's key."""
    key = npz_key if fmt == "npz" else (lambda name: name)
    size = f"this network's ViT: {encoder.embed_dim} wide, {len(encoder.blocks)} blocks"
    for name in list(targets) + ["pos_embed"]:
        if name not in state:
            raise ValueError(f"{path} lacks {key(name)!r} ({size}) {_WHERE}")
    depth = len(encoder.blocks)
    extra = sorted({int(k.split(".")[1]) for k in state if re.match(r"blocks\.\d+\.", k)} - set(range(depth)))
    if extra:
        raise ValueError(f"{path} has {key(f'blocks.{extra[-1]}.norm1.weight')!r}: {extra[-1] + 1} transformer "
                         f"blocks, this network {depth} ({size}) {_WHERE}")
    for name, target in targets.items():
        have, need = tuple(state[name].shape), tuple(target.shape)
        if name == "patch_embed.proj.weight":
            have, need = have[:1] + have[2:], need[:1] + need[2:]  # input channels are adapted
        if have != need:
            what = f"{name!r} has" if key(name) == name else f"{key(name)!r} gives {name} of"
            raise ValueError(f"{path}: {what} shape {tuple(state[name].shape)}, this network needs "
                             f"{tuple(target.shape)} ({size}) {_WHERE}")
    if state["pos_embed"].dim() != 3 or state["pos_embed"].shape[-1] != encoder.embed_dim:
        raise ValueError(f"{path}: {key('pos_embed')!r} has shape {tuple(state['pos_embed'].shape)}, not (1, n, "
                         f"{encoder.embed_dim}) ({size}) {_WHERE}")


def load_vit_weights(encoder: nn.Module, path: str) -> list:
    """Initialise ``encoder`` (a TransUNet encoder: ``blocks``, ``norm``, ``pos_embed``, ``grid``, ``patch_embed``)
    from the ViT checkpoint ``path`` (``.npz`` or timm state dict; rules in the module docstring). Nothing is
    downloaded. Returns the names loaded (timm's names). ``ValueError`` naming the file and the key when a tensor is
    missing or of another shape (another ViT size or depth)."""
    state, fmt = read_vit_file(str(path))
    targets = _targets(encoder)
    _check(state, fmt, targets, encoder, str(path))
    with torch.no_grad():
        for name, target in targets.items():
            value = state[name]
            if name == "patch_embed.proj.weight":
                value = adapt_patch_kernel(value, target.shape[1])
            target.copy_(value)
        encoder.pos_embed.copy_(resize_position_embedding(state["pos_embed"], encoder.grid))
    return sorted(targets) + ["pos_embed"]
