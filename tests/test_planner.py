"""dMoE-aware planners and nnUNetv2_dmoe_plan_and_preprocess."""
import json
import os

import numpy as np
import pytest

from conftest import nnunet_env, run


@pytest.fixture()
def env(preprocessed_3d, monkeypatch):
    for k, v in nnunet_env(preprocessed_3d).items():
        monkeypatch.setenv(k, v)
    return preprocessed_3d


def _plan(planner_cls, shape):
    planner = planner_cls(991)
    return planner.get_plans_for_configuration((1.0, 1.0, 1.0), shape, "x", 1e12, {})


@pytest.mark.parametrize("resenc", [False, True])
def test_dmoe_planner_leaves_room_for_experts(env, resenc):
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import \
        nnUNetPlannerResEncM
    from nnunet_dmoe.planners import nnUNetPlannerDMoE, nnUNetPlannerResEncMDMoE
    base_cls, dmoe_cls = (nnUNetPlannerResEncM, nnUNetPlannerResEncMDMoE) if resenc else \
        (ExperimentPlanner, nnUNetPlannerDMoE)
    shape = np.array([300, 300, 300])
    base, dmoe = _plan(base_cls, shape), _plan(dmoe_cls, shape)
    voxels = lambda p: np.prod(p["patch_size"]) * p["batch_size"]
    # the experts' activations cost memory: a smaller patch x batch, or (ResEnc-M, whose blocks all sit at stride 2 and
    # below) the same one, nnU-Net's steps being coarse
    assert voxels(dmoe) < voxels(base) or (resenc and voxels(dmoe) == voxels(base))
    block = dmoe["dmoe"]
    assert block["num_experts"] == 8 and block["top_k"] == 2 and block["num_levels"] == 4
    assert "mode" not in block and "dmoe" not in base
    # nothing of the dMoE in arch_kwargs: nnU-Net's own trainers can build the plans' U-Net
    assert not any(k.startswith("dmoe") for k in dmoe["architecture"]["arch_kwargs"])
    # the estimate is the network's own count: U-Net + dMoE activations
    planner = dmoe_cls(991)
    arch = base["architecture"]
    est_base = base_cls.static_estimate_VRAM_usage(tuple(dmoe["patch_size"]), 1, 2, arch["network_class_name"],
                                                   arch["arch_kwargs"], arch["_kw_requires_import"])
    est = planner.static_estimate_VRAM_usage(tuple(dmoe["patch_size"]), 2, 2, arch["network_class_name"],
                                             arch["arch_kwargs"], arch["_kw_requires_import"])
    # exactly the blocks after the stages that downsample (DistributionAwareMoE.compute_conv_feature_map_size)
    kw, size, extra = arch["arch_kwargs"], np.array(dmoe["patch_size"]), 0
    for c, stride in zip(kw["features_per_stage"], kw["strides"]):
        size = size // np.array(stride)
        if np.any(np.array(stride) != 1):
            extra += np.prod(size) * (c + 2 * c + 2 * c + 3 * 8 + 2 * 2)
    assert est - est_base == extra > 0


# half a minute: CI runs it with the slow checks, so that make test stays under 15 minutes
@pytest.mark.slow
def test_plan_and_preprocess_command_and_trainer_reads_settings(env):
    out = run(["nnUNetv2_dmoe_plan_and_preprocess", "-d", "991", "-c", "3d_fullres", "-np", "1"], nnunet_env(env))
    assert "plans 'nnUNetDMoEPlans'" in out
    folder = env / "preprocessed" / "Dataset991_SyntheticFairness"
    plans = json.loads((folder / "nnUNetDMoEPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["data_identifier"] == "nnUNetPlans_3d_fullres"  # preprocessing reused
    assert cfg["dmoe"]["expert_ratio"] == 4
    assert not any(k.startswith("dmoe") for k in cfg["architecture"]["arch_kwargs"])


def test_plan_and_preprocess_checks_attribute_first(env, tmp_path):
    import shutil
    src = env / "raw" / "Dataset991_SyntheticFairness"
    raw = tmp_path / "raw"
    dst = raw / "Dataset993_Broken"
    shutil.copytree(src, dst)
    os.remove(dst / "imagesTr" / "syn_0004_0001.nii.gz")
    dj = json.loads((dst / "dataset.json").read_text())
    del dj["attribute"]["cases"]["syn_0005"]
    (dst / "dataset.json").write_text(json.dumps(dj))
    from nnunet_dmoe.planners.entry_points import check_raw_dataset
    os.environ["nnUNet_raw"] = str(raw)
    with pytest.raises(ValueError) as e:
        check_raw_dataset(993)
    msg = str(e.value)
    assert "2 problem(s)" in msg and "syn_0005: missing from attribute.cases" in msg
    assert "syn_0004: no attribute-channel file syn_0004_0001.nii.gz" in msg
