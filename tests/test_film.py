"""FiLM: identity at initialisation and for unknown, a different modulation per level once gamma/beta are set, the
sum over several attributes, the dMoE's stage placement, and the trainer's network."""
import pytest
import torch

from nnunet_dmoe.plans.configuration import unet_configuration
from nnunet_dmoe.method.dmoe import DistributionAwareMoE
from nnunet_dmoe.networks.film import FiLM, FiLMUNet, build_film_network
from nnunet_dmoe.networks.unet import build_attribute_network


def test_film_by_hand():
    film = FiLM(2, 3)
    x = torch.arange(12.0).view(3, 2, 2)  # (b, C, spatial)
    levels = torch.tensor([0, 2, -1])
    torch.testing.assert_close(film(x, levels), x)  # identity at initialisation
    with torch.no_grad():
        film.gamma[0] = torch.tensor([2.0, 3.0])
        film.beta[0] = torch.tensor([1.0, -1.0])
        film.gamma[2] = torch.tensor([0.5, 1.0])
        film.beta[2] = torch.tensor([0.0, 4.0])
    out = film(x, levels)
    torch.testing.assert_close(out[0], x[0] * torch.tensor([[2.0], [3.0]]) + torch.tensor([[1.0], [-1.0]]))
    torch.testing.assert_close(out[1], x[1] * torch.tensor([[0.5], [1.0]]) + torch.tensor([[0.0], [4.0]]))
    torch.testing.assert_close(out[2], x[2])  # unknown: identity
    out.sum().backward()
    assert film.gamma.grad[1].abs().sum() == 0 and film.gamma.grad[0].abs().sum() > 0  # level 1 not in the batch


def test_film_several_attributes_add_up():
    """gamma = 1 + sum_a (gamma_a - 1), beta = sum_a beta_a; an unknown attribute contributes nothing."""
    film = FiLM(1, [2, 3])  # rows 0-1: attribute 0, rows 2-4: attribute 1
    with torch.no_grad():
        film.gamma[:, 0] = torch.tensor([2.0, 1.0, 1.0, 1.0, 3.0])
        film.beta[:, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0])
    x = torch.ones(3, 1, 1)
    out = film(x, torch.tensor([[0, 2], [0, -1], [-1, -1]]))
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([(1 + 1 + 2) + 6.0, 2 + 1.0, 1.0]))
    with pytest.raises(ValueError, match="for 2 attribute"):
        film(x, torch.tensor([0, 1, 0]))


@pytest.mark.parametrize("residual", [False, True])
def test_film_unet_identity_at_init_then_per_level(residual):
    cm = unet_configuration(2, (8, 16, 32), [1, 2, 2] if residual else None, num_levels=3, attribute_channel=1)
    torch.manual_seed(0)
    net = build_film_network(None, cm, 2, 2, True).eval()
    torch.manual_seed(0)
    baseline = build_attribute_network(None, cm, 2, 2, True).eval()
    image = torch.randn(1, 1, 16, 16)

    def case(code):  # the image with an attribute channel of this code (0 = unknown)
        return torch.cat([image, torch.full_like(image, float(code))], 1)
    with torch.no_grad():
        ref = baseline(case(0))[0]
        for code in (0, 1, 2, 3):  # identity at initialisation, every level and unknown
            torch.testing.assert_close(net(case(code))[0], ref)
        for film in net.film:
            if isinstance(film, FiLM):
                film.gamma.copy_(torch.rand_like(film.gamma) + 0.5)
                film.beta.copy_(torch.randn_like(film.beta))
        outs = [net(case(code))[0] for code in (0, 1, 2, 3)]
        torch.testing.assert_close(outs[0], ref)  # unknown: identity
        for i in range(1, 4):
            for j in range(i):
                assert not torch.allclose(outs[i], outs[j])  # a different output per level
        # levels given explicitly: as decoded from the channel
        torch.testing.assert_close(net(case(0), torch.tensor([1]))[0], outs[2])


def test_film_after_the_dmoe_stages_and_in_the_state_dict():
    for stages in ("downsampling", "all", [0, 2]):
        cm = unet_configuration(2, (8, 16, 32, 32), num_levels=2, attribute_channel=1, stages=stages)
        film = build_film_network(None, cm, 2, 2, True)
        dmoe = build_attribute_network(None, cm, 2, 2, True, routing="dmoe")
        assert ([isinstance(m, FiLM) for m in film.film]
                == [isinstance(m, DistributionAwareMoE) for m in dmoe.moe])
    assert isinstance(film, FiLMUNet) and "film.2.gamma" in film.state_dict()
    assert all(not k.startswith("film.") or k.endswith(("gamma", "beta")) for k in film.state_dict())


def test_trainer_builds_the_film_network():
    from nnunet_dmoe.trainers import nnUNetTrainerFiLM, nnUNetTrainerFiLM_1epochs_5iters  # noqa: F401
    cm = unet_configuration(2, (8, 16, 32), num_levels=2, attribute_channel=0)
    net = nnUNetTrainerFiLM.build_network_architecture(None, cm, 2, 2, False)
    assert isinstance(net, FiLMUNet) and net(torch.randn(2, 2, 16, 16)).shape == (2, 2, 16, 16)
    net.decoder.deep_supervision = True  # what nnU-Net's set_deep_supervision_enabled does
    assert isinstance(net(torch.randn(2, 2, 16, 16)), list)
