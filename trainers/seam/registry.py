"""Which trainers the plugin offers: found, not listed by hand.

Every module of this package whose name starts with ``nnUNetTrainer`` is imported, and every subclass of
:class:`~nnunet_dmoe.trainers.nnUNetTrainerAttributeBase.nnUNetTrainerAttributeBase` defined there is a trainer
(the base itself excepted). Adding a trainer is adding one such file: it gets its short-schedule variants
(:mod:`nnunet_dmoe.trainers.seam.training_length`) and a line in ``nnUNetv2_dmoe_list_trainers``.
"""
import importlib
import pkgutil
from typing import List

from nnunet_dmoe.errors import command

__all__ = ["trainer_classes", "list_trainers_entry_point"]


def trainer_classes() -> List[type]:
    """The plugin's trainers (no schedule variants), sorted by name."""
    import nnunet_dmoe.trainers as package
    from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase

    found = {}
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not info.name.rsplit(".", 1)[-1].startswith("nnUNetTrainer"):
            continue
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, nnUNetTrainerAttributeBase)
                    and obj is not nnUNetTrainerAttributeBase and obj.__module__ == module.__name__):
                found[obj.__name__] = obj
    return [found[k] for k in sorted(found)]


def _summary(cls) -> str:
    doc = (cls.__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


@command("nnUNetv2_dmoe_list_trainers")
def list_trainers_entry_point():
    import argparse
    from nnunet_dmoe.trainers.seam.training_length import EPOCHS, ITERATIONS, variant_name, variant_names

    parser = argparse.ArgumentParser(
        description="List the nnU-Net trainers this plugin offers (use them with nnUNetv2_train / nnUNetv2_predict "
                    "-tr NAME).")
    parser.add_argument("--variants", action="store_true",
                        help="[OPTIONAL] also list every short-schedule variant name, one per line")
    args = parser.parse_args()
    classes = trainer_classes()
    width = max(len(c.__name__) for c in classes)
    for cls in classes:
        print(f"{cls.__name__:<{width}}  {_summary(cls)}")
    print(f"\nShort schedules (nnU-Net's naming), for each trainer above: <trainer>_<N>epochs with N in "
          f"{', '.join(map(str, EPOCHS))}; <trainer>_<N>epochs_<M>iters (M iterations per epoch) with M in "
          f"{', '.join(map(str, ITERATIONS))}. Example: {variant_name(classes[0].__name__, 5, 10)}.")
    if args.variants:
        print()
        print("\n".join(variant_names()))
