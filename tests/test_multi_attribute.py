"""Several attributes at once (dataset.json's "attributes"): the spec list, the summed per-attribute routers, the
networks and trainers, and an end to end with nnU-Net's CLIs on synthetic data with a T-stage and a centre."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import nnunet_env, run
from nnunet_dmoe.data.attribute import attribute_settings, attribute_specs_from_dataset_json
from nnunet_dmoe.plans.configuration import unet_configuration
from nnunet_dmoe.method.config import DMoEConfig
from nnunet_dmoe.method.routing import route_index_for_levels
from nnunet_dmoe.method.dmoe import DistributionAwareMoE, NoisyTopKRouter
from nnunet_dmoe.networks.unet import build_attribute_network

STAGE = {"name": "tstage", "levels": ["T1", "T2", "T3", "T4"], "channel": 1, "cases": {"a": "T2", "b": None}}
CENTRE = {"name": "centre", "levels": ["A", "B"], "channel": 2, "cases": {"a": "B", "b": "A"}}
CHANNELS = {"0": "CT", "1": "noNorm", "2": "noNorm"}


def _network(num_levels, channels, routing="dmoe", seed=0, features=(4, 8), **dmoe):
    """A two-stage U-Net with a block after both stages ("stages": "all")."""
    torch.manual_seed(seed)
    dmoe.setdefault("stages", "all")
    cm = unet_configuration(2, features, num_levels=num_levels, attribute_channel=channels, **dmoe)
    n_in = 1 + (len(channels) if isinstance(channels, list) else 1)
    return build_attribute_network(None, cm, n_in, 2, False, routing=routing).eval()


def _randomise_routers(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, NoisyTopKRouter):
            m.w_gate.data = torch.randn(m.w_gate.shape, generator=g)


def _input(codes, size=16, seed=0):
    """Image channel and one attribute channel per attribute holding ``codes[a]`` (level + 1) everywhere."""
    g = torch.Generator().manual_seed(seed)
    x = [torch.rand(1, 1, size, size, generator=g)]
    x += [torch.full((1, 1, size, size), float(c)) for c in codes]
    return torch.cat(x, 1)


def test_specs_and_plans_settings():
    one = attribute_specs_from_dataset_json({"channel_names": CHANNELS, "attribute": STAGE})
    listed = attribute_specs_from_dataset_json({"channel_names": CHANNELS, "attributes": [STAGE]})
    assert one == listed and attribute_settings(one) == {"num_levels": 4, "attribute_channel": 1}
    two = attribute_specs_from_dataset_json({"channel_names": CHANNELS, "attributes": [STAGE, CENTRE]})
    assert [s.name for s in two] == ["tstage", "centre"]
    assert attribute_settings(two) == {"num_levels": [4, 2], "attribute_channel": [1, 2]}
    with pytest.raises(ValueError, match="share the channel 1"):
        attribute_specs_from_dataset_json({"channel_names": CHANNELS, "attributes": [STAGE, dict(CENTRE, channel=1)]})
    with pytest.raises(ValueError, match="channel 2 is channel_names"):
        attribute_specs_from_dataset_json({"channel_names": dict(CHANNELS, **{"2": "CT"}),
                                           "attributes": [STAGE, CENTRE]})


def test_route_index_offsets_each_attribute_and_its_unknown():
    levels = torch.tensor([[0, 1], [-1, 0], [3, -1]])
    # tstage: routers 0..3 + unknown 4; centre: routers 5, 6 + unknown 7
    assert route_index_for_levels(levels, [4, 2], "dmoe").tolist() == [[0, 6], [4, 5], [3, 7]]
    assert route_index_for_levels(levels, [4, 2], "moe").tolist() == [0, 0, 0]
    assert DMoEConfig(num_levels=[4, 2], attribute_channel=[1, 2]).num_routers == 8
    with pytest.raises(ValueError, match="two lists of the same length"):
        DMoEConfig(num_levels=[4, 2], attribute_channel=[1])


def test_router_logits_are_the_sum_of_the_attributes_routers():
    torch.manual_seed(0)
    router = NoisyTopKRouter(dim=6, num_experts=5, num_routers=8, top_k=2, noisy=False)
    router.w_gate.data = torch.randn(8, 6, 5)
    tokens = torch.randn(3, 7, 6)
    index = torch.tensor([[0, 6], [4, 5], [3, 7]])
    gates, experts = router(tokens, index)
    w, bias = router.w_gate, router.b_gate  # each router is nn.Linear(C, E): h W + b
    for b in range(3):
        logits = (tokens[b] @ w[index[b, 0]] + bias[index[b, 0]]) + (tokens[b] @ w[index[b, 1]] + bias[index[b, 1]])
        top, top_index = logits.topk(2, dim=-1)
        assert torch.equal(experts[b], top_index)
        torch.testing.assert_close(gates[b], torch.softmax(top, -1))


def test_one_attribute_is_todays_dmoe():
    """One attribute, given as numbers or as one-entry lists, builds the dMoE of version 0.2 (before several
    attributes existed): the same parameters and the same outputs (values printed by that version's code)."""
    spec = attribute_specs_from_dataset_json({"channel_names": CHANNELS, "attributes": [STAGE]})
    assert attribute_settings(spec) == {"num_levels": 4, "attribute_channel": 1}  # the plans hold numbers
    a = _network(4, 1, router_init="zero")  # version 0.2's routers
    b = _network([4], [1], router_init="zero")  # the list path: (b, 1) router indices, summed over one attribute
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    _randomise_routers(a), _randomise_routers(b)
    x = _input([3])[:, :2]
    with torch.no_grad():
        ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-6)
    # nnunet_dmoe 0.2 (commit c932de4), the same seeds: sum, sum of magnitudes, one voxel's logits
    torch.testing.assert_close(ya.double().sum().item(), -60.120632448699325, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ya.abs().double().sum().item(), 314.28495387744624, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ya[0, :, 3, 5].tolist(), [0.3720305562019348, 0.038508620113134384], rtol=1e-4,
                               atol=1e-5)


