"""The distribution-aware Mixture of Experts (dMoE) layer.

Oh, Jin, Park et al., "Distribution-aware Fairness Learning in Medical Image Segmentation From A Control-Theoretic
Perspective", ICML 2025. Every token ``h`` (a voxel's channel vector for conv features) gets the residual update

    h <- h + sum_{i in topk} G_i^a(h) E_i(h)

with shared experts ``E_i = Linear(C, 4C) -> ReLU -> Linear(4C, C) -> Dropout(0.1)`` and a noisy top-k router
``G^a`` chosen by the case's attribute level ``a`` (one router per level: distribution-aware). The "MoE" ablation
is the same block with one router for everyone.

Classes in data-flow order: :class:`Experts` -> :class:`NoisyTopKRouter` -> :class:`DistributionAwareMoE`. Its
settings: :mod:`nnunet_dmoe.method.config`; which router a sample uses: :mod:`nnunet_dmoe.method.routing`.

Dispatch is sparse: each token is evaluated by its ``k`` experts only. The (token, slot) pairs are sorted by
expert; results go back to their pair's row (a permutation, each token has exactly ``k`` rows) and are summed, so
neither dispatch nor combine needs atomics. Two backends compute the experts (see :func:`resolve_backend`):

- ``triton`` (CUDA): fused kernels that gather a block of tokens, run both expert layers and write the gated,
  dropped-out result by pair (``nnunet_dmoe.method._triton_experts``);
- ``grouped_mm`` (CPU, and the CUDA fallback): PyTorch custom ops (``nnunet_dmoe.method._expert_ops``), with
  ``torch.nn.functional.grouped_mm`` on CUDA and a cache-sized loop per expert on CPU.

Neither keeps the hidden (N k, 4C) activations for backward; they are recomputed. There is no host synchronisation
on CUDA and no data-dependent shape, so the block runs under ``torch.compile`` (the experts are one opaque or
Triton op) without recompiling, and every parameter takes part in every step (experts' weights are single tensors
batched along the expert axis, routers one tensor batched along the router axis), as DistributedDataParallel
without ``find_unused_parameters`` needs.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_dmoe.method._expert_ops import experts_torch
from nnunet_dmoe.method.config import ROUTER_INITS

__all__ = ["Experts", "NoisyTopKRouter", "DistributionAwareMoE", "BACKENDS", "BACKEND_ENV", "resolve_backend",
           "triton_available"]


def _linear_init_(weight: torch.Tensor, bias: torch.Tensor, fan_in: int):
    # what nn.Linear.reset_parameters does, per expert
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


BACKENDS = ("auto", "triton", "grouped_mm")
BACKEND_ENV = "NNUNET_DMOE_BACKEND"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton can be imported (it ships with CUDA builds of torch)."""
    return importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(x: torch.Tensor, dim: int, requested: Optional[str] = None) -> str:
    """``"triton"`` (fused expert kernels) or ``"grouped_mm"`` (PyTorch ops) for a feature map ``x`` with ``dim`` channels.

    ``requested`` (else ``$NNUNET_DMOE_BACKEND``, else ``"auto"``): ``auto`` takes Triton for CUDA tensors when it can be
    imported and ``dim <= 128`` (the fused kernels keep a token's channels in registers; wider blocks sit at the
    deep, low-resolution stages, where there are few tokens), else the PyTorch path. ``triton`` forces the kernels
    (on CPU tensors only under ``TRITON_INTERPRET=1``, for tests); ``grouped_mm`` forces the PyTorch path.
    """
    requested = requested or os.environ.get(BACKEND_ENV) or "auto"
    if requested not in BACKENDS:
        raise ValueError(f"dMoE backend must be one of {BACKENDS} (argument or ${BACKEND_ENV}), got {requested!r}")
    if requested == "grouped_mm" or x.device.type == "meta":
        return "grouped_mm"
    if requested == "triton":
        if not triton_available():
            raise RuntimeError(f"dMoE backend 'triton' was requested (${BACKEND_ENV}) but Triton cannot be imported; "
                               f"install torch with CUDA (it ships Triton) or use {BACKEND_ENV}=grouped_mm")
        if x.device.type != "cuda" and not _triton_interpreted():
            raise RuntimeError(f"dMoE backend 'triton' needs CUDA tensors, got {x.device.type} (set TRITON_INTERPRET=1 "
                               f"before importing triton to run the kernels on CPU in Triton's interpreter)")
        return "triton"
    return "triton" if x.device.type == "cuda" and dim <= 128 and triton_available() else "grouped_mm"


