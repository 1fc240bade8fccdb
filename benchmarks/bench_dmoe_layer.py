"""Forward+backward time of one dMoE layer: sparse dispatch vs a dense reference (documentation/explanation/cost.md).

Sparse = :class:`nnunet_dmoe.method.dmoe.DistributionAwareMoE` (each token through its top-k experts only). Dense = the
same math written the straightforward way: every token through all experts, then keep the routed k (same router,
same Dropout(0.1) on the expert outputs). C=32, 32^3 tokens x batch 2, train mode. Runs are interleaved
(sparse, dense, sparse, ...) and the median is reported, because the machine is noisy. Not a test; run by hand:

    .venv/bin/python benchmarks/bench_dmoe_layer.py [--repeats 11] [--dim 32] [--size 32] [-b 2] [-device cpu]

Target: sparse <= 0.5x dense on the 2-core CPU.
"""
import argparse

import torch

from nnunet_dmoe.commands.benchmark.timing import time_interleaved
from nnunet_dmoe.method.dmoe import DistributionAwareMoE


def dense_forward(block: DistributionAwareMoE, x: torch.Tensor, router_index: torch.Tensor) -> torch.Tensor:
    """Every token through every expert (one batched matmul over the expert axis), then pick the routed k."""
    b, c = x.shape[:2]
    ex = block.experts
    tokens = x.flatten(2).transpose(1, 2)  # b n c
    gates, expert_index = block.router(tokens, router_index)
    flat = tokens.reshape(1, -1, c)
    h = torch.relu(torch.matmul(flat, ex.w1) + ex.b1[:, None])  # e (bn) h
    out = torch.matmul(h, ex.w2) + ex.b2[:, None]  # e (bn) c
    out = out.permute(1, 0, 2).reshape(b, -1, ex.num_experts, c)  # b n e c
    if block.training and ex.dropout > 0:
        out = torch.nn.functional.dropout(out, ex.dropout)
    picked = torch.gather(out, 2, expert_index[..., None].expand(-1, -1, -1, c))  # b n k c
    mixed = (picked * gates[..., None]).sum(2)
    return x + mixed.transpose(1, 2).reshape(x.shape)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("-b", type=int, default=2)
    parser.add_argument("-device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    block = DistributionAwareMoE(args.dim, num_experts=8, num_routers=5, top_k=2).to(device).train()
    with torch.no_grad():
        block.router.w_gate.normal_()
        block.router.w_noise.normal_(0, 0.1)
    x = torch.randn(args.b, args.dim, *([args.size] * 3), device=device, requires_grad=True)
    r = torch.arange(args.b, device=device) % 5

    def step(fn):
        def run():
            out = fn(x, r)
            out.sum().backward()
            block.zero_grad(set_to_none=True)
            x.grad = None
        return run

    times = time_interleaved({"sparse": step(block), "dense": step(lambda x, r: dense_forward(block, x, r))},
                             repeats=args.repeats, device=device)
    med = {k: torch.tensor(v).median().item() for k, v in times.items()}
    print(f"dMoE layer fwd+bwd, C={args.dim}, {args.size}^3 x batch {args.b}, train mode, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved runs")
    for k, v in times.items():
        print(f"  {k:6s}: median {med[k] * 1e3:7.1f} ms   runs: {' '.join(f'{t * 1e3:.0f}' for t in v)}")
    print(f"  ratio sparse/dense: {med['sparse'] / med['dense']:.3f}  (target <= 0.5)")


if __name__ == "__main__":
    main()