def test_levels_must_name_every_attribute():
    net = _network([4, 2], [1, 2])
    with pytest.raises(ValueError, match=r"shape \(b, 2\)"):
        net(_input([2, 1]), torch.tensor([1]))  # one level per sample for two attributes
    with torch.no_grad():
        torch.testing.assert_close(net(_input([2, 1]), torch.tensor([[1, 0]])), net(_input([2, 1])))
    with pytest.raises(ValueError, match="two lists of the same length"):
        DMoEConfig(num_levels=[4, 2], attribute_channel=1)
    with pytest.raises(ValueError, match="two lists of the same length"):
        DMoEConfig(num_levels=4, attribute_channel=[1, 2])


def test_routing_report_rows_per_attribute_on_summed_routers():
    """The routing report's recorder on a real two-attribute dMoE: each attribute's rows sum to k, and the centre
    rows differ because the centre's routers take part."""
    from nnunet_dmoe.commands.routing_recorder import RoutingRecorder
    specs = attribute_specs_from_dataset_json({"channel_names": CHANNELS, "attributes": [STAGE, CENTRE]})
    net = _network([4, 2], [1, 2])
    _randomise_routers(net)
    with RoutingRecorder(net, specs) as rec, torch.no_grad():
        for s, c in ((2, 1), (2, 2), (3, 1)):
            net(_input([s, c], seed=s * 3 + c))
    blocks = rec.blocks()
    assert len(blocks) == 2  # one block per encoder stage
    for block in blocks:
        stage, centre = block["attributes"]["tstage"], block["attributes"]["centre"]
        assert stage["T2"]["tokens"] == 2 * 16 * 16 // 4 ** block["index"] and stage["T3"]["tokens"] > 0
        assert stage["T1"]["tokens"] == 0 and stage["unknown"]["tokens"] == 0
        assert centre["A"]["tokens"] == 2 * stage["T3"]["tokens"] and centre["B"]["tokens"] == stage["T3"]["tokens"]
        for row in (stage["T2"], stage["T3"], centre["A"], centre["B"]):
            assert sum(row["fraction"]) == pytest.approx(2.0)  # top-2: each token counted for its two experts
        # T2 with centre A vs T2 with centre B: the same stage routers, other centre routers
        assert block["js_divergence"]["centre"]["max"] > 0.0


