"""nnUNetv2_dmoe_routing_report: routing per (d)MoE block and attribute level, recorded with forward hooks.

Routers set by hand make the routing known: the last norm of every encoder stage with a (d)MoE block writes 1 into
channel 0 of its output (weight 0, bias 1, LeakyReLU(1) = 1), and router ``r``'s logits are 2 for expert ``2r``,
1 for expert ``2r + 1`` and 0 elsewhere (``w_gate[r, 0]``; the other channels' rows are 0). So every token of a
level-``r`` sample goes to experts {2r, 2r + 1} with gates sigmoid(1) and 1 - sigmoid(1).
"""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import nnunet_env, run
from nnunet_dmoe.data.attribute import AttributeSpec
from nnunet_dmoe.plans.configuration import unet_configuration
from nnunet_dmoe.method.dmoe import DistributionAwareMoE
from nnunet_dmoe.networks.unet import build_attribute_network
from nnunet_dmoe.commands.routing_recorder import RoutingRecorder
from nnunet_dmoe.commands.routing_report import routing_report
from nnunet_dmoe.commands.routing_summary import js_divergence

LEVELS = ["T1", "T2", "T3", "T4"]
SPEC = AttributeSpec("tstage", LEVELS, 1)
GATE = 1.0 / (1.0 + math.exp(-1.0))  # softmax over logits (2, 1)
# router r -> its two experts; router 4 (unknown) -> experts 7 (logit 2) and 0 (logit 1)
EXPERTS = {0: (0, 1), 1: (2, 3), 2: (4, 5), 3: (6, 7), 4: (7, 0)}


def set_routers_by_hand(net):
    """The routing of the module docstring, for an AttributeUNet (PlainConvUNet encoder)."""
    with torch.no_grad():
        for stage, moe in zip(net.unet.encoder.stages, net.moe):
            if not isinstance(moe, DistributionAwareMoE):
                continue
            norm = [m for m in stage.modules() if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm)][-1]
            norm.weight[0], norm.bias[0] = 0.0, 1.0
            moe.router.w_gate.zero_()
            if moe.router.b_gate is not None:
                moe.router.b_gate.zero_()
            for r in range(moe.router.w_gate.shape[0]):
                first, second = EXPERTS[r] if moe.router.w_gate.shape[0] > 1 else EXPERTS[1]
                moe.router.w_gate[r, 0, first], moe.router.w_gate[r, 0, second] = 2.0, 1.0
    return net


def tiny_net(routing, seed=0):
    """A block after each of the three stages (full resolution included), so that the hand-set routing shows at
    three resolutions."""
    torch.manual_seed(seed)
    cm = unet_configuration(2, (8, 16, 32), num_levels=4, attribute_channel=1, num_experts=8, top_k=2, stages="all")
    return build_attribute_network(None, cm, 2, 2, False, routing=routing).eval()


