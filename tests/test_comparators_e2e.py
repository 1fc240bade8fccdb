"""The fairness comparators on a tiny 2D dataset of two levels (4 training cases each), planned by nnU-Net's CLI:
GroupDRO, FEBS, adversarial and FiLM trainers in nnU-Net's training loop (1 epoch x 5 iterations; logs, checkpoint,
resumed state; nnUNetv2_predict with the adversary's two-headed network), group-balanced loaders
built by nnU-Net's get_dataloaders, FEBS fine-tuning a baseline with nnUNetv2_train -pretrained_weights, and one
network per level through its CLIs (nnUNetv2_train per level with nnU-Net's final validation, prediction,
errors)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import nnunet_env, run
from nnunet_dmoe.data.attribute import AttributeSpec
from nnunet_dmoe.commands.per_level import level_splits

DATASET = "Dataset994_SyntheticFairness"
SIZE = (48, 48)


@pytest.fixture(scope="module")
def two_levels(tmp_path_factory):
    """Synthetic 2D dataset 994: levels L1/L2 (CTV margin 0/2), 8 training and 4 test cases, planned for 2d."""
    root = tmp_path_factory.mktemp("comparators")
    env = nnunet_env(root)
    run(["nnUNetv2_dmoe_make_synthetic", "-d", "994", "-dim", "2", "-num_train", "8", "-num_test", "4", "-size",
         *map(str, SIZE), "-seed", "4", "-proportions", "0.5", "0.5", "-margins", "0", "2"], env)
    run(["nnUNetv2_plan_and_preprocess", "-d", "994", "-c", "2d", "-np", "1", "-npfp", "1"], env)
    return root


def _train(root, trainer, monkeypatch, continue_training=False):
    """nnU-Net's training loop in this process (``get_trainer_from_args`` + ``run_training``, what nnUNetv2_train
    runs before its final validation, which the per-level test runs through the CLI); returns the trainer."""
    from nnunetv2.run.run_training import get_trainer_from_args
    for k, v in nnunet_env(root, nnUNet_n_proc_DA="0").items():
        monkeypatch.setenv(k, v)
    t = get_trainer_from_args("994", "2d", 0, trainer, continue_training=continue_training,
                              device=torch.device("cpu"))
    if not continue_training:
        t.run_training()
    return t


def _log(root, trainer):
    return "".join(p.read_text() for p in _model(root, trainer).glob("training_log_*.txt"))


def _model(root, trainer, fold=0):
    return root / "results" / DATASET / f"{trainer}__nnUNetPlans__2d" / f"fold_{fold}"


def _check_segmentations(folder, cases):
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{c}.png" for c in cases]
    for c in cases:
        seg = np.asarray(Image.open(folder / f"{c}.png"))
        assert seg.shape == SIZE and set(np.unique(seg)) <= {0, 1}


def _test_cases(root):
    return sorted(json.loads((root / "raw" / DATASET / "dataset.json").read_text())["attribute"]["test_cases"])


@pytest.mark.parametrize("name,log_line,keys", [
    ("GroupDRO", "GroupDRO weights q: L1 ", ["dro_weights", "dro_group_loss"]),
    ("FEBS", "FEBS mean group weight (present groups, all outputs): L1 ", ["febs_weights"]),
])
def test_group_loss_trainer(two_levels, monkeypatch, name, log_line, keys):
    trainer = f"nnUNetTrainer{name}_1epochs_5iters"
    _train(two_levels, trainer, monkeypatch)
    assert log_line in _log(two_levels, trainer)
    model = _model(two_levels, trainer)
    assert (model / "fairness_progress.png").is_file() and (model / "progress.png").is_file()
    ckpt = torch.load(model / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logged = ckpt["logging"]
    for key in keys:
        assert len(logged[key]) == 1 and len(logged[key][0]) == 2  # one epoch, two groups
        assert all(np.isfinite(logged[key][0]))
    if name == "GroupDRO":
        q = logged["dro_weights"][0]
        assert sum(q) == pytest.approx(1.0, abs=1e-5) and q != [0.5, 0.5]  # the weights moved
        # resuming (--c, --val) restores the weights from the checkpoint's log
        t = _train(two_levels, trainer, monkeypatch, continue_training=True)
        t.load_checkpoint(str(model / "checkpoint_final.pth"))
        torch.testing.assert_close(t.loss.q, torch.tensor(q))
    else:
        assert all(0 < w <= np.tanh(1.0) + 1e-6 for w in logged["febs_weights"][0])


def test_adversarial_trainer_and_nnunet_predict(two_levels, tmp_path, monkeypatch):
    trainer = "nnUNetTrainerAdversarial_1epochs_5iters"
    _train(two_levels, trainer, monkeypatch)
    assert "Attribute classifier accuracy (training samples of known level): " in _log(two_levels, trainer)
    model = _model(two_levels, trainer)
    ckpt = torch.load(model / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert any(k.startswith("adversary.") for k in ckpt["network_weights"])
    assert 0.0 <= ckpt["logging"]["adversary_accuracy"][0] <= 1.0
    # nnU-Net's own predictor builds the network from the trainer class, loads the checkpoint (classifier
    # included) and predicts with the segmentation head only
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(two_levels / "raw" / DATASET / "imagesTs"), "-o", str(out), "-d", "994",
         "-c", "2d", "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1",
         "--disable_progress_bar"], nnunet_env(two_levels))
    _check_segmentations(out, _test_cases(two_levels))


@pytest.mark.parametrize("name", ["GroupBalanced", "GroupDRO"])
def test_group_balanced_loaders_built_by_nnunet(two_levels, monkeypatch, name):
    """nnU-Net's own get_dataloaders (single-threaded augmenter) with the sampler: the training loader draws a case
    of group g with probability 1 / (G n_g), the validation loader uniformly; the log names the groups."""
    from nnunet_dmoe.trainers.seam.group_sampling import balanced_probabilities
    for k, v in nnunet_env(two_levels, nnUNet_n_proc_DA="0").items():
        monkeypatch.setenv(k, v)
    from nnunetv2.run.run_training import get_trainer_from_args
    t = get_trainer_from_args("994", "2d", 0, f"nnUNetTrainer{name}_1epochs_5iters", device=torch.device("cpu"))
    t.initialize()
    dl_tr, dl_val = (mt.data_loader for mt in t.get_dataloaders())
    keys = list(dl_tr.indices)
    attribute = json.loads((two_levels / "raw" / DATASET / "dataset.json").read_text())["attribute"]
    cases = attribute["cases"]
    expected = balanced_probabilities([cases[k] for k in keys])
    np.testing.assert_allclose(dl_tr.sampling_probabilities, expected)
    assert dl_val.sampling_probabilities is None
    n1 = sum(cases[k] == "L1" for k in keys)
    line = (f"Group-balanced sampling (groups of '{attribute['name']}'): L1 {n1} cases (p {1 / (2 * n1):.4g} each), "
            f"L2 {len(keys) - n1} cases")
    log = "".join(p.read_text() for p in _model(two_levels, f"nnUNetTrainer{name}_1epochs_5iters").glob("*.txt"))
    assert line in log


def test_film_trainer(two_levels, monkeypatch):
    """FiLM in nnU-Net's training loop: its gamma/beta (one row per level) are in the checkpoint and trained."""
    trainer = "nnUNetTrainerFiLM_1epochs_5iters"
    _train(two_levels, trainer, monkeypatch)
    weights = torch.load(_model(two_levels, trainer) / "checkpoint_final.pth", map_location="cpu",
                         weights_only=False)["network_weights"]
    gammas = {k: v for k, v in weights.items() if k.startswith("film.") and k.endswith(".gamma")}
    assert gammas and all(v.shape[0] == 2 for v in gammas.values())  # one row per level
    assert any(not torch.equal(v, torch.ones_like(v)) for v in gammas.values())  # trained away from identity


