"""Transformer networks: TransUNet-style 2D and nnU-Net's Primus behind the attribute front end, (d)MoE on the
tokens (shared by all blocks or one per block), the paper's Table 7 parameter difference, patch handling and the
optional ViT checkpoint."""
import pytest
import torch
from nnunet_dmoe.benchmark import build_pair, cost_report, dmoe_flops, dmoe_parameters, preset_configuration
from nnunet_dmoe.configuration import unet_configuration
from nnunet_dmoe.dmoe import DistributionAwareMoE
from nnunet_dmoe.transformer_networks import (AttributeTransformer, PrimusBackbone, TRANSUNET_DEFAULTS,
                                              build_primus_network, build_transunet_network, load_vit_weights,
                                              round_patch_size, transunet_deep_supervision_scales)

TINY_VIT = {"embed_dim": 32, "depth": 3, "num_heads": 2, "stem_features": [8, 8, 16, 16]}
TINY_PRIMUS = {"embed_dim": 48, "depth": 2, "num_heads": 2}


def configuration(patch, transformer=None, **dmoe):
    """A configuration as the plans give it to the transformer trainers (the U-Net architecture entry unused)."""
    cm = unet_configuration(len(patch), **{"num_levels": 4, "attribute_channel": 1, **dmoe})
    cm.configuration["patch_size"] = list(patch)
    if transformer is not None:
        cm.configuration["transformer"] = transformer
    return cm


def transunet(routing, patch=(32, 48), ds=False, seed=0, transformer=TINY_VIT, **dmoe):
    torch.manual_seed(seed)
    return build_transunet_network(None, configuration(patch, transformer, **dmoe), 2, 3, ds, routing=routing)


def with_channel(image, codes):
    channel = torch.stack([torch.full(image.shape[2:], float(c)) for c in codes])[:, None]
    return torch.cat([image, channel], dim=1)


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def test_table7_parameter_difference_at_vit_b():
    """Defaults are ViT-B/16 (768 wide, 12 blocks); one shared (d)MoE block adds the paper's +37.8 M
    (TransUNet 91.67 -> 129.46 M with MoE, 129.51 M with dMoE). The networks of nnUNetv2_dmoe_benchmark's
    transunet_2d preset, built on the meta device: nothing is allocated."""
    cm = preset_configuration("transunet_2d")
    with torch.device("meta"):
        nets = dict(zip((None, "moe"), build_pair(cm, num_levels=4, mode="moe")))
        nets["dmoe"] = build_pair(cm, num_levels=4, mode="dmoe")[1]
    base = nets[None].backbone
    assert len(base.blocks) == 12 and base.embed_dim == 768 and base.encoder.grid == (14, 14)
    assert base.blocks[0].mlp.fc1.out_features == 3072 and base.blocks[0].attn.num_heads == 12
    n = {r: n_params(net) for r, net in nets.items()}
    moe, dmoe = n["moe"] - n[None], n["dmoe"] - n[None]
    # 8 experts Linear(768, 3072)-Linear(3072, 768) with biases, plus gate and noise router weights (768 x 8 each)
    assert moe == dmoe_parameters([768], num_routers=1) == 37_791_744
    assert dmoe == dmoe_parameters([768], num_routers=5) == 37_840_896  # 4 levels + unknown
    assert round(moe / 1e6, 2) == round(129.46 - 91.67, 2)
    assert round(dmoe / 1e6, 2) == round(129.51 - 91.67, 2)
    assert 85e6 < n[None] < 95e6  # the paper's TransUNet: 91.67 M (its decoder and stem differ from ours)


@pytest.mark.parametrize("routing", ["moe", "dmoe"])
def test_shared_placement_is_one_block_applied_after_every_transformer_block(routing):
    # deep supervision on, as the trainers train: every decoder output is used
    shared, per_block = transunet(routing, ds=True), transunet(routing, ds=True, transformer_placement="per_block")
    base = transunet(None)
    assert len(shared.moe) == 1 and len(per_block.moe) == 3
    block = n_params(shared.moe[0])
    assert n_params(shared) - n_params(base) == block
    assert n_params(per_block) - n_params(base) == 3 * block
    calls = []
    for net in (shared, per_block):
        for i, m in enumerate(net.moe):
            m.register_forward_hook(lambda mod, inp, out, i=i, net=net: calls.append((id(net), i, inp[0].shape)))
    x = with_channel(torch.randn(2, 1, 32, 48), [1, 3])
    for net in (shared, per_block):
        sum(o.float().pow(2).mean() for o in net(x)).backward()
        # DDP without find_unused_parameters: every parameter takes part in every step
        assert [n for n, p in net.named_parameters() if p.grad is None] == []
    # tokens (b, c, n): 768 -> here 32 channels, (32/16) x (48/16) = 6 tokens
    assert calls == [(id(shared), 0, (2, 32, 6))] * 3 + [(id(per_block), i, (2, 32, 6)) for i in range(3)]


