"""nnU-Net's real CLIs on a tiny synthetic 2D (PNG) dataset: plan/preprocess, train the dMoE trainer, predict with
nnUNetv2_predict; then the user's loop for new cases (image only -> nnUNetv2_dmoe_attach_attribute from a table ->
nnUNetv2_predict), which must give exactly the prediction of the same image with the generator's attribute channel.
Also the ResEnc-M planner with the dMoE trainer, and the attribute channel under nnU-Net's 2D resampling."""
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import nnunet_env, run

DATASET = "Dataset992_SyntheticFairness"
TRAINER = "nnUNetTrainerDMoE_1epochs_5iters"
SIZE = (48, 48)


def _env(root, **extra):
    """nnU-Net's variables for this root. OpenMP threads sleep instead of spinning while they wait: nnU-Net sets torch
    to all cores on CPU, and with spinning threads a step on this small CPU slows down ~50x whenever another
    process is busy (measured: 7.7 s vs 0.15 s for a 40x40 forward+backward); results are the same."""
    return nnunet_env(root, OMP_WAIT_POLICY="PASSIVE", **extra)


@pytest.fixture(scope="module")
def dataset_2d(tmp_path_factory):
    """Synthetic 2D dataset 992 (10 train / 4 test, 48x48 PNG), planned and preprocessed for 2d by nnU-Net."""
    root = tmp_path_factory.mktemp("nnunet2d")
    env = _env(root)
    run(["nnUNetv2_dmoe_make_synthetic", "-d", "992", "-dim", "2", "-num_train", "10", "-num_test", "4",
         "-size", *map(str, SIZE), "-seed", "2"], env)
    run(["nnUNetv2_plan_and_preprocess", "-d", "992", "-c", "2d", "-np", "1", "-npfp", "1"], env)
    return root


def _dataset_json(root):
    return json.loads((root / "raw" / DATASET / "dataset.json").read_text())


def _predict(env, src, out, plans="nnUNetPlans"):
    run(["nnUNetv2_predict", "-i", str(src), "-o", str(out), "-d", "992", "-c", "2d", "-tr", TRAINER, "-p", plans,
         "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar", "--save_probabilities"], env)