def _weights(state):
    """The network's parameters and buffers except nnU-Net's segmentation heads (which -pretrained_weights does
    not transfer), flattened."""
    return torch.cat([v.flatten().float() for k, v in sorted(state.items()) if ".seg_layers." not in k])


@pytest.mark.slow
def test_febs_fine_tunes_a_baseline(two_levels, monkeypatch):
    """FairSeg's FEBS fine-tunes a trained model: nnUNetv2_train -tr nnUNetTrainerFEBS -pretrained_weights <an
    nnUNetTrainerNoAttribute checkpoint of the same plans>. The baseline is trained on fold 1 (its own seed, so its
    weights differ from fold 0's initialisation) and FEBS fine-tunes fold 0: nnU-Net loads every weight but the
    segmentation heads, FEBS's loss runs, and the fine-tuned weights stay next to the baseline's, far from the
    initialisation FEBS would have started from."""
    env = nnunet_env(two_levels, nnUNet_n_proc_DA="0")
    # a FEBS schedule of its own (test_group_loss_trainer trains FEBS_1epochs_5iters in fold 0)
    baseline, febs = "nnUNetTrainerNoAttribute_1epochs_5iters", "nnUNetTrainerFEBS_1epochs_10iters"
    run(["nnUNetv2_train", "994", "2d", "1", "-tr", baseline, "-device", "cpu"], env)
    checkpoint = _model(two_levels, baseline, fold=1) / "checkpoint_final.pth"
    log = run(["nnUNetv2_train", "994", "2d", "0", "-tr", febs, "-device", "cpu", "-pretrained_weights",
               str(checkpoint)], env)
    assert any("Loading pretrained weights from file" in line and str(checkpoint) in line
               for line in log.splitlines())
    assert "FEBS mean group weight (present groups, all outputs): L1 " in log  # this run's training log
    tuned = torch.load(_model(two_levels, febs) / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert len(tuned["logging"]["febs_weights"]) == 1 and all(np.isfinite(tuned["logging"]["febs_weights"][0]))
    base = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]

    # what nnU-Net's run_training does before training: the FEBS network holds the baseline's weights exactly
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t = get_trainer_from_args("994", "2d", 0, febs, device=torch.device("cpu"))
    t.initialize()
    scratch = _weights(t.network.state_dict())
    maybe_load_checkpoint(t, False, False, str(checkpoint))
    torch.testing.assert_close(_weights(t.network.state_dict()), _weights(base), rtol=0, atol=0)
    moved, apart = (_weights(tuned["network_weights"]) - _weights(base)).norm(), (scratch - _weights(base)).norm()
    # measured: moved 1.06, apart 144 (norms over all weights)
    assert 0 < moved < 0.25 * apart, f"fine-tuning moved the weights by {moved:.3f}, a fresh start is {apart:.3f} away"


