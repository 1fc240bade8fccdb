"""The transformer trainers on tiny synthetic data with nnU-Net's own training and prediction code: TransUNet (2D)
and Primus (3D), each trains 1 epoch of 5 iterations and predicts the test cases with every attribute level written
into the attribute channel. dMoE's prediction changes with the level; the baseline's and MoE's (one router for
everyone) do not.

Training runs nnU-Net's trainer in this process (found by name as ``nnUNetv2_train`` finds it, ``run_training``).
The dMoE trainers predict with ``nnUNetv2_predict`` (the model folder's plans, the trainer found by name, the
attribute channel through nnU-Net's unchanged prediction path), the others with the same nnU-Net predictor in this
process (``predict_from_files_sequential``): each CLI start costs three Python processes importing torch and
nnU-Net, about 15 s of CPU here.
"""
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import nnunet_env, run

TINY = {
    # the paper's TransUNet with a ViT 32 wide with 2 blocks and a small decoder; tokens of 16 pixels as by default.
    # No "decoder": the trainer writes "paper" into the plans
    "2d": ("nnUNetPlansTinyViT", {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_features": [32, 16, 16, 8, 8]}),
    # Primus 48 wide with 2 blocks of 2 heads (rotary embedding: 48 / 2 / 1.5 = 16, a multiple of 4)
    "3d_fullres": ("nnUNetPlansTinyPrimus", {"embed_dim": 48, "depth": 2, "num_heads": 2}),
}
SCHEDULE = "_1epochs_5iters"


@pytest.fixture(scope="module")
def dataset_2d(tmp_path_factory):
    """Synthetic 2D dataset 993 (8 train / 4 test, 32x32 PNG), planned and preprocessed for 2d by nnU-Net. Its
    plans' patch (24x28) is not a multiple of the token size: the trainers round it."""
    root = tmp_path_factory.mktemp("transformer2d")
    env = nnunet_env(root)
    run(["nnUNetv2_dmoe_make_synthetic", "-d", "993", "-dim", "2", "-num_train", "8", "-num_test", "4",
         "-size", "32", "32", "-seed", "3"], env)
    run(["nnUNetv2_plan_and_preprocess", "-d", "993", "-c", "2d", "-np", "1", "-npfp", "1"], env)
    return root


def _dataset(root):
    return next(p.name for p in (root / "raw").iterdir() if p.name.startswith("Dataset"))


def _tiny_plans(root, configuration, pretrained=None) -> str:
    """nnUNetPlans with a tiny network in the configuration's "transformer" block, as a plans file of its own (the
    preprocessed data are shared: same data identifier)."""
    name, block = TINY[configuration]
    if pretrained:
        name, block = name + "Pretrained", {**block, "pretrained": str(pretrained)}
    folder = root / "preprocessed" / _dataset(root)
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    plans["plans_name"] = name
    plans["configurations"][configuration]["transformer"] = block
    (folder / f"{name}.json").write_text(json.dumps(plans, indent=1))
    return name


def _inputs_for_every_level(root, out):
    """The first two test cases, each once per level and once as unknown (channel 0): ``{case}_L{k}`` with k the
    level index or 'u'. Written with nnUNetv2_dmoe_attach_attribute's API from the image channel alone."""
    from nnunet_dmoe.data.attach import attach_attribute

    raw = root / "raw" / _dataset(root)
    dj = json.loads((raw / "dataset.json").read_text())
    ending, channel = dj["file_ending"], dj["attribute"]["channel"]
    image_channel = next(c for c in range(len(dj["channel_names"])) if c != channel)
    cases = sorted(dj["attribute"]["test_cases"])[:2]
    images = out.parent / (out.name + "_images")
    images.mkdir()
    table = {}
    for case in cases:
        for k, level in [(str(i), lv) for i, lv in enumerate(dj["attribute"]["levels"])] + [("u", None)]:
            shutil.copy(raw / "imagesTs" / f"{case}_{image_channel:04d}{ending}",
                        images / f"{case}_L{k}_{image_channel:04d}{ending}")
            table[f"{case}_L{k}"] = level
    attach_attribute(str(images), table, dj, output_folder=str(out), verbose=False)
    return cases, [k for k in [str(i) for i in range(len(dj["attribute"]["levels"]))] + ["u"]]


def _train_and_predict(root, configuration, trainer, plans, pred_in, pred, cli, monkeypatch, pretrained=None):
    """Train with nnU-Net's trainer in this process (``get_trainer_from_args`` finds it by name, as nnUNetv2_train
    does; ``run_training``); predict with ``nnUNetv2_predict`` (``cli``) or nnU-Net's predictor in this process."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.run.run_training import get_trainer_from_args

    dataset = _dataset(root)
    env = nnunet_env(root, nnUNet_n_proc_DA="0")
    model = root / "results" / dataset / f"{trainer}__{plans}__{configuration}"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # one thread: this process's OpenMP threads spin while they wait (no OMP_WAIT_POLICY here), and the tiny
    # networks gain nothing from a second one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = get_trainer_from_args(dataset, configuration, 0, trainer, plans, device=torch.device("cpu"))
        t.run_training()  # nnU-Net's loop: start-up check, 1 epoch of 5 iterations, validation, checkpoints
        log = open(t.log_file).read()
        assert "dataset.json and the attribute channel agree" in log
        if configuration == "2d":
            assert "Patch size [24, 28] of the plans rounded to [16, 16]" in log
        if pretrained:  # loaded once, before training; prediction rebuilds the network without the file
            # 12 per block, final norm, patch embedding, position embedding
            assert f"Initialised {12 * 2 + 2 + 2 + 1} ViT tensors from {pretrained}" in log
            pretrained.unlink()
        if not cli:
            pred.mkdir()
            predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False,
                                        allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(str(model), (0,), "checkpoint_final.pth")
            predictor.predict_from_files_sequential(str(pred_in), str(pred), save_probabilities=True)
    finally:
        torch.set_num_threads(threads)
    if cli:  # the attribute channel through nnU-Net's unchanged prediction CLI, trainer found by name
        run(["nnUNetv2_predict", "-i", str(pred_in), "-o", str(pred), "-d", dataset, "-c", configuration, "-tr",
             trainer, "-p", plans, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar",
             "--save_probabilities"], env)
    return model


@pytest.mark.parametrize("configuration,trainer,cli,attribute_matters", [
    # the slowest two (27 s and 17 s) run with the slow checks, so that make test stays under 15 minutes
    pytest.param("2d", "nnUNetTrainerTransUNet", False, False, marks=pytest.mark.slow),
    ("2d", "nnUNetTrainerTransUNetMoE", False, False),
    ("2d", "nnUNetTrainerTransUNetDMoE", True, True),
    ("3d_fullres", "nnUNetTrainerPrimusMoE", False, False),
    pytest.param("3d_fullres", "nnUNetTrainerPrimusDMoE", True, True, marks=pytest.mark.slow),
])
def test_train_predict_and_the_attribute(configuration, trainer, cli, attribute_matters, request, tmp_path,
                                         monkeypatch):
    root = request.getfixturevalue("dataset_2d" if configuration == "2d" else "preprocessed_3d")
    pretrained = None
    if trainer == "nnUNetTrainerTransUNet":  # the optional ViT checkpoint (timm's state dict), 4x4 grid + class token
        from timm.models.vision_transformer import VisionTransformer
        block = TINY["2d"][1]
        vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=block["embed_dim"], depth=block["depth"],
                                num_heads=block["num_heads"])
        pretrained = tmp_path / "vit.pth"
        torch.save(vit.state_dict(), pretrained)
    plans = _tiny_plans(root, configuration, pretrained)
    pred_in, pred = tmp_path / "in", tmp_path / "pred"
    cases, levels = _inputs_for_every_level(root, pred_in)
    model = _train_and_predict(root, configuration, trainer + SCHEDULE, plans, pred_in, pred, cli, monkeypatch,
                               pretrained)

    # the model folder rebuilds the same network: tiny sizes (TransUNet: the paper's decoder written by the trainer),
    # token-size patch, dMoE settings from dataset.json
    cfg = json.loads((model / "plans.json").read_text())["configurations"][configuration]
    multiple = 16 if configuration == "2d" else 8
    written = {"decoder": "paper"} if configuration == "2d" else {}
    assert {k: v for k, v in cfg["transformer"].items() if k != "pretrained"} == {**TINY[configuration][1], **written}
    assert all(p % multiple == 0 for p in cfg["patch_size"])
    assert cfg["dmoe"]["num_levels"] == 4 and cfg["dmoe"]["attribute_channel"] == 1
    weights = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                         weights_only=False)["network_weights"]
    assert any(k.startswith("moe.0.experts.w1") for k in weights) == ("MoE" in trainer)

    for case in cases:
        probs = {k: np.load(pred / f"{case}_L{k}.npz")["probabilities"] for k in levels}
        assert all(p.shape == probs[levels[0]].shape and np.isfinite(p).all() for p in probs.values())
        np.testing.assert_allclose(probs[levels[0]].sum(0), 1.0, atol=1e-5)
        if attribute_matters:  # its router per level: other levels, other probabilities
            assert len({p.tobytes() for p in probs.values()}) > 1, case
        else:  # the attribute is stripped (baseline) or routes everyone alike (MoE): identical, not merely close
            for k in levels[1:]:
                np.testing.assert_array_equal(probs[k], probs[levels[0]])
