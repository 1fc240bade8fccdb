"""Group-balanced sampling of training cases: every attribute group drawn equally often.

The sampling of Sagawa et al.'s ``--reweight_groups`` (github.com/kohpangwei/group_DRO: a weighted sampler with
weight ``1 / n_g`` per example): a case of group ``g`` is drawn with probability ``1 / (G n_g)``, ``G`` the groups
that have training cases, ``n_g`` the training cases of group ``g``. Groups are the levels of the (first) attribute,
with the cases of unknown level as one more group.

nnU-Net's data loader (``nnUNetDataLoader``, via batchgenerators' ``DataLoader.get_indices``) draws the case keys of
a batch with ``np.random.choice(keys, p=sampling_probabilities)``; ``nnUNetTrainer.get_dataloaders`` builds it with
``sampling_probabilities=None`` (uniform). :class:`GroupBalancedSampling` passes the probabilities instead, for the
training loader only (validation stays nnU-Net's): while nnU-Net's ``get_dataloaders`` runs, the name
``nnUNetDataLoader`` in nnU-Net's trainer module points to a function that adds them
(:func:`training_sampling_probabilities`); nothing of nnU-Net's loader code is copied. Under DDP every rank builds
its own loader with the same probabilities and draws with its own seed, as nnU-Net does.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, List, Sequence

import numpy as np

__all__ = ["balanced_probabilities", "training_sampling_probabilities", "GroupBalancedSampling"]


def balanced_probabilities(groups: Sequence) -> np.ndarray:
    """Sampling probability of each case: ``1 / (G n_g)`` for a case of group ``g`` (``G`` the distinct groups in
    ``groups``, ``n_g`` the cases of ``g``). Every group gets total probability ``1 / G``."""
    groups = np.asarray(groups)
    if groups.size == 0:
        raise ValueError("no training cases to sample from")
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return 1.0 / (len(counts) * counts[inverse.reshape(-1)])


@contextmanager
def training_sampling_probabilities(is_training: Callable[[object], bool],
                                    probabilities: Callable[[List[str]], np.ndarray]):
    """While active, nnU-Net's trainer module builds each ``nnUNetDataLoader`` whose dataset ``is_training`` with
    ``sampling_probabilities=probabilities(dataset.identifiers)``, the others unchanged. Yields a list that holds
    those probabilities once such a loader was built (empty if none was: e.g. an nnU-Net version that builds its
    loaders elsewhere)."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    original = trainer_module.nnUNetDataLoader
    used: list = []

    def loader(data, *args, **kwargs):
        if is_training(data):
            kwargs["sampling_probabilities"] = probabilities(list(data.identifiers))
            used.append(kwargs["sampling_probabilities"])
        return original(data, *args, **kwargs)

    trainer_module.nnUNetDataLoader = loader
    try:
        yield used
    finally:
        trainer_module.nnUNetDataLoader = original


class GroupBalancedSampling:
    """Mixin for a trainer of the plugin (before ``nnUNetTrainerAttributeBase`` in the bases): with
    ``group_balanced_sampling`` (default on) the training loader draws every group equally often
    (:func:`balanced_probabilities`; groups: the first attribute's levels, unknown its own group). The training
    log states each group's cases and per-case probability."""

    group_balanced_sampling = True
    _training_set = None

    def case_groups(self, keys: Sequence[str]) -> np.ndarray:
        """Group index per case key: the level index of the first attribute, ``num_levels`` for unknown."""
        levels = self.attribute_levels(list(keys))
        return np.where(levels < 0, self.attribute.num_levels, levels)

    def group_counts(self, keys: Sequence[str]) -> Dict[str, int]:
        """Cases per group name among ``keys`` (unknown as ``"unknown"``), groups without cases left out."""
        names = list(self.attribute.levels) + ["unknown"]
        groups, counts = np.unique(self.case_groups(keys), return_counts=True)
        return {names[g]: int(n) for g, n in zip(groups, counts)}

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        self._training_set = dataset_tr  # recognised by identity when nnU-Net builds its loaders
        return dataset_tr, dataset_val

    def get_dataloaders(self):
        if not self.group_balanced_sampling:
            return super().get_dataloaders()
        self._training_set = None
        with training_sampling_probabilities(lambda data: data is self._training_set,
                                             lambda keys: balanced_probabilities(self.case_groups(keys))) as used:
            loaders = super().get_dataloaders()
        if not used:
            raise RuntimeError("group-balanced sampling: nnUNetTrainer.get_dataloaders built no training loader "
                               "through its nnUNetDataLoader (another nnU-Net version?); refusing to train with "
                               "uniform sampling")
        counts = self.group_counts(self._training_set.identifiers)
        self.print_to_log_file(f"Group-balanced sampling (groups of '{self.attribute.name}'): " + ", ".join(
            f"{name} {n} cases (p {1 / (len(counts) * n):.4g} each)" for name, n in counts.items()))
        return loaders