def batch(codes, size=16, seed=0):
    """The same random image for every sample, attribute channel = code everywhere (0 = unknown)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 1, size, size, generator=g).expand(len(codes), -1, -1, -1)
    channel = torch.tensor(codes, dtype=torch.float32)[:, None, None, None].expand(-1, 1, size, size)
    return torch.cat([image, channel], dim=1)


def record(net, x, specs=(SPEC,)):
    with RoutingRecorder(net, specs) as rec, torch.inference_mode():
        net(x)
    return rec.blocks()


def expected_fraction(router):
    f = np.zeros(8)
    f[list(EXPERTS[router])] = 1.0
    return f


def test_hand_set_routers_give_the_known_fractions_gates_and_counts():
    net = set_routers_by_hand(tiny_net("dmoe"))
    # levels T1, T3, T3, unknown; T2 and T4 absent
    blocks = record(net, batch([1, 3, 3, 0]))
    assert [b["label"] for b in blocks] == ["encoder stage 0", "encoder stage 1", "encoder stage 2"]
    assert [b["channels"] for b in blocks] == [8, 16, 32] and [b["index"] for b in blocks] == [0, 1, 2]
    for b, tokens in zip(blocks, (256, 64, 16)):
        rows = b["attributes"]["tstage"]
        assert list(rows) == LEVELS + ["unknown"]
        assert rows["T1"]["tokens"] == tokens and rows["T3"]["tokens"] == 2 * tokens
        assert rows["unknown"]["tokens"] == tokens
        assert rows["T2"] == {"tokens": 0, "fraction": None, "mean_gate": None}
        for level, router in (("T1", 0), ("T3", 2), ("unknown", 4)):
            np.testing.assert_array_equal(rows[level]["fraction"], expected_fraction(router))
            first, second = EXPERTS[router]
            gates = rows[level]["mean_gate"]
            assert gates[first] == pytest.approx(GATE, abs=1e-6) and gates[second] == pytest.approx(1 - GATE, abs=1e-6)
            assert all(g is None for e, g in enumerate(gates) if e not in (first, second))
        js = b["js_divergence"]["tstage"]
        # disjoint expert pairs except unknown ({7, 0}) against T1 ({0, 1}), which share expert 0
        assert js["levels"] == ["T1", "T3", "unknown"]
        assert js["pairs"]["T1 | T3"] == pytest.approx(1.0) and js["pairs"]["T3 | unknown"] == pytest.approx(1.0)
        assert js["pairs"]["T1 | unknown"] == pytest.approx(js_divergence([.5, .5, 0], [.5, 0, .5]))
        assert js["max"] == pytest.approx(1.0)


@pytest.mark.gpu
def test_recorder_on_cuda_under_autocast_matches_cpu():
    """As nnU-Net's predictor runs it on a GPU: CUDA tensors, autocast (the dMoE's Triton path for small widths)."""
    net = set_routers_by_hand(tiny_net("dmoe"))
    x = batch([1, 3, 3, 0])
    cpu = record(net, x)
    net.cuda()
    with torch.autocast("cuda"):
        gpu = record(net, x.cuda())
    for a, b in zip(cpu, gpu):
        for level, row in a["attributes"]["tstage"].items():
            other = b["attributes"]["tstage"][level]
            assert row["tokens"] == other["tokens"] and row["fraction"] == other["fraction"]
            assert [g is None for g in row["mean_gate"] or []] == [g is None for g in other["mean_gate"] or []]


def test_every_row_sums_to_k_and_counts_add_up_over_calls():
    net = tiny_net("dmoe")
    for m in net.modules():  # random routers: tokens spread over experts
        if isinstance(m, DistributionAwareMoE):
            m.router.w_gate.data.normal_(generator=torch.Generator().manual_seed(3))
    with RoutingRecorder(net, [SPEC]) as rec, torch.inference_mode():
        net(batch([1, 2, 4, 0], seed=1))
        net(batch([2, 2], seed=2))
    for b in rec.blocks():
        for level, row in b["attributes"]["tstage"].items():
            if row["tokens"]:
                assert sum(row["fraction"]) == pytest.approx(2.0, abs=1e-12), (b["name"], level)
                assert all(0.0 < g <= 1.0 for g in row["mean_gate"] if g is not None)
        n = b["attributes"]["tstage"]
        assert n["T2"]["tokens"] == 3 * n["T1"]["tokens"] and n["T3"]["tokens"] == 0
    assert rec.windows == 6


def test_moe_routes_every_level_alike_and_dmoe_does_not():
    x = batch([1, 2, 3, 4, 0], seed=4)

    def rows(routing):
        net = tiny_net(routing, seed=5)
        for m in net.modules():
            if isinstance(m, DistributionAwareMoE):
                m.router.w_gate.data.normal_(generator=torch.Generator().manual_seed(6))
        return record(net, x)

    for b in rows("moe"):
        levels = b["attributes"]["tstage"]
        for level in LEVELS[1:] + ["unknown"]:  # identical fractions, gates and counts
            # (a sample's float32 gates may differ from another sample's in the last bits: batch position changes
            # the order of summation)
            assert {k: v for k, v in levels[level].items() if k != "mean_gate"} == \
                {k: v for k, v in levels["T1"].items() if k != "mean_gate"}
            assert levels[level]["mean_gate"] == pytest.approx(levels["T1"]["mean_gate"], rel=1e-6, abs=1e-7)
        assert b["js_divergence"]["tstage"]["max"] == 0.0
    assert all(b["js_divergence"]["tstage"]["max"] > 0.05 for b in rows("dmoe"))


class TwoAttributes(torch.nn.Module):
    """Input: image, tstage channel, centre channel; the dMoE network sees (and routes by) the first two."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x[:, :2])