def test_second_attribute_with_silent_routers_changes_nothing():
    """With the centre's routers at zero, the two-attribute dMoE equals the T-stage dMoE with the same weights."""
    one, two = _network(4, 1), _network([4, 2], [1, 2])
    _randomise_routers(one)
    state = two.state_dict()
    for k, v in one.state_dict().items():
        if k.split(".")[-1] in ("w_gate", "w_noise", "b_gate", "b_noise"):
            state[k] = torch.cat([v, torch.zeros(3, *v.shape[1:])])  # tstage's 5 routers, then the centre's 3
        else:
            state[k] = v
    two.load_state_dict(state)
    with torch.no_grad():
        for stage in (1, 2, 3, 4):
            for centre in (0, 1, 2):
                x = _input([stage, centre])
                torch.testing.assert_close(two(x), one(x[:, :2]))


def test_each_attribute_changes_the_output_and_unseen_combinations_route():
    net = _network([4, 2], [1, 2])
    assert sum(m.router.w_gate.shape[0] for m in net.moe if isinstance(m, DistributionAwareMoE)) == 8 * 2
    _randomise_routers(net)
    with torch.no_grad():
        out = {(s, c): net(_input([s, c])) for s in range(5) for c in range(3)}
    assert not torch.allclose(out[(2, 1)], out[(3, 1)])  # the stage matters
    assert not torch.allclose(out[(2, 1)], out[(2, 2)])  # the centre matters
    assert all(torch.isfinite(v).all() for v in out.values())
    with pytest.raises(ValueError, match="code 3"):
        net(_input([2, 3]))  # the centre has 2 levels: code 3 names none


def test_baseline_and_channel_comparator_take_every_attribute_channel():
    blind = _network([4, 2], [1, 2], routing=None)
    assert blind.unet.encoder.stages[0][0].convs[0].conv.in_channels == 1
    x = _input([2, 1])
    with torch.no_grad():
        assert torch.equal(blind(x), blind(_input([4, 2])))  # the attributes are stripped, unused


def test_trainer_writes_every_attribute_channel(tmp_path, monkeypatch):
    from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase, with_attribute_settings
    plans = {"configurations": {"2d": {"dmoe": {"num_experts": 4}}}}
    specs = attribute_specs_from_dataset_json({"channel_names": CHANNELS, "attributes": [STAGE, CENTRE]})
    block = with_attribute_settings(plans, "2d", specs)["configurations"]["2d"]["dmoe"]
    assert block == {"num_experts": 4, "num_levels": [4, 2], "attribute_channel": [1, 2], "stages": "downsampling",
                     "router_init": "linear"}  # a new training records the current defaults
    # the batch hook, without building a whole trainer: every attribute's clean code inside the footprint
    t = nnUNetTrainerAttributeBase.__new__(nnUNetTrainerAttributeBase)
    t.attributes, t.attribute, t.unknown_attribute_rate = specs, specs[0], 0.0
    data = torch.zeros(2, 3, 4, 4)
    data[:, 1:, :2] = 0.8  # footprint: top half
    batch = t.prepare_attribute({"data": data, "keys": ["a", "b"]}, train=False)
    assert batch["attribute"].tolist() == [1, -1]
    assert batch["attributes"].tolist() == [[1, 1], [-1, 0]]
    assert batch["data"][0, 1, :2].eq(2).all() and batch["data"][0, 2, :2].eq(2).all()
    assert batch["data"][1, 1].eq(0).all() and batch["data"][1, 2, :2].eq(1).all()
    assert batch["data"][:, 1:, 2:].eq(0).all()


# ---------------------------------------------------------------------------------------------------- end to end
TRAINER = "nnUNetTrainerDMoE_1epochs_10iters"


