"""The attribute-channel writer (``nnunet_dmoe.data.attach`` and ``nnUNetv2_dmoe_attach_attribute``) on NIfTI (3D, anisotropic,
rotated, shifted) and PNG (2D) cases: values, geometry, refusals, no silent overwrite, table formats, and a round trip
through nnU-Net's own reader and the channel decoder."""
import json
import os
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import VENV_BIN, nnunet_env
from nnunet_dmoe.data.attach import attach_attribute, load_model_dataset_json
from nnunet_dmoe.data.attribute import decode_attribute_channel
from nnunet_dmoe.data.tables import read_attribute_table

LEVELS = ["T1", "T2", "T3", "T4"]
CLI = os.path.join(VENV_BIN, "nnUNetv2_dmoe_attach_attribute")

# 3D: two image channels (0 and 2) around the attribute channel 1; anisotropic spacing, non-trivial origin and a
# rotated, permuted direction matrix
NIFTI_JSON = {"channel_names": {"0": "CT", "1": "noNorm", "2": "T2"}, "labels": {"background": 0, "target": 1},
              "numTraining": 0, "file_ending": ".nii.gz",
              "attribute": {"name": "tstage", "levels": LEVELS, "channel": 1, "cases": {}}}
PNG_JSON = {"channel_names": {"0": "gray", "1": "noNorm"}, "labels": {"background": 0, "target": 1},
            "numTraining": 0, "file_ending": ".png",
            "attribute": {"name": "tstage", "levels": LEVELS, "channel": 1, "cases": {}}}
SPACING = (0.7, 1.3, 3.1)
ORIGIN = (-12.5, 30.25, 7.125)
_c, _s = np.cos(0.4), np.sin(0.4)
DIRECTION = tuple((np.array([[_c, -_s, 0], [_s, _c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]])).ravel())
SHAPE3 = (5, 6, 7)  # numpy (z, y, x)
SHAPE2 = (9, 11)


def _images_3d(seed):
    """Two channels with different, overlapping supports (negative values count as inside) and their union."""
    rng = np.random.default_rng(seed)
    a = np.zeros(SHAPE3, np.float32)
    b = np.zeros(SHAPE3, np.float32)
    a[1:4, 1:4, 2:6] = rng.uniform(-900, -100, size=(3, 3, 4))
    b[2:5, 3:6, 0:3] = rng.uniform(1, 50, size=(3, 3, 3))
    return a, b, (a != 0) | (b != 0)


def _write_nifti(arr, path):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    sitk.WriteImage(img, str(path), True)


def _nifti_folder(folder, cases):
    folder.mkdir(parents=True, exist_ok=True)
    footprints = {}
    for k, case in enumerate(cases):
        a, b, fp = _images_3d(k)
        _write_nifti(a, folder / f"{case}_0000.nii.gz")
        _write_nifti(b, folder / f"{case}_0002.nii.gz")
        footprints[case] = fp
    return footprints


def _png_folder(folder, cases):
    folder.mkdir(parents=True, exist_ok=True)
    footprints = {}
    for k, case in enumerate(cases):
        rng = np.random.default_rng(100 + k)
        img = np.zeros(SHAPE2, np.uint8)
        img[2:7, 3 + k:9] = rng.integers(1, 256, size=(5, 6 - k))
        Image.fromarray(img).save(folder / f"{case}_0000.png")
        footprints[case] = img != 0
    return footprints


def _cli(*args, env=None):
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=120, env=env)


def _dataset_json(tmp_path, content, name="model"):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / "dataset.json").write_text(json.dumps(content))
    return d


def _read_nifti(path):
    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


# ---------------------------------------------------------------------------------------------------------- values


