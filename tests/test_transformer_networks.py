"""Transformer networks: the paper's 2D TransUNet (and the stem-and-skips TransUNet that plans of earlier versions
build) and nnU-Net's Primus behind the attribute front end, (d)MoE on the tokens (shared by all blocks or one per
block), the paper's Table 7 parameter counts, patch handling. The ViT checkpoint: tests/test_vit_weights.py."""
import hashlib

import pytest
import torch
from nnunet_dmoe.commands.benchmark.flops import dmoe_flops
from nnunet_dmoe.commands.benchmark.presets import build_pair, preset_configuration
from nnunet_dmoe.commands.benchmark.report import cost_report
from nnunet_dmoe.plans.configuration import unet_configuration
from nnunet_dmoe.method.dmoe import DistributionAwareMoE
from nnunet_dmoe.networks.primus import PrimusBackbone, build_primus_network
from nnunet_dmoe.networks.transformer import AttributeTransformer, round_patch_size
from nnunet_dmoe.networks.transunet import (StemSkipTransUNet, TRANSUNET_DEFAULTS, TransUNet, build_transunet_network,
                                            transunet_deep_supervision_scales)
from nnunet_dmoe.plans.blocks import with_transformer_defaults

# the paper's network, tiny: 32 wide, 3 blocks; decoder 16 channels on the token grid, then 4 up-blocks (tokens of 16)
TINY_VIT = {"embed_dim": 32, "depth": 3, "num_heads": 2, "decoder": "paper", "decoder_features": [16, 16, 8, 8, 8]}
# the stem-and-skips network as plans of earlier versions describe it: no "decoder"
TINY_SKIPS = {"embed_dim": 32, "depth": 3, "num_heads": 2, "stem_features": [8, 8, 16, 16]}
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


