"""Parameters and FLOPs of a network: counted (``FlopCounterMode`` on the meta device) and by formula for the (d)MoE.

Convention of the counter: 2 FLOPs per multiply-add of convolutions and matrix products; normalisation, activations
and elementwise ops are not counted (``thop``/``fvcore``-style counts report multiply-adds, half these numbers). The
experts are custom ops (``nnunet_dmoe::experts_torch``, ``nnunet_dmoe::experts_triton``) that register their
formulas, so the dMoE part is the sparse top-k computation that is executed: routers for every token plus ``k`` of
``E`` expert MLPs per token.
"""
from __future__ import annotations

from copy import deepcopy
from typing import Dict, Sequence

import torch

__all__ = ["count_parameters", "dmoe_parameters", "dmoe_flops", "grouped_mm_flops", "count_flops"]


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def dmoe_parameters(channels: Sequence[int], num_experts: int = 8, ratio: int = 4, num_routers: int = 5,
                    noisy: bool = True, router_bias: bool = True) -> int:
    """Analytic parameter count of the (d)MoE blocks after encoder stages with ``channels``: per block
    ``E (C*rC + rC + rC*C + C)`` expert weights and ``R (C + 1) E`` router weights and biases (``R C E`` without
    bias: ``"router_init": "zero"``), twice with the noise router."""
    total = 0
    for c in channels:
        h = ratio * c
        router = num_routers * (c + (1 if router_bias else 0)) * num_experts
        total += num_experts * (2 * c * h + h + c) + (2 if noisy else 1) * router
    return total


def dmoe_flops(channels: Sequence[int], tokens: Sequence[int], num_experts: int = 8, top_k: int = 2,
               ratio: int = 4) -> int:
    """Analytic inference FLOPs (2 per multiply-add) of the (d)MoE blocks: per token the router ``2 C E`` and
    ``k`` expert MLPs ``2 (C rC + rC C)`` (biases and activations are not counted, as for convolutions)."""
    total = 0
    for c, n in zip(channels, tokens):
        h = ratio * c
        total += n * (2 * c * num_experts + top_k * 2 * (c * h + h * c))
    return total


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode formula for ``aten::_grouped_mm``: 2 per multiply-add over all groups."""
    if len(a_shape) == 2 and len(b_shape) == 3:  # (M, K) x (E, K, N), rows grouped
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # (M, K) x (K, N), K grouped -> (E, M, N)
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 3:  # batched
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]  # (M, K) groups x (K, N)


def count_flops(net: torch.nn.Module, input_size: Sequence[int], num_input_channels: int,
                batch: int = 1) -> Dict[str, int]:
    """FLOPs of one eval forward pass at ``input_size`` on the meta device (nothing is computed).

    Returns ``{"total": ..., "dmoe": ...}``, the latter being the FLOPs inside the (d)MoE blocks."""
    from torch.utils.flop_counter import FlopCounterMode

    from nnunet_dmoe.method.dmoe import DistributionAwareMoE

    meta = deepcopy(net).to("meta", torch.bfloat16).eval()  # the grouped-mm meta kernel is bf16-only
    x = torch.zeros(batch, num_input_channels, *input_size, device="meta", dtype=torch.bfloat16)
    kwargs = {}
    if getattr(meta, "moe", None) is not None:
        kwargs["attribute"] = torch.zeros(batch, dtype=torch.long, device="meta")
    mapping = {torch.ops.aten._grouped_mm: grouped_mm_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        with torch.no_grad():
            meta(x, **kwargs)
    per_module = counter.get_flop_counts()
    dmoe = 0
    for name, module in meta.named_modules():
        if isinstance(module, DistributionAwareMoE):
            key = f"{type(meta).__name__}.{name}"
            dmoe += sum(per_module.get(key, {}).values())
    return {"total": counter.get_total_flops(), "dmoe": dmoe}
