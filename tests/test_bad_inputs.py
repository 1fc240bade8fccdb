"""Bad input, command by command: each row runs the real console script and asserts the exit status, the one-line
message (``<command>: error: ...``, no traceback) and, for the commands that write, that what they would replace is
byte-identical afterwards. One table, in the style of fairlearn's parametrised tests: a new finding is a new row."""
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import nnunet_env, real_data, run
from test_convert_fairseg import _npz, _official_layout
from test_convert_rt import GOOD, _manifest
from test_data_safety import snapshot

HAM = real_data("ham10000_sample")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One nnUNet_raw with a dataset of each converter (the targets that bad runs must leave alone), the inputs they
    came from, and a folder of new cases with a real image where an attribute channel would go."""
    root = tmp_path_factory.mktemp("bad_inputs")
    env = nnunet_env(root)
    rt = root / "rt"
    rt.mkdir()
    _manifest(rt, GOOD)
    run(["nnUNetv2_dmoe_convert_rt", "-i", str(rt / "manifest.csv"), "-d", "702"], env)
    _official_layout(root / "fairseg")
    run(["nnUNetv2_dmoe_convert_fairseg", "-i", str(root / "fairseg"), "-d", "703"], env)
    run(["nnUNetv2_dmoe_convert_ham10000", "-i", HAM, "-d", "704"], env)
    shutil.copytree(HAM, root / "raw" / "Dataset704_HAM10000" / "source_isic")
    run(["nnUNetv2_dmoe_make_synthetic", "-d", "701", "-dim", "2", "-num_train", "4", "-num_test", "4", "-size", "32",
         "32"], env)
    # inputs with one bad value each
    _manifest(rt, [("RT_001", "TX", "train", {})] + GOOD[1:])
    os.replace(rt / "manifest.csv", rt / "bad_stage.csv")
    _manifest(rt, GOOD)
    shutil.copytree(root / "fairseg", root / "fairseg_bad")
    _npz(root / "fairseg_bad" / "Training" / "data_00002.npz", race=7)
    new = root / "new_cases"
    new.mkdir()
    image = np.random.default_rng(0).integers(1, 256, (32, 32)).astype(np.uint8)
    Image.fromarray(image).save(new / "n1_0000.png")
    Image.fromarray(image).save(new / "n1_0001.png")  # an image channel where the attribute channel would go
    (root / "table.csv").write_text("case,stage\nn1,T2\n")
    (root / "table_tstage.csv").write_text("case,tstage\nn1,T2\n")
    (root / "table_unknown_level.csv").write_text("case,stage\nn1,T9\n")
    (root / "table_other_case.csv").write_text("case,stage\nn2,T2\n")
    _broken_inputs(root)
    return root


def _broken_inputs(root):
    """Files and datasets that are broken in one way each: JSON that is not an object, a dataset.json without
    nnU-Net's keys, a dataset without imagesTr or without labels, model folders with a broken file."""
    import json
    (root / "list.json").write_text("[1, 2]")
    synthetic = root / "raw" / "Dataset701_SyntheticFairness"
    shutil.copytree(synthetic / "labelsTr", root / "ref_beside_list" / "labelsTr")
    (root / "ref_beside_list" / "dataset.json").write_text("[1, 2]")
    (root / "raw" / "Dataset705_NoKeys").mkdir()
    (root / "raw" / "Dataset705_NoKeys" / "dataset.json").write_text("{}")
    (root / "raw" / "Dataset706_NoImages").mkdir()
    (root / "raw" / "Dataset706_NoImages" / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "gray"}, "labels": {"background": 0, "target": 1}, "numTraining": 1,
         "file_ending": ".png"}))
    (root / "raw" / "Dataset707_NoLabels").mkdir()
    shutil.copytree(synthetic / "imagesTr", root / "raw" / "Dataset707_NoLabels" / "imagesTr")
    shutil.copy(synthetic / "dataset.json", root / "raw" / "Dataset707_NoLabels" / "dataset.json")
    for name, files in (("model_list", {"dataset.json": "[1, 2]"}),
                        ("model_checkpoint", {"checkpoint_final.pth": "not a checkpoint"}),
                        ("model_debug", {"dataset.json": json.dumps({"attribute": {"cases": {"a": "T1"}}}),
                                         "fold_0/debug.json": "[1, 2]"})):
        for file, text in files.items():
            (root / name / file).parent.mkdir(parents=True, exist_ok=True)
            (root / name / file).write_text(text)
    shutil.copytree(HAM, root / "ham_without_metadata", ignore=shutil.ignore_patterns("*.csv"))
    (root / "routing_not_json").mkdir()
    (root / "routing_not_json" / "routing.json").write_text("{not json")
    (root / "routing_not_json" / "routing.png").write_bytes(b"")


