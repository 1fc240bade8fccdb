"""Base of the trainers whose loss needs each sample's group (GroupDRO, FEBS, adversarial).

Not a trainer itself (this module's name does not start with ``nnUNetTrainer``, so the registry skips it). It
connects a :class:`nnunet_dmoe.fairness.losses.GroupLoss` inside ``self.loss`` to the seam:

- the batch hook hands it ``batch["attribute"]`` (every training and validation step);
- at the end of each training epoch its statistics go to the training log, to nnU-Net's logger (so they are in
  the checkpoint) and to ``fairness_progress.png`` beside ``progress.png``;
- resuming from a checkpoint (``--c``, ``--val``) restores its state from those logged values.

A trainer on it overrides ``_build_loss`` (and, for the adversary, ``build_network_architecture``).
"""
import os
from typing import List

import numpy as np

from nnunet_dmoe.fairness.losses import UNKNOWN_GROUP, GroupLoss
from nnunet_dmoe.trainers.nnUNetTrainerAttributeBase import nnUNetTrainerAttributeBase

__all__ = ["nnUNetTrainerFairnessLossBase", "plot_fairness_progress"]


def plot_fairness_progress(history: dict, names: dict, path: str) -> None:
    """One panel per logged key: a line per group (lists) or one line (numbers), over epochs."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    keys = [k for k in history if history[k]]
    if not keys:
        return
    fig, axes = plt.subplots(len(keys), 1, figsize=(10, 4 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        values = [np.nan if v is None else v for v in history[key]]
        epochs = np.arange(len(values))
        if any(isinstance(v, list) for v in values):
            width = max(len(v) for v in values if isinstance(v, list))
            rows = np.array([v if isinstance(v, list) else [np.nan] * width for v in values], dtype=float)
            for j in range(width):
                ax.plot(epochs, rows[:, j], marker="o", label=names.get(key, [str(i) for i in range(width)])[j])
            ax.legend(loc="best")
        else:
            ax.plot(epochs, np.array(values, dtype=float), marker="o")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class nnUNetTrainerFairnessLossBase(nnUNetTrainerAttributeBase):
    """The plans' U-Net (attribute-blind) trained with a loss that reads each sample's group."""

    def group_names(self) -> List[str]:
        """The attribute's levels, plus ``"unknown"`` when dataset.json has training cases of unknown level (they
        form their own group)."""
        unknown = any(level is None for level in self.attribute.cases.values())
        return list(self.attribute.levels) + ([UNKNOWN_GROUP] if unknown else [])

    def on_train_start(self):
        if len(self.attributes) > 1:
            self.print_to_log_file(f"Groups: the levels of '{self.attribute.name}', the first of the dataset's "
                                   f"attributes {[a.name for a in self.attributes]}.")
        super().on_train_start()

    def group_losses(self) -> List[GroupLoss]:
        return [m for m in self.loss.modules() if isinstance(m, GroupLoss)]

    def prepare_attribute(self, batch: dict, train: bool) -> dict:
        batch = super().prepare_attribute(batch, train)
        levels = batch["attribute"].to(self.device, non_blocking=True)
        for loss in self.group_losses():
            loss.set_groups(levels, train)
        return batch

    def _logged(self) -> dict:
        # nnU-Net 2.8's MetaLogger keeps the values in its local logger (saved in the checkpoint)
        return getattr(self.logger, "local_logger", self.logger).my_fantastic_logging

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        logged, keys, names = self._logged(), [], {}
        for loss in self.group_losses():
            stats = loss.epoch_stats()
            for key, value in stats.items():
                # a key new to this log (first epoch) gets None for earlier epochs: nnU-Net plots up to the
                # shortest list
                logged.setdefault(key, [None] * self.current_epoch)
                self.logger.log(key, value, self.current_epoch)
                keys.append(key)
                names[key] = loss.group_names
            for line in loss.describe(stats):
                self.print_to_log_file(line)
        if self.local_rank == 0 and keys:
            plot_fairness_progress({k: logged[k] for k in keys}, names,
                                   os.path.join(self.output_folder, "fairness_progress.png"))

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        for loss in self.group_losses():
            loss.restore(self._logged())
