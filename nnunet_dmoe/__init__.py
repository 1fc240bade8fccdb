"""nnunet_dmoe: distribution-aware Mixture of Experts (dMoE) for fair segmentation, as an nnU-Net v2 plugin."""
from nnunet_dmoe.data.attribute import (AttributeSpec, UNKNOWN_CODE, decode_attribute_channel,
                                        encode_attribute_channel)
from nnunet_dmoe.data.tables import bin_labels, bin_value, read_attribute_table

__version__ = "0.3.0"

__all__ = ["AttributeSpec", "UNKNOWN_CODE", "decode_attribute_channel", "encode_attribute_channel",
           "bin_labels", "bin_value", "read_attribute_table", "__version__"]


def ext_trainer_path() -> str:
    """The folder to put on nnU-Net's ``nnUNet_extTrainer`` path so that it finds this plugin's trainers.

    ``pip install`` sets this up through ``nnunet_dmoe_ext_trainer.pth``; only if that file is missing::

        export nnUNet_extTrainer=$(python -c "import nnunet_dmoe; print(nnunet_dmoe.ext_trainer_path())")
    """
    import os
    return os.path.join(os.path.dirname(__file__), "ext_trainers")


__all__.append("ext_trainer_path")
