"""The fairness report on real data: 150 PI-CAI whole-gland masks by two independent methods, grouped by centre and
by age bins, checked against an independent numpy computation on arrays read with SimpleITK."""
import csv
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial import cKDTree

from conftest import real_data
from nnunet_dmoe.evaluation import attributes_from_table, evaluate_entry_point, evaluate_folders

DATA = real_data("picai_wholegland")
REF, AUTO = os.path.join(DATA, "reference"), os.path.join(DATA, "automatic")


@pytest.fixture(scope="module")
def marksheet():
    with open(os.path.join(DATA, "marksheet.csv"), newline="") as f:
        return {f"{r['patient_id']}_{r['study_id']}": r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def table(marksheet, tmp_path_factory):
    """The marksheet with one case-id column (<patient>_<study>, the file names)."""
    path = tmp_path_factory.mktemp("attr") / "attributes.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "center", "age"])
        for case, r in marksheet.items():
            w.writerow([case, r["center"], r["patient_age"]])
    return str(path)


@pytest.fixture(scope="module")
def arrays():
    """Independent reading: SimpleITK, no nnU-Net."""
    out = {}
    for f in sorted(os.listdir(REF)):
        case = f[: -len(".nii.gz")]
        ref = sitk.ReadImage(os.path.join(REF, f))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(AUTO, f))) == 1
        out[case] = (sitk.GetArrayFromImage(ref) == 1, pred, ref.GetSpacing()[::-1])
    return out


def _dice_iou(r, p):
    tp = np.logical_and(r, p).sum()
    return 2 * tp / (r.sum() + p.sum()), tp / np.logical_or(r, p).sum()


def _expected(arrays, group_of):
    """Per-case Dice/IoU, group means and ES in plain numpy."""
    cases = sorted(arrays)
    scores = {c: _dice_iou(*arrays[c][:2]) for c in cases}
    out = {}
    for k, m in enumerate(("Dice", "IoU")):
        v = np.array([scores[c][k] for c in cases])
        g = np.array([group_of[c] for c in cases])
        means = {lv: v[g == lv].mean() for lv in sorted(set(g))}
        m_all = v.mean()
        out[m] = {"all": m_all, "groups": means,
                  "es": m_all / (1 + sum(abs(x - m_all) for x in means.values())),
                  "worst": min(means, key=means.get), "per_case": dict(zip(cases, v))}
    return out


@pytest.fixture(scope="module")
def full_run(table, tmp_path_factory):
    """All 150 cases by centre, 1000 resamples, through the command line."""
    out = tmp_path_factory.mktemp("report")
    evaluate_entry_point(["-ref", REF, "-pred", AUTO, "-l", "1", "-o", str(out), "-attributes", table,
                          "-id_column", "case", "-attribute_column", "center"])
    return out


