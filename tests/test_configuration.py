"""The one builder of nnU-Net ConfigurationManagers without plans (presets of the cost report, tests)."""
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from nnunet_dmoe.commands.benchmark.presets import preset_configuration, resenc_m_configuration
from nnunet_dmoe.plans.configuration import unet_configuration


def test_plain_2d_values():
    cm = unet_configuration(2, (8, 16, 32), num_levels=4, attribute_channel=1)
    assert cm.network_arch_class_name == "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    kw = cm.network_arch_init_kwargs
    assert kw["n_conv_per_stage"] == [2, 2, 2] and "n_blocks_per_stage" not in kw
    assert kw["kernel_sizes"] == [[3, 3]] * 3 and kw["strides"] == [[1, 1], [2, 2], [2, 2]]
    assert kw["conv_op"] == "torch.nn.modules.conv.Conv2d"
    assert kw["norm_op"] == "torch.nn.modules.instancenorm.InstanceNorm2d"
    assert kw["n_conv_per_stage_decoder"] == [1, 1]
    assert cm.configuration["dmoe"] == {"num_levels": 4, "attribute_channel": 1, "stages": "downsampling",
                                        "router_init": "linear"}  # complete, as the trainers write it
    assert not any(k.startswith("dmoe") for k in kw)
    assert cm.network_arch_init_kwargs_req_import == ["conv_op", "norm_op", "dropout_op", "nonlin"]


def test_resenc_m_3d_values_and_networks():
    kw = resenc_m_configuration(3).network_arch_init_kwargs
    assert kw["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert kw["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6] and "n_conv_per_stage" not in kw
    assert kw["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert preset_configuration("tiny_3d").configuration == unet_configuration(3, (8, 16, 32), (1, 2, 2)).configuration
    # nnU-Net builds the networks from them
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    for blocks, cls in ((None, PlainConvUNet), ((1, 2, 2), ResidualEncoderUNet)):
        cm = unet_configuration(3, (8, 16, 32), blocks)
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, 1, 2, deep_supervision=False)
        assert type(net) is cls
        assert net(torch.zeros(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)


def test_blocks_must_match_stages():
    with pytest.raises(ValueError, match="blocks_per_stage has 2 entries for 3 stages"):
        unet_configuration(3, (8, 16, 32), (1, 2))
