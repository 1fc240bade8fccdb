import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton's interpreter (tests/test_triton_interpret.py) must be chosen before any module imports triton (torch's
# compile tests do): set it once for the whole session on machines without CUDA. It only changes how Triton kernels
# run; the plugin picks its Triton path on CUDA devices only.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The trainers' CPU memory setting (nnunet_dmoe.trainers.seam.cpu_memory) stays off in the tests' trainings, in this
# process and the CLIs it starts: on this project's 2-core machine the suite took 17:04 with it on (a run whose disk
# was also nearly full) and 14:09 with it off; with tiny networks it has little to save, and the cause of the
# difference is not isolated. tests/test_cpu_memory.py and one end-to-end test turn it on.
os.environ.setdefault("NNUNET_DMOE_KEEP_FREED_MEMORY", "0")

VENV_BIN = os.path.dirname(sys.executable)
# the real test data sets, kept in the repository (tests/data/README.md: sources and licences)
TEST_DATA = Path(__file__).resolve().parent / "data"


def real_data(name: str) -> str:
    """Path of the real data set ``name`` in ``tests/data``."""
    return str(TEST_DATA / name)


def nnunet_env(root, **extra):
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_def_n_proc="1", PYTHONHASHSEED="0",
               # nnU-Net's worker processes share 2 cores: spinning OpenMP threads would slow everything ~50x
               OMP_WAIT_POLICY="PASSIVE",
               PATH=VENV_BIN + os.pathsep + env.get("PATH", ""))
    env.update(extra)
    return env


def run(cmd, env=None, timeout=600, cwd=None):
    """Run a CLI; on failure show its output. Past ``timeout`` every process it started (its worker pools too) gets
    SIGABRT, which Python's faulthandler answers with the stack of each thread: the failure then shows where it hung."""
    cmd = [str(c) for c in cmd]
    env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except KeyboardInterrupt:  # its own session does not get the terminal's Ctrl-C: end it with the tests
        os.killpg(p.pid, signal.SIGKILL)
        raise
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGABRT)
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
        raise AssertionError(f"{' '.join(cmd)} still ran after {timeout} s; the stacks of its processes:\n"
                             f"{out[-4000:]}\n{err[-12000:]}") from None
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-4000:]}\n{err[-4000:]}")
    return out + err


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (MASTER_PORT of a DDP test)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exit_worker():
    """End a DDP test worker (torch.multiprocessing.spawn) with status 0 once it has written its results and
    destroyed its process group, without the interpreter's finalisation: there, torch 2.14's gloo backend now and
    then aborts the process ("terminate called without an active exception", SIGABRT; 3 of 11 runs of
    test_comparators_ddp.py on this project's machine), which spawn reports as a failed rank. A worker that raised
    never gets here: spawn reports its exception as before."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="session")
def preprocessed_3d(tmp_path_factory):
    """A tiny synthetic 3D dataset (id 991), planned and preprocessed with nnU-Net's own CLI."""
    root = tmp_path_factory.mktemp("nnunet3d")
    env = nnunet_env(root)
    run(["nnUNetv2_dmoe_make_synthetic", "-d", "991", "-num_train", "10", "-num_test", "4", "-size", "24", "24",
         "24", "-seed", "1"], env)
    run(["nnUNetv2_plan_and_preprocess", "-d", "991", "-c", "3d_fullres", "-np", "1", "--verify_dataset_integrity"],
        env)
    return root


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one; run with -m gpu)")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
