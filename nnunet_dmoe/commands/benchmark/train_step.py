"""One nnU-Net training iteration, replicated for timing: inputs, targets, nnU-Net's loss and ``train_step``."""
from __future__ import annotations

from contextlib import nullcontext
from typing import List, Sequence

import numpy as np
import torch

__all__ = ["make_inputs", "nnunet_loss", "make_targets", "autocast", "NNUNetTrainStep", "set_backend"]


def make_inputs(batch: int, num_input_channels: int, attribute_channel: int, patch: Sequence[int], num_levels: int,
                device) -> torch.Tensor:
    """A seeded random batch whose attribute channel holds the levels 1, 2, ... (cycling through ``num_levels``)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, num_input_channels, *patch, generator=g)
    x[:, attribute_channel] = (torch.arange(batch) % num_levels + 1).view(-1, *([1] * len(patch))).float()
    return x.to(device)


def nnunet_loss(num_outputs: int, compile_dice: bool = False):
    """nnU-Net's Dice + CE loss (``_build_loss`` without regions or ignore label) over ``num_outputs`` deep-supervision
    outputs, weights 1/2^i normalised. The lowest output keeps a weight of 1e-6, nnU-Net's choice under DDP
    (instead of 0), so that backward runs through every output."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    if compile_dice:
        loss.dc = torch.compile(loss.dc)
    weights = np.array([1 / (2 ** i) for i in range(num_outputs)])
    weights[-1] = 1e-6
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def make_targets(net: torch.nn.Module, x: torch.Tensor, num_classes: int) -> List[torch.Tensor]:
    """Random label maps shaped like each deep-supervision output (found by one no-grad forward)."""
    with torch.no_grad():
        shapes = [o.shape for o in net.eval()(x)]
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, num_classes, (s[0], 1, *s[2:]), generator=g).float().to(x.device) for s in shapes]


def autocast(device: torch.device):
    # nnU-Net autocasts (fp16) on CUDA only: "If the device_type is 'cpu' then it's slow as heck"
    return torch.autocast(device.type, enabled=True) if device.type == "cuda" else nullcontext()


class NNUNetTrainStep:
    """One training iteration as ``nnUNetTrainer.train_step`` runs it: ``zero_grad(set_to_none=True)``, forward and
    deep-supervision loss under autocast (CUDA), GradScaler (CUDA), unscale, gradient-norm clip 12, SGD step
    (lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5, ``configure_optimizers``)."""

    def __init__(self, net: torch.nn.Module, x: torch.Tensor, targets: List[torch.Tensor], compile_dice: bool = False):
        self.net, self.x, self.targets = net, x, targets
        self.device = x.device
        self.loss = nnunet_loss(len(targets), compile_dice)
        self.optimizer = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
        self.scaler = torch.GradScaler("cuda") if self.device.type == "cuda" else None

    def __call__(self):
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device):
            loss = self.loss(self.net(self.x), self.targets)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 12)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 12)
            self.optimizer.step()

    def persistent_bytes(self) -> int:
        """Parameters and optimizer state (momentum), which live between steps."""
        tensors = list(self.net.parameters()) + [t for st in self.optimizer.state.values() for t in st.values()
                                                 if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)


def set_backend(net: torch.nn.Module, backend: str):
    """Every (d)MoE block of ``net`` computes its experts with ``backend`` ("auto": the block's own choice)."""
    from nnunet_dmoe.method.dmoe import DistributionAwareMoE

    for m in net.modules():
        if isinstance(m, DistributionAwareMoE):
            m.backend = None if backend == "auto" else backend