def test_rows_per_attribute_when_there_are_several():
    centre = AttributeSpec("centre", ["A", "B"], 2)
    net = TwoAttributes(set_routers_by_hand(tiny_net("dmoe")))
    x = batch([1, 1, 2])
    x = torch.cat([x, torch.tensor([1.0, 2.0, 2.0])[:, None, None, None].expand(-1, 1, 16, 16)], dim=1)
    blocks = record(net, x, [SPEC, centre])
    rows = blocks[0]["attributes"]
    assert list(rows) == ["tstage", "centre"] and list(rows["centre"]) == ["A", "B", "unknown"]
    assert rows["tstage"]["T1"]["tokens"] == 2 * 256 and rows["centre"]["B"]["tokens"] == 2 * 256
    np.testing.assert_array_equal(rows["tstage"]["T1"]["fraction"], expected_fraction(0))
    np.testing.assert_array_equal(rows["centre"]["A"]["fraction"], expected_fraction(0))
    np.testing.assert_array_equal(rows["centre"]["B"]["fraction"], (expected_fraction(0) + expected_fraction(1)) / 2)
    assert rows["centre"]["unknown"]["tokens"] == 0
    assert blocks[0]["js_divergence"]["centre"]["pairs"]["A | B"] == pytest.approx(js_divergence([1, 0], [.5, .5]))
    with pytest.raises(ValueError, match="input has 2 channels, but attribute 'centre' is channel 2"):
        record(net.net, x[:, :2], [SPEC, centre])


@pytest.mark.parametrize("placement", ["shared", "per_block"])
def test_transformer_blocks_each_get_their_rows(placement):
    """TransUNet: one (d)MoE block after every transformer block (shared: one module called once per block)."""
    from nnunet_dmoe.networks.transunet import build_transunet_network

    cm = unet_configuration(2, num_levels=4, attribute_channel=1, transformer_placement=placement)
    cm.configuration["patch_size"] = [32, 32]
    cm.configuration["transformer"] = {"embed_dim": 32, "depth": 3, "num_heads": 2, "stem_features": [8, 8, 16, 16]}
    torch.manual_seed(0)
    net = build_transunet_network(None, cm, 2, 2, False, routing="dmoe").eval()
    blocks = record(net, batch([1, 2, 0], size=32))
    assert [b["label"] for b in blocks] == ["transformer block 0", "transformer block 1", "transformer block 2"]
    names = ["moe.0#0", "moe.0#1", "moe.0#2"] if placement == "shared" else ["moe.0", "moe.1", "moe.2"]
    assert [b["name"] for b in blocks] == names and all(b["channels"] == 32 for b in blocks)
    for b in blocks:
        rows = b["attributes"]["tstage"]
        assert rows["T1"]["tokens"] == rows["T2"]["tokens"] == rows["unknown"]["tokens"] > 0
        assert all(sum(rows[lv]["fraction"]) == pytest.approx(2.0) for lv in ("T1", "T2", "unknown"))


def test_a_network_without_moe_blocks_is_refused():
    with pytest.raises(ValueError, match=r"no \(d\)MoE block.*nnUNetTrainerDMoE"):
        RoutingRecorder(tiny_net(None), [SPEC])


