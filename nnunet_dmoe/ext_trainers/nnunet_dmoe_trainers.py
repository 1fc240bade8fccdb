"""Re-export shim for nnU-Net's trainer search.

nnU-Net imports every module of each ``nnUNet_extTrainer`` folder as a top-level module. This folder holds only
this shim, so the search finds the plugin's trainers under their real module ``nnunet_dmoe.trainers``. The
variable is set by ``nnunet_dmoe_ext_trainer.pth``, which the install places in site-packages.
"""
from nnunet_dmoe.trainers import *  # noqa: F401,F403
from nnunet_dmoe.trainers import __all__  # noqa: F401


def __getattr__(name: str):
    """The short-schedule variants, made on demand (nnU-Net's search asks with ``hasattr``)."""
    import nnunet_dmoe.trainers
    return getattr(nnunet_dmoe.trainers, name)