def test_nifti_values_and_exact_geometry(tmp_path):
    fps = _nifti_folder(tmp_path / "in", ["caseA", "caseB", "caseC"])
    written = attach_attribute(str(tmp_path / "in"), {"caseA": "T2", "caseB": None, "caseC": "T4", "other": "T1"},
                               NIFTI_JSON, verbose=False)
    assert written == {"caseA": "T2", "caseB": None, "caseC": "T4"}
    for case, code in (("caseA", 2), ("caseB", 0), ("caseC", 4)):
        ref = sitk.ReadImage(str(tmp_path / "in" / f"{case}_0000.nii.gz"))
        img, arr = _read_nifti(tmp_path / "in" / f"{case}_0001.nii.gz")
        assert img.GetSize() == ref.GetSize() == SHAPE3[::-1]
        assert img.GetSpacing() == ref.GetSpacing()
        assert img.GetOrigin() == ref.GetOrigin()
        assert img.GetDirection() == ref.GetDirection()
        assert np.allclose(img.GetDirection(), DIRECTION) and np.allclose(img.GetOrigin(), ORIGIN)
        np.testing.assert_array_equal(arr, fps[case].astype(np.uint8) * code)
        assert arr.dtype.kind in "ui"
    assert 0 < fps["caseA"].sum() < fps["caseA"].size  # the footprint is a real subset: 0 outside is tested
    # unknown: 0 everywhere
    assert not _read_nifti(tmp_path / "in" / "caseB_0001.nii.gz")[1].any()


def test_png_values(tmp_path):
    fps = _png_folder(tmp_path / "in", ["p1", "p2", "p3"])
    attach_attribute(str(tmp_path / "in"), case_levels={"p1": "T1", "p2": "T3", "p3": "T4"},
                     dataset_json=PNG_JSON, verbose=False)
    for case, code in (("p1", 1), ("p2", 3), ("p3", 4)):
        arr = np.asarray(Image.open(tmp_path / "in" / f"{case}_0001.png"))
        assert arr.shape == SHAPE2 and arr.dtype == np.uint8
        np.testing.assert_array_equal(arr, fps[case].astype(np.uint8) * code)


def test_png_unknown_is_all_zero(tmp_path):
    _png_folder(tmp_path / "in", ["p1"])
    attach_attribute(str(tmp_path / "in"), {"p1": None}, PNG_JSON, verbose=False)
    arr = np.asarray(Image.open(tmp_path / "in" / "p1_0001.png"))
    assert arr.shape == SHAPE2 and not arr.any()


# -------------------------------------------------------------------------------------------------------- refusals


def test_refuses_unknown_levels_and_lists_every_case(tmp_path):
    _png_folder(tmp_path / "in", ["p1", "p2", "p3"])
    with pytest.raises(ValueError) as e:
        attach_attribute(str(tmp_path / "in"), {"p1": "T9", "p2": "T2", "p3": "stage III"}, PNG_JSON, verbose=False)
    msg = str(e.value)
    assert "2 case(s)" in msg and "p1 ('T9')" in msg and "p3 ('stage III')" in msg and "p2" not in msg
    assert "['T1', 'T2', 'T3', 'T4']" in msg
    assert sorted(os.listdir(tmp_path / "in")) == ["p1_0000.png", "p2_0000.png", "p3_0000.png"]  # nothing written


def test_refuses_cases_missing_from_the_table(tmp_path):
    _nifti_folder(tmp_path / "in", ["caseA", "caseB", "caseC"])
    with pytest.raises(ValueError) as e:
        attach_attribute(str(tmp_path / "in"), {"caseB": "T1"}, NIFTI_JSON, verbose=False)
    assert "2 case(s)" in str(e.value) and "caseA, caseC" in str(e.value)
    assert not list((tmp_path / "in").glob("*_0001.nii.gz"))


