"""Seeding of a training run, its own small piece: every fold is a replicate with its own seed."""
import random

import numpy as np
import torch

__all__ = ["BASE_SEED", "fold_seed", "seed_everything"]

BASE_SEED = 12345


def fold_seed(fold, local_rank: int = 0) -> int:
    """``12345 + fold`` (``fold="all"``: 99); DDP ranks differ by 1000 so that they draw different augmentations
    and hidden attributes (DDP broadcasts rank 0's initial weights, so the network starts the same)."""
    return BASE_SEED + (fold if isinstance(fold, int) else 99) + 1000 * local_rank


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python's, numpy's and torch's global generators (network initialisation, augmentation in this process)
    and return a private numpy generator for the caller's own draws."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)
