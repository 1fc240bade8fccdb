"""nnUNetv2_dmoe_plan_and_preprocess checks the raw attribute channels before anything is planned: codes above the
number of levels, channels that disagree with dataset.json, cases of ``cases`` without image files (one message,
one line on stderr, nothing preprocessed), and warns when the preprocessed data are older than the raw data."""
import json
import os
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from conftest import nnunet_env, run

DATASET = "Dataset981_SyntheticFairness"
COMMAND = "nnUNetv2_dmoe_plan_and_preprocess"


@pytest.fixture()
def raw(tmp_path):
    """A tiny 2D synthetic dataset (4 training cases, PNG, attribute channel _0001) written by the real CLI."""
    env = nnunet_env(tmp_path)
    run(["nnUNetv2_dmoe_make_synthetic", "-d", "981", "-dim", "2", "-size", "16", "16", "-num_train", "4",
         "-num_test", "4"], env)
    return tmp_path


def _folder(root):
    return root / "raw" / DATASET


def _cases(root):
    return json.loads((_folder(root) / "dataset.json").read_text())["attribute"]["cases"]


def _rewrite_channel(root, case, code):
    """Write ``code`` into the footprint of ``case``'s attribute channel (code 0: all zero, "unknown")."""
    path = _folder(root) / "imagesTr" / f"{case}_0001.png"
    channel = np.array(Image.open(path))
    assert channel.max() > 0
    channel[channel > 0] = code
    Image.fromarray(channel.astype(np.uint8)).save(path)


def _refused(root, *extra):
    """Run the console script; it must refuse in one line, without a traceback, before anything is written."""
    p = subprocess.run([COMMAND, "-d", "981", "-c", "2d", *extra], env=nnunet_env(root), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.startswith(f"{COMMAND}: error: {_folder(root) / 'dataset.json'}: ")
    assert not (root / "preprocessed" / DATASET).exists()  # nothing fingerprinted, planned or preprocessed
    return p.stderr


def test_code_above_the_levels_is_refused(raw):
    _rewrite_channel(raw, "syn_0001", 9)  # 4 levels: codes 1..4
    err = _refused(raw, "-np", "2")  # 4 cases in 2 processes
    assert "1 problem(s) with the attribute" in err
    assert ("  syn_0001: The attribute channel of imagesTr/syn_0001_0001.png decodes to code 9 (level index 8), "
            "but there are only 4 levels (codes 1..4, 0 = unknown).") in err
    assert (f"rewrite the channel with nnUNetv2_dmoe_attach_attribute -i {_folder(raw) / 'imagesTr'} -t <table: "
            f"case, level> -d 981 --overwrite, or correct the level list ('levels') in dataset.json.") in err


def test_channel_that_disagrees_with_dataset_json_is_refused(raw):
    cases = _cases(raw)
    levels = ["T1", "T2", "T3", "T4"]
    other = next(lv for lv in levels if lv != cases["syn_0002"])
    _rewrite_channel(raw, "syn_0002", levels.index(other) + 1)
    _rewrite_channel(raw, "syn_0003", 0)  # unknown in the channel, a level in dataset.json
    err = _refused(raw, "-np", "1")
    assert "2 problem(s) with the attribute" in err
    assert (f"  syn_0002: dataset.json says {cases['syn_0002']}, the channel holds {other} "
            f"(imagesTr/syn_0002_0001.png)") in err
    assert (f"  syn_0003: dataset.json says {cases['syn_0003']}, the channel holds unknown "
            f"(imagesTr/syn_0003_0001.png)") in err
    assert "correct the level in attribute.cases or rewrite the channel" in err


def test_case_of_cases_without_image_files_is_refused(raw):
    for channel in (0, 1):
        os.remove(_folder(raw) / "imagesTr" / f"syn_0003_{channel:04d}.png")
    err = _refused(raw, "-np", "1")
    assert "1 problem(s) with the attribute" in err
    assert ("  syn_0003: listed in attribute.cases but has no image files (expected imagesTr/syn_0003_0000.png, "
            "imagesTr/syn_0003_0001.png)") in err


def test_every_problem_in_one_message(raw, monkeypatch):
    import multiprocessing
    from nnunet_dmoe.planners import entry_points
    from nnunet_dmoe.planners.entry_points import check_raw_dataset
    for k, v in nnunet_env(raw).items():
        monkeypatch.setenv(k, v)
    assert [s.name for s in check_raw_dataset(981)] == ["tstage"]  # the untouched dataset passes
    _rewrite_channel(raw, "syn_0000", 7)
    os.remove(_folder(raw) / "imagesTr" / "syn_0001_0001.png")
    dj = json.loads((_folder(raw) / "dataset.json").read_text())
    del dj["attribute"]["cases"]["syn_0003"]
    (_folder(raw) / "dataset.json").write_text(json.dumps(dj))
    with pytest.raises(ValueError) as e:
        check_raw_dataset(981)
    # the same message when the cases after the first are read in 2 processes (big volumes: the pool is worth it)
    contexts = []
    get_context = multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda m: contexts.append(m) or get_context(m))
    monkeypatch.setattr(entry_points, "_POOL_WORTH_S", 0.0)
    with pytest.raises(ValueError) as e_pool:
        check_raw_dataset(981, num_processes=2)
    assert contexts == ["spawn"] and str(e_pool.value) == str(e.value)
    os.remove(_folder(raw) / "imagesTr" / "syn_0002_0000.png")
    os.remove(_folder(raw) / "imagesTr" / "syn_0002_0001.png")
    with pytest.raises(ValueError) as e:
        check_raw_dataset(981)
    lines = str(e.value).splitlines()
    assert lines[0] == f"{_folder(raw) / 'dataset.json'}: 4 problem(s) with the attribute:"
    assert lines[1:4] == ["  syn_0003: missing from attribute.cases",
                          "  syn_0001: no attribute-channel file syn_0001_0001.png",
                          "  syn_0002: listed in attribute.cases but has no image files (expected "
                          "imagesTr/syn_0002_0000.png, imagesTr/syn_0002_0001.png)"]
    assert lines[4].startswith("  syn_0000: The attribute channel of imagesTr/syn_0000_0001.png decodes to code 7")
    assert lines[5].startswith("Write the missing channels with nnUNetv2_dmoe_attach_attribute")