def test_refuses_missing_image_channels(tmp_path):
    _nifti_folder(tmp_path / "in", ["caseA", "caseB", "caseC"])
    os.remove(tmp_path / "in" / "caseA_0002.nii.gz")
    os.remove(tmp_path / "in" / "caseC_0000.nii.gz")
    with pytest.raises(ValueError) as e:
        attach_attribute(str(tmp_path / "in"), {c: "T1" for c in ("caseA", "caseB", "caseC")}, NIFTI_JSON,
                         verbose=False)
    msg = str(e.value)
    assert "2 case(s)" in msg and "caseA, caseC" in msg and "CASE_0000.nii.gz, CASE_0002.nii.gz" in msg
    assert not list((tmp_path / "in").glob("*_0001.nii.gz"))


def test_refuses_empty_folder_and_bad_model_json(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(ValueError, match="holds no nnU-Net-named images"):
        attach_attribute(str(tmp_path / "in"), {}, PNG_JSON, verbose=False)
    with pytest.raises(ValueError, match="does not exist"):
        attach_attribute(str(tmp_path / "nope"), {}, PNG_JSON, verbose=False)
    no_block = {k: v for k, v in PNG_JSON.items() if k != "attribute"}
    with pytest.raises(ValueError, match="no 'attribute' block"):
        attach_attribute(str(tmp_path / "in"), {}, no_block, verbose=False)


def test_never_overwrites_unless_asked(tmp_path):
    fps = _png_folder(tmp_path / "in", ["p1", "p2"])
    attach_attribute(str(tmp_path / "in"), {"p1": "T1", "p2": "T2"}, PNG_JSON, verbose=False)
    before = {p: (tmp_path / "in" / p).read_bytes() for p in ("p1_0001.png", "p2_0001.png")}
    with pytest.raises(FileExistsError, match="p1_0001.png, p2_0001.png"):
        attach_attribute(str(tmp_path / "in"), {"p1": "T3", "p2": "T3"}, PNG_JSON, verbose=False)
    assert {p: (tmp_path / "in" / p).read_bytes() for p in before} == before
    # the command refuses as well, with one line and no traceback
    table = tmp_path / "t.csv"
    table.write_text("case,value\np1,T3\np2,T4\n")
    mj = _dataset_json(tmp_path, PNG_JSON)
    p = _cli("-i", tmp_path / "in", "-t", table, "-dataset_json", mj)
    assert p.returncode != 0 and "exist already" in p.stderr and "--overwrite" in p.stderr
    assert "Traceback" not in p.stderr
    assert {p_: (tmp_path / "in" / p_).read_bytes() for p_ in before} == before
    # --overwrite replaces them
    p = _cli("-i", tmp_path / "in", "-t", table, "-dataset_json", mj, "--overwrite")
    assert p.returncode == 0, p.stderr
    for case, code in (("p1", 3), ("p2", 4)):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "in" / f"{case}_0001.png")),
                                      fps[case].astype(np.uint8) * code)


