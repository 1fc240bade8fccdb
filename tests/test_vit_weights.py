"""ViT weights for TransUNet from a file ("pretrained" in the plans' "transformer" block): Google's ViT .npz and timm's
state dict, each written here for a tiny ViT (32 wide, 2 blocks of 2 heads, MLP 128, a 4x4 token grid + class
token), the loaded tensors compared with the file's values after the documented transforms."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from nnunet_dmoe.plans.configuration import unet_configuration
from nnunet_dmoe.networks.transunet import build_transunet_network
from nnunet_dmoe.networks.vit_weights import adapt_patch_kernel, load_vit_weights, npz_key

D, DEPTH, HEADS, MLP, GRID = 32, 2, 2, 128, 4
TINY = {"embed_dim": D, "depth": DEPTH, "num_heads": HEADS, "decoder": "paper", "decoder_features": [16, 8, 8, 8, 8]}


def transunet(image_channels=1, patch=(32, 48), transformer=TINY):
    """The paper's TransUNet, tiny, on ``image_channels`` image channels and the attribute channel after them."""
    cm = unet_configuration(2, num_levels=2, attribute_channel=image_channels)
    cm.configuration.update(patch_size=list(patch), transformer=transformer)
    torch.manual_seed(0)
    return build_transunet_network(None, cm, image_channels + 1, 2, False, routing="dmoe").backbone.encoder


def write_npz(path, depth=DEPTH, width=D, drop=None) -> dict:
    """A Google ViT checkpoint in its own layout (Flax kernels: attention (D, heads, D/heads) and (heads, D/heads,
    D), dense (in, out), patch embedding (16, 16, 3, D)), random values; ``drop``: a key left out."""
    g = np.random.default_rng(0)
    hd = width // HEADS
    arrays = {"embedding/kernel": (16, 16, 3, width), "embedding/bias": (width,), "cls": (1, 1, width),
              "Transformer/posembed_input/pos_embedding": (1, 1 + GRID * GRID, width),
              "Transformer/encoder_norm/scale": (width,), "Transformer/encoder_norm/bias": (width,),
              "head/kernel": (width, 10), "head/bias": (10,)}
    for i in range(depth):
        root = f"Transformer/encoderblock_{i}/"
        attention = root + "MultiHeadDotProductAttention_1/"
        for p in ("query", "key", "value"):
            arrays.update({attention + p + "/kernel": (width, HEADS, hd), attention + p + "/bias": (HEADS, hd)})
        arrays.update({attention + "out/kernel": (HEADS, hd, width), attention + "out/bias": (width,),
                       root + "MlpBlock_3/Dense_0/kernel": (width, MLP), root + "MlpBlock_3/Dense_0/bias": (MLP,),
                       root + "MlpBlock_3/Dense_1/kernel": (MLP, width), root + "MlpBlock_3/Dense_1/bias": (width,)})
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            arrays.update({root + norm + "/scale": (width,), root + norm + "/bias": (width,)})
    arrays = {k: g.standard_normal(shape).astype(np.float32) for k, shape in arrays.items() if k != drop}
    np.savez(path, **arrays)
    return arrays


def zoomed_position_embedding(pos: np.ndarray, grid) -> torch.Tensor:
    """TransUNet's resize: class token dropped, ``ndimage.zoom(order=1)`` of the square grid."""
    side = int(np.sqrt(pos.shape[1] - 1))
    zoom = (grid[0] / side, grid[1] / side, 1)
    return torch.from_numpy(ndimage.zoom(pos[0, 1:].reshape(side, side, -1), zoom, order=1).reshape(1, -1, D))