RAW = "raw"
# (command, arguments ({root} = the world's folder), message fragment, folder that must stay byte-identical)
BAD_INPUTS = [
    ("nnUNetv2_dmoe_convert_rt", ["-i", "{root}/nope.csv", "-d", "710"], "-i {root}/nope.csv: the manifest does not "
     "exist", None),
    ("nnUNetv2_dmoe_convert_rt", ["-i", "{root}/rt/bad_stage.csv", "-d", "702", "--overwrite"],
     "RT_001", f"{RAW}/Dataset702_RT"),
    ("nnUNetv2_dmoe_convert_rt", ["-i", "{root}/rt/manifest.csv", "-d", "702"], "Dataset id 702 is taken",
     f"{RAW}/Dataset702_RT"),
    ("nnUNetv2_dmoe_convert_rt", ["-i", "{root}/rt/manifest.csv", "-d", "702", "--overwrite", "-levels", "T1", "T1"],
     "-levels: T1 given more than once", f"{RAW}/Dataset702_RT"),
    ("nnUNetv2_dmoe_convert_rt", ["-i", "{root}/rt/manifest.csv", "-d", "1000"],
     "-d: the dataset id must be an integer from 1 to 999", None),
    ("nnUNetv2_dmoe_convert_fairseg", ["-i", "{root}/nope", "-d", "710"], "-i {root}/nope is not a folder", None),
    ("nnUNetv2_dmoe_convert_fairseg", ["-i", "{root}/fairseg_bad", "-d", "703", "--overwrite"], "race = 7",
     f"{RAW}/Dataset703_FairSeg"),
    ("nnUNetv2_dmoe_convert_ham10000", ["-i", "{root}", "-d", "710"], "the official ISIC 2018 folder", None),
    ("nnUNetv2_dmoe_convert_ham10000", ["-i", HAM, "-d", "710", "-num_folds", "0"], "-num_folds must be at least 2",
     None),
    ("nnUNetv2_dmoe_convert_ham10000", ["-i", HAM, "-d", "710", "-test_fraction", "1.5"], "-test_fraction must be in",
     None),
    ("nnUNetv2_dmoe_convert_ham10000", ["-i", "{root}/raw/Dataset704_HAM10000/source_isic", "-d", "704",
                                        "--overwrite"], "lies inside", f"{RAW}/Dataset704_HAM10000"),
    ("nnUNetv2_dmoe_make_synthetic", ["-d", "701", "-dim", "2"], "Dataset id 701 is taken",
     f"{RAW}/Dataset701_SyntheticFairness"),
    ("nnUNetv2_dmoe_make_synthetic", ["-d", "701", "-dim", "2", "-size", "2", "2", "--overwrite"],
     "-size 2 2: every axis needs at least 16 voxels", f"{RAW}/Dataset701_SyntheticFairness"),
    ("nnUNetv2_dmoe_make_synthetic", ["-d", "701", "-dim", "2", "-proportions", "1", "-1", "1", "1", "--overwrite"],
     "-proportions: every level's frequency must be a positive number", f"{RAW}/Dataset701_SyntheticFairness"),
    ("nnUNetv2_dmoe_make_synthetic", ["-d", "711", "-num_train", "2"], "num_train = 2: need at least one case per "
     "level", None),
    ("nnUNetv2_dmoe_attach_attribute", ["-i", "{root}/nope", "-t", "{root}/table.csv", "-d", "701",
                                        "-attribute_column", "stage"], "input folder {root}/nope does not exist",
     None),
    ("nnUNetv2_dmoe_attach_attribute", ["-i", "{root}/new_cases", "-t", "{root}/table.csv", "-attribute_column",
                                        "stage"], "give the model's dataset.json (-dataset_json) or the dataset (-d)",
     "new_cases"),
    ("nnUNetv2_dmoe_attach_attribute", ["-i", "{root}/new_cases", "-t", "{root}/table_other_case.csv", "-d", "701",
                                        "-attribute_column", "stage"], "have no row in the attribute table: n1",
     "new_cases"),
    ("nnUNetv2_dmoe_attach_attribute", ["-i", "{root}/new_cases", "-t", "{root}/table_unknown_level.csv", "-d", "701",
                                        "-attribute_column", "stage"], "levels that the model does not know",
     "new_cases"),
    ("nnUNetv2_dmoe_attach_attribute", ["-i", "{root}/new_cases", "-t", "{root}/table.csv", "-d", "701",
                                        "-attribute_column", "stage"], "exist already", "new_cases"),
    ("nnUNetv2_dmoe_attach_attribute", ["-i", "{root}/new_cases", "-t", "{root}/table.csv", "-d", "701",
                                        "-attribute_column", "stage", "--overwrite"],
     "n1_0001.png is not an attribute channel", "new_cases"),
    ("nnUNetv2_dmoe_attach_attribute", ["-i", "{root}/new_cases", "-t", "{root}/table.csv", "-d", "701",
                                        "-attribute_column", "nope"], "attribute column 'nope' not found", "new_cases"),
    ("nnUNetv2_dmoe_evaluate", ["-ref", "{root}/raw/Dataset701_SyntheticFairness/labelsTr", "-pred",
                                "{root}/raw/Dataset701_SyntheticFairness/labelsTr", "-l", "1", "-o", "{root}/report"],
     "Give the attribute of each case", None),
    ("nnUNetv2_dmoe_evaluate", ["-ref", "{root}/raw/Dataset701_SyntheticFairness/labelsTr", "-pred",
                                "{root}/raw/Dataset701_SyntheticFairness/labelsTr", "-l", "7", "-o", "{root}/report",
                                "-dataset_json", "{root}/raw/Dataset701_SyntheticFairness/dataset.json"],
     "-l 7: label 7 is not a label of {root}/raw/Dataset701_SyntheticFairness/dataset.json 'labels': 0 (background), "
     "1 (target)", None),
    ("nnUNetv2_dmoe_evaluate", ["-ref", "{root}/raw/Dataset701_SyntheticFairness/labelsTr", "-pred",
                                "{root}/raw/Dataset701_SyntheticFairness/labelsTr", "-l", "1", "-o",
                                "{root}/raw/Dataset701_SyntheticFairness/labelsTr/report", "-dataset_json",
                                "{root}/raw/Dataset701_SyntheticFairness/dataset.json"],
     "/labelsTr/report is inside the -ref folder", f"{RAW}/Dataset701_SyntheticFairness"),
    ("nnUNetv2_dmoe_evaluate", ["-ref", "{root}/raw/Dataset701_SyntheticFairness/labelsTr", "-pred",
                                "{root}/raw/Dataset701_SyntheticFairness/labelsTr", "-l", "1", "-o", "{root}/report",
                                "-np", "0", "-dataset_json", "{root}/raw/Dataset701_SyntheticFairness/dataset.json"],
     "-np 0: give at least 1 process", None),
    ("nnUNetv2_dmoe_add_attribute", ["-d", "701", "-t", "{root}/table.csv", "-id_column", "case",
                                     "-attribute_column", "stage"], "column 'stage': 8 case(s) have no row",
     f"{RAW}/Dataset701_SyntheticFairness"),
    ("nnUNetv2_dmoe_add_attribute", ["-d", "701", "-t", "{root}/table_tstage.csv", "-id_column", "case",
                                     "-attribute_column", "tstage"], "has the attribute(s) tstage already",
     f"{RAW}/Dataset701_SyntheticFairness"),
    ("nnUNetv2_dmoe_add_attribute", ["-d", "709", "-t", "{root}/table.csv", "-id_column", "case",
                                     "-attribute_column", "stage"], "-d 709: no such dataset", None),
    ("nnUNetv2_dmoe_add_attribute", ["-d", "702", "-t", "{root}/table.csv", "-id_column", "case",
                                     "-attribute_column", "stage", "age", "-bins", "50"], "-bins and -levels apply to "
     "one column", f"{RAW}/Dataset702_RT"),
    ("nnUNetv2_dmoe_predict", ["-i", "{root}/new_cases", "-o", "{root}/pred", "-d", "701", "-c", "2d",
                               "-attribute", "T2"], "no trained model in", None),
    ("nnUNetv2_dmoe_predict", ["-i", "{root}/new_cases", "-o", "{root}/pred", "-d", "701", "-c", "2d"],
     "give the attribute: -attribute LEVEL for every case, or -t TABLE", None),
    ("nnUNetv2_dmoe_strip_attribute_table", ["{root}/nope"], "{root}/nope is not a folder", None),
    ("nnUNetv2_dmoe_benchmark", ["-preset", "nope"], "nope", None),
    ("nnUNetv2_dmoe_routing_report", ["-i", "{root}/nope", "-o", "{root}/routing", "-d", "701", "-c", "2d", "-tr",
                                      "nnUNetTrainerDMoE", "-device", "cpu"],
     "nnUNetTrainerDMoE__nnUNetPlans__2d is not a trained model folder (no dataset.json)", None),
    ("nnUNetv2_dmoe_predict_per_level", ["-i", "{root}/nope", "-o", "{root}/pl", "-d", "701", "-c", "2d", "-device",
                                         "cpu"], "no per-level models nnUNetTrainerNoAttribute__nnUNetPlans__2d of "
     "Dataset701_SyntheticFairness", None),
    # JSON that is not an object, dataset.json files without nnU-Net's keys, datasets without imagesTr or labels,
    # and model folders with a broken file: one line that names the file and the fix (no traceback)
    ("nnUNetv2_dmoe_evaluate", ["-ref", "{root}/raw/Dataset701_SyntheticFairness/labelsTr", "-pred",
                                "{root}/raw/Dataset701_SyntheticFairness/labelsTr", "-l", "1", "-o", "{root}/report",
                                "-dataset_json", "{root}/list.json"],
     "{root}/list.json: the dataset.json must be a JSON object {{...}}, it holds a list. Give the dataset.json of the "
     "reference's dataset (nnU-Net's format) with -dataset_json.", None),
    ("nnUNetv2_dmoe_evaluate", ["-ref", "{root}/raw/Dataset701_SyntheticFairness/labelsTr", "-pred",
                                "{root}/raw/Dataset701_SyntheticFairness/labelsTr", "-l", "1", "-o", "{root}/report",
                                "-dataset_json", "{root}/new_cases/n1_0000.png"],
     "{root}/new_cases/n1_0000.png: the dataset.json is not UTF-8 text (byte 0x89 at offset 0)", None),
    ("nnUNetv2_dmoe_evaluate", ["-ref", "{root}/ref_beside_list/labelsTr", "-pred", "{root}/ref_beside_list/labelsTr",
                                "-l", "1", "-o", "{root}/report", "-attributes", "{root}/table.csv",
                                "-attribute_column", "stage"],
     "{root}/ref_beside_list/dataset.json: the dataset.json must be a JSON object {{...}}, it holds a list", None),
    ("nnUNetv2_dmoe_evaluate", ["-ref", "{root}/raw/Dataset701_SyntheticFairness/labelsTr", "-pred",
                                "{root}/raw/Dataset701_SyntheticFairness/labelsTr", "-l", "1", "-o", "{root}/table.csv",
                                "-dataset_json", "{root}/raw/Dataset701_SyntheticFairness/dataset.json"],
     "-o {root}/table.csv is a file. Give a folder for the report (it is made if missing).", None),
    ("nnUNetv2_dmoe_evaluate", ["-ref", "{root}/raw/Dataset701_SyntheticFairness/labelsTr", "-pred",
                                "{root}/raw/Dataset701_SyntheticFairness/labelsTr", "-l", "1", "-o", "{root}/report",
                                "-dataset_json", "{root}/raw/Dataset701_SyntheticFairness/dataset.json", "-routing",
                                "{root}/routing_not_json"],
     "-routing {root}/routing_not_json: routing.json is not a routing report (not valid JSON: ", None),
    ("nnUNetv2_dmoe_attach_attribute", ["-i", "{root}/new_cases", "-t", "{root}/table.csv", "-dataset_json",
                                        "{root}/list.json", "-attribute_column", "stage"],
     "{root}/list.json: the model's dataset.json must be a JSON object {{...}}, it holds a list", "new_cases"),
    ("nnUNetv2_dmoe_attach_attribute", ["-i", "{root}/new_cases", "-t", "{root}/table.csv", "-d", "701",
                                        "-attribute_column", "stage", "-o", "{root}/table.csv"],
     "output folder {root}/table.csv is a file. Give a folder with -o (it is made if missing).", "new_cases"),
    ("nnUNetv2_dmoe_attach_attribute", ["-i", "{root}/new_cases", "-t", "{root}/table.csv", "-d", "709",
                                        "-attribute_column", "stage"],
     "-d 709: no such dataset in $nnUNet_raw ({root}/raw). Give the dataset's name or id there, or the model's "
     "dataset.json with -dataset_json.", "new_cases"),
    ("nnUNetv2_dmoe_add_attribute", ["-d", "705", "-t", "{root}/table.csv", "-id_column", "case",
                                     "-attribute_column", "stage"],
     "{root}/raw/Dataset705_NoKeys/dataset.json lacks 'channel_names', 'file_ending'. Give an nnU-Net raw dataset",
     f"{RAW}/Dataset705_NoKeys"),
    ("nnUNetv2_dmoe_add_attribute", ["-d", "706", "-t", "{root}/table.csv", "-id_column", "case",
                                     "-attribute_column", "stage"],
     "{root}/raw/Dataset706_NoImages has no imagesTr folder", f"{RAW}/Dataset706_NoImages"),
    ("nnUNetv2_dmoe_strip_attribute_table", ["{root}/model_list"],
     "{root}/model_list/dataset.json: the dataset.json must be a JSON object {{...}}, it holds a list", "model_list"),
    ("nnUNetv2_dmoe_strip_attribute_table", ["{root}/model_checkpoint"],
     "{root}/model_checkpoint/checkpoint_final.pth: cannot be read as a PyTorch checkpoint", "model_checkpoint"),
    ("nnUNetv2_dmoe_strip_attribute_table", ["{root}/model_debug"],  # nothing stripped before the refusal
     "{root}/model_debug/fold_0/debug.json: the debug.json must be a JSON object {{...}}, it holds a list",
     "model_debug"),
    ("nnUNetv2_dmoe_plan_and_preprocess", ["-d", "709"], "-d 709: no such dataset in $nnUNet_raw ({root}/raw)",
     None),
    ("nnUNetv2_dmoe_plan_and_preprocess", ["-d", "705"],
     "{root}/raw/Dataset705_NoKeys/dataset.json lacks 'labels', 'channel_names', 'numTraining', 'file_ending'",
     f"{RAW}/Dataset705_NoKeys"),
    ("nnUNetv2_dmoe_plan_and_preprocess", ["-d", "706"], "{root}/raw/Dataset706_NoImages has no imagesTr folder",
     f"{RAW}/Dataset706_NoImages"),
    ("nnUNetv2_dmoe_plan_and_preprocess", ["-d", "707", "-c", "2d", "-np", "1"],
     "{root}/raw/Dataset707_NoLabels: 4 training case(s) have no label file in labelsTr: syn_0000, syn_0001, "
     "syn_0002, syn_0003 (expected labelsTr/CASE.png)", f"{RAW}/Dataset707_NoLabels"),
    ("nnUNetv2_dmoe_plan_and_preprocess", ["-d", "701", "-np", "0"], "-np 0: give at least 1 process per "
     "configuration", None),
    ("nnUNetv2_dmoe_plan_and_preprocess", ["-d", "701", "-c", "2d", "-np", "1", "2"], "-np 1 2: give one number for "
     "all configurations, or one per configuration of -c (2d)", None),
    ("nnUNetv2_dmoe_convert_ham10000", ["-i", "{root}/ham_without_metadata", "-d", "710"],
     "the HAM10000 metadata CSV {root}/ham_without_metadata/HAM10000_metadata.csv does not exist. Put "
     "HAM10000_metadata.csv into -i, or give its path with -metadata.", None),
    ("nnUNetv2_dmoe_convert_fairseg", ["-i", "{root}/fairseg", "-d", "710", "-split", "{root}/nope.json"],
     "-split {root}/nope.json: the split file does not exist. A split file is a CSV/TSV", None),
]


@pytest.mark.parametrize("command, args, message, keep", BAD_INPUTS,
                         ids=[f"{r[0].replace('nnUNetv2_dmoe_', '')}-{k}" for k, r in enumerate(BAD_INPUTS)])
def test_bad_input(world, command, args, message, keep):
    before = snapshot(world / keep) if keep else None
    args = [a.format(root=world) for a in args]
    p = subprocess.run([command, *args], env=nnunet_env(world), capture_output=True, text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and lines, p.stderr[-2000:]
    first = next(k for k, line in enumerate(lines) if line.startswith(f"{command}: error: "))
    assert message.format(root=world) in "\n".join(lines[first:])
    if keep:
        assert snapshot(world / keep) == before
    assert not [d for d in os.listdir(world / RAW) if d.startswith(".") or d.startswith("Dataset71")]