@pytest.mark.slow
def test_two_attributes_end_to_end(tmp_path):
    """Synthetic data with a T-stage margin and a centre margin, nnU-Net's CLIs: the dMoE trainer routes on both;
    its prediction changes with each attribute; a combination no training case has predicts."""
    env = nnunet_env(tmp_path, nnUNet_n_proc_DA="0")
    run(["nnUNetv2_dmoe_make_synthetic", "-d", "995", "-dim", "2", "-num_train", "12", "-num_test", "4", "-size", "40",
         "40", "--centres"], env)
    raw = tmp_path / "raw" / "Dataset995_SyntheticFairness"
    dj = json.loads((raw / "dataset.json").read_text())
    assert [b["name"] for b in dj["attributes"]] == ["tstage", "centre"]
    run(["nnUNetv2_dmoe_plan_and_preprocess", "-d", "995", "-c", "2d", "-np", "1"], env)
    log = run(["nnUNetv2_train", "995", "2d", "0", "-tr", TRAINER, "-p", "nnUNetDMoEPlans", "-device", "cpu"], env)
    assert "Attribute 'tstage': dataset.json and the attribute channel agree" in log
    assert "Attribute 'centre': dataset.json and the attribute channel agree" in log
    model = tmp_path / "results" / raw.name / f"{TRAINER}__nnUNetDMoEPlans__2d"
    block = json.loads((model / "plans.json").read_text())["configurations"]["2d"]["dmoe"]
    assert block["num_levels"] == [4, 2] and block["attribute_channel"] == [1, 2]

    # one test image under every combination of codes, written as nnUNetv2_predict input
    seen = set(zip(dj["attributes"][0]["cases"].values(), dj["attributes"][1]["cases"].values()))
    stages, centres = dj["attributes"][0]["levels"], dj["attributes"][1]["levels"]
    unseen = [(s, c) for s in range(4) for c in range(2) if (stages[s], centres[c]) not in seen]
    assert unseen, "the synthetic split should leave a combination unseen"
    image = np.array(Image.open(raw / "imagesTs" / "synts_0000_0000.png"))
    footprint = image > 0
    inputs = tmp_path / "combos"
    inputs.mkdir()
    combos = [(1, 0), (3, 0), (1, 1), unseen[0]]
    for s, c in combos:
        case = f"c_{s}_{c}"
        Image.fromarray(image).save(inputs / f"{case}_0000.png")
        for ch, level in ((1, s), (2, c)):
            Image.fromarray((footprint * (level + 1)).astype(np.uint8)).save(inputs / f"{case}_{ch:04d}.png")
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(inputs), "-o", str(out), "-d", "995", "-c", "2d", "-tr", TRAINER,
         "-p", "nnUNetDMoEPlans", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--save_probabilities",
         "--disable_progress_bar"], env)
    prob = {sc: np.load(out / f"c_{sc[0]}_{sc[1]}.npz")["probabilities"] for sc in combos}
    assert all(np.isfinite(p).all() for p in prob.values())
    assert np.abs(prob[(1, 0)] - prob[(3, 0)]).max() > 1e-3  # the stage changes the prediction
    assert np.abs(prob[(1, 0)] - prob[(1, 1)]).max() > 1e-3  # so does the centre
    assert (out / f"c_{unseen[0][0]}_{unseen[0][1]}.png").is_file()


def test_transunet_routes_on_two_attributes():
    from nnunet_dmoe.networks.transunet import build_transunet_network
    torch.manual_seed(0)
    cm = unet_configuration(2, num_levels=[4, 2], attribute_channel=[1, 2])
    cm.configuration["patch_size"] = [32, 32]
    cm.configuration["transformer"] = {"embed_dim": 32, "depth": 2, "num_heads": 2, "stem_features": [8, 8, 16, 16]}
    net = build_transunet_network(None, cm, 3, 2, False, routing="dmoe").eval()
    assert net.moe[0].router.w_gate.shape[0] == 8  # 4 + 1 stage routers, 2 + 1 centre routers
    _randomise_routers(net)
    with torch.no_grad():
        a, b, c = (net(_input(codes, size=32)) for codes in ([2, 1], [3, 1], [2, 2]))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
