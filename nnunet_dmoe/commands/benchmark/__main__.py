"""``python -m nnunet_dmoe.commands.benchmark``: the same as ``nnUNetv2_dmoe_benchmark``."""
from nnunet_dmoe.commands.benchmark.entry_point import benchmark_entry_point

benchmark_entry_point()
