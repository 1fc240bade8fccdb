"""The install users get, not the editable one: `python -m build` (sdist, then the wheel from the sdist, so nothing
stale in the checkout's build/ can slip in), the wheel's contents, then the wheel installed into a fresh virtual
environment (no --system-site-packages, not editable, nnUNet_extTrainer not set) where every console script answers
-h and a tiny 2D end to end runs through the installed commands: synthetic data, the dMoE planner, nnUNetv2_train
with the dMoE trainer, nnUNetv2_predict, nnUNetv2_dmoe_evaluate (marked slow: CI runs it right after `make test`).

Two environments: ``pinned`` gets the torch/torchvision of the environment running the tests (the Makefile's, from
this machine's wheels); ``minimum`` gets every ``>=`` requirement of the wheel at its lower bound (torch 2.10,
nnunetv2 2.8.0, ...), downloads them (about 3 GB) and is deselected by default: `make test PYTEST_ARGS="-m
min_versions"` (CI runs it)."""
import configparser
import email
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import run

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "nnunet_dmoe"
PTH = "nnunet_dmoe_ext_trainer.pth"
TRAINER = "nnUNetTrainerDMoE_1epochs_5iters"
DATASET = "Dataset993_SyntheticFairness"
# not part of a fresh environment: an outer virtual environment, Python search paths, the user's nnU-Net settings
_DROPPED = re.compile(r"^(PYTHON\w*|VIRTUAL_ENV\w*|CONDA_\w+|nnUNet_\w+)$")


def _run(cmd, env=None, cwd=None, timeout=900):
    return run(cmd, env=env, timeout=timeout, cwd=cwd)


def fresh_env(venv: Path, **extra) -> dict:
    """This process's environment less what would leak another installation in; the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if not _DROPPED.match(k)}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), "/usr/local/bin", "/usr/bin", "/bin"])
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", out, REPO], timeout=600)
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return wheels[0]


def _checkout_files():
    """Tracked and untracked-but-not-ignored files of the checkout (what a build of it sees)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [Path(f) for f in out.splitlines() if (REPO / f).is_file()]


def _installed_name(path: Path) -> str:
    """Layout rule (DESIGN.md): ``nnunet_dmoe/x`` stays, any other top-level folder ``f/x`` is ``nnunet_dmoe/f/x``."""
    return path.as_posix() if path.parts[0] == PACKAGE else f"{PACKAGE}/{path.as_posix()}"


def test_wheel_holds_every_package_and_nothing_else(dist):
    files = _checkout_files()
    package_dirs = {f.parent for f in files if f.name == "__init__.py" and f.parts[0] != "tests"}
    assert Path(PACKAGE) / "evaluation" in package_dirs  # the package the hand-written list used to miss
    expected = {_installed_name(f) for f in files if f.suffix == ".py" and f.parent in package_dirs}
    expected |= {_installed_name(f) for f in files if f.parent == Path(PACKAGE) / "ext_trainers" and f.suffix == ".py"}
    expected.add(PTH)
    with zipfile.ZipFile(dist) as z:
        names = z.namelist()
        meta = email.message_from_bytes(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
        pth = z.read(PTH).decode()
    payload = {n for n in names if ".dist-info/" not in n}
    assert payload == expected, (f"missing from the wheel: {sorted(expected - payload)}; "
                                 f"not expected in it: {sorted(payload - expected)}")
    # one version string: the metadata's is nnunet_dmoe.__version__
    version = re.search(r'^__version__ = "([^"]+)"', (REPO / PACKAGE / "__init__.py").read_text(), re.M).group(1)
    assert meta["Name"] == PACKAGE and meta["Version"] == version and dist.name == f"{PACKAGE}-{version}-py3-none-any.whl"
    assert "ext_trainers" in pth and "nnUNet_extTrainer" in pth and pth.count("\n") == 1


def _minimum_pins(wheel: Path):
    """``name==X`` for every ``name>=X`` requirement of the wheel."""
    with zipfile.ZipFile(wheel) as z:
        meta = email.message_from_bytes(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))))
    pins = [re.sub(r"\s*>=\s*", "==", r) for r in meta.get_all("Requires-Dist") if ">=" in r and "extra ==" not in r]
    assert {p.split("==")[0] for p in pins} >= {"torch", "nnunetv2", "dynamic-network-architectures"}, pins
    return pins


