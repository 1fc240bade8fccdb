"""Nothing lost: every command that writes a dataset writes it beside the target and replaces the target only at the
end, so that bad input, an uncaught error or an interruption leaves the old dataset (or its absence) exactly as it
was. Each test reproduces one finding of the bad-input sweep."""
import ctypes
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import nnunet_env, real_data, run
from nnunet_dmoe import errors
from nnunet_dmoe.data.attach import attach_attribute, is_attribute_channel
from nnunet_dmoe.dataset_conversion.fairseg import convert_fairseg
from nnunet_dmoe.dataset_conversion.ham10000 import IMAGE_DIR, convert_ham10000
from nnunet_dmoe.dataset_conversion.radiotherapy import convert_rt
from nnunet_dmoe.dataset_conversion.synthetic import make_synthetic_dataset
from nnunet_dmoe.errors import command
from nnunet_dmoe.data.tables import read_attribute_table
from test_convert_fairseg import _npz, _official_layout
from test_convert_rt import GOOD, _manifest

HAM = real_data("ham10000_sample")


def snapshot(folder) -> dict:
    """Relative path -> SHA-256 of every file below ``folder`` (folders included, as None)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = None
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, folder)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def leftovers(raw) -> list:
    """Anything in nnUNet_raw that is not a finished dataset: temporary folders of the writers."""
    return sorted(n for n in os.listdir(raw) if n.startswith("."))


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    return tmp_path


def _ham_input(folder):
    shutil.copytree(HAM, folder)
    return folder


# ------------------------------------------------------------------ 1. --overwrite checks the new input first
def test_rt_overwrite_with_bad_stage_keeps_the_old_dataset(env):
    out = convert_rt(_manifest(env, GOOD), 601)
    before = snapshot(out)
    bad = [("RT_001", "TX", "train", {})] + GOOD[1:]
    with pytest.raises(ValueError, match="RT_001.*TX"):
        convert_rt(_manifest(env, bad), 601, overwrite=True)
    assert snapshot(out) == before and leftovers(env / "raw") == []


def test_fairseg_overwrite_with_bad_race_keeps_the_old_dataset(env):
    out = convert_fairseg(str(_official_layout(env / "in")), 602)
    before = snapshot(out)
    _npz(env / "in" / "Training" / "data_00002.npz", race=7)
    with pytest.raises(ValueError, match=r"data_00002.npz.*race = 7"):
        convert_fairseg(str(env / "in"), 602, overwrite=True)
    assert snapshot(out) == before and leftovers(env / "raw") == []


def test_ham_overwrite_with_truncated_jpeg_keeps_the_old_dataset(env):
    source = _ham_input(env / "isic")
    out = convert_ham10000(str(source), 603, seed=0)
    before, splits = snapshot(out), snapshot(env / "preprocessed")
    jpg = source / IMAGE_DIR / "ISIC_0027001.jpg"
    jpg.write_bytes(jpg.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"ISIC_0027001.jpg: cannot be read as an image"):
        convert_ham10000(str(source), 603, seed=0, overwrite=True)
    assert snapshot(out) == before and snapshot(env / "preprocessed") == splits
    assert leftovers(env / "raw") == []


def test_overwrite_replaces_the_dataset_and_its_splits(env):
    source = _ham_input(env / "isic")
    out = convert_ham10000(str(source), 604, seed=0)
    (Path(out) / "stale.txt").write_text("from the old dataset")
    assert convert_ham10000(str(source), 604, seed=1, overwrite=True) == out
    assert not (Path(out) / "stale.txt").exists() and (Path(out) / "dataset.json").is_file()
    assert (env / "preprocessed" / "Dataset604_HAM10000" / "splits_final.json").is_file()
    assert leftovers(env / "raw") == []


# ------------------------------------------------------------------ 2. an input inside the dataset it replaces
def test_input_inside_the_replaced_dataset_is_refused(env):
    out = convert_ham10000(str(_ham_input(env / "isic")), 942, seed=0)
    shutil.move(str(env / "isic"), os.path.join(out, "source_isic"))
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"source_isic lies inside .*Dataset942_HAM10000.*Move the input out"):
        convert_ham10000(os.path.join(out, "source_isic"), 942, seed=0, overwrite=True)
    assert snapshot(out) == before


# ------------------------------------------------------------------ 3. attach --overwrite never replaces an image
def _png_case_folder(folder, attribute_values):
    folder.mkdir()
    image = np.zeros((8, 10), np.uint8)
    image[2:6, 3:8] = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12 + 1
    Image.fromarray(image).save(folder / "c1_0000.png")
    Image.fromarray(attribute_values.astype(np.uint8)).save(folder / "c1_0001.png")
    return {"channel_names": {"0": "gray", "1": "noNorm"}, "labels": {"background": 0, "x": 1},
            "file_ending": ".png", "attribute": {"name": "s", "levels": ["a", "b"], "channel": 1, "cases": {}}}


def test_attach_overwrite_refuses_an_image_channel(tmp_path):
    real_image = np.random.default_rng(0).integers(0, 256, (8, 10))
    dj = _png_case_folder(tmp_path / "in", real_image)
    before = snapshot(tmp_path / "in")
    with pytest.raises(ValueError, match=r"c1_0001.png is not an attribute channel.*Nothing was written"):
        attach_attribute(str(tmp_path / "in"), {"c1": "b"}, dj, overwrite=True, verbose=False)
    assert snapshot(tmp_path / "in") == before


def test_attach_overwrite_replaces_an_attribute_channel(tmp_path):
    old = np.zeros((8, 10))
    old[2:6, 3:8] = 1  # level a
    dj = _png_case_folder(tmp_path / "in", old)
    attach_attribute(str(tmp_path / "in"), {"c1": "b"}, dj, overwrite=True, verbose=False)
    new = np.asarray(Image.open(tmp_path / "in" / "c1_0001.png"))
    assert sorted(np.unique(new)) == [0, 2] and leftovers(tmp_path / "in") == []


@pytest.mark.parametrize("values, ok", [([0, 0, 0], True), ([0, 2, 2], True), ([0, 1, 2], False), ([0, 3], False),
                                        ([0, 1.5], False), ([0, 255, 17], False)])
def test_what_decodes_as_an_attribute_channel(values, ok):
    assert is_attribute_channel(np.array(values, dtype=float), 2) is ok


# ------------------------------------------------------------------ 4. failed runs leave nothing behind
def _corrupt_jpeg(env):
    source = _ham_input(env / "isic")
    jpg = source / IMAGE_DIR / "ISIC_0024311.jpg"
    jpg.write_bytes(jpg.read_bytes()[:1500])
    return lambda: convert_ham10000(str(source), 610, seed=0), "ISIC_0024311.jpg: cannot be read"


def _duplicate_levels(env):
    return lambda: convert_rt(_manifest(env, GOOD), 610, levels=["T1", "t1", "T3", "T4"]), "T1 given more than once"


def _object_array(env):
    _official_layout(env / "in")
    np.savez(env / "in" / "Training" / "data_00001.npz", slo_fundus=np.array([None, 1], dtype=object),
             disc_cup_mask=np.zeros((2, 2)), race=np.array(0))
    return lambda: convert_fairseg(str(env / "in"), 610), "data_00001.npz: cannot be read as .npz of plain arrays"


def _negative_size(env):
    return lambda: make_synthetic_dataset(610, 2, 4, 4, (-40, 40)), "-size -40 40: every axis needs at least 16"


@pytest.mark.parametrize("case", [_corrupt_jpeg, _duplicate_levels, _object_array, _negative_size])
def test_failed_conversion_leaves_no_dataset_folder(env, case):
    convert, message = case(env)
    with pytest.raises(ValueError, match=message):
        convert()
    raw = env / "raw"
    assert not raw.exists() or (not [d for d in os.listdir(raw) if d.startswith("Dataset610_")]
                                and leftovers(raw) == [])


def _start_synthetic(env, *extra):
    """make_synthetic in a subprocess, big enough to be interrupted while it writes; returns once it writes."""
    cmd = ["nnUNetv2_dmoe_make_synthetic", "-d", "620", "-dim", "3", "-num_train", "400", "-num_test", "4", "-size",
           "48", "48", "48", *extra]
    p = subprocess.Popen(cmd, env=nnunet_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not _writing(env / "raw"):
        time.sleep(0.05)
    return p


def _writing(raw) -> bool:
    """Whether a writer has begun to write images into its temporary folder."""
    try:
        return any(os.listdir(raw / d / "Dataset620_SyntheticFairness" / "imagesTr") for d in leftovers(raw))
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_make_synthetic_leaves_no_folder(env, sig):
    p = _start_synthetic(env)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "nnUNetv2_dmoe_make_synthetic: interrupted" in err and "Traceback" not in err
    assert os.listdir(env / "raw") == []


def test_a_forked_worker_blocked_in_c_code_ends_on_sigterm():
    """nnU-Net's fork pools end their workers with SIGTERM (``Pool.terminate``) and then wait for them. A worker
    forked while another thread of the command held a lock blocks in C code, where the command's Python SIGTERM
    handler never runs: it must still end, with the default action."""
    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # zeroed: a default pthread mutex (40 bytes on x86-64 glibc)

    @command("fork_probe")
    def fork_then_terminate():
        assert libc.pthread_mutex_lock(mutex) == 0  # held at fork time, as by another thread of the parent
        pid = os.fork()
        if pid == 0:
            libc.pthread_mutex_lock(mutex)  # the child's copy is locked forever: blocks inside C
            os._exit(0)
        time.sleep(0.5)
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return None

    try:
        status = fork_then_terminate()
    finally:
        libc.pthread_mutex_unlock(mutex)
    assert status is not None, "the forked worker outlived SIGTERM"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is not errors._sigterm_to_interrupt  # the command restored the handler


def test_the_runner_shows_where_a_hung_command_waits():
    """conftest.run ends a command that outlives its timeout, and the failure shows the command's stack."""
    start = time.time()
    with pytest.raises(AssertionError, match=r"(?s)still ran after 3 s.*File \"<string>\", line \d+ in waits"):
        run([sys.executable, "-c", "import time\ndef waits(): time.sleep(120)\nwaits()"], timeout=3)
    assert time.time() - start < 60