# two minutes and more of training on two cores: CI runs it with the slow checks, so make test stays under 15 minutes
@pytest.mark.slow
def test_train_predict_and_attach_round_trip(dataset_2d, tmp_path):
    root = dataset_2d
    env = _env(root)
    log = run(["nnUNetv2_train", "992", "2d", "0", "-tr", TRAINER, "-device", "cpu"],
              _env(root, nnUNet_n_proc_DA="0"))
    # the trainer's start check: every preprocessed (cropped, normalised) case decodes to its dataset.json level
    assert "dataset.json and the attribute channel agree for all 10 cases" in log
    model = root / "results" / DATASET / f"{TRAINER}__nnUNetPlans__2d"
    cfg = json.loads((model / "plans.json").read_text())["configurations"]["2d"]
    assert cfg["architecture"]["network_class_name"].endswith("PlainConvUNet")
    assert cfg["dmoe"]["num_levels"] == 4 and cfg["dmoe"]["attribute_channel"] == 1
    ckpt = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    # the paper's placement: the first block after stage 1 (the first that downsamples), none at stage 0
    assert any(k.startswith("moe.1.experts.w1") for k in ckpt["network_weights"])
    assert not any(k.startswith("moe.0.") for k in ckpt["network_weights"])
    assert (model / "fold_0" / "validation" / "summary.json").is_file()

    # New cases: the test images without their attribute channel, under new names, plus one of unknown attribute.
    # nnUNetv2_dmoe_attach_attribute writes the channel from a CSV table into the prediction folder (-o), next to
    # the original test cases with the generator's channel; one nnUNetv2_predict call predicts all of them.
    dj = _dataset_json(root)
    test_levels = dj["attribute"]["test_cases"]
    images_ts = root / "raw" / DATASET / "imagesTs"
    cases = sorted(p.name[: -len("_0000.png")] for p in images_ts.glob("*_0000.png"))
    assert cases == sorted(test_levels) and len(cases) == 4
    new = tmp_path / "new"
    new.mkdir()
    for case in cases:
        shutil.copy(images_ts / f"{case}_0000.png", new / f"new_{case}_0000.png")
    shutil.copy(images_ts / f"{cases[0]}_0000.png", new / "unknown_case_0000.png")
    table = tmp_path / "levels.csv"
    table.write_text("patient,tstage\n" + "".join(f"new_{c},{test_levels[c]}\n" for c in cases) + "unknown_case,\n")
    pred_in = tmp_path / "pred_in"
    shutil.copytree(images_ts, pred_in)
    out = run(["nnUNetv2_dmoe_attach_attribute", "-i", str(new), "-t", str(table), "-id_column", "patient",
               "-attribute_column", "tstage", "-d", "992", "-o", str(pred_in)], env)
    assert "unknown_case: unknown" in out
    for case in cases:  # the tool writes the channel the generator wrote
        np.testing.assert_array_equal(np.asarray(Image.open(pred_in / f"new_{case}_0001.png")),
                                      np.asarray(Image.open(images_ts / f"{case}_0001.png")))
    assert not np.asarray(Image.open(pred_in / "unknown_case_0001.png")).any()

    pred = tmp_path / "pred"
    _predict(env, pred_in, pred)
    assert sorted(p.name for p in pred.glob("*.png")) == sorted(
        [f"{c}.png" for c in cases] + [f"new_{c}.png" for c in cases] + ["unknown_case.png"])
    for f in pred.glob("*.png"):
        seg = np.asarray(Image.open(f))
        assert seg.shape == SIZE and set(np.unique(seg)) <= {0, 1}
    for case in cases:
        a, b = (np.asarray(Image.open(pred / f"{c}.png")) for c in (case, f"new_{case}"))
        np.testing.assert_array_equal(a, b)
        pa, pb = (np.load(pred / f"{c}.npz")["probabilities"] for c in (case, f"new_{case}"))
        assert pa.shape == (2, 1, *SIZE)
        np.testing.assert_array_equal(pa, pb)  # same model, deterministic eval: identical, not merely close

    # nnUNetv2_dmoe_predict: the same new cases from the table, the channel made in a temporary folder only
    before = sorted(p.name for p in new.iterdir())
    pred2 = tmp_path / "pred_dmoe"
    flags = ["-d", "992", "-c", "2d", "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1",
             "--disable_progress_bar"]
    run(["nnUNetv2_dmoe_predict", "-i", str(new), "-o", str(pred2), "-t", str(table), "-id_column", "patient",
         "-attribute_column", "tstage"] + flags, env)
    assert sorted(p.name for p in new.iterdir()) == before  # nothing written next to the images
    for name in [f"new_{c}" for c in cases] + ["unknown_case"]:
        np.testing.assert_array_equal(np.asarray(Image.open(pred2 / f"{name}.png")),
                                      np.asarray(Image.open(pred / f"{name}.png")))
    # one level for every case
    level = test_levels[cases[0]]
    pred3 = tmp_path / "pred_level"
    run(["nnUNetv2_dmoe_predict", "-i", str(new), "-o", str(pred3), "-attribute", level] + flags, env)
    for c in [c for c in cases if test_levels[c] == level]:
        np.testing.assert_array_equal(np.asarray(Image.open(pred3 / f"new_{c}.png")),
                                      np.asarray(Image.open(pred / f"new_{c}.png")))
    # errors: a level the model does not know (its levels listed), a case missing from the table
    p = subprocess.run(["nnUNetv2_dmoe_predict", "-i", str(new), "-o", str(tmp_path / "x"), "-attribute", "T9"]
                       + flags, env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "-attribute T9" in p.stderr and "T1, T2, T3, T4" in p.stderr
    short = tmp_path / "short.csv"
    short.write_text("patient,tstage\n" + f"new_{cases[0]},{test_levels[cases[0]]}\n")
    p = subprocess.run(["nnUNetv2_dmoe_predict", "-i", str(new), "-o", str(tmp_path / "x"), "-t", str(short),
                        "-id_column", "patient", "-attribute_column", "tstage"] + flags, env=env, capture_output=True,
                       text=True)
    assert p.returncode == 2 and "have no row for 'tstage'" in p.stderr and "unknown_case" in p.stderr
    assert "--allow_unknown" in p.stderr and not (tmp_path / "x").exists()

    # the Python form, for a predictor the caller holds
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunet_dmoe.inference.predict import predict_with_attribute
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(0,))
    pred4 = tmp_path / "pred_python"
    predict_with_attribute(predictor, str(new), str(pred4), table={f"new_{c}": test_levels[c] for c in cases}
                           | {"unknown_case": None}, num_processes_preprocessing=1,
                           num_processes_segmentation_export=1)
    for name in [f"new_{c}" for c in cases] + ["unknown_case"]:
        np.testing.assert_array_equal(np.asarray(Image.open(pred4 / f"{name}.png")),
                                      np.asarray(Image.open(pred / f"{name}.png")))
    assert sorted(p.name for p in new.iterdir()) == before


