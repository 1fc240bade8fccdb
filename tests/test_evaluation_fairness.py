"""Hand-made tables for the fairness statistics, the empty-mask conventions and bad input of the evaluation."""
import json
import os
import re

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_dmoe.evaluation import (FairnessFrame, attributes_from_dataset_json, compare_methods, equity_scaled,
                                    evaluate_entry_point, evaluate_folders, metric_per_case, resample_counts,
                                    resample_seeds)

# ---------------------------------------------------------------------------------------------------------------
# ES, group means and worst group: hand-made tables
# ---------------------------------------------------------------------------------------------------------------
ES_TABLE = [
    # scores, groups, levels, overall, group means, ES, worst
    ([0.9, 0.7, 0.6, 0.8], ["a", "a", "b", None], ["a", "b"], 0.75, {"a": 0.8, "b": 0.6}, 0.75 / 1.2, "b"),
    ([1.0, 1.0, 1.0], ["a", "b", "b"], ["a", "b"], 1.0, {"a": 1.0, "b": 1.0}, 1.0, "a"),
    ([0.5, 0.9, 0.7, 0.7], ["x", "y", "z", "z"], ["x", "y", "z"], 0.7, {"x": 0.5, "y": 0.9, "z": 0.7},
     0.7 / 1.4, "x"),
    # a level without cases: n=0, NaN mean, out of ES and worst group
    ([0.2, 0.4], ["lo", "lo"], ["lo", "hi"], 0.3, {"lo": 0.3, "hi": np.nan}, 0.3 / 1.0, "lo"),
    # unknown cases move M_all but are not a group of the ES sum
    ([0.6, 0.6, 0.0], ["a", "a", None], ["a"], 0.4, {"a": 0.6}, 0.4 / 1.2, "a"),
]


@pytest.mark.parametrize("scores, groups, levels, overall, means, es, worst", ES_TABLE)
def test_es_table(scores, groups, levels, overall, means, es, worst):
    ff = FairnessFrame(scores={"Dice": scores}, groups=groups, levels=levels)
    assert ff.overall["Dice"] == pytest.approx(overall)
    for g, m in means.items():
        assert ff.by_group[g]["Dice"] == pytest.approx(m, nan_ok=True)
    assert ff.es["Dice"] == pytest.approx(es)
    assert ff.worst_group["Dice"] == worst
    assert sum(ff.group_sizes.values()) == len(scores)
    assert ("unknown" in ff.groups) == (None in groups)


def test_lower_is_better_metric_has_no_es_and_worst_is_max():
    ff = FairnessFrame(scores={"HD95": [1.0, 3.0, np.nan, 2.0], "Dice": [0.9, 0.5, 0.0, 0.7]},
                       groups=["a", "b", "b", "c"], levels=["a", "b", "c"],
                       higher_is_better={"HD95": False, "Dice": True})
    assert set(ff.es) == {"Dice"}
    assert ff.by_group["b"]["HD95"] == 3.0  # nanmean: the NaN case is skipped
    assert ff.worst_group == {"HD95": "b", "Dice": "b"}
    assert ff.group_max()["HD95"] == 3.0 and ff.group_min()["Dice"] == pytest.approx(0.25)


def _manual_bootstrap(scores, groups, levels, n_boot, seed):
    """Independent loop: the same per-resample seeds, np.nanmean per group, ES with NaN for a missing group."""
    scores, groups = np.asarray(scores, float), np.asarray(groups, dtype=object)
    overall, es, per_group = [], [], {lv: [] for lv in levels}
    for s in resample_seeds(seed, n_boot):
        idx = np.random.default_rng(int(s)).integers(0, len(scores), size=len(scores))
        sc, gr = scores[idx], groups[idx]
        m_all = np.nanmean(sc)
        gm = {lv: (np.nanmean(sc[gr == lv]) if np.any(gr == lv) else np.nan) for lv in levels}
        overall.append(m_all)
        for lv in levels:
            per_group[lv].append(gm[lv])
        es.append(m_all / (1 + sum(abs(gm[lv] - m_all) for lv in levels)))
    q = (0.025, 0.975)
    return (np.quantile(overall, q), np.nanquantile(es, q), {lv: np.nanquantile(v, q) for lv, v in per_group.items()},
            np.mean(np.isnan(es)))


