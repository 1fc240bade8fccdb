"""Whole-network cost of the dMoE in nnU-Net's ResEnc-M 3D U-Net (the times and memory of
documentation/explanation/cost.md).

ResidualEncoderUNet with nnU-Net's ResEnc-M settings (features 32-64-128-256-320-320, blocks 1-3-4-6-6-6, one conv
per decoder stage, kernel 3, strides 1,2,2,2,2,2, InstanceNorm3d affine, LeakyReLU, conv bias, deep supervision),
built through :func:`nnunet_dmoe.networks.unet.build_attribute_network`, with a dMoE after every encoder stage that
downsamples (the default; ``-stages all`` adds the block at full resolution) vs without (None). Patch 64^3, batch
2, CPU. Times forward+backward in train mode (loss = sum of the deep-supervision outputs' means) and eval forward
under no_grad, interleaved, medians. Peak memory of a train step: each network in a child process of its own, the
growth of the process's peak resident memory (VmHWM) over two forward+backward steps after building, and the peak.
With ``--profile`` it also times the dMoE layer alone at each encoder stage's shape and breaks the largest one
down by operator (torch.profiler, forward and backward). Not a test; run by hand:

    .venv/bin/python benchmarks/bench_resenc_m.py [--repeats 9] [--patch 64] [-b 2] [-stages all] [--profile]

Target: dMoE/plain <= 1.15x for forward+backward on the 2-core CPU.

Large activations are fresh ``mmap`` allocations that glibc by default returns after each op, and first-touch page
faults are expensive in this VM. The plugin's trainers tell glibc to reuse freed memory on CPU
(:mod:`nnunet_dmoe.trainers.seam.cpu_memory`), and so does this benchmark unless ``--glibc_default`` is given. Say which
setting you used.
"""
import argparse
import multiprocessing
import statistics

import torch

from nnunet_dmoe.commands.benchmark.flops import count_parameters
from nnunet_dmoe.commands.benchmark.presets import (build_pair, resenc_m_configuration, stages_argument,
                                                    with_dmoe_settings)
from nnunet_dmoe.commands.benchmark.timing import time_interleaved
from nnunet_dmoe.networks.unet import build_attribute_network, stage_blocks_and_sizes
from nnunet_dmoe.trainers.seam.cpu_memory import keep_freed_memory

# operator name -> part of the dMoE layer it belongs to (forward and backward ops alike)
OP_GROUPS = {
    "routing (bmm, softplus, randn, topk, softmax)": ("aten::bmm", "aten::softplus", "aten::softplus_backward",
                                                      "aten::normal_", "aten::randn_like", "aten::topk",
                                                      "aten::_softmax", "aten::_softmax_backward_data",
                                                      "aten::value_selecting_reduction_backward", "aten::scatter"),
    "sort / searchsorted": ("aten::sort", "aten::searchsorted"),
    "gather rows (index_select, index)": ("aten::index", "aten::index_select"),
    "grouped_mm (fwd+bwd)": ("aten::_grouped_mm", "aten::grouped_mm", "aten::mm", "aten::bmm_out"),
    "relu + relu backward": ("aten::relu_", "aten::clamp_min_", "aten::threshold_backward"),
    "dropout + gates (random_, ge, where, mul)": ("aten::uniform_", "aten::rand_like", "aten::ge", "aten::rand",
                                                  "aten::random_", "aten::where", "aten::mul", "aten::sum"),
    "adds (bias, residual, grad accumulation)": ("aten::add", "aten::add_"),
    "index_add / index backward": ("aten::index_add_", "aten::index_put_", "aten::_index_put_impl_",
                                   "aten::index_add", "aten::scatter_add_"),
    "copies, fills (cat, pad, copy_, zeros)": ("aten::cat", "aten::copy_", "aten::clone", "aten::constant_pad_nd",
                                               "aten::contiguous", "aten::_to_copy", "aten::fill_", "aten::zero_"),
}


def layer_profile(net, patch, batch, repeats):
    """Time each stage's dMoE layer alone (fwd+bwd, train) at its feature-map shape; operator table of the first."""
    shapes = [(moe, size[0]) for moe, size in stage_blocks_and_sizes(net.unet, net.moe, [patch] * 3)]
    fns = {}
    r = torch.arange(batch) % net.config.num_routers
    for moe, size in shapes:
        x = torch.randn(batch, moe.dim, size, size, size, requires_grad=True)

        def run(moe=moe, x=x):
            moe(x, r).sum().backward()
        fns[f"C={moe.dim:3d}, {size:2d}^3"] = run
    times = time_interleaved(fns, repeats=repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    total = sum(med.values())
    print(f"\ndMoE layer alone per encoder stage (fwd+bwd, train, batch {batch}), median of {repeats}:")
    for k, v in med.items():
        print(f"  {k}: {v * 1e3:7.1f} ms  ({100 * v / total:4.1f} %)")
    print(f"  sum: {total * 1e3:.1f} ms")

    moe, size = shapes[0]
    x = torch.randn(batch, moe.dim, size, size, size, requires_grad=True)
    moe(x, r).sum().backward()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            moe(x, r).sum().backward()
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events)
    grouped = {g: 0.0 for g in OP_GROUPS}
    other = {}
    for e in events:
        for g, names in OP_GROUPS.items():
            if e.key in names:
                grouped[g] += e.self_cpu_time_total
                break
        else:
            other[e.key] = e.self_cpu_time_total
    print(f"\nlargest dMoE layer (C={moe.dim}, {size}^3) by operator (self CPU time, fwd+bwd, 3 steps, torch.profiler):")
    for g, t in sorted(grouped.items(), key=lambda kv: -kv[1]):
        print(f"  {g:45s} {t / 3e3:7.1f} ms/step  {100 * t / total_self:4.1f} %")
    rest = sum(other.values())
    top = ", ".join(f"{k} {v / 3e3:.0f}" for k, v in sorted(other.items(), key=lambda kv: -kv[1])[:6])
    print(f"  {'other':45s} {rest / 3e3:7.1f} ms/step  {100 * rest / total_self:4.1f} %   ({top} ms)")