@pytest.mark.slow
def test_stale_preprocessed_data_are_warned(raw, monkeypatch):
    env = nnunet_env(raw)
    out = run([COMMAND, "-d", "981", "-c", "2d", "-np", "1", "--no_pp"], env)
    assert "Warning: the preprocessed data" not in out  # there were none
    target = raw / "preprocessed" / DATASET
    from nnunet_dmoe.planners.entry_points import warn_if_preprocessed_is_stale
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert warn_if_preprocessed_is_stale(981, ["2d"], True) is False  # just planned: fresh
    label = _folder(raw) / "labelsTr" / "syn_0002.png"
    later = time.time() + 120
    os.utime(label, (later, later))
    p = subprocess.run([COMMAND, "-d", "981", "-c", "2d", "-np", "1", "--no_pp"], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    first = p.stdout.splitlines()[0]
    assert first.startswith(f"Warning: the preprocessed data in {target} are stale: the raw file {label} (")
    assert f"is newer than {target / 'dataset.json'} (" in first
    assert first.endswith("this run (--no_pp) rewrites only the fingerprint and plans: rerun without --no_pp (or "
                          "nnUNetv2_plan_and_preprocess) before training.")


def test_trainers_start_check_keeps_its_rule():
    """The rule now shared with the planner (attribute.channel_disagreement) gives the start-up check's lines."""
    from nnunet_dmoe.data.attribute import AttributeSpec
    from nnunet_dmoe.trainers.seam.attribute_checks import check_preprocessed_attribute

    class Cases:
        identifiers = ["a", "b", "c", "d"]
        data = {"a": 2, "b": 3, "c": 0, "d": 9}

        def load_case(self, key):
            image = np.zeros((2, 4, 4, 4), dtype=np.float32)
            image[:, 1:3, 1:3, 1:3] = 1
            image[1][image[1] > 0] = self.data[key]
            return image, None, None

    spec = AttributeSpec("tstage", ["T1", "T2", "T3"], 1, cases={"a": "T2", "b": "T2", "c": "T1", "d": None})
    with pytest.raises(ValueError) as e:
        check_preprocessed_attribute(Cases(), spec)
    lines = str(e.value).splitlines()
    assert lines[1:4] == ["  b: dataset.json says T2, the channel holds T3",
                          "  c: dataset.json says T1, the channel holds unknown",
                          "  d: The attribute channel of d decodes to code 9 (level index 8), but there are only 3 "
                          "levels (codes 1..3, 0 = unknown). Write the channel with nnUNetv2_dmoe_attach_attribute "
                          "using the levels of the model's dataset.json."]
    assert lines[0].startswith("dataset.json's attribute block and the preprocessed attribute channel (channel 1) "
                               "disagree for 3 case(s):")
