"""nnunet_dmoe: distribution-aware Mixture of Experts (dMoE) for fair segmentation, as an nnU-Net v2 plugin."""
from nnunet_dmoe.attribute import (AttributeSpec, UNKNOWN_CODE, decode_attribute_channel,
                                   encode_attribute_channel)
from nnunet_dmoe.tables import bin_labels, bin_value, read_attribute_table

__version__ = "0.1.0"

__all__ = ["AttributeSpec", "UNKNOWN_CODE", "decode_attribute_channel", "encode_attribute_channel",
           "bin_labels", "bin_value", "read_attribute_table", "__version__"]