def _compute_dtype(x: torch.Tensor, backend: str) -> torch.dtype:
    device = x.device.type
    if device != "meta" and torch.is_autocast_enabled(device):  # meta: FLOP counting
        if device == "cuda" and backend == "grouped_mm":
            # grouped GEMM kernels are bf16; nnU-Net's fp16 autocast is not among them
            return torch.bfloat16
        return torch.get_autocast_dtype(device)
    return x.dtype


class Experts(nn.Module):
    """``num_experts`` MLPs ``Linear(C, rC) -> ReLU -> Linear(rC, C) -> Dropout``, weights batched on a leading axis.

    The parameters are used as stored, (E, C, rC) and (E, rC, C) (``input @ weight``), by both backends: nothing is
    rebuilt per step. :meth:`forward` evaluates each token's ``k`` experts and returns their gated sum.
    """

    def __init__(self, num_experts: int, dim: int, ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        hidden = dim * ratio
        self.num_experts, self.dim, self.hidden, self.dropout = num_experts, dim, hidden, dropout
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

    def reset_parameters(self):
        for e in range(self.num_experts):
            _linear_init_(self.w1.data[e], self.b1.data[e], self.dim)
            _linear_init_(self.w2.data[e], self.b2.data[e], self.hidden)

    def forward(self, xt: torch.Tensor, gates: torch.Tensor, expert_index: torch.Tensor,
                backend: str = "grouped_mm") -> torch.Tensor:
        """``sum_j gates[:, j] * Dropout(E_{expert_index[:, j]}(xt))`` for tokens ``xt`` (N, C) in the compute dtype,
        ``gates`` and ``expert_index`` (N, k). Returns (N, C) in ``xt``'s dtype."""
        p = self.dropout if self.training else 0.0
        if backend == "triton":
            from nnunet_dmoe.method import _triton_experts

            if p > 0:
                seed = torch.randint(0, 2 ** 62, (1,), device=xt.device, dtype=torch.int64)
            else:
                seed = torch.zeros(1, device=xt.device, dtype=torch.int64)
            return _triton_experts.experts_triton(xt, gates, expert_index, self.w1, self.b1, self.w2, self.b2,
                                                  seed, p)[0]
        keep = _keep_mask(xt.new_empty(expert_index.numel(), self.dim), p) if p > 0 else None
        return experts_torch(xt, gates, expert_index, keep, self.w1, self.b1, self.w2, self.b2, 1.0 / (1.0 - p))[0]


def _keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """Bernoulli(1 - p) mask shaped like ``like`` (what Dropout(p) keeps); only ``like``'s shape and device are used.

    On CPU torch's generator is serial and costly at the full-resolution stage: one 64-bit draw gives four 16-bit
    uniforms (a quarter of the draws of ``rand_like``), compared with a threshold; the keep probability is
    1 - p to within 2**-17 (0.1 -> 0.89999). Elsewhere (CUDA's Philox), and under ``torch.compile`` (which cannot
    trace the in-place ``random_``), ``rand_like`` + compare.
    """
    if like.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.rand(like.shape, device=like.device) >= p
    n = like.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device).random_(-(2 ** 63), None)
    threshold = -(2 ** 15) + round(p * 2 ** 16)  # int16 values below it (probability p) are dropped
    return (bits.view(torch.int16)[:n] >= threshold).view(like.shape)


