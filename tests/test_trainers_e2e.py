"""nnU-Net's real CLIs on a tiny synthetic 3D dataset: plan/preprocess, train, resume, validate, predict; and the
trainer's checks of the attribute block against the preprocessed data."""
import json
import os
import shutil
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
    assert "nnunet_dmoe.trainers.seam.training_length" in p.stdout


# over a minute of training on two cores: CI runs it with the slow checks, so make test stays under 15 minutes
@pytest.mark.slow
def test_train_resume_validate_predict(preprocessed_3d, tmp_path):
    root = preprocessed_3d
    env = nnunet_env(root, nnUNet_n_proc_DA="0")
    # the trainers' CPU memory setting on, as for users (conftest turns it off for the other tests)
    log = run(["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"],
              dict(env, NNUNET_DMOE_KEEP_FREED_MEMORY="1"))
    assert "dataset.json and the attribute channel agree for all 10 cases" in log
    assert "CPU memory: glibc keeps freed memory for reuse" in log  # nnunet_dmoe.trainers.seam.cpu_memory
    model = root / "results" / "Dataset991_SyntheticFairness" / f"{TRAINER}__nnUNetPlans__3d_fullres"
    plans = json.loads((model / "plans.json").read_text())
    block = plans["configurations"]["3d_fullres"]["dmoe"]
    assert block["num_levels"] == 4 and block["attribute_channel"] == 1  # the model folder is self-contained
    ckpt = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    # the paper's placement: the first block after stage 1 (the first that downsamples), none at stage 0
    assert any(k.startswith("moe.1.experts.w1") for k in ckpt["network_weights"])
    assert not any(k.startswith("moe.0.") for k in ckpt["network_weights"])
    assert (model / "fold_0" / "validation" / "summary.json").is_file()

    # resume (--c) from the final checkpoint, then validation only (--val)
    log = run(["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu", "--c"], env)
    assert "checkpoint_final.pth" in log or "Training done" in log
    os.remove(model / "fold_0" / "validation" / "summary.json")
    run(["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu", "--val"], env)
    summary = json.loads((model / "fold_0" / "validation" / "summary.json").read_text())
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0
    assert "cases" not in json.loads((model / "dataset.json").read_text())["attribute"]  # --c and --val without it

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
    block = t.configuration_manager.configuration["dmoe"]
    assert block["num_levels"] == 4 and block["attribute_channel"] == 1
    assert t.my_init_kwargs["plans"]["configurations"]["3d_fullres"]["dmoe"]["num_levels"] == 4
    assert not any(k.startswith("dmoe") for k in t.configuration_manager.network_arch_init_kwargs)


def test_batch_hook_writes_clean_codes_inside_the_footprint(preprocessed_3d, monkeypatch):
    t = _trainer(preprocessed_3d, monkeypatch)
    cases = list(t.attribute.cases)[:4]
    expected = [t.attribute.levels.index(t.attribute.cases[c]) + 1 for c in cases]
    # an augmented channel: footprint in the first half (blurred, noisy values), background in the second
    data = torch.zeros(4, 2, 4, 3, 3)
    data[:, 1, :2] = torch.tensor([0.7, 1.9, 3.3, 2.2]).view(4, 1, 1, 1)
    data[:, 1, 2:] = 0.3
    batch = t.prepare_attribute({"data": data, "keys": cases}, train=False)
    assert batch["attribute"].tolist() == [e - 1 for e in expected]
    assert (batch["data"][:, 1, :2] == torch.tensor(expected, dtype=torch.float).view(4, 1, 1, 1)).all()
    assert (batch["data"][:, 1, 2:] == 0).all()
    # in training a share of the samples is shown as unknown (channel 0), their level stays in batch["attribute"]
    data = torch.ones(200, 2, 1, 1, 1)
    batch = t.prepare_attribute({"data": data, "keys": [cases[0]] * 200}, train=True)
    hidden = int((batch["data"][:, 1] == 0).sum())
    assert 5 < hidden < 40 and (batch["attribute"] == expected[0] - 1).all()
    assert t.prepare_attribute({"data": torch.ones(200, 2, 1, 1, 1), "keys": [cases[0]] * 200},
                               train=False)["data"][:, 1].eq(expected[0]).all()


