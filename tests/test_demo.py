"""The demo's plans variants and training times: what its benchmark rows train."""
import json
import os

import pytest
import torch
from torch import nn

from nnunet_dmoe.commands.demo import FINE_TUNED_FROM, PLANS_VARIANTS, epochs_of, plans_of, write_plans_variant
from nnunet_dmoe.commands.demo_report import training_seconds, write_training_times


def _network(plans_file, dataset_json_file):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_dmoe.data.attribute import attribute_specs_from_dataset_json
    from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import with_attribute_settings
    from nnunet_dmoe.trainers.nnUNetTrainerDMoE import nnUNetTrainerDMoE

    with open(plans_file) as f, open(dataset_json_file) as g:
        plans, dataset_json = json.load(f), json.load(g)
    plans = with_attribute_settings(plans, "3d_fullres", attribute_specs_from_dataset_json(dataset_json))
    pm = PlansManager(plans)
    torch.manual_seed(0)
    return nnUNetTrainerDMoE.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 2, 2, False)


def test_plans_variants_change_only_their_setting(preprocessed_3d):
    folder = preprocessed_3d / "preprocessed" / "Dataset991_SyntheticFairness"
    dataset_json = folder / "dataset.json"
    default = _network(folder / "nnUNetPlans.json", dataset_json)
    paths = {m: write_plans_variant(str(folder / "nnUNetPlans.json"), *PLANS_VARIANTS[m])
             for m in ("dMoE-all-stages", "dMoE-zero-router")}
    try:
        with open(paths["dMoE-all-stages"]) as f:
            plans = json.load(f)
        assert plans["plans_name"] == "nnUNetPlans_allStages"
        assert os.path.basename(paths["dMoE-zero-router"]) == "nnUNetPlans_routerZero.json"
        # the same preprocessed data
        assert plans["configurations"]["3d_fullres"]["data_identifier"] == "nnUNetPlans_3d_fullres"

        # the default: no block at full resolution, routers as nn.Linear (a bias, non-zero weights)
        assert isinstance(default.moe[0], nn.Identity) and not isinstance(default.moe[1], nn.Identity)
        assert default.moe[1].router.b_gate is not None and default.moe[1].router.w_gate.abs().sum() > 0

        all_stages = _network(paths["dMoE-all-stages"], dataset_json)
        assert not any(isinstance(m, nn.Identity) for m in all_stages.moe)
        assert all_stages.moe[1].router.b_gate is not None

        zero = _network(paths["dMoE-zero-router"], dataset_json)
        assert isinstance(zero.moe[0], nn.Identity)
        assert zero.moe[1].router.b_gate is None and zero.moe[1].router.w_gate.abs().sum() == 0
    finally:
        for p in paths.values():
            os.remove(p)


def test_plans_of_and_epochs_of():
    assert plans_of("dMoE") == "nnUNetDMoEPlans"
    assert plans_of("dMoE-all-stages") == "nnUNetDMoEPlans_allStages"
    assert plans_of("dMoE-upcycled") == "nnUNetDMoEPlans_upcycled"  # its own model folder
    assert epochs_of("dMoE", 10) == 10 and epochs_of("dMoE-upcycled", 10) == 5 and epochs_of("dMoE-upcycled", 1) == 1
    assert FINE_TUNED_FROM["dMoE-upcycled"] == FINE_TUNED_FROM["FEBS"] == "Baseline"


def test_training_time_is_the_sum_of_epoch_times(tmp_path):
    for name, (starts, ends) in {"a": ([0.0, 10.0], [4.0, 13.5]), "b": ([5.0], [7.0])}.items():
        (tmp_path / name).mkdir()
        torch.save({"logging": {"epoch_start_timestamps": starts, "epoch_end_timestamps": ends}},
                   tmp_path / name / "checkpoint_final.pth")
    assert training_seconds(str(tmp_path / "a")) == pytest.approx(7.5)
    write_training_times({"one": [str(tmp_path / "a")], "per level": [str(tmp_path / "a"), str(tmp_path / "b")]},
                         str(tmp_path / "times.md"))
    rows = (tmp_path / "times.md").read_text().splitlines()[-2:]
    assert rows == ["| one | 8 |", "| per level | 10 |"]