@pytest.mark.slow
def test_one_network_per_level(two_levels, tmp_path, monkeypatch):
    root = two_levels
    env = nnunet_env(root, nnUNet_n_proc_DA="0")
    trainer = "nnUNetTrainerNoAttribute_1epochs_5iters"
    own_split = root / "preprocessed" / DATASET / "splits_final.json"
    before = own_split.read_text() if own_split.exists() else None
    log = run(["nnUNetv2_dmoe_train_per_level", "994", "2d", "0", "-tr", trainer, "-device", "cpu"], env)
    # each level trained on its own cases: 3 of its 4 cases, 1 validates
    assert log.count("This split has 3 training and 1 validation cases.") >= 2
    row = next(line for line in log.splitlines() if line.startswith("| Parameters (M), all networks"))
    unet, per_level, _ = (float(v) for v in row.split("|")[2:5])
    assert per_level == pytest.approx(2 * unet, abs=0.011)
    dj = json.loads((root / "raw" / DATASET / "dataset.json").read_text())
    models = {}
    for i, level in enumerate(dj["attribute"]["levels"]):
        view = root / "preprocessed" / DATASET / "per_level" / f"{i}_{level}" / DATASET
        splits = json.loads((view / "splits_final.json").read_text())
        assert len(splits) == 4 and {dj["attribute"]["cases"][c] for s in splits for c in s["train"]} == {level}
        models[level] = (root / "results" / DATASET / "per_level" / f"{i}_{level}" / DATASET
                         / f"{trainer}__nnUNetPlans__2d")
        assert (models[level] / "fold_0" / "checkpoint_final.pth").is_file()
    assert (own_split.read_text() if own_split.exists() else None) == before  # the dataset's own split untouched

    images = root / "raw" / DATASET / "imagesTs"
    out = tmp_path / "pred"
    log = run(["nnUNetv2_dmoe_predict_per_level", "-i", str(images), "-o", str(out), "-d", "994", "-c", "2d",
               "-f", "0", "-tr", trainer, "-device", "cpu", "--sequential"], env)
    assert "Predicted 2 case(s) of L1, 2 case(s) of L2" in log
    cases = _test_cases(root)
    _check_segmentations(out, cases)

    # the same case predicted by nnU-Net's predictor with its level's model: identical
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    for k, v in nnunet_env(root).items():
        monkeypatch.setenv(k, v)
    case = next(c for c in cases if dj["attribute"]["test_cases"][c] == "L2")
    predictor = nnUNetPredictor(perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(models["L2"]), (0,), "checkpoint_final.pth")
    files = [str(images / f"{case}_{c:04d}.png") for c in range(2)]
    ref = predictor.predict_from_files_sequential([files], None, False, True)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out / f"{case}.png")), ref[0])

    # levels from a table instead of the channel; a case of unknown level is an error naming it
    from nnunet_dmoe.commands.per_level import predict_per_level
    single = tmp_path / "single"
    single.mkdir()
    for c in range(2):
        shutil.copy(images / f"{case}_{c:04d}.png", single / f"new_{c:04d}.png")
    chosen = predict_per_level(str(single), str(tmp_path / "pred_table"), "994", "2d", 0, trainer, device="cpu",
                               levels={"new": "L2"}, sequential=True)
    assert chosen == {"new": "L2"}
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pred_table" / "new.png")), ref[0])
    Image.fromarray(np.zeros(SIZE, np.uint8)).save(single / "new_0001.png")
    with pytest.raises(ValueError, match=r"1 case\(s\) have an unknown level: new"):
        predict_per_level(str(single), str(tmp_path / "pred_unknown"), "994", "2d", 0, trainer, device="cpu",
                          sequential=True)