class NoisyTopKRouter(nn.Module):
    """Noisy top-k gating (Shazeer et al. 2017), one router per index along a leading router axis.

    ``logits = h W_r + b_r`` plus, in training, ``N(0, 1) * softplus(h W_noise_r + b_noise_r)``; keep the top ``k``
    logits and softmax over them. Eval mode is deterministic (no noise), unlike the paper's reference code.
    """

    def __init__(self, dim: int, num_experts: int, num_routers: int, top_k: int = 2, noisy: bool = True,
                 init: str = "linear"):
        super().__init__()
        self.top_k, self.noisy = top_k, noisy
        if init not in ROUTER_INITS:
            raise ValueError(f"router init must be one of {ROUTER_INITS}, got {init!r}")
        # "linear": each router is the paper's nn.Linear(C, E) (bias, uniform +-1/sqrt(C)), so the levels' routers
        # differ from the start; "zero": no bias, zero weights (routing starts uniform; versions up to 0.2)
        self.w_gate = nn.Parameter(torch.zeros(num_routers, dim, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(num_routers, dim, num_experts)) if noisy else None
        self.b_gate = nn.Parameter(torch.zeros(num_routers, num_experts)) if init == "linear" else None
        self.b_noise = nn.Parameter(torch.zeros(num_routers, num_experts)) if init == "linear" and noisy else None
        if init == "linear":
            with torch.no_grad():
                for w, b in ((self.w_gate, self.b_gate), (self.w_noise, self.b_noise)):
                    if w is not None:
                        _linear_init_(w, b, dim)

    def _logits(self, tokens: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                router_index: torch.Tensor) -> torch.Tensor:
        logits = torch.bmm(tokens, self.router_weights(weight, router_index).to(tokens.dtype))
        if bias is not None:
            logits = logits + self.router_weights(bias, router_index).to(tokens.dtype)[:, None, :]
        return logits

    def router_weights(self, weight: torch.Tensor, router_index: torch.Tensor) -> torch.Tensor:
        """(b, c, e) weights (or (b, e) biases) of each sample's router: ``router_index`` (b,), or (b, A) for several
        attributes, whose A routers are summed (``h W_1 + h W_2 = h (W_1 + W_2)``: the sum of the attributes' router
        logits)."""
        w = weight[router_index]
        return w if router_index.ndim == 1 else w.sum(1)

    def forward(self, tokens: torch.Tensor, router_index: torch.Tensor):
        """tokens: (b, n, c); router_index: (b,) long, or (b, A) for several attributes (:meth:`router_weights`).
        Returns gates (b, n, k) float32 and expert indices (b, n, k).

        For k = 2 (the paper's setting) the top two come from two max reductions (the second over the logits with
        the first masked), and the softmax over two logits is ``sigmoid(l1 - l2)``, ``1 - sigmoid(l1 - l2)``: cheaper
        than ``topk`` + ``softmax``, the same values (ties resolve to the lower expert index)."""
        logits = self._logits(tokens, self.w_gate, self.b_gate, router_index)
        if self.training and self.noisy:
            noise_std = F.softplus(self._logits(tokens, self.w_noise, self.b_noise, router_index))
            logits = logits + torch.randn_like(logits) * noise_std
        if self.top_k == 2:
            top1, index1 = logits.max(dim=-1, keepdim=True)
            top2, index2 = logits.scatter(-1, index1, float("-inf")).max(dim=-1, keepdim=True)
            gate1 = torch.sigmoid((top1 - top2).float())
            return torch.cat([gate1, 1.0 - gate1], dim=-1), torch.cat([index1, index2], dim=-1)
        top_logits, top_index = logits.topk(self.top_k, dim=-1)
        return torch.softmax(top_logits.float(), dim=-1), top_index


class DistributionAwareMoE(nn.Module):
    """Residual (d)MoE block over the channel vectors of a conv feature map (2D or 3D).

    ``forward(x, router_index)``: x is (b, c, *spatial), router_index (b,) long, or (b, A) for several attributes
    (see :func:`nnunet_dmoe.method.routing.route_index_for_levels`). Axis letters: b batch, c channels, n tokens per sample, k top-k, e experts.
    ``backend``: see :func:`resolve_backend` (``None``: ``$NNUNET_DMOE_BACKEND`` or automatic).
    """

    def __init__(self, dim: int, num_experts: int = 8, num_routers: int = 1, top_k: int = 2, expert_ratio: int = 4,
                 expert_dropout: float = 0.1, router_noise: bool = True, backend: Optional[str] = None,
                 router_init: str = "linear"):
        super().__init__()
        self.dim, self.num_experts, self.top_k, self.backend = dim, num_experts, top_k, backend
        self.router = NoisyTopKRouter(dim, num_experts, num_routers, top_k, router_noise, router_init)
        self.experts = Experts(num_experts, dim, expert_ratio, expert_dropout)

    def forward(self, x: torch.Tensor, router_index: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        if c != self.dim:
            raise ValueError(f"dMoE block built for {self.dim} channels got a feature map with {c}")
        backend = resolve_backend(x, c, self.backend)
        # one copy into token rows (b n, c), in the experts' compute dtype; the router reads the same rows
        xt = x.flatten(2).transpose(1, 2).to(_compute_dtype(x, backend)).reshape(-1, c)
        gates, expert_index = self.router(xt.view(b, -1, c), router_index)
        mixed = self.experts(xt, gates.view(-1, self.top_k), expert_index.view(-1, self.top_k), backend)
        # x first: the sum is allocated in x's (b, c, n) layout, the token rows are read transposed
        return torch.add(x.flatten(2), mixed.to(x.dtype).view(b, -1, c).transpose(1, 2)).reshape(x.shape)

    def compute_conv_feature_map_size(self, input_size) -> np.int64:
        """Activations stored for backward per sample, counted like DNA's blocks (elements, not bytes)."""
        assert len(input_size) in (2, 3), "give the spatial size only"
        n = np.prod(input_size, dtype=np.int64)
        c, k, e = self.dim, self.top_k, self.num_experts
        # token rows, the k expert outputs by pair (alive while they are summed) and their sum, the residual output;
        # routing: logits, noise and its scale, gates and indices. The hidden (k, 4C) rows are recomputed in backward.
        return np.int64(n * (c + k * c + 2 * c + 3 * e + 2 * k))
