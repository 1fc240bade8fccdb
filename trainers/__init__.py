"""nnU-Net trainers of the plugin (names fixed in DESIGN.md). nnU-Net finds them through ``nnUNet_extTrainer``."""
from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase
from nnunet_dmoe.trainers.nnUNetTrainerAttributeChannel import nnUNetTrainerAttributeChannel
from nnunet_dmoe.trainers.nnUNetTrainerDMoE import nnUNetTrainerDMoE
from nnunet_dmoe.trainers.nnUNetTrainerMoE import nnUNetTrainerMoE
from nnunet_dmoe.trainers.nnUNetTrainerNoAttribute import nnUNetTrainerNoAttribute
from nnunet_dmoe.trainers import training_length as _training_length
from nnunet_dmoe.trainers.training_length import *  # noqa: F401,F403

__all__ = ["nnUNetTrainerAttributeBase", "nnUNetTrainerNoAttribute", "nnUNetTrainerAttributeChannel",
           "nnUNetTrainerMoE", "nnUNetTrainerDMoE"] + _training_length.__all__