def test_per_level_refuses_too_few_cases_and_missing_folds(two_levels, monkeypatch):
    with pytest.raises(AssertionError, match="nnUNetv2_dmoe_train_per_level: error") as e:
        run(["nnUNetv2_dmoe_train_per_level", "994", "2d", "0", "-min_cases", "5", "-device", "cpu"],
            nnunet_env(two_levels))
    assert "level 'L1' has 4 (" in str(e.value) and "level 'L2' has 4 (" in str(e.value)
    assert "Traceback" not in str(e.value)
    from nnunet_dmoe.commands.per_level import per_level_training_commands
    for k, v in nnunet_env(two_levels).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="fold 4 does not exist for level 'L1': its 4 training cases give a 4-fold"):
        per_level_training_commands("994", "2d", 4, "nnUNetTrainerNoAttribute")


def test_level_splits_name_every_small_level():
    spec = AttributeSpec(name="stage", levels=["T1", "T2", "T3"], channel=1,
                         cases={"a": "T1", "b": "T2", "c": "T2", "d": "T2", "e": None, "f": "T3"})
    with pytest.raises(ValueError) as e:
        level_splits(spec, list("abcdef"))
    assert "level 'T1' has 1 (a); level 'T3' has 1 (f)" in str(e.value)
    spec.cases.update(g="T1", h="T3")
    splits = level_splits(spec, list("abcdefgh"))
    assert [len(s) for s in splits.values()] == [2, 3, 2]  # K = min(5, cases); the unknown case e trains nothing
    assert sorted(splits[1][0]["train"] + splits[1][0]["val"]) == ["b", "c", "d"]


@pytest.mark.slow
def test_dmoe_upcycles_a_trained_baseline(two_levels, monkeypatch):
    """nnUNetv2_train -tr nnUNetTrainerDMoE -pretrained_weights <plain nnU-Net checkpoint of the same plans>: the
    U-Net's weights (segmentation layers included) load into the dMoE's U-Net and the blocks start as the identity,
    so before fine-tuning the dMoE predicts exactly what the baseline predicts."""
    env = nnunet_env(two_levels, nnUNet_n_proc_DA="0")
    baseline, dmoe = "nnUNetTrainerNoAttribute_1epochs_5iters", "nnUNetTrainerDMoE_2epochs_5iters"
    checkpoint = _model(two_levels, baseline, fold=1) / "checkpoint_final.pth"
    if not checkpoint.is_file():  # test_febs_fine_tunes_a_baseline trains it too
        run(["nnUNetv2_train", "994", "2d", "1", "-tr", baseline, "-device", "cpu"], env)

    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    base = get_trainer_from_args("994", "2d", 1, baseline, device=torch.device("cpu"))
    base.initialize()
    base.network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"])
    t = get_trainer_from_args("994", "2d", 0, dmoe, device=torch.device("cpu"))
    t.initialize()
    maybe_load_checkpoint(t, False, False, str(checkpoint))  # what nnUNetv2_train runs for -pretrained_weights
    x = torch.randn(2, 2, *t.configuration_manager.patch_size)
    x[:, 1] = torch.tensor([1.0, 2.0])[:, None, None]  # levels L1, L2
    base.network.eval(), t.network.eval()
    with torch.no_grad():
        for a, b in zip(t.network(x), base.network(x)):  # every deep-supervision output
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    log = run(["nnUNetv2_train", "994", "2d", "0", "-tr", dmoe, "-device", "cpu", "-pretrained_weights",
               str(checkpoint)], env)
    assert "Upcycled the nnU-Net U-Net of" in log and "every (d)MoE block starts as the identity" in log
    tuned = torch.load(_model(two_levels, dmoe) / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    w2 = [v for k, v in tuned["network_weights"].items() if k.endswith("experts.w2")]
    assert w2 and all(v.abs().sum() > 0 for v in w2)  # fine-tuning moved the experts away from zero
