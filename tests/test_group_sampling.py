"""Group-balanced sampling: the probabilities 1 / (G n_g), the frequencies nnU-Net's own data loader draws with
them, and the hook that hands them to the training loader only."""
from types import SimpleNamespace

import numpy as np
import pytest
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_dmoe.trainers.seam.group_sampling import GroupBalancedSampling, balanced_probabilities, training_sampling_probabilities

# six cases: three of level 0, one of level 1, two of unknown level (group 2)
KEYS = ["a", "b", "c", "d", "e", "f"]
GROUPS = [0, 0, 0, 1, 2, 2]


def _dataset(keys=KEYS):
    return SimpleNamespace(identifiers=list(keys))


def _loader(dataset, batch_size=2, **kwargs):
    """nnU-Net's data loader over a stand-in dataset (only the case keys are used to draw a batch)."""
    labels = SimpleNamespace(all_labels=[0, 1], has_ignore_label=False)
    return nnUNetDataLoader(dataset, batch_size, (8, 8), (8, 8), labels, **kwargs)


def test_probabilities_by_hand():
    p = balanced_probabilities(GROUPS)
    np.testing.assert_allclose(p, [1 / 9, 1 / 9, 1 / 9, 1 / 3, 1 / 6, 1 / 6])
    assert p.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(balanced_probabilities(["x", "x"]), [0.5, 0.5])  # one group: uniform
    with pytest.raises(ValueError, match="no training cases"):
        balanced_probabilities([])


def test_nnunet_loader_draws_every_group_equally_often():
    """30000 cases drawn by nnU-Net's loader (``get_indices``) with a fixed seed: each group about 1/3 of the draws
    (binomial standard deviation 0.0027), each case in proportion to 1 / n_g; uniform draws would give 1/2, 1/6,
    1/3."""
    loader = _loader(_dataset(), batch_size=3, sampling_probabilities=balanced_probabilities(GROUPS))
    np.random.seed(0)
    drawn = np.concatenate([loader.get_indices() for _ in range(10000)])
    case_freq = np.array([(drawn == k).mean() for k in KEYS])
    group_freq = np.array([case_freq[np.array(GROUPS) == g].sum() for g in range(3)])
    np.testing.assert_allclose(group_freq, [1 / 3] * 3, atol=0.012)
    np.testing.assert_allclose(case_freq, balanced_probabilities(GROUPS), atol=0.012)


def test_hook_reaches_the_training_loader_only():
    """What nnU-Net's get_dataloaders does (build its loaders by the name in its module), with the hook active:
    the training set's loader gets the probabilities of its keys, the validation loader stays uniform, and the
    name is restored afterwards."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    train, val = _dataset(), _dataset(["g", "h"])
    groups = dict(zip(KEYS, GROUPS))
    with training_sampling_probabilities(lambda data: data is train,
                                         lambda keys: balanced_probabilities([groups[k] for k in keys])) as used:
        dl_tr = trainer_module.nnUNetDataLoader(train, 2, (8, 8), (8, 8), SimpleNamespace(
            all_labels=[0, 1], has_ignore_label=False), sampling_probabilities=None)
        dl_val = trainer_module.nnUNetDataLoader(val, 2, (8, 8), (8, 8), SimpleNamespace(
            all_labels=[0, 1], has_ignore_label=False), sampling_probabilities=None)
    assert trainer_module.nnUNetDataLoader is nnUNetDataLoader
    np.testing.assert_allclose(dl_tr.sampling_probabilities, balanced_probabilities(GROUPS))
    assert dl_val.sampling_probabilities is None and len(used) == 1


class _FakeTrainer:
    """Stands in for nnUNetTrainer: get_dataloaders builds both loaders as nnU-Net does (its module's name)."""

    def __init__(self, build_training_loader=True):
        self.build_training_loader = build_training_loader
        self.logged = []

    def get_tr_and_val_datasets(self):
        return _dataset(), _dataset(["g"])

    def get_dataloaders(self):
        import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module
        tr, val = self.get_tr_and_val_datasets()
        if not self.build_training_loader:  # e.g. an nnU-Net that builds its loaders in another module
            return _loader(tr), _loader(val)
        return trainer_module.nnUNetDataLoader(tr, 2, (8, 8), (8, 8), SimpleNamespace(
            all_labels=[0, 1], has_ignore_label=False), sampling_probabilities=None), _loader(val)


class _Balanced(GroupBalancedSampling, _FakeTrainer):
    attribute = SimpleNamespace(name="stage", levels=["T1", "T2"], num_levels=2)

    def attribute_levels(self, keys):
        return np.array([{0: 0, 1: 1, 2: -1}[dict(zip(KEYS, GROUPS))[k]] for k in keys])

    def print_to_log_file(self, *args):
        self.logged.append(" ".join(map(str, args)))


def test_mixin_groups_unknown_cases_and_logs_them():
    trainer = _Balanced()
    dl_tr, dl_val = trainer.get_dataloaders()
    np.testing.assert_allclose(dl_tr.sampling_probabilities, balanced_probabilities(GROUPS))
    assert dl_val.sampling_probabilities is None
    assert trainer.logged == ["Group-balanced sampling (groups of 'stage'): T1 3 cases (p 0.1111 each), T2 1 cases "
                              "(p 0.3333 each), unknown 2 cases (p 0.1667 each)"]
    off = _Balanced()
    off.group_balanced_sampling = False
    assert off.get_dataloaders()[0].sampling_probabilities is None and off.logged == []
    with pytest.raises(RuntimeError, match="refusing to train with uniform sampling"):
        _Balanced(build_training_loader=False).get_dataloaders()
