"""A straightforward dense dMoE, written independently of the layer's sparse paths, for the layer tests.

Router: ``topk`` + ``softmax`` (the layer uses max/mask/max and a sigmoid for k = 2); experts: every token through
every expert with plain matrix products, then the routed ``k`` are picked; Dropout from a given keep mask by pair
``t * k + j``. The noise is drawn as the layer draws it (``randn_like`` of the logits), so with the same RNG state
both see the same noise.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from nnunet_dmoe.method._expert_ops import sort_rows
from nnunet_dmoe.method.dmoe import DistributionAwareMoE


def dense_reference(block: DistributionAwareMoE, x: torch.Tensor, router_index: torch.Tensor,
                    keep_by_pair: Optional[torch.Tensor] = None) -> torch.Tensor:
    b, c = x.shape[:2]
    tokens = x.flatten(2).transpose(1, 2)  # b n c
    router, ex = block.router, block.experts
    def linear(weight, bias):  # each sample's router as nn.Linear(C, E): h W + b (no bias: version 0.2's routers)
        out = torch.bmm(tokens, weight[router_index])
        return out if bias is None else out + bias[router_index][:, None, :].to(out.dtype)

    logits = linear(router.w_gate, router.b_gate)
    if router.training and router.noisy:
        logits = logits + torch.randn_like(logits) * F.softplus(linear(router.w_noise, router.b_noise))
    top, index = logits.topk(block.top_k, dim=-1)
    gates = torch.softmax(top, dim=-1)
    outs = [torch.relu(tokens @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e] for e in range(ex.num_experts)]
    picked = torch.gather(torch.stack(outs, dim=2), 2, index[..., None].expand(-1, -1, -1, c))  # b n k c
    if keep_by_pair is not None:
        picked = picked * keep_by_pair.view(picked.shape) / (1 - ex.dropout)
    mixed = (picked * gates[..., None]).sum(2)
    return x + mixed.transpose(1, 2).reshape(x.shape)


def keep_rows_to_pairs(keep_rows: torch.Tensor, expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The torch backend draws its Dropout mask by sorted row; the same mask by pair."""
    order, _ = sort_rows(expert_index, num_experts)
    out = torch.empty_like(keep_rows)
    out[order] = keep_rows
    return out


def make_block(c=6, routers=5, top_k=2, seed=0, **kw) -> DistributionAwareMoE:
    torch.manual_seed(seed)
    block = DistributionAwareMoE(c, num_experts=8, num_routers=routers, top_k=top_k, **kw)
    with torch.no_grad():  # non-zero routers so that routing differs between levels and samples
        block.router.w_gate.normal_()
        block.router.w_noise.normal_(0, 0.3)
    return block


def gradients(block: DistributionAwareMoE, x: torch.Tensor, out: torch.Tensor, seed: int = 7) -> Dict[str, torch.Tensor]:
    """Output, input gradient and every parameter gradient for the loss ``sum(out * fixed random weights)``."""
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    grads = torch.autograd.grad((out.float() * weights).sum(), [x, *block.parameters()], allow_unused=True)
    names = ["x"] + [n for n, _ in block.named_parameters()]
    result = {n: g for n, g in zip(names, grads) if g is not None}
    result["out"] = out.detach()
    return result


def assert_close_relative(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], tol: float):
    """Every tensor within ``tol`` relative (Frobenius) error of the reference."""
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    for name, ref in expected.items():
        got = actual[name].float().cpu()
        ref = ref.float().cpu()
        err = (got - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