def signature(module) -> str:
    """sha256 of the sorted ``name:shape`` lines of a state dict."""
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(module.state_dict().items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def test_table7_parameters_of_the_papers_transunet():
    """nnUNetv2_dmoe_benchmark's transunet_2d preset is the paper's TransUNet (ViT-B/16 on 16x16 patches of an RGB
    224x224 input, no stem, no skips, decoder 512 -> 256, 128, 64, 16, 2 classes): Table 7's 91.67 M, and with one
    shared block 129.46 M (MoE) / 129.51 M (dMoE). Built on the meta device: nothing is allocated."""
    cm = preset_configuration("transunet_2d")
    with torch.device("meta"):
        nets = dict(zip((None, "moe"), build_pair(cm, num_levels=4, mode="moe", num_input_channels=4)))
        nets["dmoe"] = build_pair(cm, num_levels=4, mode="dmoe", num_input_channels=4)[1]
    base = nets[None].backbone
    assert isinstance(base, TransUNet) and base.encoder.grid == (14, 14)
    assert len(base.blocks) == 12 and base.embed_dim == 768 and base.blocks[0].attn.num_heads == 12
    assert base.encoder.patch_embed.weight.shape == (768, 3, 16, 16) and base.blocks[0].mlp.fc1.out_features == 3072
    assert [b[1][0].out_channels for b in base.decoder.blocks] == [256, 128, 64, 16]
    block = (768 * 3 * 768 + 3 * 768) + (768 * 768 + 768) + (768 * 3072 + 3072) + (3072 * 768 + 768) + 4 * 768
    vit = 3 * 768 * 256 + 768 + 196 * 768 + 12 * block + 2 * 768
    convs = [(768, 512), (512, 256), (256, 256), (256, 128), (128, 128), (128, 64), (64, 64), (64, 16), (16, 16)]
    decoder = sum(9 * a * b + 2 * b for a, b in convs) + 9 * 16 * 2 + 2  # conv (no bias) + BatchNorm; head
    assert (n_params(base.encoder), n_params(base.decoder)) == (vit, decoder) == (85_797_120, 5_876_066)
    n = {r: n_params(net) for r, net in nets.items()}
    # 8 experts Linear(768, 3072)-Linear(3072, 768) and per router the gate's and the noise's Linear(768, 8), all
    # with biases (the reference code's nn.Linear); dMoE: 4 levels + unknown
    experts, router = 8 * (2 * 768 * 3072 + 3072 + 768), 2 * (768 * 8 + 8)
    assert (n[None], n["moe"] - n[None], n["dmoe"] - n[None]) == (91_673_186, experts + router, experts + 5 * router)
    assert [round(n[r] / 1e6, 2) for r in (None, "moe", "dmoe")] == [91.67, 129.46, 129.51]


@pytest.mark.parametrize("routing,transformer", [("moe", TINY_VIT), ("dmoe", TINY_VIT), ("dmoe", TINY_SKIPS)])
def test_shared_placement_is_one_block_applied_after_every_transformer_block(routing, transformer):
    # deep supervision on, as the benchmark trains: every decoder output is used (the paper's network has one)
    shared = transunet(routing, ds=True, transformer=transformer)
    per_block = transunet(routing, ds=True, transformer=transformer, transformer_placement="per_block")
    base = transunet(None, transformer=transformer)
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
    # (the untrained decoder's outputs are small: PyTorch's default conv init, as TransUNet's, and BatchNorm's
    # initial running statistics)
    assert all((out[i] - out[j]).abs().max() > 1e-3 * out.abs().max() for i in range(5) for j in range(i + 1, 5))
    base_out = base(x)
    torch.testing.assert_close(base_out, base_out[:1].expand_as(base_out), rtol=0, atol=0)


def test_deep_supervision_outputs_match_the_scales_given_to_nnunet():
    """The paper's network has one output (a list of one with deep supervision); the stem-and-skips network one per
    stem stage."""
    for transformer, scales in ((TINY_VIT, [[1.0, 1.0]]),
                                (TINY_SKIPS, [[1.0, 1.0], [0.5, 0.5], [0.25, 0.25], [0.125, 0.125]])):
        net = transunet("dmoe", ds=True, transformer=transformer)
        out = net(with_channel(torch.randn(2, 1, 32, 48), [1, 2]))
        assert transunet_deep_supervision_scales(configuration((32, 48), transformer)) == scales
        assert isinstance(out, list) and [tuple(o.shape) for o in out] == [(2, 3, 32 * s, 48 * s) for s, _ in scales]
        net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled does
        assert net(with_channel(torch.randn(1, 1, 32, 48), [1])).shape == (1, 3, 32, 48)


def test_plans_without_decoder_build_the_earlier_network_and_paper_builds_the_papers():
    """Model folders of earlier versions have no "decoder" in their plans' "transformer" block (or no block): they
    rebuild the stem-and-skips network, parameter names and shapes exactly as before (sha256 of the sorted
    ``name:shape`` lines of the baseline's state dict, recorded with the version before the paper's network,
    commit 18944ad). "paper" builds the paper's: patch embedding on the image, no stem, no skips."""
    earlier = "92264e524130f86c345d7348ccd719e573e7651e857024c3e33e4f67de546019"
    for block in (TINY_SKIPS, {**TINY_SKIPS, "decoder": "skips"}):
        with torch.device("meta"):
            net = build_transunet_network(None, configuration((32, 48), block), 2, 3, True)
        assert isinstance(net.backbone, StemSkipTransUNet) and signature(net) == earlier
        assert (len(net.state_dict()), n_params(net)) == (290, 72_212)
    with torch.device("meta"):
        old = build_transunet_network(None, configuration((224, 224)), 2, 2, False)  # no block: ViT-B + stem
    assert isinstance(old.backbone, StemSkipTransUNet) and n_params(old) == 90_480_200  # the earlier 90.48 M
    net = transunet(None)
    names = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert isinstance(net.backbone, TransUNet) and not any("stem" in k or "decoder.encoder" in k for k in names)
    assert names["backbone.encoder.patch_embed.weight"] == (32, 1, 16, 16)  # 16x16 conv on the image channel
    assert names["backbone.decoder.conv.0.weight"] == (16, 32, 3, 3)  # on the token grid
    assert [names[f"backbone.decoder.blocks.{i}.2.0.weight"][0] for i in range(4)] == [16, 8, 8, 8]
    assert names["backbone.decoder.seg_layer.weight"] == (3, 8, 3, 3)


def test_trainers_write_the_papers_decoder_into_plans_that_lack_it():
    """What the TransUNet trainers do to the plans at training start (with_transformer_defaults): a block without
    "decoder" gets "paper", after nnU-Net's configuration inheritance (a child's block replaces its parent's); a
    block that names a decoder keeps it; the caller's plans are not changed."""
    plans = {"configurations": {"2d": {"patch_size": [32, 32], "transformer": {"depth": 2}},
                                "2d_small": {"inherits_from": "2d"}, "2d_own": {"inherits_from": "2d",
                                                                                "transformer": {"depth": 3}}}}
    written = with_transformer_defaults(plans, "2d", {"decoder": "paper"})
    assert written["configurations"]["2d"]["transformer"] == {"depth": 2, "decoder": "paper"}
    assert plans["configurations"]["2d"]["transformer"] == {"depth": 2}
    inherited = with_transformer_defaults(plans, "2d_small", {"decoder": "paper"})["configurations"]["2d_small"]
    own = with_transformer_defaults(plans, "2d_own", {"decoder": "paper"})["configurations"]["2d_own"]
    assert (inherited["transformer"], own["transformer"]) == ({"depth": 2, "decoder": "paper"},
                                                              {"depth": 3, "decoder": "paper"})
    plans["configurations"]["2d"]["transformer"]["decoder"] = "skips"
    assert with_transformer_defaults(plans, "2d", {"decoder": "paper"}) is plans
    assert with_transformer_defaults({"configurations": {"2d": {}}}, "2d", {"decoder": "paper"})[
        "configurations"]["2d"]["transformer"] == {"decoder": "paper"}
    with pytest.raises(ValueError, match="configuration '3d' is not in the plans"):
        with_transformer_defaults(plans, "3d", {"decoder": "paper"})


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


def test_trainer_refuses_a_checkpoint_of_the_other_decoder():
    """``nnUNetv2_train --c`` on a model folder of an earlier version: the trainer now builds the paper's network,
    the checkpoint holds the stem-and-skips one; the error says what to set in the plans."""
    from types import SimpleNamespace

    from nnunet_dmoe.trainers.nnUNetTrainerTransUNet import nnUNetTrainerTransUNet

    old = {"network_weights": {k: v for k, v in transunet(None, transformer=TINY_SKIPS).state_dict().items()}}
    new = {"network_weights": {k: v for k, v in transunet(None).state_dict().items()}}
    for decoder, checkpoint, other in (("paper", old, "skips"), ("skips", new, "paper")):
        trainer = SimpleNamespace(was_initialized=True, decoder_kind=decoder)
        with pytest.raises(RuntimeError, match=f"holds the \"{other}\" TransUNet, the plans build \"{decoder}\"; "
                                               f"set \"decoder\": \"{other}\" in the plans' \"transformer\" block"):
            nnUNetTrainerTransUNet.load_checkpoint(trainer, checkpoint)


@pytest.mark.parametrize("kwargs,message", [
    ({"patch": (32, 32, 32)}, "TransUNet is 2D.*Primus"),
    ({"transformer": {**TINY_VIT, "width": 3}}, r"unknown settings \['width'\]"),
    ({"transformer": {**TINY_VIT, "decoder": "unet"}}, r"\"decoder\".*one of \('paper', 'skips'\), got 'unet'"),
    ({"transformer": {**TINY_VIT, "stem_features": [8, 16]}}, r"\['stem_features'\].*\"skips\".*builds \"paper\""),
    ({"transformer": {**TINY_SKIPS, "dropout": 0.0}}, r"\['dropout'\].*\"paper\".*builds \"skips\""),
    ({"transformer": {**TINY_VIT, "decoder_features": [16, 8, 8]}}, r"2 up-blocks.*token size 16 needs 4"),
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
    """nnUNetv2_dmoe_benchmark -preset transunet_2d builds the paper's TransUNet; the GFLOPs of a shared block count
    each of its calls (here a tiny ViT: 3 blocks, 2x2 tokens)."""
    cm = preset_configuration("transunet_2d")
    assert cm.configuration["transformer"] == {"decoder": "paper"}
    cm.configuration.update(transformer=TINY_VIT, patch_size=[32, 32])
    report = cost_report(cm, num_levels=4, num_input_channels=4, num_outputs=2, attribute_channel=3,
                         flops_size=(32, 32), patch=(32, 32), measure=False)
    base, dmoe = report["rows"]["parameters"]
    assert dmoe - base == n_params(DistributionAwareMoE(32, num_routers=5))
    assert report["dmoe_flops"] == dmoe_flops([32], [3 * 4]) > 0
    assert report["rows"]["flops"][1] - report["rows"]["flops"][0] == report["dmoe_flops"]


def test_the_dmoe_planners_block_builds_a_transformer():
    """nnUNetDMoEPlans' "dmoe" block (every setting, stages null) serves the transformer trainers too."""
    from dataclasses import asdict

    from nnunet_dmoe.method.config import DMoEConfig

    block = {k: v for k, v in asdict(DMoEConfig(num_levels=4, attribute_channel=1)).items() if k != "mode"}
    net = build_transunet_network(None, configuration((32, 32), TINY_VIT, **block), 2, 3, routing="dmoe")
    assert len(net.moe) == 1 and net.moe[0].router.w_gate.shape == (5, 32, 8)
