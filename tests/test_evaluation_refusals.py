"""nnUNetv2_dmoe_evaluate refuses impossible input instead of scoring it: labels that do not exist, label maps that
hold values which are not labels, an output folder inside an input folder, fewer than one process. Every refusal is
one line on stderr, exit status 2, and nothing written into -o."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_dmoe.evaluation import compare_methods, evaluate_entry_point, evaluate_folders

CASES = ("c0", "c1", "c2")
ATTRS = {"c0": "a", "c1": "a", "c2": "b"}
PREFIX = "nnUNetv2_dmoe_evaluate: error: "


def _write(folder, case, arr, dtype=np.uint8):
    os.makedirs(folder, exist_ok=True)
    img = sitk.GetImageFromArray(np.asarray(arr, dtype=dtype))
    img.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(img, os.path.join(folder, case + ".nii.gz"))


def _square(shift=0):
    r = np.zeros((4, 12, 12), np.uint8)
    r[1:3, 3:9, 3:9] = 1
    return np.roll(r, shift, axis=2)


def _dataset_json(path, labels=None):
    dj = {"channel_names": {"0": "CT", "1": "noNorm"},
          "attribute": {"name": "site", "levels": ["a", "b"], "channel": 1, "cases": {}, "test_cases": ATTRS}}
    if labels is not None:
        dj["labels"] = labels
    path.write_text(json.dumps(dj))
    return str(path)


@pytest.fixture
def folders(tmp_path):
    """Three cases with labels {0, 1}; c1's prediction is shifted by one voxel (Dice 0.8333)."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for i, case in enumerate(CASES):
        _write(str(ref), case, _square())
        _write(str(pred), case, _square(i % 2))
    return ref, pred, tmp_path