def test_full_report_by_centre_matches_numpy(full_run, arrays, marksheet):
    s = json.load(open(full_run / "summary.json"))
    exp = _expected(arrays, {c: marksheet[c]["center"] for c in arrays})
    assert s["n_cases"] == 150 and s["n_boot"] == 1000 and s["seed"] == 0
    assert {g: s["groups"][g]["n"] for g in s["groups"]} == {"PCNN": 50, "RUMC": 50, "ZGT": 50}
    for m in ("Dice", "IoU"):
        assert s["overall"][m] == pytest.approx(exp[m]["all"], abs=1e-9)
        for g, v in exp[m]["groups"].items():
            assert s["groups"][g][m] == pytest.approx(v, abs=1e-9)
        assert s["es"][m] == pytest.approx(exp[m]["es"], abs=1e-9)
        assert s["worst_group"][m] == exp[m]["worst"]
        lo, hi = s["ci"]["overall"][m]
        assert lo < s["overall"][m] < hi and hi - lo < 0.05
        lo, hi = s["ci"]["es"][m]
        assert lo < s["es"][m] < hi
    # the values of this data set, so that a change of convention shows up
    assert s["overall"]["Dice"] == pytest.approx(0.9811, abs=5e-4)
    assert s["es"]["Dice"] == pytest.approx(0.9667, abs=5e-4)
    assert s["worst_group"] == {"Dice": "RUMC", "IoU": "RUMC", "HD95": "RUMC", "NSD": "RUMC"}
    assert "HD95" not in s["es"] and set(s["es"]) == {"Dice", "IoU", "NSD"}
    with open(full_run / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 150
    for r in rows:
        assert float(r["Dice"]) == pytest.approx(exp["Dice"]["per_case"][r["case"]], rel=1e-5)
        assert r["group"] == marksheet[r["case"]]["center"]
    md = open(full_run / "report.md").read()
    assert "All: ES-Dice" in md and "RUMC (n=50): Dice" in md
    ci = s["ci"]["es"]["Dice"]
    assert f"{s['es']['Dice']:.3f} ({ci[0]:.3f}–{ci[1]:.3f})" in md
    assert md.count("†") >= 4  # Dice and IoU of RUMC in the paper table, NSD and HD95 in the surface table
    assert os.path.getsize(full_run / "report.png") > 10_000


def test_age_bins_subset_with_empty_level(table, arrays, marksheet, tmp_path):
    """40 cases by age bins; '<30' has no case: reported with n=0, NaN, no crash."""
    cases = sorted(arrays)[::4][:40]
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for d, src in ((ref, REF), (pred, AUTO)):
        d.mkdir()
        for c in cases:
            os.symlink(os.path.join(src, c + ".nii.gz"), d / (c + ".nii.gz"))
    attrs = attributes_from_table(table, "case", "age", bins=[30, 60, 70])
    s = evaluate_folders(str(ref), str(pred), [1], attrs, str(tmp_path / "out"), n_boot=200, seed=1)
    assert list(s["groups"]) == ["<30", "30-60", "60-70", ">=70"]
    assert s["groups"]["<30"]["n"] == 0 and np.isnan(s["groups"]["<30"]["Dice"])

    def age_bin(c):
        a = float(marksheet[c]["patient_age"])
        return "30-60" if a < 60 else "60-70" if a < 70 else ">=70"
    exp = _expected({c: arrays[c] for c in cases}, {c: age_bin(c) for c in cases})
    for m in ("Dice", "IoU"):
        for g, v in exp[m]["groups"].items():
            assert s["groups"][g][m] == pytest.approx(v, abs=1e-9)
            assert s["groups"][g]["n"] == sum(age_bin(c) == g for c in cases)
        assert s["es"][m] == pytest.approx(exp[m]["es"], abs=1e-9)
        assert s["worst_group"][m] == exp[m]["worst"]
    assert json.load(open(tmp_path / "out" / "summary.json"))["groups"]["<30"]["Dice"] is None


def _surface_points(mask, spacing):
    """Face-connected border voxels, by shifting a zero-padded copy (independent of scipy.ndimage)."""
    m = np.pad(mask, 1)
    inner = m.copy()
    for axis in range(3):
        inner &= np.roll(m, 1, axis) & np.roll(m, -1, axis)
    border = (m & ~inner)[1:-1, 1:-1, 1:-1]
    return np.argwhere(border) * np.asarray(spacing)


def test_hd95_and_nsd_against_kdtree(full_run, arrays):
    with open(full_run / "per_case.csv", newline="") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    for case in sorted(arrays)[::37]:  # 5 cases from the three centres
        r, p, spacing = arrays[case]
        pr, pp = _surface_points(r, spacing), _surface_points(p, spacing)
        d_rp, d_pr = cKDTree(pp).query(pr)[0], cKDTree(pr).query(pp)[0]
        hd95 = max(np.percentile(d_rp, 95), np.percentile(d_pr, 95))
        nsd = ((d_rp <= 1.0).sum() + (d_pr <= 1.0).sum()) / (len(d_rp) + len(d_pr))
        assert float(rows[case]["HD95"]) == pytest.approx(hd95, rel=1e-5), case
        assert float(rows[case]["NSD"]) == pytest.approx(nsd, rel=1e-5), case
