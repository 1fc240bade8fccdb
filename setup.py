import os

from setuptools import setup
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


setup(
    name="nnunet_dmoe",
    version="0.1.0",
    description="Distribution-aware Mixture of Experts (dMoE) for fair medical image segmentation, "
                "as an nnU-Net v2 plugin",
    python_requires=">=3.10",
    packages=["nnunet_dmoe", "nnunet_dmoe.trainers", "nnunet_dmoe.planners", "nnunet_dmoe.dataset_conversion"],
    package_dir={
        "nnunet_dmoe": "nnunet_dmoe",
        "nnunet_dmoe.trainers": "trainers",
        "nnunet_dmoe.planners": "planners",
        "nnunet_dmoe.dataset_conversion": "dataset_conversion",
    },
    package_data={"nnunet_dmoe": ["ext_trainers/*.py"]},
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
    install_requires=[
        "torch>=2.4",
        "nnunetv2>=2.8",
        "dynamic-network-architectures>=0.4",
        "batchgenerators>=0.25",
        "batchgeneratorsv2",
        "SimpleITK",
        "numpy",
        "matplotlib",
        "tqdm",
        "Pillow",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={
        "console_scripts": [
            "nnUNetv2_dmoe_convert_fairseg=nnunet_dmoe.dataset_conversion.fairseg:convert_fairseg_entry_point",
            "nnUNetv2_dmoe_convert_ham10000=nnunet_dmoe.dataset_conversion.ham10000:convert_ham10000_entry_point",
            "nnUNetv2_dmoe_convert_rt=nnunet_dmoe.dataset_conversion.radiotherapy:convert_rt_entry_point",
            "nnUNetv2_dmoe_attach_attribute=nnunet_dmoe.attach:attach_attribute_entry_point",
            "nnUNetv2_dmoe_make_synthetic=nnunet_dmoe.synthetic:make_synthetic_entry_point",
            "nnUNetv2_dmoe_evaluate=nnunet_dmoe.evaluation:evaluate_entry_point",
            "nnUNetv2_dmoe_plan_and_preprocess=nnunet_dmoe.planners.entry_points:plan_and_preprocess_entry_point",
            "nnUNetv2_dmoe_benchmark=nnunet_dmoe.benchmark:benchmark_entry_point",
            "nnUNetv2_dmoe_demo=nnunet_dmoe.demo:demo_entry_point",
            "nnUNetv2_dmoe_train_per_level=nnunet_dmoe.per_level:train_per_level_entry_point",
            "nnUNetv2_dmoe_predict_per_level=nnunet_dmoe.per_level:predict_per_level_entry_point",
        ]
    },
)