def test_zero_initialised_experts_reproduce_the_baseline_and_levels_route():
    base, dmoe = transunet(None), transunet("dmoe", seed=3)
    dmoe.backbone.load_state_dict(base.backbone.state_dict())
    for m in dmoe.moe:
        with torch.no_grad():
            m.experts.w2.zero_()
            m.experts.b2.zero_()
    base.eval(), dmoe.eval()
    x = with_channel(torch.randn(4, 1, 32, 48), [1, 2, 3, 0])
    torch.testing.assert_close(dmoe(x), base(x), rtol=0, atol=0)
    # with experts and routers that differ per level, the same image gives other logits per level; the channel
    # decodes to the levels given explicitly (-1 = unknown)
    dmoe = transunet("dmoe", seed=4).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        dmoe.moe[0].router.w_gate.copy_(torch.randn(dmoe.moe[0].router.w_gate.shape, generator=g))
    x = with_channel(torch.randn(1, 1, 32, 48).repeat(5, 1, 1, 1), [1, 2, 3, 4, 0])
    out = dmoe(x)
    torch.testing.assert_close(out, dmoe(x, torch.tensor([0, 1, 2, 3, -1])), rtol=0, atol=0)
    assert all((out[i] - out[j]).abs().max() > 1e-4 for i in range(5) for j in range(i + 1, 5))
    base_out = base(x)
    torch.testing.assert_close(base_out, base_out[:1].expand_as(base_out), rtol=0, atol=0)


def test_deep_supervision_outputs_match_the_scales_given_to_nnunet():
    net = transunet("dmoe", ds=True)
    out = net(with_channel(torch.randn(2, 1, 32, 48), [1, 2]))
    scales = transunet_deep_supervision_scales(configuration((32, 48), TINY_VIT))
    assert scales == [[1.0, 1.0], [0.5, 0.5], [0.25, 0.25], [0.125, 0.125]]
    assert [tuple(o.shape[2:]) for o in out] == [(32 * s, 48 * s) for s, _ in scales]
    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled does
    assert net(with_channel(torch.randn(1, 1, 32, 48), [1])).shape == (1, 3, 32, 48)


def test_patch_size_must_be_a_multiple_of_the_token_size_and_trainers_round_it():
    with pytest.raises(ValueError, match=r"patch size \[24, 48\].*multiple of 16"):
        transunet(None, patch=(24, 48))
    arch = configuration((16, 16)).configuration["architecture"]
    plans = {"configurations": {"2d": {"patch_size": [24, 56], "architecture": arch,
                                       "transformer": {"patch_size": 8, "stem_features": [8, 16]}}}}
    rounded, old, new = round_patch_size(plans, "2d", TRANSUNET_DEFAULTS)
    assert (old, new) == ([24, 56], [24, 56]) and rounded is plans
    plans["configurations"]["2d"]["transformer"] = {}
    rounded, old, new = round_patch_size(plans, "2d", TRANSUNET_DEFAULTS)
    assert new == [16, 48] and rounded["configurations"]["2d"]["patch_size"] == [16, 48]
    assert plans["configurations"]["2d"]["patch_size"] == [24, 56]  # the caller's plans are not changed
    plans["configurations"]["2d"]["patch_size"] = [12, 40]
    assert round_patch_size(plans, "2d", TRANSUNET_DEFAULTS)[2] == [16, 32]  # at least one token


