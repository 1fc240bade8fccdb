"""Several attributes in the fairness report: per attribute and per combination of groups, values by hand."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_dmoe.evaluation import (CaseAttributes, attributes_from_dataset_json, attributes_from_table,
                                    compare_methods, evaluate_entry_point, evaluate_folders)

# case: (stage, centre, shift of the 10x10 square; None = empty prediction) -> Dice 1, 0.9, 0.8, 1, 0, 1
CASES = {"c0": ("T1", "A", 0), "c1": ("T1", "B", 1), "c2": ("T2", "A", 2), "c3": ("T2", "A", 0),
         "c4": ("T2", "B", None), "c5": (None, "A", 0)}
DICE = {"c0": 1.0, "c1": 0.9, "c2": 0.8, "c3": 1.0, "c4": 0.0, "c5": 1.0}
ALL = sum(DICE.values()) / 6


def _write(folder, case, arr):
    os.makedirs(folder, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr.astype(np.uint8)), os.path.join(folder, case + ".nii.gz"))


@pytest.fixture
def two_attributes(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for case, (_, _, shift) in CASES.items():
        r = np.zeros((1, 20, 20), np.uint8)
        r[0, 5:15, 5:15] = 1
        _write(str(ref), case, r)
        _write(str(pred), case, np.zeros_like(r) if shift is None else np.roll(r, shift, axis=2))
    stage = CaseAttributes("stage", ["T1", "T2"], {c: v[0] for c, v in CASES.items()})
    centre = CaseAttributes("centre", ["A", "B", "C"], {c: v[1] for c, v in CASES.items()})
    return str(ref), str(pred), tmp_path, [stage, centre]


def _es(groups):
    return ALL / (1 + sum(abs(g - ALL) for g in groups))


def test_per_attribute_and_combinations(two_attributes):
    ref, pred, tmp, attrs = two_attributes
    s = evaluate_folders(ref, pred, [1], attrs, str(tmp / "out"), n_boot=50, seed=0)
    # the top level is the first attribute's summary, as with a single attribute
    assert s["attribute"] == "stage" and s["groups"] == s["attributes"]["stage"]["groups"]
    assert s["overall"]["Dice"] == pytest.approx(ALL)
    st, ce, co = s["attributes"]["stage"], s["attributes"]["centre"], s["combinations"]
    assert list(s["attributes"]) == ["stage", "centre"]
    assert st["groups"]["T1"]["Dice"] == pytest.approx(0.95) and st["groups"]["T2"]["Dice"] == pytest.approx(0.6)
    assert st["groups"]["unknown"]["n"] == 1
    assert st["es"]["Dice"] == pytest.approx(_es([0.95, 0.6])) and st["worst_group"]["Dice"] == "T2"
    assert ce["groups"]["A"]["Dice"] == pytest.approx(0.95) and ce["groups"]["B"]["Dice"] == pytest.approx(0.45)
    assert ce["groups"]["C"]["n"] == 0 and ce["es"]["Dice"] == pytest.approx(_es([0.95, 0.45]))
    assert ce["worst_group"]["Dice"] == "B" and "unknown" not in ce["groups"]
    # combinations: only those with cases (no "... & C"); c5 (stage unknown) is in the unknown group
    assert co["attribute"] == "stage & centre" and co["of"] == ["stage", "centre"] and co["separator"] == " & "
    assert list(co["groups"]) == ["T1 & A", "T1 & B", "T2 & A", "T2 & B", "unknown"]
    assert [co["groups"][g]["n"] for g in co["groups"]] == [1, 1, 2, 1, 1]
    means = [1.0, 0.9, 0.9, 0.0]
    for g, m in zip(co["groups"], means):
        assert co["groups"][g]["Dice"] == pytest.approx(m)
    assert co["es"]["Dice"] == pytest.approx(_es(means)) and co["worst_group"]["Dice"] == "T2 & B"
    assert co["groups"]["T1 & B"]["IoU"] == pytest.approx(90 / 110)
    assert co["small"] == ["T1 & A", "T1 & B", "T2 & A", "T2 & B"]
    assert len(co["ci"]["es"]["Dice"]) == 2 and co["ci"]["es"]["Dice"][0] <= co["ci"]["es"]["Dice"][1]
    # files
    on_disk = json.load(open(tmp / "out" / "summary.json"))
    assert on_disk["combinations"]["groups"]["T2 & B"]["Dice"] == 0.0
    lines = open(tmp / "out" / "per_case.csv").read().splitlines()
    assert lines[0] == "case,group,group_stage,group_centre,label,Dice,IoU,HD95,NSD,n_ref,n_pred"
    assert lines[2].startswith("c1,T1 & B,T1,B,1,0.9,") and lines[6].startswith("c5,unknown,unknown,A,1,1,")
    md = open(tmp / "out" / "report.md").read()
    heads = [ln for ln in md.splitlines() if ln.startswith("## ")]
    assert heads == ["## Attribute `stage`", "## Attribute `centre`", "## Combinations (stage & centre)"]
    assert "T2 & B (n=1): Dice" in md and "Fewer than 5 cases (means unreliable): T1 & A, T1 & B, T2 & A, T2 & B" in md
    assert "C (n=0): Dice" in md
    for f in ("report.png", "report_centre.png", "report_combinations.png"):
        assert os.path.getsize(tmp / "out" / f) > 1000


def test_dataset_json_and_table_give_the_same_attributes(two_attributes, capsys):
    ref, pred, tmp, attrs = two_attributes
    blocks = [{"name": a.name, "levels": a.levels, "channel": k + 1, "cases": {},
               "test_cases": dict(a.cases)} for k, a in enumerate(attrs)]
    dj = {"channel_names": {"0": "CT", "1": "noNorm", "2": "noNorm"}, "labels": {"background": 0, "x": 1},
          "attributes": blocks}
    (tmp / "dataset.json").write_text(json.dumps(dj))
    found = attributes_from_dataset_json(str(tmp / "dataset.json"))
    assert [(a.name, a.levels, a.cases) for a in found] == [(a.name, a.levels, a.cases) for a in attrs]
    (tmp / "t.csv").write_text("case,stage,centre\n" + "".join(f"{c},{s or ''},{k}\n" for c, (s, k, _) in CASES.items()))
    table = attributes_from_table(str(tmp / "t.csv"), "case", ["stage", "centre"])
    assert [(a.name, a.cases) for a in table] == [(a.name, a.cases) for a in attrs]
    with pytest.raises(ValueError, match="-bins bins one numeric column"):
        attributes_from_table(str(tmp / "t.csv"), "case", ["stage", "centre"], bins=[1])
    evaluate_entry_point(["-ref", ref, "-pred", pred, "-l", "1", "-o", str(tmp / "cli"), "-dataset_json",
                          str(tmp / "dataset.json"), "-bootstrap", "0"])
    out = capsys.readouterr().out
    assert "  centre: ES-Dice 0.522" in out and "stage & centre:" in out and "worst group: Dice T2 & B" in out
    evaluate_entry_point(["-ref", ref, "-pred", pred, "-l", "1", "-o", str(tmp / "tab"), "-attributes",
                          str(tmp / "t.csv"), "-attribute_column", "stage", "-attribute_column", "centre", "-bootstrap", "0"])
    a, b = (json.load(open(tmp / d / "summary.json")) for d in ("cli", "tab"))
    assert a["combinations"]["groups"] == b["combinations"]["groups"]


def test_compare_with_two_attributes(two_attributes):
    ref, pred, tmp, attrs = two_attributes
    r = compare_methods({"perfect": ref, "model": pred}, ref, [1], attrs, str(tmp / "cmp"), n_boot=0)
    assert r["methods"]["perfect"]["combinations"]["es"]["Dice"] == 1.0
    assert r["methods"]["model"]["combinations"]["es"]["Dice"] == pytest.approx(_es([1.0, 0.9, 0.9, 0.0]))
    md = open(tmp / "cmp" / "report.md").read()
    assert md.count("| perfect |") == 3 * 2  # each of 3 groupings: a segmentation and a surface table
