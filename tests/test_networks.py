"""Network builders: the plans' U-Nets with the attribute front end and (d)MoE blocks."""
import copy
import os

import numpy as np
import pytest
import torch

from nnunet_dmoe.data.attribute import decode_attribute_channel, encode_attribute_channel
from nnunet_dmoe.plans.configuration import unet_configuration
from nnunet_dmoe.method.dmoe import DistributionAwareMoE
from nnunet_dmoe.networks.attribute_input import decode_levels
from nnunet_dmoe.networks.unet import AttributeUNet, build_attribute_network


def build(mode, dim=3, residual=False, ds=False, seed=0, **dmoe):
    torch.manual_seed(seed)
    dmoe.setdefault("num_levels", 4)
    dmoe.setdefault("attribute_channel", 1)
    cm = unet_configuration(dim, (8, 16, 32), [1, 2, 2] if residual else None, **dmoe)
    kwargs = {"keep_attribute_channel": True} if mode == "channel" else {"routing": None if mode == "none" else mode}
    return build_attribute_network(None, cm, 2, 3, ds, **kwargs)


def with_channel(image, codes):
    """image (b, 1, *sp); attribute channel = code inside the footprint (everywhere here)."""
    ch = torch.stack([torch.full(image.shape[2:], float(c)) for c in codes])[:, None]
    return torch.cat([image, ch], dim=1)


def randomise_routers(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, DistributionAwareMoE):
            with torch.no_grad():
                m.router.w_gate.copy_(torch.randn(m.router.w_gate.shape, generator=g))


def blocks(net):
    return [m for m in net.moe if isinstance(m, DistributionAwareMoE)]


@pytest.mark.parametrize("dim,residual", [(3, False), (3, True), (2, False), (2, True)])
def test_dmoe_after_every_downsampling_stage_and_shapes(dim, residual):
    """The paper's placement (Table 5): after every encoder stage that downsamples, none at full resolution."""
    net = build("dmoe", dim, residual, ds=True)
    assert isinstance(net, AttributeUNet)
    assert [type(m) for m in net.moe] == [torch.nn.Identity, DistributionAwareMoE, DistributionAwareMoE]
    assert [m.dim for m in blocks(net)] == [16, 32]
    assert net.moe[1].router.w_gate.shape[0] == 5  # 4 levels + unknown
    x = with_channel(torch.randn(2, 1, *([16] * dim)), [1, 4])
    out = net(x)
    assert isinstance(out, (list, tuple)) and out[0].shape == (2, 3, *([16] * dim))  # deep supervision kept
    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled does
    assert net(x).shape == (2, 3, *([16] * dim))


def test_moe_has_one_router_and_stage_selection():
    net = build("moe", stages=[2])
    assert isinstance(net.moe[0], torch.nn.Identity) and isinstance(net.moe[2], DistributionAwareMoE)
    assert net.moe[2].router.w_gate.shape[0] == 1
    assert [type(m) for m in build("dmoe", stages="all").moe] == [DistributionAwareMoE] * 3  # full resolution too
    anisotropic = unet_configuration(3, (8, 16, 32), num_levels=4, attribute_channel=1)
    anisotropic.configuration["architecture"]["arch_kwargs"]["strides"] = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    net = build_attribute_network(None, anisotropic, 2, 3, False, routing="dmoe")
    assert [type(m) for m in net.moe] == [torch.nn.Identity, DistributionAwareMoE, DistributionAwareMoE]
    with pytest.raises(ValueError,
                       match=r"\"stages\" in the plans' \"dmoe\" block must be one of \('downsampling', 'all'\) or a list"):
        build("dmoe", stages="most")


def test_channel_mode_is_plain_unet_with_all_channels():
    net = build("channel")
    assert type(net).__name__ == "PlainConvUNet"
    assert net.encoder.stages[0][0].convs[0].conv.in_channels == 2


def test_zero_initialised_experts_reproduce_plain_resenc_unet():
    base = build("none", residual=True)
    dmoe = build("dmoe", residual=True, seed=3)
    dmoe.unet.load_state_dict(base.unet.state_dict())
    for m in blocks(dmoe):
        with torch.no_grad():
            m.experts.w2.zero_()
            m.experts.b2.zero_()
    randomise_routers(dmoe)
    x = with_channel(torch.randn(2, 1, 16, 16, 16), [2, 3])
    base.eval(), dmoe.eval()
    torch.testing.assert_close(dmoe(x), base.unet(x[:, :1]), rtol=0, atol=0)


def test_attribute_changes_dmoe_logits_but_not_the_baseline():
    image = torch.randn(1, 1, 16, 16, 16).repeat(4, 1, 1, 1, 1)
    x = with_channel(image, [1, 2, 3, 4])
    dmoe = build("dmoe").eval()
    randomise_routers(dmoe)
    out = dmoe(x)
    for i in range(1, 4):
        assert (out[i] - out[0]).abs().max() > 1e-4
    baseline = build("none").eval()
    out_b = baseline(x)
    for i in range(1, 4):
        torch.testing.assert_close(out_b[i], out_b[0], rtol=0, atol=0)
    # explicit levels give the same result as the channel
    torch.testing.assert_close(dmoe(x, torch.tensor([0, 1, 2, 3])), out)


