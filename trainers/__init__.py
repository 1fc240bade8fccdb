"""nnU-Net trainers of the plugin. nnU-Net finds them through ``nnUNet_extTrainer``; ``nnUNetv2_dmoe_list_trainers``
lists them. Each trainer is one module ``nnUNetTrainer*.py`` here (found by :mod:`.registry`)."""
from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase
from nnunet_dmoe.trainers.registry import trainer_classes
from nnunet_dmoe.trainers import training_length as _training_length

__all__ = ["nnUNetTrainerAttributeBase"]
for _cls in trainer_classes():
    globals()[_cls.__name__] = _cls
    __all__.append(_cls.__name__)
for _name in _training_length.__all__:
    if _name.startswith("nnUNetTrainer"):
        globals()[_name] = getattr(_training_length, _name)
        __all__.append(_name)