@pytest.mark.parametrize("seed", [0, 7, 12345])
def test_bootstrap_matches_manual_loop(seed):
    rng = np.random.default_rng(99)
    scores = rng.uniform(0.5, 1.0, 20)
    groups = ["rare"] + ["a"] * 12 + ["b"] * 7  # "rare" is missing from ~36% of the resamples
    ff = FairnessFrame(scores={"Dice": scores}, groups=groups, levels=["a", "b", "rare"],
                       n_boot=300, ci_quantiles=(0.025, 0.975), random_state=seed)
    overall, es, per_group, nan_share = _manual_bootstrap(scores, groups, ["a", "b", "rare"], 300, seed)
    assert 0.2 < nan_share < 0.5  # the missing-group case is exercised
    assert [ff.overall_ci[0]["Dice"], ff.overall_ci[1]["Dice"]] == pytest.approx(list(overall))
    assert [ff.es_ci[0]["Dice"], ff.es_ci[1]["Dice"]] == pytest.approx(list(es))
    for lv in ("a", "b", "rare"):
        assert [ff.by_group_ci[0][lv]["Dice"], ff.by_group_ci[1][lv]["Dice"]] == pytest.approx(list(per_group[lv]))
    lo, hi = ff.es_ci[0]["Dice"], ff.es_ci[1]["Dice"]
    assert lo <= ff.es["Dice"] <= hi


def test_bootstrap_seeds_are_stable():
    assert resample_seeds(3, 10)[:4].tolist() == resample_seeds(3, 4).tolist()
    assert resample_seeds(3, 4).tolist() != resample_seeds(4, 4).tolist()
    counts = resample_counts(15, resample_seeds(0, 50))
    assert counts.shape == (50, 15) and np.all(counts.sum(axis=1) == 15)
    kw = dict(scores={"Dice": np.linspace(0, 1, 15)}, groups=["a", "b", "c"] * 5, levels=["a", "b", "c"],
              n_boot=50, ci_quantiles=(0.05, 0.5, 0.95))
    a, b = FairnessFrame(random_state=1, **kw), FairnessFrame(random_state=1, **kw)
    assert a.es_ci == b.es_ci and len(a.es_ci) == 3
    assert FairnessFrame(random_state=2, **kw).es_ci != a.es_ci


def test_frame_argument_errors():
    with pytest.raises(ValueError, match="n_boot and ci_quantiles must be given together"):
        FairnessFrame(scores={"Dice": [1.0]}, groups=["a"], levels=["a"], n_boot=10)
    with pytest.raises(ValueError, match="neither a level"):
        FairnessFrame(scores={"Dice": [1.0]}, groups=["zz"], levels=["a"])
    with pytest.raises(ValueError, match="has 2 values"):
        FairnessFrame(scores={"Dice": [1.0, 1.0]}, groups=["a"], levels=["a"])
    with pytest.raises(RuntimeError, match="no confidence intervals"):
        FairnessFrame(scores={"Dice": [1.0]}, groups=["a"], levels=["a"]).overall_ci


def test_equity_scaled_vectorised():
    out = equity_scaled(np.array([0.8, 0.5]), np.array([[0.9, 0.7], [0.5, np.nan]]))
    assert out[0] == pytest.approx(0.8 / 1.2) and np.isnan(out[1])


# ---------------------------------------------------------------------------------------------------------------
# per-case metrics and the empty-mask conventions
# ---------------------------------------------------------------------------------------------------------------
def _cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


