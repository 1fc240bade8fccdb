"""nnU-Net trainers of the plugin. nnU-Net finds them through ``nnUNet_extTrainer``; ``nnUNetv2_dmoe_list_trainers``
lists them. Each trainer is one module ``nnUNetTrainer*.py`` here (found by :mod:`.seam.registry`); its short-schedule
variants (``<trainer>_<N>epochs[_<M>iters]``, :mod:`.seam.training_length`) are made when first asked for."""
from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase
from nnunet_dmoe.trainers.seam.registry import trainer_classes
from nnunet_dmoe.trainers.seam import training_length as _training_length

__all__ = ["nnUNetTrainerAttributeBase"]
for _cls in trainer_classes():
    globals()[_cls.__name__] = _cls
    __all__.append(_cls.__name__)


def __getattr__(name: str):
    """A short-schedule variant, e.g. ``nnUNetTrainerDMoE_5epochs`` (PEP 562; ``hasattr`` finds it)."""
    return getattr(_training_length, name)
