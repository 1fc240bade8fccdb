"""Harvard-FairSeg converter on npz files generated in the documented format."""
import os

import numpy as np
import pytest
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_dmoe.data.attribute import UNKNOWN_CODE, AttributeSpec
from nnunet_dmoe.dataset_conversion.fairseg import convert_fairseg


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    return tmp_path


def _npz(path, race=0, old_keys=False, mask_extra=None, **extra):
    """A 20x24 SLO image (black border) with rim (-1) and cup (-2) in the disc_cup_mask."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = np.zeros((20, 24), np.uint8)
    image[2:18, 2:22] = 100 + race
    mask = np.zeros((20, 24), np.int8)
    mask[6:14, 8:16] = -1
    mask[8:12, 10:14] = -2
    if mask_extra is not None:
        mask[0, 0] = mask_extra
    keys = ("fundus_slo", "disc_cup") if old_keys else ("slo_fundus", "disc_cup_mask")
    fields = dict(race=np.array(race), gender=np.array(1), ethnicity=np.array(-1), language=np.array(0),
                  maritalstatus=np.array(0), age=np.array(63.5))
    fields.update(extra)
    np.savez(path, **{keys[0]: image, keys[1]: mask}, **fields)


def _official_layout(root):
    _npz(root / "Training" / "data_00001.npz", race=0)
    _npz(root / "Training" / "data_00002.npz", race=1, old_keys=True)
    _npz(root / "Training" / "data_00003.npz", race=-1)  # FairSeg: -1 = missing
    _npz(root / "Test" / "data_00004.npz", race=2)
    return root


def test_official_split_labels_levels_and_channel(env):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    out = convert_fairseg(str(_official_layout(env / "in")), 501)
    dj = load_json(os.path.join(out, "dataset.json"))
    assert dj["labels"] == {"background": 0, "rim": 1, "cup": 2}
    assert dj["channel_names"] == {"0": "rgb_to_0_1", "1": "noNorm"}
    assert dj["attribute"] == {"name": "race", "levels": ["Asian", "Black", "White"], "channel": 1,
                               "cases": {"data_00001": "Asian", "data_00002": "Black", "data_00003": None},
                               "test_cases": {"data_00004": "White"}}
    AttributeSpec.from_dataset_json(dj)
    io = NaturalImage2DIO()
    images, _ = io.read_images([os.path.join(out, "imagesTr", f"data_00002_000{k}.png") for k in range(2)])
    seg, _ = io.read_seg(os.path.join(out, "labelsTr", "data_00002.png"))
    assert images.shape == (2, 1, 20, 24)
    assert images[0, 0, 5, 5] == 101 and images[0, 0, 0, 0] == 0
    np.testing.assert_array_equal(images[1, 0], np.where(images[0, 0] > 0, 2, 0))  # Black -> index 1 -> code 2
    assert seg[0, 0, 7, 9] == 1 and seg[0, 0, 9, 11] == 2 and seg[0, 0, 0, 0] == 0
    assert np.bincount(seg.astype(int).ravel()).tolist() == [20 * 24 - 64, 64 - 16, 16]
    unknown, _ = io.read_images([os.path.join(out, "imagesTr", "data_00003_0001.png")])
    assert unknown.max() == UNKNOWN_CODE == 0  # FairSeg's -1 becomes the channel's unknown code
    test, _ = io.read_images([os.path.join(out, "imagesTs", "data_00004_0001.png")])
    assert set(np.unique(test)) == {0, 3}
    assert os.path.isfile(os.path.join(out, "labelsTs", "data_00004.png"))


def test_passes_nnunet_integrity_check(env):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(convert_fairseg(str(_official_layout(env / "in")), 501), num_processes=1)


def test_split_file_and_other_attributes(env):
    root = env / "flat"
    for i, age in enumerate([15, 45, 85]):
        _npz(root / f"data_{i:05d}.npz", gender=np.array(i % 2), age=np.array(age))
    split = env / "split.csv"
    split.write_text("case,split\ndata_00000,train\ndata_00001,test\ndata_00002,Training\n")
    out = convert_fairseg(str(root), 520, attribute="gender", split_file=str(split))
    block = load_json(os.path.join(out, "dataset.json"))["attribute"]
    assert block["levels"] == ["Female", "Male"]
    assert block["cases"] == {"data_00000": "Female", "data_00002": "Female"}
    assert block["test_cases"] == {"data_00001": "Male"}
    out = convert_fairseg(str(root), 521, attribute="age", age_bins=[40, 60])
    block = load_json(os.path.join(out, "dataset.json"))["attribute"]
    assert block["levels"] == ["<40", "40-60", ">=60"]
    assert block["cases"] == {"data_00000": "<40", "data_00001": "40-60", "data_00002": ">=60"}
    assert block["test_cases"] == {}
    assert not os.path.exists(os.path.join(out, "imagesTs"))


def test_all_bad_files_are_named_in_one_error(env):
    root = _official_layout(env / "in")
    _npz(root / "Training" / "data_00010.npz", mask_extra=-3)
    _npz(root / "Training" / "data_00011.npz", race=7)
    np.savez(root / "Test" / "data_00012.npz", disc_cup_mask=np.zeros((4, 4)), race=np.array(0))
    _npz(root / "Validation" / "data_00013.npz")
    with pytest.raises(ValueError) as e:
        convert_fairseg(str(root), 530)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert "data_00013.npz: the folder 'Validation' names no split" in msg
    assert "data_00010.npz: disc_cup_mask has undeclared values [-3]" in msg
    assert "data_00011.npz: race = 7 is not one of the codes" in msg
    assert "data_00012.npz: has no image key (slo_fundus or fundus_slo" in msg
    assert not os.listdir(env / "raw")


def test_existing_dataset_folder_is_refused(env):
    root = _official_layout(env / "in")
    convert_fairseg(str(root), 540)
    with pytest.raises(RuntimeError, match="Dataset540_FairSeg"):
        convert_fairseg(str(root), 540, dataset_name="Other")
    out = convert_fairseg(str(root), 540, dataset_name="Other", overwrite=True)
    assert sorted(os.listdir(env / "raw")) == ["Dataset540_Other"] and os.path.basename(out) == "Dataset540_Other"


def test_split_file_error_lists_twenty_values_then_the_count(tmp_path):
    from nnunet_dmoe.dataset_conversion.common import read_split_file
    split = tmp_path / "split.csv"
    split.write_text("case,split\n" + "".join(f"c{i:02d},xyz\n" for i in range(23)))
    with pytest.raises(ValueError, match=r"must be train or test; found c00 \('xyz'\), .*, c19 \('xyz'\), "
                                         r"\.\.\. \(3 more\)\. "):
        read_split_file(str(split))


def test_two_attributes_race_and_gender(env):
    from PIL import Image
    root = env / "in"
    _npz(root / "Training" / "data_00001.npz", race=0, gender=np.array(0))
    _npz(root / "Training" / "data_00002.npz", race=1, gender=np.array(-1))
    _npz(root / "Test" / "data_00003.npz", race=2)
    out = convert_fairseg(str(root), 505, attribute=["race", "gender"])
    dj = load_json(os.path.join(out, "dataset.json"))
    assert "attribute" not in dj and dj["channel_names"] == {"0": "rgb_to_0_1", "1": "noNorm", "2": "noNorm"}
    assert dj["attributes"][1] == {"name": "gender", "levels": ["Female", "Male"], "channel": 2,
                                   "cases": {"data_00001": "Female", "data_00002": None},
                                   "test_cases": {"data_00003": "Male"}}
    assert dj["attributes"][0]["cases"] == {"data_00001": "Asian", "data_00002": "Black"}
    for case, folder, race, gender in (("data_00001", "imagesTr", 1, 1), ("data_00002", "imagesTr", 2, 0),
                                       ("data_00003", "imagesTs", 3, 2)):
        image = np.asarray(Image.open(os.path.join(out, folder, f"{case}_0000.png")))
        for k, code in ((1, race), (2, gender)):
            np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(out, folder, f"{case}_000{k}.png"))),
                                          np.where(image > 0, code, 0))
