"""Short-schedule variants in nnU-Net's naming, as class names (sweeps are class names, not flags).

``<Trainer>_<N>epochs`` sets ``num_epochs``; ``<Trainer>_<N>epochs_<M>iters`` also sets
``num_iterations_per_epoch = M`` (and ``max(1, M // 5)`` validation iterations) for CPU runs and tests.
"""
from nnunet_dmoe.trainers.nnUNetTrainerAttributeChannel import nnUNetTrainerAttributeChannel
from nnunet_dmoe.trainers.nnUNetTrainerDMoE import nnUNetTrainerDMoE
from nnunet_dmoe.trainers.nnUNetTrainerMoE import nnUNetTrainerMoE
from nnunet_dmoe.trainers.nnUNetTrainerNoAttribute import nnUNetTrainerNoAttribute

EPOCHS = (1, 2, 5, 10, 20, 50, 100, 250, 500)
ITERATIONS = (5, 10, 25, 50, 100)
BASES = (nnUNetTrainerNoAttribute, nnUNetTrainerAttributeChannel, nnUNetTrainerMoE, nnUNetTrainerDMoE)


def _variant(base, epochs, iterations=None):
    name = f"{base.__name__}_{epochs}epochs" + (f"_{iterations}iters" if iterations else "")

    def __init__(self, plans, configuration, fold, dataset_json, device=base.__init__.__defaults__[0]):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        if iterations:
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = max(1, iterations // 5)

    cls = type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name,
                               "__doc__": f"{base.__name__} with {epochs} epochs"
                                          + (f" of {iterations} iterations" if iterations else "") + "."})
    return cls


__all__ = []
for _base in BASES:
    for _e in EPOCHS:
        for _it in (None,) + ITERATIONS:
            _cls = _variant(_base, _e, _it)
            globals()[_cls.__name__] = _cls
            __all__.append(_cls.__name__)
