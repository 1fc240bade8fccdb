"""Radiotherapy manifest converter on small NIfTI files generated with SimpleITK."""
import os

import numpy as np
import pytest
from batchgenerators.utilities.file_and_folder_operations import load_json
import SimpleITK as sitk

from nnunet_dmoe.data.attribute import AttributeSpec
from nnunet_dmoe.dataset_conversion.radiotherapy import convert_rt, normalise_tstage

SPACING, ORIGIN = (0.9, 0.9, 2.5), (-10.0, 5.0, 3.0)


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    return tmp_path


def _image(array, spacing=SPACING, origin=ORIGIN):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def _case(folder, case, label_value=1, label_spacing=SPACING, with_label=True):
    """CT (z, y, x) = (6, 10, 12), zero outside a body box, and a CTV box; returns (image, label) relative paths."""
    os.makedirs(folder / "img", exist_ok=True)
    os.makedirs(folder / "lab", exist_ok=True)
    ct = np.zeros((6, 10, 12), np.int16)
    ct[1:5, 2:8, 2:10] = 40
    label = np.zeros(ct.shape, np.uint8)
    label[2:4, 3:6, 4:7] = label_value
    sitk.WriteImage(_image(ct), str(folder / "img" / f"{case}.nii.gz"))
    if not with_label:
        return f"img/{case}.nii.gz", ""
    sitk.WriteImage(_image(label, spacing=label_spacing), str(folder / "lab" / f"{case}.nii.gz"))
    return f"img/{case}.nii.gz", f"lab/{case}.nii.gz"


def _manifest(folder, rows, extra_header=""):
    """rows: (case, tstage, split, case kwargs)."""
    lines = ["case_id,image_CT,label,tstage,split" + extra_header]
    for case, tstage, split, kwargs in rows:
        image, label = _case(folder, case, **kwargs)
        lines.append(f"{case},{image},{label},{tstage},{split}")
    path = folder / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = [("RT_001", "cT1b", "train", {}), ("RT_002", "pT3", "train", {}), ("RT_003", "T4a", "train", {}),
        ("RT_004", "", "train", {}), ("RT_005", "ypT2", "test", {"with_label": False})]


@pytest.mark.parametrize("text, stage", [("T1a", "T1"), ("cT1b", "T1"), ("pT1", "T1"), ("T4b", "T4"),
                                         ("ypT3", "T3"), (" t2 ", "T2"), ("pTis", "Tis"), ("T0", "T0"), ("2", "T2"),
                                         ("", None), ("unknown", None), ("NaN", None)])
def test_normalise_tstage(text, stage):
    assert normalise_tstage(text) == stage


@pytest.mark.parametrize("text", ["TX", "T5", "N1", "stage II", "T1N0"])
def test_normalise_tstage_rejects(text):
    with pytest.raises(ValueError, match="cannot read the T-stage"):
        normalise_tstage(text)


def test_levels_cases_and_attribute_channel(env):
    out = convert_rt(_manifest(env, GOOD), 503)
    dj = load_json(os.path.join(out, "dataset.json"))
    assert dj["channel_names"] == {"0": "CT", "1": "noNorm"}
    assert dj["labels"] == {"background": 0, "CTV": 1} and dj["numTraining"] == 4
    assert dj["attribute"] == {"name": "tstage", "levels": ["T1", "T2", "T3", "T4"], "channel": 1,
                               "cases": {"RT_001": "T1", "RT_002": "T3", "RT_003": "T4", "RT_004": None},
                               "test_cases": {"RT_005": "T2"}}
    AttributeSpec.from_dataset_json(dj)
    ct = sitk.ReadImage(os.path.join(out, "imagesTr", "RT_002_0000.nii.gz"))
    attr = sitk.ReadImage(os.path.join(out, "imagesTr", "RT_002_0001.nii.gz"))
    assert attr.GetSize() == ct.GetSize() == (12, 10, 6)
    assert np.allclose(attr.GetSpacing(), SPACING) and np.allclose(attr.GetOrigin(), ORIGIN)
    assert attr.GetDirection() == ct.GetDirection()
    a = sitk.GetArrayFromImage(attr)
    assert a.dtype == np.uint8
    np.testing.assert_array_equal(a, np.where(sitk.GetArrayFromImage(ct) != 0, 3, 0))  # T3 -> index 2 -> code 3
    assert sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, "imagesTr", "RT_004_0001.nii.gz"))).max() == 0
    assert sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, "imagesTs", "RT_005_0001.nii.gz"))).max() == 2
    assert sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, "labelsTr", "RT_001.nii.gz"))).sum() == 18
    assert not os.path.exists(os.path.join(out, "labelsTs"))