@pytest.mark.slow
def test_model_folder_holds_no_case_table(dataset_2d, tmp_path):
    """What a user shares (the model folder, nnU-Net's exported zip) holds the levels but no patient's attribute."""
    from nnunet_dmoe.data.model_folder import attribute_table_entries

    root = dataset_2d
    model = root / "results" / DATASET / f"{TRAINER}__nnUNetPlans__2d"
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        run(["nnUNetv2_train", "992", "2d", "0", "-tr", TRAINER, "-device", "cpu"], _env(root, nnUNet_n_proc_DA="0"))
    entries = attribute_table_entries(_dataset_json(root))
    assert len(entries) == 14  # 10 training and 4 test cases
    block = json.loads((model / "dataset.json").read_text())["attribute"]
    assert block == {"name": "tstage", "levels": ["T1", "T2", "T3", "T4"], "channel": 1}
    ckpt = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert "cases" not in ckpt["init_args"]["dataset_json"]["attribute"]
    debug = (model / "fold_0" / "debug.json").read_text()
    assert "tstage" in debug and not [e for e in entries if e in debug]

    archive = tmp_path / "model.zip"
    run(["nnUNetv2_export_model_to_zip", "-d", "992", "-o", str(archive), "-c", "2d", "-tr", TRAINER, "-f", "0"],
        _env(root))
    import io
    import zipfile
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        assert any(n.endswith("checkpoint_final.pth") for n in names) and any(n.endswith("debug.json") for n in names)
        for n in names:
            data = z.read(n)
            if n.endswith(".pth"):
                dj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)["init_args"]["dataset_json"]
                assert attribute_table_entries(dj) == []
            elif n.endswith(".json"):
                assert not [e for e in entries if e in data.decode()], n


