"""Short-schedule variants in nnU-Net's naming, as class names (sweeps are class names, not flags).

``<Trainer>_<N>epochs`` sets ``num_epochs``; ``<Trainer>_<N>epochs_<M>iters`` also sets
``num_iterations_per_epoch = M`` (and ``max(1, M // 5)`` validation iterations) for CPU runs and tests. Made for
every trainer that :func:`nnunet_dmoe.trainers.registry.trainer_classes` finds.
"""
from typing import Optional

from nnunet_dmoe.trainers.registry import trainer_classes

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


__all__ = ["EPOCHS", "ITERATIONS", "variant_name"]
for _base in trainer_classes():
    for _e in EPOCHS:
        for _it in (None,) + ITERATIONS:
            _cls = _variant(_base, _e, _it)
            globals()[_cls.__name__] = _cls
            __all__.append(_cls.__name__)