def test_passes_nnunet_integrity_check_and_levels_from_cli(env):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    out = convert_rt(_manifest(env, GOOD), 504, levels=["T1", "T2", "T3", "T4a", "T0"], labels=["CTV", "GTV"])
    dj = load_json(os.path.join(out, "dataset.json"))
    assert dj["attribute"]["levels"] == ["T1", "T2", "T3", "T4", "T0"]
    assert dj["labels"] == {"background": 0, "CTV": 1, "GTV": 2}
    verify_dataset_integrity(out, num_processes=1)


def test_all_bad_cases_are_named_in_one_error(env):
    rows = GOOD + [("RT_010", "TX", "train", {}), ("RT_011", "T2", "train", {"label_value": 3}),
                   ("RT_012", "T2", "train", {"label_spacing": (0.9, 0.9, 3.0)}),
                   ("RT_013", "T2", "train", {"with_label": False})]
    manifest = _manifest(env, rows)
    with pytest.raises(ValueError) as e:
        convert_rt(manifest, 505)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert "row 7 (RT_010): cannot read the T-stage 'TX'" in msg
    assert "(RT_011): label" in msg and "undeclared values [3] (declared 0..1)" in msg
    assert "(RT_012): label" in msg and "is not on the grid of image_CT" in msg
    assert "row 10 (RT_013): the label (mask) is missing" in msg
    assert not os.listdir(env / "raw")


def test_unparsable_as_unknown_and_undeclared_level(env):
    manifest = _manifest(env, GOOD + [("RT_010", "TX", "train", {})])
    out = convert_rt(manifest, 506, unparsable_as_unknown=True)
    assert load_json(os.path.join(out, "dataset.json"))["attribute"]["cases"]["RT_010"] is None
    with pytest.raises(ValueError, match=r"\(RT_003\): T-stage T4 is not one of -levels \['T1', 'T2', 'T3'\]"):
        convert_rt(manifest, 507, levels=["T1", "T2", "T3"], unparsable_as_unknown=True)


def test_unreadable_image_is_reported(env):
    manifest = _manifest(env, GOOD)
    (env / "img" / "RT_002.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"\(RT_002\): SimpleITK cannot read a file of this case"):
        convert_rt(manifest, 508)


def test_manifest_without_image_columns(env):
    path = env / "m.csv"
    path.write_text("case_id,image,label,tstage\nA,a.nii.gz,b.nii.gz,T1\n")
    with pytest.raises(ValueError, match=r"missing \['image_<channel>'\]"):
        convert_rt(str(path), 508)


def test_existing_dataset_folder_is_refused(env):
    manifest = _manifest(env, GOOD)
    convert_rt(manifest, 509)
    with pytest.raises(RuntimeError, match="Dataset509_RT.*--overwrite"):
        convert_rt(manifest, 509)
    convert_rt(manifest, 509, overwrite=True)


def test_tstage_and_a_centre_column(env):
    """-attribute_column centre: an "attributes" list (tstage, centre), channels 1 and 2 on the CT grid."""
    manifest = env / "manifest.csv"
    _manifest(env, GOOD)
    lines = manifest.read_text().splitlines()
    centres = ["B", "A", "B", "unknown", "A"]
    manifest.write_text("\n".join([lines[0] + ",centre"] + [ln + f",{c}" for ln, c in zip(lines[1:], centres)]) + "\n")
    out = convert_rt(str(manifest), 508, attribute_columns=["centre"])
    dj = load_json(os.path.join(out, "dataset.json"))
    assert "attribute" not in dj and dj["channel_names"] == {"0": "CT", "1": "noNorm", "2": "noNorm"}
    assert dj["attributes"][0]["name"] == "tstage" and dj["attributes"][0]["channel"] == 1
    assert dj["attributes"][1] == {"name": "centre", "levels": ["A", "B"], "channel": 2,
                                   "cases": {"RT_001": "B", "RT_002": "A", "RT_003": "B", "RT_004": None},
                                   "test_cases": {"RT_005": "A"}}
    ct = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, "imagesTr", "RT_003_0000.nii.gz"))) != 0
    for k, code in ((1, 4), (2, 2)):  # T4 -> code 4, centre B -> code 2
        img = sitk.ReadImage(os.path.join(out, "imagesTr", f"RT_003_000{k}.nii.gz"))
        assert np.allclose(img.GetSpacing(), SPACING) and np.allclose(img.GetOrigin(), ORIGIN)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), np.where(ct, code, 0))
    with pytest.raises(ValueError, match=r"-attribute_column: \['tstage'\]"):
        convert_rt(str(manifest), 509, attribute_columns=["tstage"])
    with pytest.raises(ValueError, match=r"missing \['site'\]"):
        convert_rt(str(manifest), 509, attribute_columns=["site"])