def test_unknown_attribute_uses_the_unknown_router():
    dmoe = build("dmoe").eval()
    randomise_routers(dmoe)
    image = torch.randn(1, 1, 16, 16, 16)
    unknown = dmoe(with_channel(image, [0]))
    torch.testing.assert_close(unknown, dmoe(with_channel(image, [1]), torch.tensor([-1])))
    assert (unknown - dmoe(with_channel(image, [1]))).abs().max() > 1e-4


def test_bad_channel_code_and_wrong_channel_count():
    dmoe = build("dmoe").eval()
    with pytest.raises(ValueError, match="decodes to code 7"):
        dmoe(with_channel(torch.randn(1, 1, 16, 16, 16), [7]))
    with pytest.raises(ValueError, match="expects 2 input channels"):
        dmoe(torch.randn(1, 1, 16, 16, 16))


def test_bad_channel_code_is_an_error_under_torch_compile_too():
    dmoe = build("dmoe").eval()
    compiled = torch.compile(dmoe, backend="eager")  # dynamo decides what runs: the check must not be traced away
    good = with_channel(torch.randn(1, 1, 16, 16, 16), [2])
    # grouped_mm under compile is bf16-only: nnU-Net compiles on CUDA, always under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert compiled(good).isfinite().all()
        with pytest.raises(ValueError, match="decodes to code 6.*only 4 levels"):
            compiled(with_channel(torch.randn(1, 1, 16, 16, 16), [6]))


def test_builder_arguments_and_settings_block():
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    def cfg(**dmoe):
        return unet_configuration(3, (8, 16, 32), **dmoe)

    with pytest.raises(ValueError, match="keep_attribute_channel must be False"):
        build_attribute_network(None, cfg(num_levels=4, attribute_channel=1), 2, 3, False, routing="dmoe",
                                keep_attribute_channel=True)
    with pytest.raises(ValueError, match="routing must be one of"):
        build_attribute_network(None, cfg(num_levels=4, attribute_channel=1), 2, 3, False, routing="DMoE")
    # the plans' "dmoe" block (current) and dmoe_* arch_kwargs (plans of version 0.1) build the same network
    current = cfg(num_levels=3, attribute_channel=0, num_experts=4, top_k=1)
    legacy = copy.deepcopy(current.configuration)
    legacy["architecture"]["arch_kwargs"].update({f"dmoe_{k}": v for k, v in legacy.pop("dmoe").items()})
    nets = []
    for c in (current, ConfigurationManager(legacy)):
        torch.manual_seed(0)
        nets.append(build_attribute_network(None, c, 2, 3, False, routing="dmoe"))
    assert nets[0].moe[1].router.w_gate.shape == (4, 16, 4) and nets[0].config.top_k == 1
    assert nets[0].attribute_channel == nets[1].attribute_channel == 0
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="lack the attribute channel"):
        build_attribute_network(None, cfg(), 2, 3, False, routing="dmoe")


def test_decode_levels_majority_and_unknown():
    ch = torch.zeros(3, 1, 6, 6)
    ch[0, 0, :4] = 2
    ch[0, 0, 4:, :2] = 1.4  # resampling blur: rounds to 1, minority
    ch[1, 0, 2:] = 3.2
    assert decode_levels(ch, 4).tolist() == [1, 2, -1]


@pytest.mark.parametrize("level", [None, 0, 3])
def test_channel_survives_nnunet_resampling(level):
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    rng = np.random.default_rng(0)
    image = np.zeros((1, 20, 30, 30), dtype=np.float32)
    image[0, 3:17, 5:25, 4:26] = rng.uniform(0.1, 1, size=(14, 20, 22))
    channel = encode_attribute_channel(image, level).astype(np.float32)[None]
    assert set(np.unique(channel)) == ({0} if level is None else {0, level + 1})
    resampled = resample_data_or_seg_to_shape(channel, (9, 41, 37), (3.0, 1, 1), (6.6, 0.73, 0.8), is_seg=False,
                                              order=3, order_z=0, force_separate_z=None)
    assert decode_attribute_channel(resampled, 4) == level
    assert decode_levels(torch.from_numpy(resampled)[None], 4).item() == (-1 if level is None else level)


