"""Networks built from nnU-Net plans: the U-Nets, FiLM and the transformers behind the attribute-channel front end."""