# ------------------------------------------------------------------------------------------ model folder, CLI
DATASET = "Dataset991_SyntheticFairness"
TRAINER = "nnUNetTrainerDMoE"


@pytest.fixture(scope="module")
def model_folder(preprocessed_3d, tmp_path_factory):
    """A real nnU-Net model folder in its own nnUNet_results: the plans of the session's tiny synthetic 3D dataset
    (nnU-Net's planner), the dMoE network from the trainer's own builder with routers set by hand, a checkpoint as
    nnU-Net writes it (mirroring on). Images: the 4 test cases (one per level) and one case of unknown level."""
    import SimpleITK as sitk
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_dmoe.trainers.nnUNetTrainerDMoE import nnUNetTrainerDMoE

    root = tmp_path_factory.mktemp("routing")
    plans = json.loads((preprocessed_3d / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    plans["configurations"]["3d_fullres"]["dmoe"] = {"num_levels": 4, "attribute_channel": 1}  # as the trainer does
    folder = root / "results" / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    shutil.copy(preprocessed_3d / "raw" / DATASET / "dataset.json", folder / "dataset.json")
    pm = PlansManager(plans)
    torch.manual_seed(0)
    net = nnUNetTrainerDMoE.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 2, 2, False)
    set_routers_by_hand(net)
    torch.save({"network_weights": net.state_dict(), "trainer_name": TRAINER,
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               folder / "fold_0" / "checkpoint_final.pth")
    images = root / "images"
    shutil.copytree(preprocessed_3d / "raw" / DATASET / "imagesTs", images)
    first = sorted(images.glob("*_0000.nii.gz"))[0]
    shutil.copy(first, images / "nolevel_0000.nii.gz")
    channel = sitk.ReadImage(str(first).replace("_0000.nii.gz", "_0001.nii.gz"))
    zero = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(channel)))
    zero.CopyInformation(channel)
    sitk.WriteImage(zero, str(images / "nolevel_0001.nii.gz"))
    return root, folder, net


@pytest.fixture(scope="module")
def routing_out(model_folder, tmp_path_factory):
    """nnUNetv2_dmoe_routing_report on the model folder, through its command line."""
    root = model_folder[0]
    out = tmp_path_factory.mktemp("routing_report")
    env = nnunet_env(root, nnUNet_results=str(root / "results"))
    log = run(["nnUNetv2_dmoe_routing_report", "-i", str(root / "images"), "-o", str(out), "-d", "991",
               "-c", "3d_fullres", "-tr", TRAINER, "-device", "cpu", "--disable_progress_bar"], env)
    return out, log


def test_cli_reports_the_hand_set_routing_of_a_model_folder(model_folder, routing_out):
    root, folder, net = model_folder
    out, log = routing_out
    assert "encoder stage 0" in log and "JS between levels: mean 0.900, max 1.000" in log
    report = json.loads((out / "routing.json").read_text())
    assert (out / "routing.png").stat().st_size > 10_000
    assert report["model"]["routing"] == "dmoe" and report["model"]["top_k"] == 2
    assert report["model"]["folds"] == [0] and report["model"]["mirroring_axes"] == [0, 1, 2]
    levels = json.loads((folder / "dataset.json").read_text())["attribute"]["test_cases"]
    assert sorted(levels.values()) == LEVELS  # the generator gives each level one of the 4 test cases
    samples = report["input"]["network_forward_samples"]
    assert report["input"]["cases"] == 5 and samples % 8 == 0 and samples >= 5 * 8  # 8 mirrorings per window
    patch = np.array(json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]["patch_size"])
    stages = [m for m in net.moe if isinstance(m, DistributionAwareMoE)]
    assert [b["label"] for b in report["blocks"]] == [f"encoder stage {s}" for s in range(len(stages))]
    for b, stride in zip(report["blocks"], net.unet.encoder.strides):
        patch = patch // np.array(stride)
        per_window = int(np.prod(patch))
        rows = b["attributes"]["tstage"]
        assert sum(r["tokens"] for r in rows.values()) == samples * per_window
        for r, level in enumerate(LEVELS + ["unknown"]):
            assert rows[level]["tokens"] > 0 and rows[level]["tokens"] % (8 * per_window) == 0
            np.testing.assert_array_equal(rows[level]["fraction"], expected_fraction(r))
            assert rows[level]["mean_gate"][EXPERTS[r][0]] == pytest.approx(GATE, abs=1e-6)
        assert b["js_divergence"]["tstage"]["pairs"]["T1 | T2"] == pytest.approx(1.0)


