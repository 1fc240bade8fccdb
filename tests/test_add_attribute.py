"""nnUNetv2_dmoe_add_attribute: an existing nnU-Net raw dataset and a table in, a dataset nnU-Net verifies out."""
import hashlib
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import nnunet_env, run

DATASET = "Dataset501_Existing"
# case -> (T-stage, age); "c3" is an imagesTs case
TABLE = {"c0": ("T2", 71), "c1": ("T1", 45), "c2": ("T3", 58), "c3": ("T2", 80)}


def _image(seed, shape=(6, 10, 12)):
    rng = np.random.default_rng(seed)
    arr = np.zeros(shape, np.float32)
    arr[1:5, 2:8, 3:10] = rng.uniform(1, 2, (4, 6, 7))  # the footprint; 0 outside
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.8, 0.9, 2.5))
    img.SetOrigin((10.0, -4.0, 3.0))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return img


@pytest.fixture
def existing(tmp_path):
    """A plain nnU-Net dataset (one CT channel), three training and one test case, and the patients' table."""
    raw = tmp_path / "raw" / DATASET
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / sub).mkdir(parents=True)
    for i, case in enumerate(TABLE):
        img = _image(i)
        sub = "imagesTs" if case == "c3" else "imagesTr"
        sitk.WriteImage(img, str(raw / sub / f"{case}_0000.nii.gz"))
        if sub == "imagesTr":
            seg = sitk.GetImageFromArray((sitk.GetArrayFromImage(img) > 1.5).astype(np.uint8))
            seg.CopyInformation(img)
            sitk.WriteImage(seg, str(raw / "labelsTr" / f"{case}.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "tumour": 1}, "numTraining": 3,
        "file_ending": ".nii.gz"}))
    table = tmp_path / "patients.csv"
    table.write_text("patient,stage,age\n" + "".join(f"{c},{s},{a}\n" for c, (s, a) in TABLE.items()))
    return tmp_path, raw, table


def _digest(folder):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(os.path.relpath(p, folder).encode() + open(p, "rb").read())
    return h.hexdigest()


def _add(root, *args, check=True):
    cmd = ["nnUNetv2_dmoe_add_attribute", "-d", "501"] + [str(a) for a in args]
    if check:
        return run(cmd, nnunet_env(root))
    import subprocess
    return subprocess.run(cmd, env=nnunet_env(root), capture_output=True, text=True)


def test_adds_block_channel_and_files_that_nnunet_verifies(existing):
    root, raw, table = existing
    _add(root, "-t", table, "-id_column", "patient", "-attribute_column", "stage")
    ds = json.loads((raw / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "CT", "1": "noNorm"}
    assert ds["attribute"] == {"name": "stage", "levels": ["T1", "T2", "T3"], "channel": 1,
                               "cases": {"c0": "T2", "c1": "T1", "c2": "T3"}, "test_cases": {"c3": "T2"}}
    for case, (stage, _) in TABLE.items():
        sub = "imagesTs" if case == "c3" else "imagesTr"
        image = sitk.ReadImage(str(raw / sub / f"{case}_0000.nii.gz"))
        channel = sitk.ReadImage(str(raw / sub / f"{case}_0001.nii.gz"))
        assert channel.GetSpacing() == pytest.approx(image.GetSpacing())
        assert channel.GetOrigin() == pytest.approx(image.GetOrigin())
        assert channel.GetDirection() == pytest.approx(image.GetDirection())
        code = ["T1", "T2", "T3"].index(stage) + 1
        expected = np.where(sitk.GetArrayFromImage(image) != 0, code, 0)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(channel), expected)

    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(raw), num_processes=1)  # raises on any problem

    # a second attribute in a second run: binned age, in bin order, its own channel
    _add(root, "-t", table, "-id_column", "patient", "-attribute_column", "age", "-bins", "50", "65")
    ds = json.loads((raw / "dataset.json").read_text())
    assert "attribute" not in ds and [b["name"] for b in ds["attributes"]] == ["stage", "age"]
    age = ds["attributes"][1]
    assert age["levels"] == ["<50", "50-65", ">=65"] and age["channel"] == 2
    assert age["cases"] == {"c0": ">=65", "c1": "<50", "c2": "50-65"} and age["test_cases"] == {"c3": ">=65"}
    assert ds["channel_names"] == {"0": "CT", "1": "noNorm", "2": "noNorm"}
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTr" / "c1_0002.nii.gz"))).max() == 1
    verify_dataset_integrity(str(raw), num_processes=1)


def test_refusals_leave_the_dataset_byte_identical(existing):
    root, raw, table = existing
    before = _digest(raw.parent)
    # a continuous column without bins
    p = _add(root, "-t", table, "-id_column", "patient", "-attribute_column", "age", check=False)
    assert p.returncode == 2 and "looks continuous" in p.stderr and "-bins" in p.stderr
    # missing values and cases: every one listed
    table2 = root / "t2.csv"
    table2.write_text("patient,stage\nc0,T2\nc1,\n")
    p = _add(root, "-t", table2, "-id_column", "patient", "-attribute_column", "stage", check=False)
    assert p.returncode == 2
    assert "2 case(s) have no row: c2, c3" in p.stderr and "1 case(s) have no value: c1" in p.stderr
    assert "--allow_unknown" in p.stderr
    # an unreadable image, found only after other cases were written (staged)
    (raw / "imagesTs" / "c3_0000.nii.gz").write_bytes(b"not a nifti")
    before_broken = _digest(raw.parent)
    p = _add(root, "-t", table, "-id_column", "patient", "-attribute_column", "stage", check=False)
    assert p.returncode == 2 and "imagesTs/c3: cannot read c3_0000.nii.gz" in p.stderr
    assert _digest(raw.parent) == before_broken
    assert before != before_broken


def test_unknown_values_and_overwrite(existing):
    root, raw, table = existing
    table2 = root / "t2.csv"
    table2.write_text("patient,stage\nc0,T2\nc1,\nc2,T3\n")
    _add(root, "-t", table2, "-id_column", "patient", "-attribute_column", "stage", "--allow_unknown")
    ds = json.loads((raw / "dataset.json").read_text())
    assert ds["attribute"]["cases"] == {"c0": "T2", "c1": None, "c2": "T3"}
    assert ds["attribute"]["test_cases"] == {"c3": None}
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTr" / "c1_0001.nii.gz"))).any()

    before = _digest(raw)
    p = _add(root, "-t", table, "-id_column", "patient", "-attribute_column", "stage", check=False)
    assert p.returncode == 2 and "has the attribute(s) stage already" in p.stderr and "--overwrite" in p.stderr
    assert _digest(raw) == before
    _add(root, "-t", table, "-id_column", "patient", "-attribute_column", "stage", "-levels", "T3", "T2", "T1",
         "--overwrite")
    ds = json.loads((raw / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "CT", "1": "noNorm"}  # the same channel, replaced
    assert ds["attribute"]["levels"] == ["T3", "T2", "T1"] and ds["attribute"]["cases"]["c1"] == "T1"
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTr" / "c1_0001.nii.gz"))).max() == 3