def test_intensity_augmentation_leaves_the_attribute_channel_alone(preprocessed_3d, monkeypatch):
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    t = _trainer(preprocessed_3d, monkeypatch, cls="nnUNetTrainerAttributeChannel")
    t.initialize()
    rot, dummy_2d, initial_patch, mirror = t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    pipeline = t.get_training_transforms(t.configuration_manager.patch_size, rot, None, mirror, dummy_2d,
                                         use_mask_for_norm=t.configuration_manager.use_mask_for_norm,
                                         is_cascaded=False, foreground_labels=t.label_manager.foreground_labels,
                                         regions=None, ignore_label=None)
    names = [type(getattr(x, "transform", x)).__name__ for x in pipeline.transforms]
    assert names.index("StashChannel") < names.index("GaussianNoiseTransform") < names.index("GammaTransform") \
        < names.index("RestoreChannel")
    # strong noise on every channel: the image changes, the attribute channel does not
    torch.manual_seed(0)
    image = torch.zeros(2, 8, 8, 8)
    image[1, 2:6, 2:6, 2:6] = 3.0
    i, j = names.index("StashChannel"), names.index("RestoreChannel")
    noise = GaussianNoiseTransform(noise_variance=(1.0, 1.0), p_per_channel=1.0)
    out = pipeline.transforms[i](image=image.clone())
    out = noise(**out)
    out = pipeline.transforms[j](**out)
    assert out["image"][0].abs().sum() > 0 and torch.equal(out["image"][1], image[1])