def test_feature_map_size_counts_experts():
    plain, dmoe = build("none"), build("dmoe")
    a = plain.compute_conv_feature_map_size((32, 32, 32))
    b = dmoe.compute_conv_feature_map_size((32, 32, 32))
    extra = sum(m.compute_conv_feature_map_size((32 // 2 ** i,) * 3) for i, m in enumerate(dmoe.moe)
                if isinstance(m, DistributionAwareMoE))
    assert b == a + extra and extra > 0.1 * a


PINNED = os.path.join(os.path.dirname(__file__), "data", "pinned", "dmoe_unet_v0.2.pt")


def test_model_of_version_0_2_keeps_its_network_and_predictions():
    """A model folder trained by version 0.2 (plans block without "stages"/"router_init": a dMoE after every stage,
    zero-initialised routers without bias) rebuilds that network and predicts as then. The file was written by
    tests/data/pinned/make_dmoe_unet_v0.2.py with that version's code."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    saved = torch.load(PINNED, weights_only=False)
    assert saved["configuration"]["dmoe"] == {"num_levels": 4, "attribute_channel": 1}
    net = build_attribute_network(None, ConfigurationManager(saved["configuration"]), 2, 3, False, routing="dmoe")
    assert [type(m) for m in net.moe] == [DistributionAwareMoE] * 3 and net.moe[0].router.b_gate is None
    net.load_state_dict(saved["state_dict"])  # strict: the same parameters
    with torch.no_grad():
        # float32 sums run in another order on another processor than the one that wrote the file (an Intel Xeon
        # differs by up to 3e-6 on outputs of up to 6): 1e-5 is about 20 float32 steps at that size, while routing
        # a case by another level's router moves its output by up to 2
        torch.testing.assert_close(net.eval()(saved["input"]), saved["output"], rtol=1e-5, atol=1e-5)
    # a new training of the same plans records and gets the paper's network
    from nnunet_dmoe.plans.blocks import current_dmoe_block
    assert current_dmoe_block(saved["configuration"]["dmoe"]) == {"num_levels": 4, "attribute_channel": 1,
                                                                "stages": "downsampling", "router_init": "linear"}
    new = build("dmoe", dim=2)
    assert isinstance(new.moe[0], torch.nn.Identity) and new.moe[1].router.b_gate.shape == (5, 8)


def test_routers_start_as_nn_linear():
    """Each level's router is the paper's nn.Linear(C, E): a bias, uniform +-1/sqrt(C) weights, for the logits and
    the noise scale; so the levels' routers differ from the first step."""
    router = build("dmoe", dim=2).moe[2].router
    bound = 1 / 32 ** 0.5
    for p in (router.w_gate, router.b_gate, router.w_noise, router.b_noise):
        assert bound >= p.detach().abs().max() > 0.8 * bound
    for w in (router.w_gate, router.w_noise):  # 5 x 32 x 8 draws of U(-bound, bound)
        assert abs(w.mean().item()) < 0.1 * bound and w.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.1)
    assert not torch.equal(router.w_gate[0], router.w_gate[1])
    zero = build("dmoe", dim=2, router_init="zero").moe[2].router
    assert zero.b_gate is None and zero.w_gate.abs().sum() == 0


@pytest.mark.parametrize("residual", [False, True])
def test_upcycled_dmoe_predicts_as_the_loaded_unet(residual):
    """-pretrained_weights of a plain nnU-Net checkpoint: the dMoE's first forward equals the loaded model's."""
    baseline = build("none", residual=residual, seed=3)  # nnUNetTrainerNoAttribute: keys unet.*
    with torch.no_grad():  # trained-looking weights, not the initialisation
        for p in baseline.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dmoe = build("dmoe", residual=residual, seed=4)
    randomise_routers(dmoe)
    assert dmoe.load_plain_unet(baseline.state_dict()) == []
    x = with_channel(torch.randn(4, 1, 16, 16, 16), [1, 2, 3, 4])
    baseline.eval(), dmoe.eval()
    with torch.no_grad():
        torch.testing.assert_close(dmoe(x), baseline(x), rtol=0, atol=0)
    assert all(b.experts.w2.abs().sum() == 0 and b.experts.w1.abs().sum() > 0 for b in blocks(dmoe))
    # the experts are not stuck: one training step moves their output layer
    dmoe.train()
    dmoe(x).float().pow(2).mean().backward()
    assert all(b.experts.w2.grad.abs().sum() > 0 for b in blocks(dmoe))


def test_upcycling_nnunets_own_trainer_drops_the_attribute_input():
    """nnUNetTrainer on the dataset with the channel: a PlainConvUNet of 2 inputs, keys encoder.* / decoder.*."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    cm = unet_configuration(3, (8, 16, 32), num_levels=4, attribute_channel=1)
    torch.manual_seed(5)
    plain = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                   cm.network_arch_init_kwargs_req_import, 2, 3, deep_supervision=False)
    first = next(k for k, v in plain.state_dict().items() if v.dim() == 5)
    with torch.no_grad():  # the old model ignored the attribute input: then the outputs must agree
        plain.state_dict()[first][:, 1] = 0
    dmoe = build("dmoe", seed=6)
    notes = dmoe.load_plain_unet(plain.state_dict())
    assert len(notes) == 1 and first in notes[0] and "dropped" in notes[0]
    x = with_channel(torch.randn(2, 1, 16, 16, 16), [2, 3])
    plain.eval(), dmoe.eval()
    with torch.no_grad():
        torch.testing.assert_close(dmoe(x), plain(x), rtol=0, atol=0)
    other = build("none", residual=True)
    with pytest.raises(ValueError, match="not an nnU-Net U-Net of these plans"):
        dmoe.load_plain_unet(other.state_dict())
