"""The trainer registry: trainers are found, each gets its schedule variants, and users can list them."""
import subprocess
import sys

import pytest


def test_registry_finds_every_trainer_module_and_makes_variants():
    import nnunet_dmoe.trainers as trainers
    from nnunet_dmoe.trainers.seam.registry import trainer_classes
    from nnunet_dmoe.trainers.seam.training_length import EPOCHS, ITERATIONS, variant_name
    names = [c.__name__ for c in trainer_classes()]
    assert {"nnUNetTrainerNoAttribute", "nnUNetTrainerAttributeChannel", "nnUNetTrainerMoE",
            "nnUNetTrainerDMoE"} <= set(names)
    assert "nnUNetTrainerAttributeBase" not in names
    for name in names:
        base = getattr(trainers, name)
        v = getattr(trainers, variant_name(name, 5, 10))
        assert v.__mro__[1] is base and v.__module__ == "nnunet_dmoe.trainers.seam.training_length"
        assert getattr(trainers, variant_name(name, 5, 10)) is v  # made once, then kept
        assert v.__name__ == f"{name}_5epochs_10iters"
    assert len(trainers.__all__) == 1 + len(names)
    from nnunet_dmoe.trainers.seam.training_length import variant_names
    assert len(variant_names()) == len(names) * len(EPOCHS) * (1 + len(ITERATIONS))
    for missing in ("nnUNetTrainerDMoE_7epochs", "nnUNetTrainerDMoE_5epochs_3iters", "nnUNetTrainerNope_5epochs"):
        assert not hasattr(trainers, missing)


def test_importing_the_trainers_makes_no_variant():
    """Schedules on demand: the classes exist only once asked for (nnU-Net's search asks with hasattr)."""
    code = ("import gc; import nnunet_dmoe.trainers as t; "
            "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer; "
            "count = lambda: len({c for c in gc.get_objects() if isinstance(c, type) and issubclass(c, nnUNetTrainer) "
            "and c.__module__.startswith('nnunet_dmoe')}); "
            "before = count(); v = t.nnUNetTrainerDMoE_noUnknown_20epochs_25iters; "
            "print(before, count(), v.__mro__[1].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) <= 100 and int(out[1]) == int(out[0]) + 1 and out[2] == "nnUNetTrainerDMoE_noUnknown"


def test_variant_name_rejects_schedules_without_a_class():
    from nnunet_dmoe.trainers.seam.training_length import variant_name
    assert variant_name("nnUNetTrainerDMoE", 10, 50) == "nnUNetTrainerDMoE_10epochs_50iters"
    assert variant_name("nnUNetTrainerDMoE", 250) == "nnUNetTrainerDMoE_250epochs"
    with pytest.raises(ValueError, match="7 epochs: choose one of"):
        variant_name("nnUNetTrainerDMoE", 7)
    with pytest.raises(ValueError, match="3 iterations per epoch"):
        variant_name("nnUNetTrainerDMoE", 5, 3)


def test_list_trainers_command():
    code = "import sys; sys.argv[1:] = ['--variants']; from nnunet_dmoe.trainers.seam.registry import " \
           "list_trainers_entry_point as f; f()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert any(line.startswith("nnUNetTrainerDMoE ") and "Distribution-aware" in line for line in lines)
    assert "nnUNetTrainerMoE_100epochs_25iters" in lines and "nnUNetTrainerNoAttribute_1epochs" in lines
