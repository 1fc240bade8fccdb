"""Training-step cost of the fairness comparators next to the attribute-blind baseline, as nnU-Net trains them.

For a preprocessed dataset (``$nnUNet_preprocessed``), each trainer is built by nnU-Net's ``get_trainer_from_args``
and started with ``on_train_start`` (network, loss, optimizer, dataloaders; on CUDA nnU-Net's torch.compile and
autocast); then ``train_step`` runs on the same prefetched batches for every trainer, interleaved (baseline,
GroupDRO, FEBS, adversarial, dMoE, baseline, ...), and the median time per step is reported with its ratio to the
baseline. Model folders go to a temporary ``nnUNet_results``. Not a test; run by hand, e.g. after
``nnUNetv2_dmoe_demo`` (dataset 990) or on a GPU::

    .venv/bin/python benchmarks/bench_comparators.py -d 990 -c 2d -p nnUNetDMoEPlans -device cpu --steps 10
    python benchmarks/bench_comparators.py -d 990 -c 3d_fullres -p nnUNetDMoEPlans -device cuda --steps 30

The first steps (compilation on CUDA) are warm-up and not timed.
"""
import argparse
import os
import statistics
import tempfile
import time

import torch

TRAINERS = ["nnUNetTrainerNoAttribute", "nnUNetTrainerGroupDRO", "nnUNetTrainerFEBS", "nnUNetTrainerAdversarial",
            "nnUNetTrainerDMoE"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-d", required=True, help="[REQUIRED] dataset name or id (preprocessed)")
    p.add_argument("-c", default="3d_fullres", help="[OPTIONAL] configuration. Default: 3d_fullres")
    p.add_argument("-p", default="nnUNetPlans", help="[OPTIONAL] plans identifier. Default: nnUNetPlans")
    p.add_argument("-device", default="cuda", help="[OPTIONAL] cuda or cpu. Default: cuda")
    p.add_argument("-tr", nargs="+", default=TRAINERS, help="[OPTIONAL] trainers; the first is the reference")
    p.add_argument("--steps", type=int, default=20, help="[OPTIONAL] timed steps per trainer. Default: 20")
    p.add_argument("--warmup", type=int, default=3, help="[OPTIONAL] untimed steps per trainer. Default: 3")
    p.add_argument("--batches", type=int, default=4, help="[OPTIONAL] prefetched batches, reused. Default: 4")
    a = p.parse_args()

    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="bench_comparators_")
    from nnunetv2.run.run_training import get_trainer_from_args

    device = torch.device(a.device)
    trainers, batches = {}, None
    for name in a.tr:
        t = get_trainer_from_args(str(a.d), a.c, 0, name, a.p, device=device)
        t.on_train_start()
        if batches is None:
            batches = [next(t.dataloader_train) for _ in range(a.batches)]
        trainers[name] = t

    def step(t, i):
        b = batches[i % len(batches)]
        # train_step moves data to the device; keep the prefetched CPU batch intact for the next trainer
        t.train_step({k: (v.clone() if torch.is_tensor(v) else [x.clone() for x in v] if isinstance(v, list) else v)
                      for k, v in b.items()})

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for t in trainers.values():
        for i in range(a.warmup):
            step(t, i)
    sync()
    times = {n: [] for n in trainers}
    for i in range(a.steps):
        for n, t in trainers.items():
            sync()
            t0 = time.perf_counter()
            step(t, i)
            sync()
            times[n].append(time.perf_counter() - t0)
    ref = statistics.median(times[a.tr[0]])
    cfg = trainers[a.tr[0]].configuration_manager
    print(f"\n{a.d} {a.c} {a.p}: patch {cfg.patch_size}, batch {cfg.batch_size}, device {device}, "
          f"{torch.get_num_threads()} threads, median of {a.steps} interleaved steps")
    print("| trainer | train step (ms) | ratio |\n|---|---:|---:|")
    for n in trainers:
        m = statistics.median(times[n])
        print(f"| {n} | {m * 1e3:.1f} | {m / ref:.2f}x |")
    for t in trainers.values():
        t.on_train_end()


if __name__ == "__main__":
    main()