@pytest.mark.slow
def test_interrupted_overwrite_keeps_the_old_dataset(env):
    run(["nnUNetv2_dmoe_make_synthetic", "-d", "620", "-dim", "2", "-num_train", "4", "-num_test", "4", "-size", "32",
         "32"], nnunet_env(env))
    before = snapshot(env / "raw" / "Dataset620_SyntheticFairness")
    p = _start_synthetic(env, "--overwrite")
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=60)
    assert p.returncode == 130 and os.listdir(env / "raw") == ["Dataset620_SyntheticFairness"]
    assert snapshot(env / "raw" / "Dataset620_SyntheticFairness") == before


@pytest.mark.slow
def test_killed_writer_leaves_only_a_hidden_folder_that_the_next_run_removes(env):
    p = _start_synthetic(env)
    p.kill()
    p.communicate(timeout=60)
    assert [d for d in os.listdir(env / "raw") if not d.startswith(".")] == []  # the id stays free
    assert len(leftovers(env / "raw")) == 1
    run(["nnUNetv2_dmoe_make_synthetic", "-d", "621", "-dim", "2", "-num_train", "4", "-num_test", "4", "-size", "32",
         "32"], nnunet_env(env))
    assert os.listdir(env / "raw") == ["Dataset621_SyntheticFairness"]


