"""Short-schedule variants in nnU-Net's naming, as class names (sweeps are class names, not flags).

``<Trainer>_<N>epochs`` sets ``num_epochs``; ``<Trainer>_<N>epochs_<M>iters`` also sets
``num_iterations_per_epoch = M`` (and ``max(1, M // 5)`` validation iterations) for CPU runs and tests. Exists for
every trainer that :func:`nnunet_dmoe.trainers.seam.registry.trainer_classes` finds.

The classes are made when a name is first asked for (the module's ``__getattr__``, which nnU-Net's trainer search
reaches through ``hasattr``), then kept: importing the trainers makes none of them.
"""
import re
from typing import Optional

from nnunet_dmoe.trainers.seam.registry import trainer_classes

EPOCHS = (1, 2, 5, 10, 20, 50, 100, 250, 500)
ITERATIONS = (5, 10, 25, 50, 100)


def variant_name(base: str, epochs: int, iterations: Optional[int] = None) -> str:
    """The class name of ``base`` trained ``epochs`` epochs (of ``iterations`` iterations; None: nnU-Net's 250).
    Raises ``ValueError`` for a schedule without a class."""
    if epochs not in EPOCHS:
        raise ValueError(f"{epochs} epochs: choose one of {EPOCHS} (trainer variants are class names)")
    if iterations is not None and iterations not in ITERATIONS:
        raise ValueError(f"{iterations} iterations per epoch: choose one of {ITERATIONS}, or none for nnU-Net's 250")
    return f"{base}_{epochs}epochs" + (f"_{iterations}iters" if iterations else "")


def _variant(base, epochs, iterations=None):
    name = variant_name(base.__name__, epochs, iterations)

    def __init__(self, plans, configuration, fold, dataset_json, device=base.__init__.__defaults__[0]):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        if iterations:
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = max(1, iterations // 5)

    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name,
                                "__doc__": f"{base.__name__} with {epochs} epochs"
                                           + (f" of {iterations} iterations" if iterations else "") + "."})


__all__ = ["EPOCHS", "ITERATIONS", "variant_name", "variant_names"]
_NAME = re.compile(r"^(?P<base>nnUNetTrainer\w*?)_(?P<epochs>\d+)epochs(?:_(?P<iters>\d+)iters)?$")


def variant_names():
    """Every variant's name (none is made), trainer by trainer."""
    return [variant_name(cls.__name__, e, it) for cls in trainer_classes() for e in EPOCHS
            for it in (None,) + ITERATIONS]


def __getattr__(name: str):
    """The variant class ``name``, made on first use and kept (PEP 562)."""
    m = _NAME.match(name)
    bases = {cls.__name__: cls for cls in trainer_classes()} if m else {}
    if not m or m["base"] not in bases or int(m["epochs"]) not in EPOCHS or (
            m["iters"] is not None and int(m["iters"]) not in ITERATIONS):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = _variant(bases[m["base"]], int(m["epochs"]), None if m["iters"] is None else int(m["iters"]))
    globals()[name] = cls
    return cls
