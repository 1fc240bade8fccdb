"""The distribution-aware Mixture of Experts (dMoE) layer.

Oh, Jin, Park et al., "Distribution-aware Fairness Learning in Medical Image Segmentation From A Control-Theoretic
Perspective", ICML 2025. Every token ``h`` (a voxel's channel vector for conv features) gets the residual update

    h <- h + sum_{i in topk} G_i^a(h) E_i(h)

with shared experts ``E_i = Linear(C, 4C) -> ReLU -> Linear(4C, C) -> Dropout(0.1)`` and a noisy top-k router
``G^a`` chosen by the case's attribute level ``a`` (one router per level: distribution-aware). The "MoE" ablation
is the same block with one router for everyone.

Classes in data-flow order: :class:`Experts` -> :class:`NoisyTopKRouter` -> :class:`DistributionAwareMoE`.

Dispatch is sparse: each token is evaluated by its ``k`` experts only, with one grouped matrix multiply per expert
layer (``torch.nn.functional.grouped_mm``) over tokens sorted by expert. There is no host synchronisation and no
data-dependent shape, so the block runs under ``torch.compile`` without recompiling, and every parameter takes
part in every step (experts' weights are single tensors batched along the expert axis, routers one tensor batched
along the router axis), as DistributedDataParallel without ``find_unused_parameters`` needs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DMoEConfig", "Experts", "NoisyTopKRouter", "DistributionAwareMoE", "route_index_for_levels"]


@dataclass
class DMoEConfig:
    """dMoE hyperparameters, stored in the plans' ``arch_kwargs`` with the prefix ``dmoe_`` (see :meth:`to_arch_kwargs`).

    Experts
        num_experts, top_k, expert_ratio (hidden width = ratio * C), expert_dropout.
    Routing
        mode ("dmoe": one router per level plus one for "unknown"; "moe": one shared router), router_noise
        (noisy top-k gating in training; eval is always deterministic), num_levels (attribute levels).
    Placement
        stages: encoder stages followed by a (d)MoE block, ``None`` = all stages (bottleneck included).
    Input
        attribute_channel: index of the attribute channel in the network input (stripped before the U-Net).
    """

    # experts
    num_experts: int = 8
    top_k: int = 2
    expert_ratio: int = 4
    expert_dropout: float = 0.1
    # routing
    mode: str = "dmoe"
    router_noise: bool = True
    num_levels: int = 1
    # placement
    stages: Optional[Sequence[int]] = None
    # input
    attribute_channel: int = -1

    def __post_init__(self):
        if self.mode not in ("dmoe", "moe"):
            raise ValueError(f"dmoe_mode must be 'dmoe' or 'moe', got {self.mode!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"dmoe_top_k must be in 1..dmoe_num_experts={self.num_experts}, got {self.top_k}")
        if self.expert_ratio < 1:
            raise ValueError(f"dmoe_expert_ratio must be >= 1, got {self.expert_ratio}")
        if not 0.0 <= self.expert_dropout < 1.0:
            raise ValueError(f"dmoe_expert_dropout must be in [0, 1), got {self.expert_dropout}")
        if self.num_levels < 1:
            raise ValueError(f"dmoe_num_levels must be >= 1, got {self.num_levels}")
        if self.stages is not None:
            self.stages = [int(s) for s in self.stages]

    @property
    def num_routers(self) -> int:
        # one router per level + one trained for "unknown" (see route_index_for_levels)
        return self.num_levels + 1 if self.mode == "dmoe" else 1

    def to_arch_kwargs(self) -> dict:
        return {f"dmoe_{k}": (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def pop_from_arch_kwargs(cls, arch_kwargs: dict, **overrides) -> "DMoEConfig":
        """Remove every ``dmoe_*`` key from ``arch_kwargs`` (in place) and build the config (defaults if absent)."""
        values = {k[len("dmoe_"):]: arch_kwargs.pop(k) for k in list(arch_kwargs) if k.startswith("dmoe_")}
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown dMoE settings in the plans: {sorted('dmoe_' + u for u in unknown)}; "
                             f"known: {sorted('dmoe_' + k for k in cls.__dataclass_fields__)}")
        values.update(overrides)
        return cls(**values)


def route_index_for_levels(levels: torch.Tensor, num_levels: int, mode: str) -> torch.Tensor:
    """Router index per sample. ``levels`` holds level indices, ``-1`` for unknown.

    dMoE: level ``i`` -> router ``i``; unknown -> router ``num_levels`` (trained on samples whose attribute the
    trainer hides at a small rate). MoE: everyone -> router 0.
    """
    if mode == "moe":
        return torch.zeros_like(levels)
    return torch.where(levels < 0, torch.full_like(levels, num_levels), levels)


def _linear_init_(weight: torch.Tensor, bias: torch.Tensor, fan_in: int):
    # what nn.Linear.reset_parameters does, per expert
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):  # meta: FLOP counting
        # grouped GEMM kernels (and torch.compile's grouped_mm) are bf16; nnU-Net's fp16 autocast is not among them
        return torch.bfloat16
    return x.dtype


def _pad_to(n: int, multiple: int = 8) -> int:
    return -(-n // multiple) * multiple


class Experts(nn.Module):
    """``num_experts`` MLPs ``Linear(C, rC) -> ReLU -> Linear(rC, C) -> Dropout``, weights batched on a leading axis.

    Grouped GEMM wants rows whose byte stride is a multiple of 16, so the input width is padded to
    ``in_width = ceil8(C + 1)``: the extra column of ones carries the layer-1 bias, the rest are zeros. Hidden and
    output widths are padded the same way (no padding for C a multiple of 8, as in every nnU-Net U-Net).
    """

    def __init__(self, num_experts: int, dim: int, ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        hidden = dim * ratio
        self.num_experts, self.dim, self.hidden, self.dropout = num_experts, dim, hidden, dropout
        self.in_width, self.hidden_width, self.out_width = _pad_to(dim + 1), _pad_to(hidden), _pad_to(dim)
        # (E, C, H) and (E, H, C): the grouped-mm layout (input @ weight)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()

    def reset_parameters(self):
        for e in range(self.num_experts):
            _linear_init_(self.w1.data[e], self.b1.data[e], self.dim)
            _linear_init_(self.w2.data[e], self.b2.data[e], self.hidden)

    def padded_weights(self, dtype: torch.dtype):
        """(E, in_width, hidden_width) with the bias row, and (E, hidden_width, out_width), zero-padded."""
        e, c, h = self.num_experts, self.dim, self.hidden
        w1 = torch.cat([self.w1, self.b1[:, None, :]], dim=1)
        w1 = F.pad(w1, (0, self.hidden_width - h, 0, self.in_width - c - 1))
        w2 = F.pad(self.w2, (0, self.out_width - c, 0, self.hidden_width - h))
        return w1.to(dtype), w2.to(dtype)

    def forward(self, x_in: torch.Tensor, offsets: torch.Tensor, expert_of_row: torch.Tensor,
                row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows of ``x_in`` (M, in_width; column C holds ones, later columns zeros) are grouped by expert: rows
        ``offsets[e-1]:offsets[e]`` belong to expert ``e``; ``expert_of_row`` (M,) says the same per row.
        Returns (M, C): ``Dropout(E(x))``, times ``row_scale`` (M,) when given (the gates: folded into the dropout
        multiply, one pass over the output instead of three)."""
        w1, w2 = self.padded_weights(x_in.dtype)
        h = torch.relu_(F.grouped_mm(x_in, w1, offs=offsets))
        out = F.grouped_mm(h, w2, offs=offsets)
        if self.out_width != self.dim:
            out = out[:, : self.dim]
        out = out + self.b2.to(x_in.dtype).index_select(0, expert_of_row)
        scale = None if row_scale is None else row_scale[:, None]
        if self.training and self.dropout > 0:
            factor = scale * (1.0 / (1.0 - self.dropout)) if scale is not None else 1.0 / (1.0 - self.dropout)
            return out * torch.where(_keep_mask(out, self.dropout), factor, 0.0)
        return out if scale is None else out * scale