# 40 s of training on two cores: CI runs it with the slow checks, so make test stays under 15 minutes
@pytest.mark.slow
def test_resenc_planner_and_dmoe_trainer(dataset_2d, tmp_path):
    """nnUNetPlannerResEncM plans the 2D dataset; the dMoE trainer builds ResidualEncoderUNet + dMoE from it, passes
    its start check, trains, validates, and nnUNetv2_predict runs with the ResEnc model."""
    root = dataset_2d
    env = _env(root)
    # ResEnc-M's 2d configuration preprocesses exactly as the default plans (same data identifier, spacing and
    # normalisation), so the fixture's preprocessed data serve it and --no_pp saves the time of writing them again
    run(["nnUNetv2_plan_and_preprocess", "-d", "992", "-c", "2d", "-pl", "nnUNetPlannerResEncM", "--no_pp"], env)
    plans_file = root / "preprocessed" / DATASET / "nnUNetResEncUNetMPlans.json"
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"]["2d"]
    default = json.loads((root / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())["configurations"]["2d"]
    for key in ("data_identifier", "spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data"):
        assert cfg[key] == default[key], key
    assert cfg["architecture"]["network_class_name"].endswith("ResidualEncoderUNet") and cfg["batch_size"] >= 2
    log = run(["nnUNetv2_train", "992", "2d", "0", "-tr", TRAINER, "-p", "nnUNetResEncUNetMPlans", "-device", "cpu"],
              _env(root, nnUNet_n_proc_DA="0"))
    assert "dataset.json and the attribute channel agree for all 10 cases" in log
    model = root / "results" / DATASET / f"{TRAINER}__nnUNetResEncUNetMPlans__2d"
    cfg = json.loads((model / "plans.json").read_text())["configurations"]["2d"]
    assert cfg["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    assert cfg["dmoe"]["num_levels"] == 4
    ckpt = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    # the paper's placement: the first block after stage 1 (the first that downsamples), none at stage 0
    assert any(k.startswith("moe.1.experts.w1") for k in ckpt["network_weights"])
    assert not any(k.startswith("moe.0.") for k in ckpt["network_weights"])
    assert any("stages.0.blocks" in k for k in ckpt["network_weights"])  # residual encoder blocks
    summary = json.loads((model / "fold_0" / "validation" / "summary.json").read_text())
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0
    images_ts = root / "raw" / DATASET / "imagesTs"
    _predict(env, images_ts, tmp_path / "pred", plans="nnUNetResEncUNetMPlans")
    cases = sorted(p.name[: -len("_0000.png")] for p in images_ts.glob("*_0000.png"))
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.png")) == [f"{c}.png" for c in cases]
    for case in cases:
        seg = np.asarray(Image.open(tmp_path / "pred" / f"{case}.png"))
        assert seg.shape == SIZE and set(np.unique(seg)) <= {0, 1}
        probs = np.load(tmp_path / "pred" / f"{case}.npz")["probabilities"]
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
        np.testing.assert_array_equal(seg, probs.argmax(0)[0])


@pytest.mark.parametrize("spacing", [[0.6, 0.6], [1.7, 1.3]])
def test_nnunet_2d_resampling_keeps_the_attribute(dataset_2d, spacing, monkeypatch):
    """PNG cases have spacing 1, so the 2d plans never resample them; force nnU-Net's preprocessor to resample to
    another spacing (up and down, order-3 for data) and decode the attribute channel of every test case."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_dmoe.data.attribute import decode_attribute_channel

    root = dataset_2d
    for k, v in nnunet_env(root).items():
        monkeypatch.setenv(k, v)
    dj = _dataset_json(root)
    plans = json.loads((root / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
    plans["configurations"]["2d"]["spacing"] = spacing
    pm = PlansManager(plans)
    cm = pm.get_configuration("2d")
    images_ts = root / "raw" / DATASET / "imagesTs"
    levels = dj["attribute"]["levels"]
    for case, level in sorted(dj["attribute"]["test_cases"].items()):
        files = [str(images_ts / f"{case}_{i:04d}.png") for i in range(2)]
        data, _, props = DefaultPreprocessor(verbose=False).run_case(files, None, pm, cm, dj)
        expected_shape = np.round(np.array(props["shape_after_cropping_and_before_resampling"][1:])
                                  / np.array(spacing)).astype(int)
        assert data.shape[0] == 2 and tuple(data.shape[2:]) == tuple(expected_shape)
        assert decode_attribute_channel(data[1], len(levels), case) == levels.index(level)
        # the channel still holds the level's code nearly everywhere inside the footprint
        codes = np.rint(data[1][data[1] > 0.5])
        assert np.mean(codes == levels.index(level) + 1) > 0.9