def test_output_folder_gets_copies_and_input_stays_untouched(tmp_path):
    fps = _nifti_folder(tmp_path / "in", ["caseA", "caseB"])
    before = sorted(os.listdir(tmp_path / "in"))
    table = tmp_path / "t.csv"
    table.write_text("case,value\ncaseA,T3\ncaseB,\n")
    out = tmp_path / "out"
    p = _cli("-i", tmp_path / "in", "-t", table, "-dataset_json", _dataset_json(tmp_path, NIFTI_JSON), "-o", out)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(tmp_path / "in")) == before
    assert sorted(os.listdir(out)) == sorted(before + ["caseA_0001.nii.gz", "caseB_0001.nii.gz"])
    for f in before:
        assert (out / f).read_bytes() == (tmp_path / "in" / f).read_bytes()
    np.testing.assert_array_equal(_read_nifti(out / "caseA_0001.nii.gz")[1], fps["caseA"].astype(np.uint8) * 3)
    assert not _read_nifti(out / "caseB_0001.nii.gz")[1].any()
    # existing image copies in the output folder are not overwritten silently either
    os.remove(out / "caseA_0001.nii.gz")
    os.remove(out / "caseB_0001.nii.gz")
    with pytest.raises(FileExistsError, match="caseA_0000.nii.gz"):
        attach_attribute(str(tmp_path / "in"), {"caseA": "T1", "caseB": "T1"}, NIFTI_JSON, str(out), verbose=False)
    attach_attribute(str(tmp_path / "in"), {"caseA": "T1", "caseB": "T1"}, NIFTI_JSON, str(out), overwrite=True,
                     verbose=False)
    np.testing.assert_array_equal(_read_nifti(out / "caseB_0001.nii.gz")[1], fps["caseB"].astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------- tables


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json_object", "json_records"])
def test_cli_table_formats(tmp_path, fmt):
    fps = _png_folder(tmp_path / "in", ["p1", "p2", "p3"])
    rows = [("p1", "T2"), ("p2", ""), ("p3", "T4")]
    if fmt == "csv":
        table = tmp_path / "t.csv"
        table.write_text("pid,stage\n" + "".join(f"{c},{v}\n" for c, v in rows))
    elif fmt == "tsv":
        table = tmp_path / "t.tsv"
        table.write_text("pid\tstage\n" + "".join(f"{c}\t{v}\n" for c, v in rows))
    elif fmt == "json_object":
        table = tmp_path / "t.json"
        table.write_text(json.dumps({c: (v or None) for c, v in rows}))
    else:
        table = tmp_path / "t.json"
        table.write_text(json.dumps([{"pid": c, "stage": v or "unknown"} for c, v in rows]))
    cols = [] if fmt == "json_object" else ["-id_column", "pid", "-attribute_column", "stage"]
    p = _cli("-i", tmp_path / "in", "-t", table, "-dataset_json", _dataset_json(tmp_path, PNG_JSON) / "dataset.json",
             *cols)
    assert p.returncode == 0, p.stderr
    for case, code in (("p1", 2), ("p2", 0), ("p3", 4)):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "in" / f"{case}_0001.png")),
                                      fps[case].astype(np.uint8) * code)


def test_cli_numeric_column_with_bins_and_dataset_from_nnunet_raw(tmp_path):
    """Age binned by edges 40 60 -> levels '<40', '40-60', '>=60'; the model's dataset.json found by -d."""
    dj = dict(PNG_JSON, attribute={"name": "age", "levels": ["<40", "40-60", ">=60"], "channel": 1, "cases": {}},
              name="Dataset993_Ages")
    raw = tmp_path / "raw" / "Dataset993_Ages"
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps(dj))
    fps = _png_folder(tmp_path / "in", ["a1", "a2", "a3", "a4"])
    table = tmp_path / "ages.csv"
    table.write_text("case,age\na1.png,39.9\na2,40\na3,77\na4,nan\n")  # an id with the file ending is accepted
    p = _cli("-i", tmp_path / "in", "-t", table, "-attribute_column", "age", "-bins", "40", "60", "-d", "993",
             env=nnunet_env(tmp_path))
    assert p.returncode == 0, p.stderr
    for case, code in (("a1", 1), ("a2", 2), ("a3", 3), ("a4", 0)):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "in" / f"{case}_0001.png")),
                                      fps[case].astype(np.uint8) * code)
    # a non-numeric cell in a binned column is refused by the command, naming the row
    table.write_text("case,age\na1,old\n")
    p = _cli("-i", tmp_path / "in", "-t", table, "-attribute_column", "age", "-bins", "40", "60", "-d", "993",
             "--overwrite", env=nnunet_env(tmp_path))
    assert p.returncode != 0 and "row 2 (a1): 'old'" in p.stderr and "Traceback" not in p.stderr


def test_cli_reports_every_unknown_level(tmp_path):
    _png_folder(tmp_path / "in", ["p1", "p2", "p3"])
    table = tmp_path / "t.csv"
    table.write_text("case,value\np1,T5\np2,T2\np3,t1\n")
    p = _cli("-i", tmp_path / "in", "-t", table, "-dataset_json", _dataset_json(tmp_path, PNG_JSON))
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "p1 ('T5')" in p.stderr and "p3 ('t1')" in p.stderr and "2 case(s)" in p.stderr
    assert not list((tmp_path / "in").glob("*_0001.png"))