EMPTY = np.zeros((4, 5, 6), bool)
FULL = _cube((4, 5, 6), (1, 1, 1), (3, 4, 5))


@pytest.mark.parametrize("ref, pred, expected", [
    (EMPTY, EMPTY, {"Dice": 1.0, "IoU": 1.0, "HD95": 0.0, "NSD": 1.0}),
    (EMPTY, FULL, {"Dice": 0.0, "IoU": 0.0, "HD95": np.nan, "NSD": 0.0}),
    (FULL, EMPTY, {"Dice": 0.0, "IoU": 0.0, "HD95": np.nan, "NSD": 0.0}),
    (FULL, FULL, {"Dice": 1.0, "IoU": 1.0, "HD95": 0.0, "NSD": 1.0}),
])
def test_empty_mask_conventions(ref, pred, expected):
    m = metric_per_case(ref, pred, spacing=(3.0, 0.5, 0.5))
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, nan_ok=True), k


def test_shift_along_anisotropic_axis():
    # two slabs of 4 slices, shifted by one slice of 3 mm: every surface point is 0 or 3 mm from the other surface
    ref = _cube((12, 10, 10), (2, 2, 2), (6, 8, 8))
    pred = _cube((12, 10, 10), (3, 2, 2), (7, 8, 8))
    m = metric_per_case(ref, pred, spacing=(3.0, 0.5, 0.5))
    assert m["Dice"] == pytest.approx(2 * 3 / 8) and m["IoU"] == pytest.approx(3 / 5)
    assert m["HD95"] == pytest.approx(3.0)
    # NSD at 1 mm: only the shifted caps miss; at 3 mm everything is inside the tolerance
    assert 0 < m["NSD"] < 1
    assert metric_per_case(ref, pred, (3.0, 0.5, 0.5), nsd_tolerance=3.0)["NSD"] == 1.0
    with pytest.raises(ValueError, match="-nsd_tolerance must be a positive"):
        metric_per_case(ref, pred, (3.0, 0.5, 0.5), nsd_tolerance=0)


# ---------------------------------------------------------------------------------------------------------------
# folders: small synthetic NIfTI cases
# ---------------------------------------------------------------------------------------------------------------
def _write(folder, case, arr, spacing=(1.0, 1.0, 2.0)):
    os.makedirs(folder, exist_ok=True)
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, os.path.join(folder, case + ".nii.gz"))