@pytest.mark.parametrize("kwargs,message", [
    ({"patch": (32, 32, 32)}, "TransUNet is 2D.*Primus"),
    ({"transformer": {**TINY_VIT, "width": 3}}, r"unknown settings \['width'\]"),
    ({"transformer_placement": "everywhere"}, "transformer_placement"),
    ({"stages": [0, 1]}, "stages"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        transunet("dmoe", **kwargs)


def test_primus_defaults_are_nnunets_primus_m_and_dmoe_sits_between_its_blocks():
    from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import nnUNet_Primus_M_Trainer

    cm = configuration((64, 64, 64))
    with torch.device("meta"):
        ours = build_primus_network(None, cm, 2, 3, routing="dmoe")
        ref = nnUNet_Primus_M_Trainer.build_network_architecture(None, cm, 1, 3, False)
    assert repr(ours.backbone.primus) == repr(ref)
    assert len(ours.moe) == 1 and ours.moe[0].dim == 864

    torch.manual_seed(0)
    cm = configuration((16, 24, 16), TINY_PRIMUS, transformer_placement="per_block")
    net = build_primus_network(None, cm, 2, 3, routing="dmoe")
    assert isinstance(net.backbone, PrimusBackbone) and len(net.moe) == 2
    x = with_channel(torch.randn(2, 1, 16, 24, 16), [2, 4])
    out = net(x)
    assert out.shape == (2, 3, 16, 24, 16)
    out.pow(2).mean().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []
    for m in net.moe:
        with torch.no_grad():
            m.experts.w2.zero_()
            m.experts.b2.zero_()
    net.eval()
    with torch.no_grad():  # the block-wise path equals Primus's own forward when the experts add nothing
        torch.testing.assert_close(net(x), net.backbone.primus(x[:, :1]), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"patch size \[16, 20, 16\].*multiple of 8"):
        build_primus_network(None, configuration((16, 20, 16), TINY_PRIMUS), 2, 3, routing="moe")


def test_vit_checkpoint_initialises_blocks_norm_and_resampled_position_embedding(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(1)
    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=0)
    path = tmp_path / "vit.pth"
    torch.save({"model": vit.state_dict()}, path)
    net = transunet("dmoe")
    encoder = net.backbone.encoder
    loaded = load_vit_weights(encoder, str(path))
    assert "pos_embed" in loaded and "blocks.2.mlp.fc2.weight" in loaded and "norm.weight" in loaded
    for k, v in encoder.blocks.state_dict().items():
        torch.testing.assert_close(v, vit.blocks.state_dict()[k], rtol=0, atol=0)
    assert encoder.pos_embed.shape == (1, 6, 32)  # 4x4 grid of the checkpoint (class token dropped) -> 2x3
    torch.save(VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=3, num_heads=2).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit this ViT"):
        load_vit_weights(encoder, str(path))
    with pytest.raises(ValueError, match="does not exist"):
        load_vit_weights(encoder, str(tmp_path / "missing.pth"))


def test_attribute_transformer_checks_its_input():
    net = transunet("moe")
    assert isinstance(net, AttributeTransformer) and isinstance(net.moe[0], DistributionAwareMoE)
    assert net.moe[0].router.w_gate.shape[0] == 1
    with pytest.raises(ValueError, match="expects 2 input channels"):
        net(torch.randn(1, 3, 32, 48))
    net.eval()
    with pytest.raises(ValueError, match="decodes to code 7"):
        net(with_channel(torch.randn(1, 1, 32, 48), [7]))


def test_benchmark_preset_counts_the_shared_block_at_every_use():
    """nnUNetv2_dmoe_benchmark -preset transunet_2d builds TransUNet; the GFLOPs of a shared block count each of its
    calls (here a tiny ViT: 3 blocks, 2x2 tokens)."""
    cm = preset_configuration("transunet_2d")
    cm.configuration.update(transformer=TINY_VIT, patch_size=[32, 32])
    report = cost_report(cm, num_levels=4, num_input_channels=2, num_outputs=2, attribute_channel=1,
                         flops_size=(32, 32), patch=(32, 32), measure=False)
    base, dmoe = report["rows"]["parameters"]
    assert dmoe - base == dmoe_parameters([32], num_routers=5)
    assert report["dmoe_flops"] == dmoe_flops([32], [3 * 4]) > 0
    assert report["rows"]["flops"][1] - report["rows"]["flops"][0] == report["dmoe_flops"]


def test_the_dmoe_planners_block_builds_a_transformer():
    """nnUNetDMoEPlans' "dmoe" block (every setting, stages null) serves the transformer trainers too."""
    from dataclasses import asdict

    from nnunet_dmoe.dmoe import DMoEConfig

    block = {k: v for k, v in asdict(DMoEConfig(num_levels=4, attribute_channel=1)).items() if k != "mode"}
    net = build_transunet_network(None, configuration((32, 32), TINY_VIT, **block), 2, 3, routing="dmoe")
    assert len(net.moe) == 1 and net.moe[0].router.w_gate.shape == (5, 32, 8)
