"""Converters into nnU-Net raw datasets with the attribute block and channel: Harvard-FairSeg, HAM10000,
radiotherapy CT/MR with T-stage, and the built-in synthetic data; written through a staging folder, so that nothing
is lost (common.py)."""