# ------------------------------------------------------------------ 9. replacing raw data whose preprocessed data exist
@pytest.mark.slow
def test_overwrite_warns_that_preprocessed_data_are_stale(env):
    e = nnunet_env(env)
    make = ["nnUNetv2_dmoe_make_synthetic", "-d", "622", "-dim", "2", "-num_train", "4", "-num_test", "4", "-size",
            "32", "32"]
    run(make, e)
    run(["nnUNetv2_extract_fingerprint", "-d", "622", "-np", "1"], e)
    out = run(make + ["--overwrite", "-seed", "7"], e)
    assert ("Dataset622_SyntheticFairness holds preprocessed data of the dataset that was just replaced; they are "
            "stale") in out
    assert "nnUNetv2_plan_and_preprocess -d 622" in out


# ------------------------------------------------------------------ 10. smaller ones
@pytest.mark.parametrize("args, message", [
    (["-proportions", "0.5", "-0.1", "0.3", "0.3"], "-proportions: every level's frequency must be a positive number"),
    (["-dim", "2", "-size", "2", "2"], "-size 2 2: every axis needs at least 16 voxels"),
    (["-dim", "2", "-size", "40"], "-size 40 does not have 2 dimensions"),
    (["-margins", "0", "-1", "2", "3"], "-margins: margins are voxel counts >= 0"),
])
def test_make_synthetic_refuses_bad_settings(env, args, message):
    p = subprocess.run(["nnUNetv2_dmoe_make_synthetic", "-d", "623", *args], env=nnunet_env(env),
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"nnUNetv2_dmoe_make_synthetic: error: {message}" + p.stderr.strip().split(message)[1]
    assert not (env / "raw").exists() or os.listdir(env / "raw") == []


def test_ham_num_folds_zero_names_the_flag(env):
    p = subprocess.run(["nnUNetv2_dmoe_convert_ham10000", "-i", HAM, "-d", "624", "-num_folds", "0"],
                       env=nnunet_env(env), capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "nnUNetv2_dmoe_convert_ham10000: error: -num_folds must be at least 2" in p.stderr


def test_table_errors_name_the_default_column(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("case,stage\na,T1\n")
    with pytest.raises(ValueError, match=r"attribute column 'value' \(the default\) not found.*\['case', 'stage'\]"):
        read_attribute_table(str(table))


def test_tables_with_a_byte_order_mark_are_read_and_latin1_is_named(tmp_path):
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffcase,stage\na,T1\n".encode("utf-8"))
    assert read_attribute_table(str(bom), attribute_column="stage") == {"a": "T1"}
    latin = tmp_path / "latin.csv"
    latin.write_bytes("case,stage\nJosé,T1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{latin}: the attribute table is not UTF-8 text .* Save it as UTF-8"):
        read_attribute_table(str(latin), attribute_column="stage")


def test_bad_code_at_prediction_names_the_case_being_predicted():
    import torch
    from nnunet_dmoe.networks.attribute_input import decode_levels

    channel = torch.zeros(2, 1, 4, 4)
    channel[:, :, 1:3, 1:3] = 9
    with pytest.raises(ValueError, match=r"the case being predicted \(its name is in nnU-Net's last 'Predicting "
                                         r"CASE' line; patch 0 of the batch\) decodes to code 9"):
        decode_levels(channel, 4)


def test_commands_end_bad_input_in_one_line(env):
    """A bad flag value deep in a converter: one line on stderr, exit status 2, no traceback."""
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnUNetv2_dmoe_convert_rt"), "-i",
                        str(env / "nope.csv"), "-d", "625"], env=nnunet_env(env), capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"nnUNetv2_dmoe_convert_rt: error: -i {env / 'nope.csv'}: the manifest does not exist"]