def test_load_model_dataset_json(tmp_path):
    mj = _dataset_json(tmp_path, NIFTI_JSON)
    assert load_model_dataset_json(str(mj)) == NIFTI_JSON
    assert load_model_dataset_json(str(mj / "dataset.json")) == NIFTI_JSON
    with pytest.raises(ValueError, match="does not exist"):
        load_model_dataset_json(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="-dataset_json"):
        load_model_dataset_json()


# ------------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("kind", ["nifti", "png"])
def test_round_trip_through_nnunet_reader(tmp_path, kind):
    """nnU-Net's reader (as nnUNetv2_predict uses it) reads the completed case: every channel on one grid, and the
    attribute channel decodes to the table's level (unknown -> None)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    dj, make = (NIFTI_JSON, _nifti_folder) if kind == "nifti" else (PNG_JSON, _png_folder)
    fps = make(tmp_path / "in", ["r1", "r2", "r3"])
    table = tmp_path / "t.csv"
    table.write_text("case,value\nr1,T1\nr2,T3\nr3,unknown\n")
    attach_attribute(str(tmp_path / "in"), read_attribute_table(str(table)), dj, verbose=False)
    n = len(dj["channel_names"])
    fe = dj["file_ending"]
    for case, expected in (("r1", 0), ("r2", 2), ("r3", None)):
        files = [str(tmp_path / "in" / f"{case}_{i:04d}{fe}") for i in range(n)]
        rw = determine_reader_writer_from_dataset_json(dj, files[0], verbose=False)()
        data, props = rw.read_images(files)  # refuses channels whose shape or geometry differ
        assert data.shape[0] == n and data.shape[1:] == ((1,) + SHAPE2 if kind == "png" else SHAPE3)
        assert decode_attribute_channel(data[1], len(LEVELS), case) == expected
        # the image channels are unchanged and the attribute is exactly on their footprint
        footprint = np.any(data[[i for i in range(n) if i != 1]] != 0, axis=0)
        np.testing.assert_array_equal(footprint.reshape(fps[case].shape), fps[case])
        np.testing.assert_array_equal(data[1] > 0, footprint if expected is not None else np.zeros_like(footprint))
        if kind == "nifti":
            assert np.allclose(props["spacing"], SPACING[::-1])


def test_table_errors_list_twenty_rows_then_the_count(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("case,value\n" + "".join(f"c{i:02d},old\n" for i in range(22)))
    with pytest.raises(ValueError, match=r"are not numbers: row 2 \(c00\): 'old'; .*; row 21 \(c19\): 'old'; "
                                         r"\.\.\. \(2 more\)$"):
        read_attribute_table(str(table), bins=[40, 60])
    table.write_text("case,value\n" + "".join(f"c{i:02d},T1\nc{i:02d},T2\n" for i in range(21)))
    with pytest.raises(ValueError, match=r"listed more than once: c00, c01, .*, c19, \.\.\. \(1 more\)$"):
        read_attribute_table(str(table))


def test_attach_and_evaluate_share_the_table_flags(capsys):
    from nnunet_dmoe.cli import Parser
    from nnunet_dmoe.evaluation import evaluate_entry_point
    from nnunet_dmoe.data.tables import add_attribute_table_arguments
    parser = Parser()
    add_attribute_table_arguments(parser, "-t", "[REQUIRED] table", required=True)
    args = parser.parse_args(["-t", "x.csv", "-id_column", "pid", "-attribute_column", "age", "-bins", "40", "60"])
    assert vars(args) == {"t": "x.csv", "id_column": "pid", "attribute_column": "age", "bins": [40.0, 60.0]}
    assert vars(parser.parse_args(["-t", "x.csv"])) == {"t": "x.csv", "id_column": None, "attribute_column": None,
                                                        "bins": None}
    attach_help = _cli("-h").stdout
    with pytest.raises(SystemExit):
        evaluate_entry_point(["-h"])
    evaluate_help = capsys.readouterr().out
    for flag, text in (("-t", attach_help), ("-attributes", evaluate_help)):
        text = " ".join(text.split())  # argparse wraps at the terminal width
        assert f"-id_column ID_COLUMN [OPTIONAL] column of {flag} with the case id. Default: 'case'" in text
        assert (f"-attribute_column ATTRIBUTE_COLUMN [ATTRIBUTE_COLUMN ...] [OPTIONAL] column of {flag} with the "
                f"attribute;") in text
        assert "--id-column" not in text  # the old spelling works but is not advertised
        assert "-bins BINS [BINS ...] [OPTIONAL] edges that bin a numeric attribute column, e.g. -bins 60 70" in text


# ------------------------------------------------------------------------------------------- several attributes
# attributes on channels 1 (stage) and 3 (centre), image channels 0 and 2
MULTI_JSON = {"channel_names": {"0": "CT", "1": "noNorm", "2": "T2", "3": "noNorm"},
              "labels": {"background": 0, "target": 1}, "numTraining": 0, "file_ending": ".nii.gz",
              "attributes": [{"name": "tstage", "levels": LEVELS, "channel": 1, "cases": {}},
                             {"name": "centre", "levels": ["A", "B", "C"], "channel": 3, "cases": {}}]}


def test_cli_two_columns_write_both_channels(tmp_path):
    fps = _nifti_folder(tmp_path / "in", ["caseA", "caseB"])
    table = tmp_path / "t.csv"
    table.write_text("case,stage,site\ncaseA,T3,B\ncaseB,,C\n")
    model = _dataset_json(tmp_path, MULTI_JSON)
    p = _cli("-i", tmp_path / "in", "-t", table, "-dataset_json", model, "-attribute_column", "stage",
             "-attribute_column", "site", "-o", tmp_path / "out")
    assert p.returncode == 0, p.stderr
    for case, stage, centre in (("caseA", 3, 2), ("caseB", 0, 3)):
        for channel, code in ((1, stage), (3, centre)):
            img, arr = _read_nifti(tmp_path / "out" / f"{case}_{channel:04d}.nii.gz")
            assert img.GetSpacing() == pytest.approx(SPACING) and img.GetOrigin() == pytest.approx(ORIGIN)
            np.testing.assert_array_equal(arr, fps[case].astype(np.uint8) * code)
    assert sorted(f.name for f in (tmp_path / "out").iterdir())[:4] == [
        "caseA_0000.nii.gz", "caseA_0001.nii.gz", "caseA_0002.nii.gz", "caseA_0003.nii.gz"]
    # one column for two attributes, and a level the model does not know: errors name the column, case and fix
    p = _cli("-i", tmp_path / "in", "-t", table, "-dataset_json", model, "-attribute_column", "stage")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "has 2 attributes (tstage, centre)" in p.stderr and "Repeat -attribute_column" in p.stderr
    table.write_text("case,tstage,centre\ncaseA,T3,Z\ncaseB,T1,A\n")  # default columns: the attributes' names
    p = _cli("-i", tmp_path / "in", "-t", table, "-dataset_json", model)
    assert p.returncode != 0 and f"attribute 'centre' (column 'centre' of {table})" in p.stderr
    assert "caseA ('Z')" in p.stderr and not list((tmp_path / "in").glob("*_0003.nii.gz"))
    written = attach_attribute(str(tmp_path / "in"), [{"caseA": "T1", "caseB": "T2"}, {"caseA": "A", "caseB": None}],
                               MULTI_JSON, verbose=False)
    assert written == [{"caseA": "T1", "caseB": "T2"}, {"caseA": "A", "caseB": None}]
    assert not _read_nifti(tmp_path / "in" / "caseB_0003.nii.gz")[1].any()