def test_plain_nnunet_trainer_builds_a_working_baseline_from_dmoe_plans(preprocessed_3d, monkeypatch):
    """nnU-Net's own nnUNetTrainer on nnUNetDMoEPlans: the plans' U-Net over all channels (attribute as input)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_dmoe.planners import nnUNetPlannerDMoE
    for k, v in nnunet_env(preprocessed_3d).items():
        monkeypatch.setenv(k, v)
    planner = nnUNetPlannerDMoE(991)
    planner.plan_experiment()
    plans = _load(preprocessed_3d, "nnUNetDMoEPlans.json")
    assert plans["configurations"]["3d_fullres"]["dmoe"]["num_experts"] == 8
    cm = PlansManager(plans).get_configuration("3d_fullres")
    net = nnUNetTrainer.build_network_architecture(PlansManager(plans), cm, 2, 2, False)
    assert type(net).__name__ == "PlainConvUNet"
    assert net(torch.zeros(1, 2, *cm.patch_size)).shape == (1, 2, *cm.patch_size)


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


def test_cpu_trainer_sgd_is_fused_and_updates_as_nnunets(preprocessed_3d, monkeypatch):
    t = _trainer(preprocessed_3d, monkeypatch)
    t.initialize()
    assert t.optimizer.param_groups and all(g["fused"] for g in t.optimizer.param_groups)
    params = list(t.network.parameters())
    start = [p.detach().clone() for p in params]
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    ref_opt = torch.optim.SGD(ref, t.initial_lr, weight_decay=t.weight_decay, momentum=0.99, nesterov=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # momentum buffers built and used
        for p, r in zip(params, ref):
            p.grad = torch.randn(p.shape, generator=g)
            r.grad = p.grad.clone()
        t.optimizer.step()
        ref_opt.step()
    # the same update; a float rounding apart at most (the fused kernel's scalar tail may use FMA)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-8)
    assert not all(torch.equal(p.detach(), s) for p, s in zip(params, start))


def test_no_unknown_trainer_is_the_papers_setting(preprocessed_3d, monkeypatch):
    """nnUNetTrainerDMoE_noUnknown: one router per level (4, no unknown router), nothing hidden in training, and an
    unknown attribute refused in training data and at prediction."""
    from nnunet_dmoe.method.dmoe import DistributionAwareMoE

    t = _trainer(preprocessed_3d, monkeypatch, cls="nnUNetTrainerDMoE_noUnknown")
    assert t.unknown_attribute_rate == 0.0
    t.initialize()
    blocks = [m for m in t.network.modules() if isinstance(m, DistributionAwareMoE)]
    assert blocks and all(b.router.w_gate.shape[0] == 4 for b in blocks)
    case = list(t.attribute.cases)[0]
    data = torch.ones(50, 2, 1, 1, 1)
    assert t.prepare_attribute({"data": data, "keys": [case] * 50}, train=True)["data"][:, 1].ne(0).all()
    x = torch.rand(2, 2, *t.configuration_manager.patch_size)
    x[:, 1] = torch.tensor([2.0, 0.0]).view(2, 1, 1, 1)  # the second case has no attribute
    with pytest.raises(ValueError, match=r"has no attribute .* no router for an unknown attribute .*"
                                         r"nnUNetTrainerDMoE, which has a router for unknown"):
        with torch.no_grad():
            t.network.eval()(x)
    dj = _load(preprocessed_3d, "dataset.json")
    dj["attribute"]["cases"]["syn_0002"] = None
    with pytest.raises(ValueError, match=r"needs the attribute of every training case, but 1 are unknown in "
                                         r"dataset.json: syn_0002 \(tstage\)\. .*train nnUNetTrainerDMoE"):
        _trainer(preprocessed_3d, monkeypatch, dj, cls="nnUNetTrainerDMoE_noUnknown")


@pytest.mark.slow
def test_strip_attribute_table_of_an_earlier_model_folder(preprocessed_3d, tmp_path):
    """A model folder as version 0.2 wrote it (the dataset's attribute table in dataset.json, in each checkpoint's
    init_args and in debug.json): nnUNetv2_dmoe_strip_attribute_table removes every table, and the folder still
    predicts as before."""
    from nnunet_dmoe.data.model_folder import attribute_table_entries

    root = preprocessed_3d
    env = nnunet_env(root, nnUNet_n_proc_DA="0")
    model = root / "results" / "Dataset991_SyntheticFairness" / f"{TRAINER}__nnUNetPlans__3d_fullres"
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        run(["nnUNetv2_train", "991", "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"], env)
    old = tmp_path / "old_model"
    shutil.copytree(model, old)
    raw_json = json.loads((root / "raw" / "Dataset991_SyntheticFairness" / "dataset.json").read_text())
    entries = attribute_table_entries(raw_json)
    assert len(entries) == 14
    (old / "dataset.json").write_text(json.dumps(raw_json))
    checkpoints = sorted((old / "fold_0").glob("*.pth"))
    assert old / "fold_0" / "checkpoint_final.pth" in checkpoints
    for path in checkpoints:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        ckpt["init_args"]["dataset_json"] = raw_json
        torch.save(ckpt, path)
    debug = json.loads((old / "fold_0" / "debug.json").read_text())
    debug["dataset_json"] = str(raw_json)
    (old / "fold_0" / "debug.json").write_text(json.dumps(debug))

    out = run(["nnUNetv2_dmoe_strip_attribute_table", str(old)], env)
    assert out.count("stripped ") == 2 + len(checkpoints)  # dataset.json, the checkpoints, debug.json
    for path in old.rglob("*"):
        if path.suffix == ".json":
            assert not [e for e in entries if e in path.read_text()], path
        elif path.suffix == ".pth":
            dj = torch.load(path, map_location="cpu", weights_only=False)["init_args"]["dataset_json"]
            assert attribute_table_entries(dj) == [] and dj["attribute"]["levels"] == raw_json["attribute"]["levels"]
    assert "nothing changed" in run(["nnUNetv2_dmoe_strip_attribute_table", str(old)], env)

    images = root / "raw" / "Dataset991_SyntheticFairness" / "imagesTs"
    for folder, pred in ((model, tmp_path / "a"), (old, tmp_path / "b")):
        run(["nnUNetv2_predict_from_modelfolder", "-i", str(images), "-o", str(pred), "-m", str(folder), "-f", "0",
             "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"], env)
    for f in sorted((tmp_path / "a").glob("*.nii.gz")):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(f))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b" / f.name))))
