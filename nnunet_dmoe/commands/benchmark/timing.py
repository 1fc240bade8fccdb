"""Measuring steps: interleaved timings, peak memory and a profiler table, on CPU or CUDA."""
from __future__ import annotations

import itertools
import time
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["sync", "time_interleaved", "peak_memory_bytes", "profile_table"]


def sync(device):
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Dict[str, Callable[[], None]], repeats: int = 9, warmup: int = 1, device="cpu",
                     cpu_times: Optional[Dict[str, List[float]]] = None) -> Dict[str, List[float]]:
    """Seconds per call of each function, runs interleaved (a, b, a, b, ...) so that machine noise hits all alike.

    ``cpu_times``: also collect the process CPU seconds of each call into this dict (on a shared machine, with
    ``OMP_WAIT_POLICY=PASSIVE``, a measure of the work that other processes' load does not inflate)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.setdefault(k, []).append(time.process_time() - c0)
    return times


def peak_memory_bytes(step: Callable[[], None], device) -> int:
    """Peak bytes allocated during ``step`` above what was allocated before it (activations, gradients, ...)."""
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    return max(itertools.accumulate((n for _, n in events), initial=0))


def profile_table(step: Callable[[], None], device, steps: int = 2, rows: int = 15) -> str:
    """torch.profiler table of ``steps`` calls: top CUDA kernels by self CUDA time (CUDA) or CPU ops by self CPU
    time (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return f"{steps} steps, sorted by {key}\n" + prof.key_averages().table(sort_by=key, row_limit=rows)
