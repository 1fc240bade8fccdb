"""nnU-Net's real CLIs on a tiny synthetic 3D dataset: plan/preprocess, train, resume, validate, predict; and the
trainer's checks of the attribute block against the preprocessed data."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import nnunet_env, run

TRAINER = "nnUNetTrainerDMoE_1epochs_5iters"


def _load(root, name):
    with open(root / "preprocessed" / "Dataset991_SyntheticFairness" / name) as f:
        return json.load(f)


def _trainer(root, monkeypatch, dataset_json=None, cls="nnUNetTrainerDMoE"):
    for k, v in nnunet_env(root).items():
        monkeypatch.setenv(k, v)
    import nnunet_dmoe.trainers as trainers
    plans = _load(root, "nnUNetPlans.json")
    plans["continue_training"] = False
    dj = dataset_json if dataset_json is not None else _load(root, "dataset.json")
    return getattr(trainers, cls)(plans, "3d_fullres", 0, dj, torch.device("cpu"))


def test_trainer_found_in_a_clean_shell():
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
            "c = f('nnUNetTrainerDMoE_5epochs'); print(c.__module__, c.num_epochs if hasattr(c, 'num_epochs') else '')")
    p = subprocess.run(["env", "-i", f"PATH={os.path.dirname(sys.executable)}", sys.executable, "-c", code],
                       capture_output=True, text=True, cwd="/", timeout=300)
    assert p.returncode == 0, p.stderr
    assert "nnunet_dmoe.trainers.training_length" in p.stdout


def test_train_resume_validate_predict(preprocessed_3d, tmp_path):
    root = preprocessed_3d
    env = nnunet_env(root, nnUNet_n_proc_DA="0")
    log = run(["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"], env)
    assert "dataset.json and the attribute channel agree for all 10 cases" in log
    model = root / "results" / "Dataset991_SyntheticFairness" / f"{TRAINER}__nnUNetPlans__3d_fullres"
    plans = json.loads((model / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert arch["dmoe_num_levels"] == 4 and arch["dmoe_attribute_channel"] == 1  # the model folder is self-contained
    ckpt = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert any(k.startswith("moe.0.experts.w1") for k in ckpt["network_weights"])
    assert (model / "fold_0" / "validation" / "summary.json").is_file()

    # resume (--c) from the final checkpoint, then validation only (--val)
    log = run(["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu", "--c"], env)
    assert "checkpoint_final.pth" in log or "Training done" in log
    os.remove(model / "fold_0" / "validation" / "summary.json")
    run(["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu", "--val"], env)
    summary = json.loads((model / "fold_0" / "validation" / "summary.json").read_text())
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0

    # nnU-Net's own predictor on the test images (attribute channel included)
    images = root / "raw" / "Dataset991_SyntheticFairness" / "imagesTs"
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", "991", "-c", "3d_fullres", "-tr", TRAINER,
         "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"], env)
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz"))
    assert len(cases) == 4
    for case in cases:
        ref = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
        pred = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert pred.GetSize() == ref.GetSize() and pred.GetSpacing() == ref.GetSpacing()
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1}


def test_trainer_records_levels_in_plans_before_init(preprocessed_3d, monkeypatch):
    t = _trainer(preprocessed_3d, monkeypatch)
    kw = t.configuration_manager.network_arch_init_kwargs
    assert kw["dmoe_num_levels"] == 4 and kw["dmoe_attribute_channel"] == 1
    assert t.my_init_kwargs["plans"]["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"][
        "dmoe_num_levels"] == 4
    # the batch's case keys give the levels; hidden ones become unknown (0)
    cases = list(t.attribute.cases)[:4]
    data = torch.zeros(4, 2, 3, 3, 3)
    data = t.write_attribute_channel(data, cases, hide_rate=0.0)
    expected = [t.attribute.levels.index(t.attribute.cases[c]) + 1 for c in cases]
    assert data[:, 1, 0, 0, 0].tolist() == expected and (data[:, 1] == data[:, 1, :1, :1, :1]).all()
    hidden = t.write_attribute_channel(torch.zeros(200, 2, 1, 1, 1), [cases[0]] * 200, hide_rate=0.25)
    assert 20 < int((hidden[:, 1] == 0).sum()) < 80


@pytest.mark.parametrize("edit,message", [
    (lambda dj: dj.pop("attribute"), "has no 'attribute' block"),
    (lambda dj: dj["attribute"]["cases"].update(syn_0000="T9"), r"syn_0000 \('T9'\)"),
    (lambda dj: dj["channel_names"].update({"1": "zscore"}), "must be 'noNorm'"),
])
def test_bad_attribute_block_stops_the_trainer(preprocessed_3d, monkeypatch, edit, message):
    dj = _load(preprocessed_3d, "dataset.json")
    edit(dj)
    with pytest.raises(ValueError, match=message):
        _trainer(preprocessed_3d, monkeypatch, dj)


def test_start_check_names_every_disagreeing_or_missing_case(preprocessed_3d, monkeypatch):
    dj = _load(preprocessed_3d, "dataset.json")
    cases = dj["attribute"]["cases"]
    original = cases["syn_0001"]
    cases["syn_0001"] = next(lv for lv in dj["attribute"]["levels"] if lv != original)
    cases["syn_0002"] = None
    del cases["syn_0003"]
    t = _trainer(preprocessed_3d, monkeypatch, dj)
    t.initialize()
    with pytest.raises(ValueError) as e:
        t.check_attribute_channel()
    msg = str(e.value)
    assert "3 case(s)" in msg
    assert f"syn_0001: dataset.json says {cases['syn_0001']}, the channel holds {original}" in msg
    assert "syn_0002: dataset.json says unknown" in msg
    assert "syn_0003: missing from attribute.cases" in msg


def test_start_check_rejects_out_of_range_codes(preprocessed_3d, monkeypatch):
    dj = _load(preprocessed_3d, "dataset.json")
    # pretend the dataset had only two levels: cases coded 3 or 4 decode out of range
    dj["attribute"]["levels"] = dj["attribute"]["levels"][:2]
    for key in ("cases", "test_cases"):
        dj["attribute"][key] = {k: (v if v in dj["attribute"]["levels"] else None)
                                for k, v in dj["attribute"][key].items()}
    t = _trainer(preprocessed_3d, monkeypatch, dj)
    t.initialize()
    with pytest.raises(ValueError, match="decodes to code [34].*only 2 levels"):
        t.check_attribute_channel()