def _configuration(stages):
    cm = resenc_m_configuration(3)
    return cm if stages is None else with_dmoe_settings(cm, stages=stages_argument(stages))


def _input(batch, patch):
    x = torch.randn(batch, 2, *([patch] * 3))
    x[:, 1] = torch.arange(batch)[:, None, None, None] % 4 + 1  # attribute channel: levels 1..4
    return x


def _peak_rss_kib() -> int:
    """The peak resident memory of this process's address space (VmHWM; ru_maxrss would carry the parent's peak
    over from before the child's exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _peak_of_train_step(which, stages, batch, patch, glibc_default, queue):
    if not glibc_default:
        keep_freed_memory()
    torch.manual_seed(0)
    cm = with_dmoe_settings(_configuration(stages), num_levels=4, attribute_channel=1)
    net = build_attribute_network(None, cm, 2, 2, True, routing=None if which == "plain" else "dmoe").train()
    x = _input(batch, patch)
    before = _peak_rss_kib()
    for _ in range(2):
        out = net(x)
        sum(o.float().mean() for o in out).backward()
        net.zero_grad(set_to_none=False)  # the gradients stay, as in training
    queue.put(((_peak_rss_kib() - before) / 2 ** 20, _peak_rss_kib() / 2 ** 20))  # KiB -> GiB


def peak_memory(stages, batch, patch, glibc_default):
    """(GiB that a train step adds to the peak resident memory, the process's peak), per network, each measured in a
    fresh process."""
    ctx = multiprocessing.get_context("spawn")
    peaks = {}
    for which in ("plain", "dmoe"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_peak_of_train_step, args=(which, stages, batch, patch, glibc_default, queue))
        proc.start()
        peaks[which] = queue.get()
        proc.join()
    return peaks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("-b", type=int, default=2)
    parser.add_argument("-stages", nargs="+", default=None,
                        help="encoder stages with a dMoE block: downsampling (default), all, or indices")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--skip_network", action="store_true", help="only the --profile part")
    parser.add_argument("--skip_memory", action="store_true", help="no peak memory measurement")
    parser.add_argument("--glibc_default", action="store_true",
                        help="leave glibc's malloc as it is (default: reuse freed memory, as the trainers do on CPU)")
    args = parser.parse_args()
    print(keep_freed_memory() if not args.glibc_default else "CPU memory: glibc's defaults (--glibc_default)")
    base, dmoe = build_pair(_configuration(args.stages), num_levels=4, deep_supervision=True)
    x = _input(args.b, args.patch)
    print(f"ResEnc-M 3D, patch {args.patch}^3, batch {args.b}, CPU, {torch.get_num_threads()} threads, dMoE after "
          f"stages {' '.join(args.stages or ['downsampling'])}")
    print(f"parameters: plain {count_parameters(base) / 1e6:.2f} M, dMoE {count_parameters(dmoe) / 1e6:.2f} M")
    if not args.skip_network:
        def train_step(net):
            def run():
                out = net(x)
                loss = sum(o.float().mean() for o in out)
                loss.backward()
                net.zero_grad(set_to_none=True)
            return run

        def eval_step(net):
            def run():
                with torch.no_grad():
                    net(x)
            return run

        base.train(), dmoe.train()
        tc, ec = {}, {}
        t = time_interleaved({"plain": train_step(base), "dmoe": train_step(dmoe)}, repeats=args.repeats,
                             cpu_times=tc)
        base.eval(), dmoe.eval()
        e = time_interleaved({"plain": eval_step(base), "dmoe": eval_step(dmoe)}, repeats=args.repeats, cpu_times=ec)
        for name, times, cpu in (("forward+backward (train)", t, tc), ("eval forward (no_grad)", e, ec)):
            mp, md = statistics.median(times["plain"]), statistics.median(times["dmoe"])
            pair = statistics.median(d / p for p, d in zip(times["plain"], times["dmoe"]))
            cp, cd = statistics.median(cpu["plain"]), statistics.median(cpu["dmoe"])
            print(f"{name}: plain {mp:.3f} s, dMoE {md:.3f} s, ratio {md / mp:.3f} (median of per-pair ratios "
                  f"{pair:.3f}; CPU time {cp:.2f} -> {cd:.2f} s, {cd / cp:.3f})   (median of {args.repeats}; "
                  f"runs plain {' '.join(f'{v:.2f}' for v in times['plain'])} | "
                  f"dMoE {' '.join(f'{v:.2f}' for v in times['dmoe'])})")
    if not args.skip_memory:
        peaks = peak_memory(args.stages, args.b, args.patch, args.glibc_default)
        (gp, pp), (gd, pd) = peaks["plain"], peaks["dmoe"]
        print(f"peak memory (VmHWM, own process each): train steps add plain {gp:.2f} GiB, dMoE {gd:.2f} GiB "
              f"(ratio {gd / gp:.3f}); process peak plain {pp:.2f} GiB, dMoE {pd:.2f} GiB (ratio {pd / pp:.3f})")
    if args.profile:
        dmoe.train()
        layer_profile(dmoe, args.patch, args.b, args.repeats)


if __name__ == "__main__":
    main()
