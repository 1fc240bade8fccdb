"""What pyproject.toml cannot say: the .pth hook for nnU-Net's trainer search (wheel and editable install) and the
package discovery under the checkout's four top-level folders, installed as ``nnunet_dmoe.*``."""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

# One line, executed by Python's site module at start-up: adds this plugin's trainer folder to nnU-Net's
# `nnUNet_extTrainer` search path (keeping whatever the user set) without importing anything heavy.
PTH_NAME = "nnunet_dmoe_ext_trainer.pth"
PTH_LINE = (
    "import os, importlib.util as _u; _s = _u.find_spec('nnunet_dmoe'); "
    "_p = _s is not None and _s.origin and os.path.join(os.path.dirname(_s.origin), 'ext_trainers'); "
    "_v = os.environ.get('nnUNet_extTrainer', ''); "
    "_p and _p not in _v.split(os.pathsep) and "
    "os.environ.__setitem__('nnUNet_extTrainer', os.pathsep.join(filter(None, [_v, _p])))\n"
)


class BuildPyWithPth(build_py):
    """Puts the .pth file into the wheel's purelib (the root of site-packages), where `site` reads it."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, PTH_NAME)
        with open(target, "w") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]


class _StrategyWithPth:
    """Wraps setuptools' editable strategy so that `pip install -e .` also ships the .pth file."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH_LINE)

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self.strategy.__exit__(*exc)


class EditableWheelWithPth(editable_wheel):
    # `_select_strategy` is setuptools-internal; if it disappears, editable installs still work but users must set
    # nnUNet_extTrainer themselves (see README).
    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithPth(super()._select_strategy(*args, **kwargs))


# The checkout's top-level folders and the import names they are installed under. Every folder below them with an
# __init__.py is a package of the wheel (tests/test_wheel_install.py checks that no package folder is left out).
PACKAGE_ROOTS = {
    "nnunet_dmoe": "nnunet_dmoe",
    "nnunet_dmoe.trainers": "trainers",
    "nnunet_dmoe.planners": "planners",
    "nnunet_dmoe.dataset_conversion": "dataset_conversion",
}


def discover_packages(roots=PACKAGE_ROOTS):
    return [name for root, folder in roots.items()
            for name in [root] + [f"{root}.{sub}" for sub in find_packages(folder)]]


# Everything else (name, version, dependencies, scripts) is in pyproject.toml.
setup(
    packages=discover_packages(),
    package_dir=PACKAGE_ROOTS,
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
)