@pytest.fixture(scope="module", params=["pinned", pytest.param("minimum", marks=pytest.mark.min_versions)])
def venv(request, dist, tmp_path_factory):
    """A fresh virtual environment with the wheel. ``pinned``: the torch/torchvision of the test environment (pip
    takes them from this machine's wheels); ``minimum``: the wheel's lower bounds."""
    if request.param == "pinned":
        pins = [f"{name}=={importlib.metadata.version(name)}" for name in ("torch", "torchvision")]
    else:
        pins = _minimum_pins(dist)
    path = tmp_path_factory.mktemp(f"venv_{request.param}") / "venv"
    _run([sys.executable, "-m", "venv", path])
    try:
        _run([path / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile", dist, *pins],
             env=fresh_env(path), timeout=1500)
        yield path, pins
    finally:
        shutil.rmtree(path, ignore_errors=True)  # several GB (torch with its CUDA libraries)


def test_installed_from_the_wheel(venv, tmp_path):
    path, pins = venv
    env = fresh_env(path)
    assert "nnUNet_extTrainer" not in env
    probe = ("import json, os, importlib.metadata as m, nnunet_dmoe, nnunetv2.paths as p\n"
             "print(json.dumps({'file': nnunet_dmoe.__file__, 'ext_paths': p.nnUNet_extTrainer.get().split(os.pathsep),\n"
             "  'versions': {d: m.version(d) for d in ('torch', 'nnunetv2', 'dynamic-network-architectures')},\n"
             "  'direct_url': m.distribution('nnunet_dmoe').read_text('direct_url.json')}))")
    info = json.loads(_run([path / "bin" / "python", "-c", probe], env=env, cwd=tmp_path).strip().splitlines()[-1])
    site = path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert Path(info["file"]) == site / PACKAGE / "__init__.py"  # not the checkout
    assert json.loads(info["direct_url"] or "{}").get("dir_info", {}).get("editable") is not True
    assert not list(site.glob("__editable__*"))
    # the .pth of the wheel put the trainer folder on nnU-Net's search path
    assert (site / PTH).is_file() and info["ext_paths"] == [str(site / PACKAGE / "ext_trainers")]
    for pin in pins:
        name, version = pin.split("==")
        if name in info["versions"]:
            assert info["versions"][name].split("+")[0] in (version, version + ".0"), (pin, info["versions"])


def _console_scripts(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        text = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
    cp = configparser.ConfigParser()
    cp.optionxform = str
    cp.read_string(text)
    return sorted(cp["console_scripts"])


def test_every_console_script_answers_help(venv, dist, tmp_path):
    path, _ = venv
    scripts = _console_scripts(dist)
    assert "nnUNetv2_dmoe_list_trainers" in scripts and "nnUNetv2_dmoe_evaluate" in scripts and len(scripts) >= 10
    for name in scripts:
        assert (path / "bin" / name).is_file(), name
        out = _run([name, "-h"], env=fresh_env(path), cwd=tmp_path, timeout=300)
        assert out.startswith("usage: ") and name in out.splitlines()[0], f"{name} -h printed:\n{out[:2000]}"


@pytest.mark.slow
def test_end_to_end_on_the_installed_wheel(venv, tmp_path):
    """Synthetic 2D data -> dMoE planner -> nnUNetv2_train (dMoE) -> nnUNetv2_predict -> fairness report, every step
    a console script of the fresh environment, in a folder outside the checkout."""
    path, _ = venv
    root = tmp_path
    env = fresh_env(path, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
                    nnUNet_results=str(root / "results"), nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0",
                    PYTHONHASHSEED="0", OMP_WAIT_POLICY="PASSIVE")  # as tests/conftest.py's nnunet_env
    run = lambda *cmd: _run(cmd, env=env, cwd=root)  # noqa: E731
    run("nnUNetv2_dmoe_make_synthetic", "-d", "993", "-dim", "2", "-num_train", "8", "-num_test", "4", "-size", "40",
        "40", "-seed", "3")
    run("nnUNetv2_dmoe_plan_and_preprocess", "-d", "993", "-c", "2d", "-np", "1")
    log = run("nnUNetv2_train", "993", "2d", "0", "-tr", TRAINER, "-p", "nnUNetDMoEPlans", "-device", "cpu")
    assert "dataset.json and the attribute channel agree for all 8 cases" in log
    model = root / "results" / DATASET / f"{TRAINER}__nnUNetDMoEPlans__2d"
    assert (model / "fold_0" / "checkpoint_final.pth").is_file()
    val = json.loads((model / "fold_0" / "validation" / "summary.json").read_text())
    assert 0.0 <= val["foreground_mean"]["Dice"] <= 1.0

    raw = root / "raw" / DATASET
    cases = sorted(p.name[: -len("_0000.png")] for p in (raw / "imagesTs").glob("*_0000.png"))
    assert len(cases) == 4
    run("nnUNetv2_predict", "-i", raw / "imagesTs", "-o", root / "pred", "-d", "993", "-c", "2d", "-tr", TRAINER,
        "-p", "nnUNetDMoEPlans", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar")
    assert sorted(p.name for p in (root / "pred").glob("*.png")) == [f"{c}.png" for c in cases]

    run("nnUNetv2_dmoe_evaluate", "-ref", raw / "labelsTs", "-pred", root / "pred", "-l", "1", "-dataset_json",
        raw / "dataset.json", "-o", root / "report", "-bootstrap", "50")
    for name in ("summary.json", "per_case.csv", "report.md", "report.png"):
        assert (root / "report" / name).stat().st_size > 0, name
    summary = json.loads((root / "report" / "summary.json").read_text())
    assert summary["n_cases"] == 4 and summary["levels"] == ["T1", "T2", "T3", "T4"]
    values = [summary["overall"][m] for m in ("Dice", "IoU")] + [summary["es"][m] for m in ("Dice", "IoU")]
    values += [g[m] for g in summary["groups"].values() for m in ("Dice", "IoU")]
    assert all(v is not None and 0.0 <= v <= 1.0 for v in values), summary
