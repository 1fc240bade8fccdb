"""CPU cost of MoE and dMoE in the demo's 2D configuration: one nnU-Net train step, baseline vs MoE vs dMoE.

The demo's data and plans are made as ``nnUNetv2_dmoe_demo`` makes them (synthetic 2D dataset 990, 96x96, 60/40
cases; ``nnUNetv2_dmoe_plan_and_preprocess``, whose 2D plans give PlainConvUNet 32..512 at patch 80x80), in
``-o`` (reused when present). The networks are built from those plans through the trainers' builder; each step is
nnU-Net's ``train_step`` on CPU: deep-supervision Dice+CE loss, backward, gradient clip 12, SGD with Nesterov
momentum (``nnunet_dmoe.commands.benchmark.train_step.NNUNetTrainStep``; torch's fused SGD kernel and glibc reusing
freed memory, as the plugin's trainers run on CPU: ``--foreach_sgd`` / ``--glibc_default`` for torch's and glibc's
defaults), no autocast (nnU-Net autocasts on CUDA only). Runs are interleaved (baseline, MoE, dMoE, ...), medians
reported. Not a test; run by hand:

    .venv/bin/python benchmarks/bench_demo_2d.py [-o /tmp/demo2d_bench] [--repeats 15] [-b 2] [--parts]

``--parts`` also times the four parts of a step one after the other (forward with the loss, backward, gradient clip,
SGD step), to show where the extra time of the (d)MoE goes.

Target of version 0.2 (withdrawn in 0.3: the experts quadruple this small network's parameters): MoE and dMoE train
step at most 1.5x the baseline's.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from nnunet_dmoe.commands.benchmark.flops import count_parameters
from nnunet_dmoe.commands.benchmark.presets import build_pair
from nnunet_dmoe.commands.benchmark.timing import time_interleaved
from nnunet_dmoe.commands.benchmark.train_step import NNUNetTrainStep, make_inputs, make_targets
from nnunet_dmoe.commands.demo import PLANS, demo_env
from nnunet_dmoe.plans.loading import load_configuration
from nnunet_dmoe.trainers.seam.cpu_memory import keep_freed_memory


def prepare(output: str, dataset_id: int) -> None:
    env = demo_env(output)
    name = f"Dataset{dataset_id:03d}_SyntheticFairness"
    if not os.path.isfile(os.path.join(env["nnUNet_preprocessed"], name, PLANS + ".json")):
        bin_dir = os.path.dirname(sys.executable)
        for cmd in (["nnUNetv2_dmoe_make_synthetic", "-d", str(dataset_id), "-dim", "2", "-num_train", "60",
                     "-num_test", "40", "-seed", "0"],
                    ["nnUNetv2_dmoe_plan_and_preprocess", "-d", str(dataset_id), "-c", "2d", "-np", "2"]):
            subprocess.run([os.path.join(bin_dir, cmd[0])] + cmd[1:], env=env, check=True,
                           stdout=subprocess.DEVNULL)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", default="/tmp/demo2d_bench", help="folder for the demo's data and plans")
    parser.add_argument("-d", type=int, default=990)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("-b", type=int, default=2, help="batch size (the demo's plans: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--foreach_sgd", action="store_true",
                        help="torch's default SGD implementation (default: the fused kernel, as the trainers on CPU)")
    parser.add_argument("--glibc_default", action="store_true",
                        help="leave glibc's malloc as it is (default: reuse freed memory, as the trainers do on CPU)")
    parser.add_argument("--parts", action="store_true", help="also time forward, backward, clip and SGD separately")
    args = parser.parse_args()
    print(keep_freed_memory() if not args.glibc_default else "CPU memory: glibc's defaults (--glibc_default)")
    if args.threads:
        torch.set_num_threads(args.threads)
    prepare(os.path.abspath(args.o), args.d)
    cm, num_levels, channels, outputs, attribute_channel, patch = load_configuration(str(args.d), "2d", PLANS)
    nets = {}
    base, nets["dmoe"] = build_pair(cm, num_levels, True, channels, outputs, attribute_channel, mode="dmoe")
    _, nets["moe"] = build_pair(cm, num_levels, True, channels, outputs, attribute_channel, mode="moe")
    nets = {"baseline": base, **nets}
    x = make_inputs(args.b, channels, attribute_channel, patch, num_levels, "cpu")
    targets = make_targets(base, x, outputs)
    steps = {}
    for k, n in nets.items():
        n.train()
        steps[k] = NNUNetTrainStep(n, x, targets)
        if not args.foreach_sgd:
            steps[k].optimizer = torch.optim.SGD(n.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99,
                                                 nesterov=True, fused=True)
    arch = cm.network_arch_init_kwargs
    print(f"demo 2D plans: {cm.network_arch_class_name.split('.')[-1]} {arch['features_per_stage']}, patch "
          f"{list(patch)}, batch {args.b}, CPU {torch.get_num_threads()} threads, "
          f"{'default' if args.foreach_sgd else 'fused'} SGD; parameters (M): "
          + ", ".join(f"{k} {count_parameters(n) / 1e6:.2f}" for k, n in nets.items()))
    cpu = {}
    t = time_interleaved(steps, repeats=args.repeats, warmup=2, cpu_times=cpu)
    med = {k: statistics.median(v) for k, v in t.items()}
    for k, v in t.items():
        ratio = med[k] / med["baseline"]
        pair = statistics.median(a / b for a, b in zip(v, t["baseline"]))
        c = statistics.median(cpu[k]) / statistics.median(cpu["baseline"])
        print(f"  {k:8s} train step: median {med[k] * 1e3:6.1f} ms  ({ratio:.2f}x; per-pair {pair:.2f}x; CPU time "
              f"{c:.2f}x)   runs: " + " ".join(f"{s * 1e3:.0f}" for s in v))

    if args.parts:
        parts = {k: time_parts(s, args.repeats) for k, s in steps.items()}
        print("  parts of a step, median ms (extra over the baseline):")
        for part in parts["baseline"]:
            print(f"    {part:8s} " + "  ".join(f"{k} {v[part]:6.1f}" + (
                "" if k == "baseline" else f" (+{v[part] - parts['baseline'][part]:.1f})") for k, v in parts.items()))


def time_parts(step: NNUNetTrainStep, repeats: int, warmup: int = 2) -> dict:
    """Median milliseconds of the parts of ``step`` (CPU: no autocast, no GradScaler)."""
    times = {"forward": [], "backward": [], "clip": [], "sgd": []}
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        step.optimizer.zero_grad(set_to_none=True)
        loss = step.loss(step.net(step.x), step.targets)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(step.net.parameters(), 12)
        t3 = time.perf_counter()
        step.optimizer.step()
        t4 = time.perf_counter()
        if i >= warmup:
            for part, t in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[part].append(t)
    return {part: statistics.median(t) * 1e3 for part, t in times.items()}


if __name__ == "__main__":
    main()
