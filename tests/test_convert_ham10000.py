"""HAM10000 converter on the real sample in tests/data (read-only) and on small images named after real metadata
rows (to test the lesion-grouped split and missing ages)."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from batchgenerators.utilities.file_and_folder_operations import load_json
from PIL import Image

from conftest import real_data
from nnunet_dmoe.data.attribute import AttributeSpec
from nnunet_dmoe.dataset_conversion.ham10000 import (IMAGE_DIR, MASK_DIR, _lesion_split, convert_ham10000,
                                                     lesion_folds)
from nnunet_dmoe.data.tables import bin_labels, read_attribute_table

SAMPLE = real_data("ham10000_sample")
METADATA = os.path.join(SAMPLE, "HAM10000_metadata.csv")
AGES = {"ISIC_0024311": "60-80", "ISIC_0027001": "40-60", "ISIC_0027287": "40-60", "ISIC_0027533": "40-60",
        "ISIC_0027800": "60-80"}
LEVELS = ["<20", "20-40", "40-60", "60-80", ">=80"]


def test_sample_is_in_the_repository():
    """The real sample lives in the checkout (tests/data), with its licence note; nothing is read from beside it."""
    checkout = Path(__file__).resolve().parents[1]
    assert Path(SAMPLE) == checkout / "tests" / "data" / "ham10000_sample"
    assert os.path.isfile(METADATA)
    assert len(os.listdir(os.path.join(SAMPLE, IMAGE_DIR))) == 5
    assert "CC BY-NC" in Path(SAMPLE, "README.md").read_text()


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    return tmp_path


@pytest.fixture(scope="module")
def sample_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ham")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_raw", str(root / "raw"))
        mp.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
        out = convert_ham10000(SAMPLE, 502, seed=0)
    return out, root


def _small_input(folder, image_ids, mask_value=255):
    """Tiny RGB jpgs + 0/mask_value masks named after real image ids (metadata from the sample csv)."""
    os.makedirs(folder / IMAGE_DIR)
    os.makedirs(folder / MASK_DIR)
    rng = np.random.RandomState(0)
    for i in image_ids:
        Image.fromarray(rng.randint(1, 255, (12, 16, 3)).astype(np.uint8)).save(folder / IMAGE_DIR / f"{i}.jpg")
        mask = np.zeros((12, 16), np.uint8)
        mask[3:8, 4:10] = mask_value
        Image.fromarray(mask).save(folder / MASK_DIR / f"{i}_segmentation.png")
    shutil.copy(METADATA, folder / "HAM10000_metadata.csv")
    return folder


def test_sample_levels_and_split(sample_dataset):
    out, _ = sample_dataset
    dj = load_json(os.path.join(out, "dataset.json"))
    block = dj["attribute"]
    assert block["levels"] == LEVELS == bin_labels([20, 40, 60, 80])
    assert block["channel"] == 3
    assert dj["channel_names"] == {"0": "rgb_to_0_1", "1": "rgb_to_0_1", "2": "rgb_to_0_1", "3": "noNorm"}
    assert {**block["cases"], **block["test_cases"]} == AGES
    assert not set(block["cases"]) & set(block["test_cases"])
    assert len(block["test_cases"]) == 1 and dj["numTraining"] == 4
    assert sorted(f[:-4] for f in os.listdir(os.path.join(out, "labelsTs"))) == sorted(block["test_cases"])
    AttributeSpec.from_dataset_json(dj)


def test_sample_read_back_with_nnunet(sample_dataset):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    out, _ = sample_dataset
    block = load_json(os.path.join(out, "dataset.json"))["attribute"]
    case = "ISIC_0027800" if "ISIC_0027800" in block["cases"] else "ISIC_0027001"
    folder = "imagesTr"
    images, _ = NaturalImage2DIO().read_images([os.path.join(out, folder, f"{case}_{k:04d}.png") for k in range(4)])
    seg, _ = NaturalImage2DIO().read_seg(os.path.join(out, "labelsTr", f"{case}.png"))
    assert images.shape == (4, 1, 450, 600) and seg.shape == (1, 1, 450, 600)
    rgb = np.asarray(Image.open(os.path.join(SAMPLE, IMAGE_DIR, f"{case}.jpg"))).transpose(2, 0, 1)
    np.testing.assert_array_equal(images[:3, 0], rgb)
    code = LEVELS.index(AGES[case]) + 1
    footprint = np.any(rgb != 0, axis=0)
    np.testing.assert_array_equal(images[3, 0], np.where(footprint, code, 0))
    mask = np.asarray(Image.open(os.path.join(SAMPLE, MASK_DIR, f"{case}_segmentation.png")))
    np.testing.assert_array_equal(seg[0, 0], (mask == 255).astype(np.float32))
    assert set(np.unique(seg)) == {0, 1}


def test_sample_passes_nnunet_integrity_check(sample_dataset):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(sample_dataset[0], num_processes=1)


def test_sample_writes_lesion_grouped_splits_final(sample_dataset):
    out, root = sample_dataset
    folds = load_json(root / "preprocessed" / "Dataset502_HAM10000" / "splits_final.json")
    with open(os.path.join(out, "dataset.json")) as f:
        train = set(json.load(f)["attribute"]["cases"])
    assert len(folds) == 4  # 4 training lesions -> at most 4 folds
    assert sorted(c for fold in folds for c in fold["val"]) == sorted(train)
    for fold in folds:
        assert set(fold["train"]) | set(fold["val"]) == train and not set(fold["train"]) & set(fold["val"])


def test_lesion_split_over_full_metadata_never_splits_a_lesion():
    lesions = read_attribute_table(METADATA, id_column="image_id", attribute_column="lesion_id")
    split = _lesion_split(lesions, test_fraction=0.2, seed=3)
    sides = {}
    for image, lesion in lesions.items():
        sides.setdefault(lesion, set()).add(split[image])
    assert all(len(s) == 1 for s in sides.values())
    assert 0.19 < sum(s == "test" for s in split.values()) / len(split) < 0.21
    assert split == _lesion_split(lesions, test_fraction=0.2, seed=3)
    assert split != _lesion_split(lesions, test_fraction=0.2, seed=4)
    train = {i: lesion for i, lesion in lesions.items() if split[i] == "train"}
    for fold in lesion_folds(train, 5, seed=3):
        assert not {train[i] for i in fold["train"]} & {train[i] for i in fold["val"]}


def test_shared_lesions_stay_together_and_missing_age_is_unknown(env):
    # HAM_0000118 and HAM_0002730 each have several images; ISIC_0033391 has no age
    ids = ["ISIC_0027419", "ISIC_0025030", "ISIC_0026769", "ISIC_0025661", "ISIC_0033391", "ISIC_0024311",
           "ISIC_0027001", "ISIC_0027287"]
    inp = _small_input(env / "in", ids)
    lesions = read_attribute_table(METADATA, id_column="image_id", attribute_column="lesion_id")
    assert lesions["ISIC_0027419"] == lesions["ISIC_0025030"] and lesions["ISIC_0026769"] == lesions["ISIC_0025661"]
    for seed in range(4):
        out = convert_ham10000(str(inp), 510, seed=seed, test_fraction=0.4, overwrite=True)
        block = load_json(os.path.join(out, "dataset.json"))["attribute"]
        train_lesions = {lesions[c] for c in block["cases"]}
        assert not train_lesions & {lesions[c] for c in block["test_cases"]}
        assert len(block["test_cases"]) >= 1
    both = {**block["cases"], **block["test_cases"]}
    assert both["ISIC_0033391"] is None and both["ISIC_0027419"] == ">=80"
    folder = "imagesTr" if "ISIC_0033391" in block["cases"] else "imagesTs"
    attribute = np.asarray(Image.open(os.path.join(out, folder, "ISIC_0033391_0003.png")))
    assert attribute.max() == 0


def test_sex_attribute_and_split_file(env):
    ids = ["ISIC_0024311", "ISIC_0027001", "ISIC_0027533"]
    inp = _small_input(env / "in", ids)
    split = env / "split.json"
    split.write_text(json.dumps({"train": ids[:2], "test": ids[2:]}))
    out = convert_ham10000(str(inp), 511, attribute="sex", split_file=str(split))
    block = load_json(os.path.join(out, "dataset.json"))["attribute"]
    assert block["levels"] == ["female", "male"]
    assert block["cases"] == {"ISIC_0024311": "female", "ISIC_0027001": "female"}
    assert block["test_cases"] == {"ISIC_0027533": "male"}
    attribute = np.asarray(Image.open(os.path.join(out, "imagesTs", "ISIC_0027533_0003.png")))
    assert set(np.unique(attribute)) == {2}


def test_missing_mask_and_missing_metadata_row_are_reported_together(env):
    inp = _small_input(env / "in", ["ISIC_0024311", "ISIC_0027001"])
    os.remove(inp / MASK_DIR / "ISIC_0027001_segmentation.png")
    Image.fromarray(np.ones((12, 16, 3), np.uint8)).save(inp / IMAGE_DIR / "ISIC_9999999.jpg")
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(inp / MASK_DIR / "ISIC_9999999_segmentation.png")
    with pytest.raises(ValueError) as e:
        convert_ham10000(str(inp), 512)
    msg = str(e.value)
    assert "2 problem(s)" in msg
    assert "ISIC_0027001_segmentation.png is missing" in msg
    assert "ISIC_9999999.jpg: no row with image_id ISIC_9999999" in msg
    assert not (env / "raw" / "Dataset512_HAM10000").exists()


def test_undeclared_mask_value(env):
    inp = _small_input(env / "in", ["ISIC_0024311", "ISIC_0027001"], mask_value=128)
    with pytest.raises(ValueError, match=r"ISIC_0024311_segmentation.png: undeclared mask values \[128\]"):
        convert_ham10000(str(inp), 513)
    assert not os.listdir(env / "raw")


def test_existing_dataset_folder_is_refused(env):
    inp = _small_input(env / "in", ["ISIC_0024311", "ISIC_0027001"])
    os.makedirs(env / "raw" / "Dataset514_Other")
    with pytest.raises(RuntimeError, match="Dataset514_Other.*--overwrite"):
        convert_ham10000(str(inp), 514)
    out = convert_ham10000(str(inp), 514, overwrite=True)
    assert os.path.basename(out) == "Dataset514_HAM10000"
    assert not (env / "raw" / "Dataset514_Other").exists()


def test_sample_with_two_attributes_age_and_sex(env):
    """-a age sex: an "attributes" list and one noNorm channel per attribute (_0003 age, _0004 sex)."""
    from nnunet_dmoe.data.attribute import attribute_specs_from_dataset_json
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    out = convert_ham10000(SAMPLE, 503, attribute=["age", "sex"], seed=0)
    dj = load_json(os.path.join(out, "dataset.json"))
    assert "attribute" not in dj and [b["name"] for b in dj["attributes"]] == ["age", "sex"]
    assert dj["channel_names"] == {"0": "rgb_to_0_1", "1": "rgb_to_0_1", "2": "rgb_to_0_1", "3": "noNorm",
                                   "4": "noNorm"}
    age, sex = dj["attributes"]
    assert (age["channel"], age["levels"], {**age["cases"], **age["test_cases"]}) == (3, LEVELS, AGES)
    sexes = {"ISIC_0024311": "female", "ISIC_0027001": "female", "ISIC_0027287": "female", "ISIC_0027533": "male",
             "ISIC_0027800": "female"}
    assert (sex["channel"], sex["levels"], {**sex["cases"], **sex["test_cases"]}) == (4, ["female", "male"], sexes)
    assert sex["cases"].keys() == age["cases"].keys() and dj["numTraining"] == 4
    assert [s.name for s in attribute_specs_from_dataset_json(dj)] == ["age", "sex"]
    case = "ISIC_0027533"  # 55, male
    folder = os.path.join(out, "imagesTr" if case in age["cases"] else "imagesTs")
    footprint = np.any(np.asarray(Image.open(os.path.join(SAMPLE, IMAGE_DIR, f"{case}.jpg"))) != 0, axis=2)
    for k, code in ((3, LEVELS.index("40-60") + 1), (4, 2)):
        np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(folder, f"{case}_{k:04d}.png"))),
                                      np.where(footprint, code, 0))
    verify_dataset_integrity(out, num_processes=1)
    with pytest.raises(RuntimeError, match="Dataset id 503 is taken"):  # never overwritten unless asked
        convert_ham10000(SAMPLE, 503, attribute=["age", "sex"], seed=0)
    with pytest.raises(ValueError, match="-a: sex given more than once"):
        convert_ham10000(SAMPLE, 504, attribute=["sex", "sex"])