@pytest.fixture
def small(tmp_path):
    """Four cases with labels 1 (rim) and 2 (cup); case c3's prediction misses everything."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for i in range(4):
        r = np.zeros((6, 16, 16), np.uint8)
        r[1:5, 3:13, 3:13] = 1
        r[2:4, 6:10, 6:10] = 2
        p = np.roll(r, i % 2, axis=2) if i < 3 else np.zeros_like(r)
        _write(str(ref), f"c{i}", r)
        _write(str(pred), f"c{i}", p)
    return str(ref), str(pred), tmp_path


def test_labels_regions_unknown_and_empty_level(small):
    ref, pred, tmp = small
    attrs = {"c0": "young", "c1": "young", "c2": None, "c3": "old"}
    from nnunet_dmoe.evaluation import CaseAttributes
    ca = CaseAttributes("age", ["young", "middle", "old"], attrs)
    s = evaluate_folders(ref, pred, ["1", "2", "1,2"], ca, str(tmp / "out"), n_boot=50, seed=0)
    assert s["labels_scored"] == ["1", "2", "1,2"] and set(s["labels"]) == {"1", "2", "1,2"}
    assert s["groups"]["middle"]["n"] == 0 and np.isnan(s["groups"]["middle"]["Dice"])
    assert s["groups"]["unknown"]["n"] == 1
    # c3: empty prediction -> Dice 0, HD95 NaN; HD95 group mean of "old" is NaN (no finite value)
    assert s["labels"]["1,2"]["groups"]["old"]["Dice"] == 0.0
    assert np.isnan(s["labels"]["1,2"]["groups"]["old"]["HD95"])
    assert s["worst_group"]["Dice"] == "old" and s["worst_group"]["HD95"] == "young"
    # top level = per-case mean over the labels
    for m in ("Dice", "IoU", "NSD"):
        assert s["overall"][m] == pytest.approx(np.mean([s["labels"][lb]["overall"][m] for lb in ("1", "2", "1,2")]))
    # ES excludes unknown from the sum but not from M_all
    d = s["labels"]["1"]
    m_all = d["overall"]["Dice"]
    assert d["es"]["Dice"] == pytest.approx(m_all / (1 + abs(d["groups"]["young"]["Dice"] - m_all)
                                                     + abs(d["groups"]["old"]["Dice"] - m_all)))
    on_disk = json.load(open(tmp / "out" / "summary.json"))
    assert on_disk["groups"]["middle"]["Dice"] is None and on_disk["groups"]["middle"]["n"] == 0
    assert set(on_disk["ci"]) >= {"overall", "es", "groups"} and len(on_disk["ci"]["es"]["Dice"]) == 2
    lines = open(tmp / "out" / "per_case.csv").read().splitlines()
    assert lines[0] == "case,group,label,Dice,IoU,HD95,NSD,n_ref,n_pred" and len(lines) == 1 + 4 * 3
    assert "c3,old,1,0,0,nan,0," in "\n".join(lines)
    md = open(tmp / "out" / "report.md").read()
    assert "middle (n=0): Dice" in md and "## Segmentation (label 1,2)" in md
    assert os.path.getsize(tmp / "out" / "report.png") > 1000


def test_dataset_json_cases_and_test_cases(small, tmp_path):
    ref, pred, _ = small
    dj = {"channel_names": {"0": "MRI", "1": "noNorm"}, "labels": {"background": 0, "rim": 1, "cup": 2},
          "attribute": {"name": "site", "levels": ["A", "B"], "channel": 1, "cases": {"c0": "A", "c1": "B"},
                        "test_cases": {"c2": "A", "c3": None}}}
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(dj))
    attrs = attributes_from_dataset_json(str(path))
    assert attrs.cases == {"c0": "A", "c1": "B", "c2": "A", "c3": None}
    s = evaluate_folders(ref, pred, [1], attrs, None, n_boot=0)
    assert [g for g in s["groups"]] == ["A", "B", "unknown"] and "ci" not in s
    dj["attribute"]["test_cases"]["c0"] = "B"
    path.write_text(json.dumps(dj))
    with pytest.raises(ValueError, match="c0"):
        attributes_from_dataset_json(str(path))


def test_compare_two_methods(small, tmp_path):
    ref, pred, _ = small
    out = tmp_path / "cmp"
    attrs = {"c0": "a", "c1": "a", "c2": "b", "c3": "b"}
    r = compare_methods({"perfect": ref, "shifted": pred}, ref, [1], attrs, str(out), n_boot=100, seed=3)
    assert r["methods"]["perfect"]["es"]["Dice"] == 1.0 and r["methods"]["perfect"]["overall"]["HD95"] == 0.0
    assert r["methods"]["shifted"]["overall"]["Dice"] < 1.0
    md = open(out / "report.md").read()
    assert "| perfect |" in md and "| shifted |" in md
    assert open(out / "per_case.csv").readline().startswith("method,case,group,label")


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------
def test_shape_mismatch_names_case_and_shapes(small):
    ref, pred, _ = small
    _write(pred, "c1", np.zeros((6, 16, 15), np.uint8))
    with pytest.raises(ValueError, match=r"case c1: .*shape \(6, 16, 16\).*shape \(6, 16, 15\)"):
        evaluate_folders(ref, pred, [1], {f"c{i}": "a" for i in range(4)}, None, n_boot=0)


def test_spacing_mismatch_names_case_and_spacings(small):
    ref, pred, _ = small
    _write(pred, "c2", np.zeros((6, 16, 16), np.uint8), spacing=(1.0, 1.0, 2.5))
    with pytest.raises(ValueError, match=r"case c2: .*spacing \[2\.0, 1\.0, 1\.0\].*spacing \[2\.5, 1\.0, 1\.0\]"):
        evaluate_folders(ref, pred, [1], {f"c{i}": "a" for i in range(4)}, None, n_boot=0)


def test_missing_and_extra_cases(small):
    ref, pred, _ = small
    os.remove(os.path.join(pred, "c2.nii.gz"))
    with pytest.raises(ValueError, match="have no prediction.*c2"):
        evaluate_folders(ref, pred, [1], {f"c{i}": "a" for i in range(4)}, None, n_boot=0)
    _write(pred, "c2", np.zeros((6, 16, 16)))
    _write(pred, "zz9", np.zeros((6, 16, 16)))
    with pytest.raises(ValueError, match="have no reference case: zz9"):
        evaluate_folders(ref, pred, [1], {f"c{i}": "a" for i in range(4)}, None, n_boot=0)


def test_case_without_attribute(small):
    ref, pred, _ = small
    with pytest.raises(ValueError, match="1 case\\(s\\) have no attribute .*: c3"):
        evaluate_folders(ref, pred, [1], {"c0": "a", "c1": "a", "c2": None}, None, n_boot=0)


@pytest.mark.parametrize("argv_tail, message", [
    (["-l", "one"], "'one' is not a label or a region"),
    (["-l", "1", "1"], "more than once"),
    (["-l", "1", "-compare", "broken"], "is not NAME=PRED_FOLDER"),
    (["-l", "1", "-bins", "60"], "-bins goes with -attributes"),
])
def test_cli_bad_arguments(small, argv_tail, message, capsys):
    ref, pred, tmp = small
    dj = {"channel_names": {"0": "x", "1": "noNorm"}, "attribute": {"name": "s", "levels": ["a"], "channel": 1,
                                                                    "cases": {f"c{i}": "a" for i in range(4)}}}
    (tmp / "dataset.json").write_text(json.dumps(dj))
    argv = ["-ref", ref, "-o", str(tmp / "o"), "-dataset_json", str(tmp / "dataset.json")]
    argv += argv_tail if "-compare" in argv_tail else ["-pred", pred] + argv_tail
    with pytest.raises(SystemExit) as e:
        evaluate_entry_point(argv)
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_png_2d_cases_and_table_ids_with_ending(tmp_path):
    """2D PNGs (nnU-Net reads them as (1, x, y) with spacing 999): the surface is the in-plane outline."""
    from PIL import Image
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    for i in range(3):
        r = np.zeros((20, 20), np.uint8)
        r[5:15, 5:15] = 1
        Image.fromarray(r).save(ref / f"img{i}.png")
        Image.fromarray(np.roll(r, i, axis=1)).save(pred / f"img{i}.png")
    (tmp_path / "t.csv").write_text("case,site\nimg0.png,A\nimg1.png,B\nimg2.png,\n")
    out = tmp_path / "o"
    evaluate_entry_point(["-ref", str(ref), "-pred", str(pred), "-l", "1", "-o", str(out), "-attributes",
                          str(tmp_path / "t.csv"), "-attribute_column", "site", "-bootstrap", "20"])
    rows = {r.split(",")[0]: r.split(",") for r in open(out / "per_case.csv").read().splitlines()[1:]}
    assert rows["img0"][1:3] == ["A", "1"] and float(rows["img0"][5]) == 0.0
    assert rows["img2"][1] == "unknown" and float(rows["img2"][5]) == pytest.approx(2.0)  # HD95 in pixels
    assert float(rows["img1"][3]) == pytest.approx(0.9)  # Dice of a square shifted by 1 of 10 pixels
