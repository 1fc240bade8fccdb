"""The plugin's settings in nnU-Net plans: the configuration's "dmoe" and "transformer" blocks, and configurations
built without a plans file."""