def _keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """Bernoulli(1 - p) mask shaped like ``like`` (what Dropout(p) keeps).

    On CPU torch's generator is serial and costly at the full-resolution stage: one 64-bit draw gives two 32-bit
    uniforms (half the draws of ``rand_like``), compared with a threshold; the keep probability is 1 - p to within
    2**-32, finer than ``rand_like``'s 2**-24 float grid. Elsewhere (CUDA's Philox), and under ``torch.compile``
    (which cannot trace the in-place ``random_``), ``rand_like`` + compare.
    """
    if like.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.rand_like(like) >= p
    n = like.numel()
    bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=like.device).random_(-(2 ** 63), None)
    threshold = -(2 ** 31) + round(p * 2 ** 32)  # int32 values below it (probability p) are dropped
    return (bits.view(torch.int32)[:n] >= threshold).view(like.shape)


class NoisyTopKRouter(nn.Module):
    """Noisy top-k gating (Shazeer et al. 2017), one router per index along a leading router axis.

    ``logits = h W_r`` plus, in training, ``N(0, 1) * softplus(h W_noise_r)``; keep the top ``k`` logits and softmax
    over them. Eval mode is deterministic (no noise), unlike the paper's reference code.
    """

    def __init__(self, dim: int, num_experts: int, num_routers: int, top_k: int = 2, noisy: bool = True):
        super().__init__()
        self.top_k, self.noisy = top_k, noisy
        # zero-initialised as in the reference noisy-gating code: routing starts uniform/random
        self.w_gate = nn.Parameter(torch.zeros(num_routers, dim, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(num_routers, dim, num_experts)) if noisy else None

    def forward(self, tokens: torch.Tensor, router_index: torch.Tensor):
        """tokens: (b, n, c); router_index: (b,) long. Returns gates (b, n, k) and expert indices (b, n, k)."""
        w_gate = self.w_gate[router_index].to(tokens.dtype)
        logits = torch.bmm(tokens, w_gate)
        if self.training and self.noisy:
            noise_std = F.softplus(torch.bmm(tokens, self.w_noise[router_index].to(tokens.dtype)))
            logits = logits + torch.randn_like(logits) * noise_std
        top_logits, top_index = logits.topk(self.top_k, dim=-1)
        gates = torch.softmax(top_logits.float(), dim=-1).to(tokens.dtype)
        return gates, top_index


class DistributionAwareMoE(nn.Module):
    """Residual (d)MoE block over the channel vectors of a conv feature map (2D or 3D).

    ``forward(x, router_index)``: x is (b, c, *spatial), router_index (b,) long (see
    :func:`route_index_for_levels`). Axis letters: b batch, c channels, n tokens per sample, k top-k, e experts.
    """

    def __init__(self, dim: int, num_experts: int = 8, num_routers: int = 1, top_k: int = 2, expert_ratio: int = 4,
                 expert_dropout: float = 0.1, router_noise: bool = True):
        super().__init__()
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.router = NoisyTopKRouter(dim, num_experts, num_routers, top_k, router_noise)
        self.experts = Experts(num_experts, dim, expert_ratio, expert_dropout)

    def dispatch(self, tokens: torch.Tensor, gates: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
        """Sparse mixture: ``sum_k gates[..., k] * E_{expert_index[..., k]}(tokens)`` for (b, n, c) tokens."""
        b, n, c = tokens.shape
        k = self.top_k
        dtype = _compute_dtype(tokens)
        pad = self.experts.in_width - c - 1
        # one copy into row layout (tokens is usually a transposed view of the feature map): [h | 1 | 0 ...]
        flat = torch.cat([tokens.to(dtype), tokens.new_ones(1, 1, 1, dtype=dtype).expand(b, n, 1),
                          tokens.new_zeros(1, 1, pad, dtype=dtype).expand(b, n, pad)], dim=2).view(b * n, -1)
        sorted_expert, order = torch.sort(expert_index.reshape(-1), stable=True)  # (bnk,)
        token_of_row = order // k
        offsets = torch.searchsorted(sorted_expert, torch.arange(self.num_experts, device=tokens.device),
                                     right=True).to(torch.int32)
        out = self.experts(flat.index_select(0, token_of_row), offsets, sorted_expert,
                           row_scale=gates.reshape(-1).index_select(0, order).to(dtype))
        mixed = torch.zeros(b * n, c, dtype=dtype, device=tokens.device).index_add_(0, token_of_row, out)
        return mixed.view(b, n, c).to(tokens.dtype)

    def forward(self, x: torch.Tensor, router_index: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        if c != self.dim:
            raise ValueError(f"dMoE block built for {self.dim} channels got a feature map with {c}")
        tokens = x.flatten(2).transpose(1, 2)  # (b, n, c), a view
        gates, expert_index = self.router(tokens, router_index)
        mixed = self.dispatch(tokens, gates, expert_index)
        # x first: the sum is allocated in x's (b, c, n) layout, so the transposed view costs no extra copy
        return torch.add(x.flatten(2), mixed.transpose(1, 2)).reshape(x.shape)

    def compute_conv_feature_map_size(self, input_size) -> np.int64:
        """Activations stored for backward per sample, counted like DNA's blocks (elements, not bytes)."""
        assert len(input_size) in (2, 3), "give the spatial size only"
        n = np.prod(input_size, dtype=np.int64)
        c, h, k = self.dim, self.experts.hidden, self.top_k
        # gathered inputs, hidden (pre/post ReLU), expert outputs, mixed result, residual output; plus routing logits
        return np.int64(n * (k * (c + 1 + 2 * h + 2 * c) + 2 * c + 2 * self.num_experts))