def test_evaluate_puts_the_routing_into_its_report(preprocessed_3d, routing_out, tmp_path, capsys):
    import re

    from nnunet_dmoe.evaluation import evaluate_entry_point

    out, _ = routing_out
    raw = preprocessed_3d / "raw" / DATASET
    report = tmp_path / "report"
    evaluate_entry_point(["-ref", str(raw / "labelsTr"), "-pred", str(raw / "labelsTr"), "-l", "1", "-o",
                          str(report), "-dataset_json", str(raw / "dataset.json"), "-bootstrap", "0",
                          "-routing", str(out)])
    assert (report / "routing.png").read_bytes() == (out / "routing.png").read_bytes()
    md = (report / "report.md").read_text()
    assert md.startswith("# Fairness report") and "## Routing" in md and "![routing per level](routing.png)" in md
    assert "| encoder stage 0 | 32 | 0.900 / 1.000 | T1: 0 1; T2: 2 3; T3: 4 5; T4: 6 7; unknown: 0 7 |" in md
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        evaluate_entry_point(["-ref", str(raw / "labelsTr"), "-pred", str(raw / "labelsTr"), "-l", "1", "-o",
                              str(tmp_path / "r2"), "-dataset_json", str(raw / "dataset.json"), "-routing",
                              str(tmp_path)])
    assert e.value.code == 2
    assert re.search(rf"-routing {tmp_path}: no routing.json there.*nnUNetv2_dmoe_routing_report",
                     capsys.readouterr().err)
    assert not (tmp_path / "r2").exists()  # refused before the evaluation


def test_bad_inputs_name_the_file_and_the_fix(model_folder, tmp_path):
    from nnunet_dmoe.trainers.nnUNetTrainerNoAttribute import nnUNetTrainerNoAttribute
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    root, folder, _ = model_folder
    cpu = torch.device("cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=rf"{empty} holds no images ending in \.nii\.gz"):
        routing_report(str(empty), str(tmp_path / "o"), str(folder), device=cpu, progress=False)

    partial = tmp_path / "partial"
    shutil.copytree(root / "images", partial)
    (partial / "nolevel_0001.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"nolevel \(missing: nolevel_0001\.nii\.gz.*nnUNetv2_dmoe_attach_attribute"):
        routing_report(str(partial), str(tmp_path / "o"), str(folder), device=cpu, progress=False)

    with pytest.raises(ValueError, match=r"no checkpoint .*fold_1/checkpoint_final\.pth"):
        routing_report(str(root / "images"), str(tmp_path / "o"), str(folder), folds=[1], device=cpu, progress=False)

    blind = tmp_path / "blind"
    (blind / "fold_0").mkdir(parents=True)
    for f in ("plans.json", "dataset.json"):
        shutil.copy(folder / f, blind / f)
    pm = PlansManager(json.loads((blind / "plans.json").read_text()))
    net = nnUNetTrainerNoAttribute.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 2, 2, False)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainerNoAttribute",
                "init_args": {"configuration": "3d_fullres"}}, blind / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(ValueError, match=rf"The model {blind} \(trainer nnUNetTrainerNoAttribute\) has no \(d\)MoE"):
        routing_report(str(root / "images"), str(tmp_path / "o"), str(blind), device=cpu, progress=False)