def _refused(argv, capsys):
    """Runs the command, expects exit status 2 and one line on stderr; returns the message after the prefix."""
    with pytest.raises(SystemExit) as e:
        evaluate_entry_point([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    assert "Traceback" not in err
    return lines[0][len(PREFIX):]


# ------------------------------------------------------------------------------------------ 1. labels after -l
@pytest.mark.parametrize("label", ["7", "0", "-1", "1,7"])
def test_label_not_declared_in_dataset_json_is_refused(folders, capsys, label):
    ref, pred, tmp = folders
    dj = _dataset_json(tmp / "dataset.json", {"background": 0, "lesion": 1})
    out = tmp / "out"
    msg = _refused(["-ref", ref, "-pred", pred, "-l", label, "-o", out, "-dataset_json", dj], capsys)
    assert msg.startswith(f"-l {label}: ")
    bad = label.split(",")[-1]
    assert f"label {bad}" in msg
    assert "-l 1" in msg  # the fix: the labels that exist
    if bad != "0" and not bad.startswith("-"):
        assert f"{dj} 'labels': 0 (background), 1 (lesion)" in msg
    assert not out.exists()


def test_label_zero_and_negative_name_background(folders):
    ref, pred, tmp = folders
    with pytest.raises(ValueError, match=r"^-l 0: label 0 is the background, which is not scored\. Score foreground"):
        evaluate_folders(str(ref), str(pred), ["0"], ATTRS, None, n_boot=0)
    with pytest.raises(ValueError, match=r"^-l -1: label -1 is negative; labels are 0 \(background\), 1, 2"):
        evaluate_folders(str(ref), str(pred), [-1], ATTRS, None, n_boot=0)


def test_label_absent_from_every_reference_is_refused_without_dataset_json(folders):
    ref, pred, tmp = folders
    for label in (7, "1,7"):
        with pytest.raises(ValueError) as e:
            evaluate_folders(str(ref), str(pred), [label], ATTRS, str(tmp / "out"), n_boot=0)
        msg = str(e.value)
        assert msg.startswith(f"-l {label}: no reference in {ref} holds label 7 (they hold 0, 1)")
        assert "Score a label they hold (-l 1)" in msg and "-dataset_json" in msg
    assert not (tmp / "out").exists()


def test_declared_label_without_reference_voxels_is_scored(folders, capsys):
    """dataset.json declares label 2, no case holds it: both masks empty everywhere, Dice 1 by convention."""
    ref, pred, tmp = folders
    dj = _dataset_json(tmp / "dataset.json", {"background": 0, "rim": 1, "cup": 2})
    evaluate_entry_point([str(a) for a in ["-ref", ref, "-pred", pred, "-l", "1", "2", "-o", tmp / "out",
                                           "-dataset_json", dj, "-bootstrap", "0"]])
    s = json.load(open(tmp / "out" / "summary.json"))
    assert s["labels"]["2"]["overall"]["Dice"] == 1.0
    assert s["labels"]["1"]["overall"]["Dice"] == pytest.approx((1 + 30 / 36 + 1) / 3)


def test_dataset_json_next_to_labels_folder_is_found(tmp_path):
    """ref = <dataset>/labelsTs: <dataset>/dataset.json declares the labels although -dataset_json is not given."""
    ref, pred = tmp_path / "Dataset001_X" / "labelsTs", tmp_path / "pred"
    for case in CASES:
        _write(str(ref), case, _square())
        _write(str(pred), case, _square())
    dj = _dataset_json(tmp_path / "Dataset001_X" / "dataset.json", {"background": 0, "organ": 1, "tumour": [1, 3]})
    with pytest.raises(ValueError, match=rf"^-l 2: label 2 is not a label of {dj} 'labels': 0 \(background\), "
                                         rf"1 \(organ\), 3\. Score a foreground label: -l 1 3\.$"):
        evaluate_folders(str(ref), str(pred), [2], ATTRS, None, n_boot=0)
    assert evaluate_folders(str(ref), str(pred), [3], ATTRS, None, n_boot=0)["overall"]["Dice"] == 1.0


# ------------------------------------------------------------------------------- 2. values in the label maps
def test_prediction_value_not_in_references_is_refused(folders, capsys):
    ref, pred, tmp = folders
    p = _square()
    p[0, 0, 0] = 9
    _write(str(pred), "c1", p)
    out = tmp / "out"
    dj = _dataset_json(tmp / "dataset.json")  # attributes only, no 'labels': the references define the labels
    msg = _refused(["-ref", ref, "-pred", pred, "-l", "1", "-o", out, "-dataset_json", dj], capsys)
    assert msg.startswith(f"prediction {pred / 'c1.nii.gz'} (case c1) holds 9, which is not a label of "
                          f"the reference folder {ref}: 0 (background), 1.")
    assert "-dataset_json" in msg
    assert not out.exists()


def test_prediction_and_reference_value_not_in_dataset_json_are_refused(folders):
    ref, pred, tmp = folders
    dj = _dataset_json(tmp / "dataset.json", {"background": 0, "lesion": 1})
    p = _square()
    p[0, :2, :2] = 255  # a 0/255 mask
    _write(str(pred), "c2", p)
    with pytest.raises(ValueError, match=rf"^prediction {pred / 'c2.nii.gz'} \(case c2\) holds 255, which is not a "
                                         rf"label of {dj} 'labels': 0 \(background\), 1 \(lesion\)\."):
        evaluate_folders(str(ref), str(pred), [1], ATTRS, None, n_boot=0, dataset_json=dj)
    r = _square()
    r[3, 11, 11] = 4
    _write(str(ref), "c0", r)
    with pytest.raises(ValueError, match=rf"^reference {ref / 'c0.nii.gz'} \(case c0\) holds 4, which is not a "
                                         rf"label of {dj}"):
        evaluate_folders(str(ref), str(pred), [1], ATTRS, None, n_boot=0, dataset_json=dj)


@pytest.mark.parametrize("who, value, num_processes", [("pred", 0.6, 1), ("ref", 0.6, 1), ("pred", 0.6, 2),
                                                        ("ref", -1.0, 1)])
def test_non_integer_or_negative_value_is_refused(folders, who, value, num_processes):
    ref, pred, tmp = folders
    folder = {"pred": pred, "ref": ref}[who]
    v = _square().astype(np.float32)
    v[1, 4, 4] = value
    _write(str(folder), "c2", v, dtype=np.float32)
    role = {"pred": "prediction", "ref": "reference"}[who]
    what = (r"negative value\(s\) -1: labels are 0 \(background\), 1, 2" if value == -1 else
            rf"non-integer value\(s\) {value:g}: a label map holds integer labels only\. Export the segmentation as "
            rf"labels")
    with pytest.raises(ValueError, match=rf"^{role} {folder / 'c2.nii.gz'} \(case c2\) holds the {what}"):
        evaluate_folders(str(ref), str(pred), [1], ATTRS, str(tmp / "out"), n_boot=0,
                         num_processes=num_processes)
    assert not (tmp / "out").exists()


@pytest.mark.parametrize("values, found", [([0, 1, 2, 255], (0, 1, 2, 255)), ([3, 7], (3, 7)), ([0, 0.6], "0.6"),
                                           ([0, np.nan, 1], "nan"), ([0, np.inf], "inf"), ([-1.5, 0], "-1.5"),
                                           ([2, -3, 0], "negative value(s) -3")])
def test_label_values_of_arrays(values, found):
    """The values of a label map: the fast path (a small range), the sorted path (255) and the refusals."""
    from nnunet_dmoe.evaluation._checks import label_values
    seg = np.array(values, dtype=np.float32 if isinstance(found, str) or 255 in values else np.uint8)
    if isinstance(found, tuple):
        assert label_values(seg, "prediction", "p.nii.gz", "c") == found
    else:
        with pytest.raises(ValueError, match=r"^prediction p\.nii\.gz \(case c\) holds the ") as e:
            label_values(seg, "prediction", "p.nii.gz", "c")
        assert found in str(e.value)


# ---------------------------------------------------------------------------------- 3. -o inside an input folder
@pytest.mark.parametrize("where, sub", [("pred", None), ("pred", "sub"), ("ref", None), ("compare", None),
                                        ("link", None)])
def test_output_inside_an_input_folder_is_refused(folders, capsys, where, sub):
    ref, pred, tmp = folders
    other = tmp / "other"
    for case in CASES:
        _write(str(other), case, _square())
    os.symlink(pred, tmp / "link")  # -o: a link to -pred is the same folder
    inside = {"pred": pred, "ref": ref, "compare": other, "link": pred}[where]
    out = {"link": tmp / "link"}.get(where, inside / sub if sub else inside)
    before = {d: sorted(os.listdir(d)) for d in (ref, pred, other)}
    dj = _dataset_json(tmp / "dataset.json")
    methods = ["-pred", pred] if where != "compare" else ["-compare", f"a={pred}", f"b={other}"]
    msg = _refused(["-ref", ref, *methods, "-l", "1", "-o", out, "-dataset_json", dj], capsys)
    flag = {"ref": "-ref", "compare": "-compare b"}.get(where, "-pred")
    assert msg.startswith(f"-o {out} is {'inside' if sub else 'the same folder as'} the {flag} folder {inside}:")
    assert "Give an output folder outside -ref, -pred and the -compare folders." in msg
    assert {d: sorted(os.listdir(d)) for d in (ref, pred, other)} == before


def test_library_refuses_output_inside_input(folders):
    ref, pred, tmp = folders
    with pytest.raises(ValueError, match=rf"^output_folder {pred / 'rep'} is inside the prediction folder {pred}"):
        evaluate_folders(str(ref), str(pred), [1], ATTRS, str(pred / "rep"), n_boot=0)
    with pytest.raises(ValueError, match=rf"^output_folder {ref} is the same folder as the reference folder {ref}"):
        compare_methods({"m": str(pred)}, str(ref), [1], ATTRS, str(ref), n_boot=0)
    assert sorted(os.listdir(pred)) == [f"{c}.nii.gz" for c in CASES]


# ---------------------------------------------------------------------------------------------------- 4. -np
@pytest.mark.parametrize("n", ["0", "-2"])
def test_np_below_one_is_refused(folders, capsys, n):
    ref, pred, tmp = folders
    dj = _dataset_json(tmp / "dataset.json")
    out = tmp / "out"
    msg = _refused(["-ref", ref, "-pred", pred, "-l", "1", "-o", out, "-dataset_json", dj, "-np", n], capsys)
    assert msg == f"-np {n}: give at least 1 process for reading and scoring the cases (e.g. -np 1)."
    assert not out.exists()


# ----------------------------------------------------------------------------------- the real console script
def test_console_script_prints_one_line_without_traceback(folders):
    ref, pred, tmp = folders
    script = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_dmoe_evaluate")
    env = {k: v for k, v in os.environ.items() if k != "NNUNET_DMOE_TRACEBACK"}
    run = subprocess.run([script, "-ref", str(ref), "-pred", str(pred), "-l", "1", "-o", str(tmp / "out")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.splitlines() == [PREFIX + "Give the attribute of each case: -dataset_json PATH (a dataset.json "
                                       "with an 'attribute' block) or -attributes TABLE -id_column C "
                                       "-attribute_column A."]
    assert not (tmp / "out").exists()