def test_google_npz_is_read_with_transunets_transposes_and_reshapes(tmp_path):
    a = write_npz(tmp_path / "ViT-B_16.npz")
    encoder = transunet()  # one image channel: the RGB kernel summed (TransUNet repeats a grey image)
    loaded = load_vit_weights(encoder, str(tmp_path / "ViT-B_16.npz"))
    assert len(loaded) == 12 * DEPTH + 5 and "patch_embed.proj.weight" in loaded and "pos_embed" in loaded
    t = lambda k: torch.from_numpy(a[k])  # noqa: E731
    for i, block in enumerate(encoder.blocks):
        root = f"Transformer/encoderblock_{i}/"
        att = root + "MultiHeadDotProductAttention_1/"
        expected = {
            "attn.qkv.weight": torch.cat([t(att + p + "/kernel").reshape(D, D).t() for p in ("query", "key", "value")]),
            "attn.qkv.bias": torch.cat([t(att + p + "/bias").reshape(-1) for p in ("query", "key", "value")]),
            "attn.proj.weight": t(att + "out/kernel").reshape(D, D).t(), "attn.proj.bias": t(att + "out/bias"),
            "mlp.fc1.weight": t(root + "MlpBlock_3/Dense_0/kernel").t(),
            "mlp.fc1.bias": t(root + "MlpBlock_3/Dense_0/bias"),
            "mlp.fc2.weight": t(root + "MlpBlock_3/Dense_1/kernel").t(),
            "mlp.fc2.bias": t(root + "MlpBlock_3/Dense_1/bias"),
            "norm1.weight": t(root + "LayerNorm_0/scale"), "norm1.bias": t(root + "LayerNorm_0/bias"),
            "norm2.weight": t(root + "LayerNorm_2/scale"), "norm2.bias": t(root + "LayerNorm_2/bias")}
        assert sorted(expected) == sorted(block.state_dict())
        for name, value in expected.items():
            torch.testing.assert_close(block.state_dict()[name], value, rtol=0, atol=0, msg=f"block {i} {name}")
    torch.testing.assert_close(encoder.norm.weight.data, t("Transformer/encoder_norm/scale"), rtol=0, atol=0)
    torch.testing.assert_close(encoder.norm.bias.data, t("Transformer/encoder_norm/bias"), rtol=0, atol=0)
    kernel = t("embedding/kernel").permute(3, 2, 0, 1)  # HWIO -> OIHW
    torch.testing.assert_close(encoder.patch_embed.weight.data, kernel.sum(1, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(encoder.patch_embed.bias.data, t("embedding/bias"), rtol=0, atol=0)
    # the summed kernel on a grey image = TransUNet's x.repeat(1, 3, 1, 1) through the RGB kernel (up to the float32
    # rounding of the sum; the convolution itself in float64)
    grey, conv = torch.randn(1, 1, 32, 48, dtype=torch.float64), torch.nn.functional.conv2d
    torch.testing.assert_close(conv(grey, encoder.patch_embed.weight.double(), stride=16),
                               conv(grey.repeat(1, 3, 1, 1), kernel.double(), stride=16), rtol=1e-5, atol=1e-5)
    # 4x4 grid + class token -> the network's 2x3 grid (patch 32x48), bilinear as TransUNet's ndimage.zoom(order=1)
    expected = zoomed_position_embedding(a["Transformer/posembed_input/pos_embedding"], (2, 3))
    torch.testing.assert_close(encoder.pos_embed.data, expected, rtol=1e-6, atol=1e-6)


def test_timm_state_dict_loads_as_it_is(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=0)
    torch.save({"model": vit.state_dict()}, tmp_path / "vit_base_patch16_224.pth")
    for patch, grid in (((64, 64), (4, 4)), ((32, 48), (2, 3))):
        encoder = transunet(image_channels=3, patch=patch)  # RGB: the patch embedding as it is
        loaded = load_vit_weights(encoder, str(tmp_path / "vit_base_patch16_224.pth"))
        assert len(loaded) == 12 * DEPTH + 5
        ours = {f"blocks.{k}": v for k, v in encoder.blocks.state_dict().items()}
        ours.update({f"norm.{k}": v for k, v in encoder.norm.state_dict().items()})
        ours.update({"patch_embed.proj.weight": encoder.patch_embed.weight, "patch_embed.proj.bias":
                     encoder.patch_embed.bias})
        for name, value in ours.items():
            torch.testing.assert_close(value.data, vit.state_dict()[name], rtol=0, atol=0, msg=name)
        pos = vit.pos_embed.detach().numpy()
        if grid == (4, 4):  # the checkpoint's grid: its values without the class token
            torch.testing.assert_close(encoder.pos_embed.data, vit.pos_embed.data[:, 1:], rtol=0, atol=0)
        torch.testing.assert_close(encoder.pos_embed.data, zoomed_position_embedding(pos, grid), rtol=1e-6, atol=1e-6)


def test_the_stem_and_skips_network_takes_all_but_the_patch_embedding(tmp_path):
    write_npz(tmp_path / "vit.npz")
    skips = {"embed_dim": D, "depth": DEPTH, "num_heads": HEADS, "stem_features": [8, 8, 16, 16]}
    encoder = transunet(transformer=skips)
    before = encoder.patch_embed.weight.detach().clone()
    loaded = load_vit_weights(encoder, str(tmp_path / "vit.npz"))
    assert len(loaded) == 12 * DEPTH + 3 and not any(k.startswith("patch_embed") for k in loaded)
    torch.testing.assert_close(encoder.patch_embed.weight.data, before, rtol=0, atol=0)  # on the stem: untouched


def test_patch_kernel_for_other_channel_counts():
    w = torch.arange(2 * 3 * 1 * 1, dtype=torch.float32).reshape(2, 3, 1, 1)  # (D=2, RGB)
    assert adapt_patch_kernel(w, 3) is w
    assert adapt_patch_kernel(w, 1)[:, :, 0, 0].tolist() == [[3.0], [12.0]]
    assert adapt_patch_kernel(w, 4)[:, :, 0, 0].tolist() == [[0.0, 0.75, 1.5, 0.0], [2.25, 3.0, 3.75, 2.25]]


def test_a_wrong_file_names_the_file_and_the_key(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    encoder = transunet()
    missing = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"
    write_npz(tmp_path / "cut.npz", drop=missing)
    with pytest.raises(ValueError, match=f"cut.npz lacks '{missing}'"):
        load_vit_weights(encoder, str(tmp_path / "cut.npz"))
    write_npz(tmp_path / "shallow.npz", depth=1)
    with pytest.raises(ValueError, match="shallow.npz lacks 'Transformer/encoderblock_1/LayerNorm_0/scale'"):
        load_vit_weights(encoder, str(tmp_path / "shallow.npz"))
    write_npz(tmp_path / "deep.npz", depth=3)
    with pytest.raises(ValueError, match=r"deep.npz has 'Transformer/encoderblock_2/LayerNorm_0/scale': 3 "
                                         r"transformer blocks, this network 2"):
        load_vit_weights(encoder, str(tmp_path / "deep.npz"))
    wide = VisionTransformer(img_size=64, patch_size=16, embed_dim=48, depth=DEPTH, num_heads=HEADS)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"wide.pth: 'blocks.0.norm1.weight' has shape \(48,\), this network needs "
                                         r"\(32,\) \(this network's ViT: 32 wide, 2 blocks\)"):
        load_vit_weights(encoder, str(tmp_path / "wide.pth"))
    write_npz(tmp_path / "wide.npz", width=48)
    with pytest.raises(ValueError, match=r"wide.npz: 'Transformer/encoderblock_0/LayerNorm_0/scale' gives "
                                         r"blocks.0.norm1.weight of shape \(48,\), this network needs \(32,\)"):
        load_vit_weights(encoder, str(tmp_path / "wide.npz"))
    other_patch = VisionTransformer(img_size=64, patch_size=8, embed_dim=D, depth=DEPTH, num_heads=HEADS)
    torch.save(other_patch.state_dict(), tmp_path / "b8.pth")
    with pytest.raises(ValueError, match=r"b8.pth: 'patch_embed.proj.weight' has shape \(32, 3, 8, 8\), this network "
                                         r"needs \(32, 1, 16, 16\)"):
        load_vit_weights(encoder, str(tmp_path / "b8.pth"))
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match="notes.txt is neither a ViT .npz nor a torch state dict"):
        load_vit_weights(encoder, str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match=r"missing.npz does not exist \(\"pretrained\" in the plans'"):
        load_vit_weights(encoder, str(tmp_path / "missing.npz"))
    assert npz_key("blocks.3.attn.qkv.bias") == "Transformer/encoderblock_3/MultiHeadDotProductAttention_1/query/bias"
