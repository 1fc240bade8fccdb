"""The cost report: every number of the table (:func:`cost_report`) and the markdown table (:func:`format_table`)."""
from __future__ import annotations

import statistics
import time
from copy import deepcopy
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from nnunet_dmoe.commands.benchmark.flops import count_flops, count_parameters
from nnunet_dmoe.commands.benchmark.presets import build_pair
from nnunet_dmoe.commands.benchmark.timing import peak_memory_bytes, profile_table, sync, time_interleaved
from nnunet_dmoe.commands.benchmark.train_step import (NNUNetTrainStep, autocast, make_inputs, make_targets,
                                                       set_backend)

__all__ = ["cost_report", "format_table"]


def cost_report(configuration_manager, *, num_levels: int, num_input_channels: int, num_outputs: int,
                attribute_channel: int, flops_size: Sequence[int], patch: Sequence[int], batch: int = 2,
                device="cpu", repeats: int = 9, mode: str = "dmoe", measure: bool = True,
                train_step: Optional[bool] = None, compile: bool = False, backends: Sequence[str] = ("auto",),
                profile: bool = False, warmup: int = 1) -> dict:
    """Everything the table shows, as numbers (see :mod:`nnunet_dmoe.commands.benchmark` for how each is obtained).

    ``train_step`` (default: on CUDA): time :class:`NNUNetTrainStep` instead of forward+backward. ``compile``:
    ``torch.compile`` the networks (and the Dice loss) as nnU-Net does; the first step (compilation included) is
    reported and the eval forward is left out (eval mode would compile again). ``backends``: one (d)MoE network per
    dMoE backend ("auto", "triton", "grouped_mm"), all timed interleaved with the baseline. Each row of the report
    holds one value per network: baseline first.
    """
    device = torch.device(device)
    train_step = device.type == "cuda" if train_step is None else train_step
    base, moe, nets = _networks(configuration_manager, num_levels, num_input_channels, num_outputs,
                                attribute_channel, mode, backends)
    rows = {"parameters": tuple(count_parameters(n) for n in nets.values())}
    fb, fm = (count_flops(n, flops_size, num_input_channels) for n in (base, moe))
    rows["flops"] = (fb["total"],) + (fm["total"],) * len(backends)
    report = {"rows": rows, "dmoe_flops": fm["dmoe"], "flops_size": tuple(flops_size), "patch": tuple(patch),
              "batch": batch, "device": str(device), "repeats": repeats, "mode": mode, "backends": list(backends),
              "threads": torch.get_num_threads(), "train_step": train_step, "compile": compile}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
        torch.backends.cudnn.benchmark = True  # nnU-Net's run_training sets it
    if not measure:
        return report
    x = make_inputs(batch, num_input_channels, attribute_channel, patch, num_levels, device)
    for net in nets.values():
        net.to(device)
    run_nets = {k: torch.compile(n) if compile else n for k, n in nets.items()}
    if not compile:
        rows["forward_s"] = _forward_seconds(nets, run_nets, x, device, repeats, warmup)
    targets = make_targets(base, x, num_outputs)
    for n in nets.values():
        n.train()
    steps = _train_steps(run_nets, x, targets, train_step, compile)
    rows["first_s"] = _first_step_seconds(steps, nets, device)
    t = time_interleaved(steps, repeats, warmup=warmup, device=device)
    rows["train_s"] = tuple(statistics.median(t[k]) for k in nets)
    report["train_runs_s"] = {k: v for k, v in t.items()}
    rows["peak_bytes"] = _peak_bytes(steps, nets, train_step, device)
    if profile:
        report["profiles"] = {k: profile_table(s, device) for k, s in steps.items()}
    return report


def _networks(configuration_manager, num_levels: int, num_input_channels: int, num_outputs: int,
              attribute_channel: int, mode: str,
              backends: Sequence[str]) -> Tuple[torch.nn.Module, torch.nn.Module, Dict[str, torch.nn.Module]]:
    """(baseline, (d)MoE, {"base": baseline, backend: (d)MoE network computing its experts with it, ...})."""
    base, moe = build_pair(configuration_manager, num_levels, deep_supervision=True,
                           num_input_channels=num_input_channels, num_outputs=num_outputs,
                           attribute_channel=attribute_channel, mode=mode)
    nets = {"base": base}
    for i, b in enumerate(backends):
        net = moe if i == 0 else deepcopy(moe)
        set_backend(net, b)
        nets[b] = net
    return base, moe, nets


def _forward_seconds(nets: Dict[str, torch.nn.Module], run_nets: Dict[str, Callable], x: torch.Tensor,
                     device: torch.device, repeats: int, warmup: int) -> tuple:
    """Median eval forward (no_grad, nnU-Net's autocast) time of each network, runs interleaved."""
    def forward(net):
        def run():
            with torch.no_grad(), autocast(device):
                net(x)
        return run

    for n in nets.values():
        n.eval()
    t = time_interleaved({k: forward(n) for k, n in run_nets.items()}, repeats, warmup=warmup, device=device)
    return tuple(statistics.median(t[k]) for k in nets)


def _train_steps(run_nets: Dict[str, Callable], x: torch.Tensor, targets, train_step: bool,
                 compile: bool) -> Dict[str, Callable[[], None]]:
    """Per network the step to time: nnU-Net's train step, or a forward+backward of the outputs' means."""
    if train_step:
        return {k: NNUNetTrainStep(n, x, targets, compile_dice=compile) for k, n in run_nets.items()}

    def fwd_bwd(net):
        def run():
            out = net(x)
            sum(o.float().mean() for o in out).backward()
            net.zero_grad(set_to_none=True)
        return run
    return {k: fwd_bwd(n) for k, n in run_nets.items()}


def _first_step_seconds(steps: Dict[str, Callable[[], None]], nets: Dict[str, torch.nn.Module],
                        device: torch.device) -> tuple:
    """The first step of each network (compilation, cudnn autotuning), timed separately."""
    first = {}
    for k, step in steps.items():
        t0 = time.perf_counter()
        step()
        sync(device)
        first[k] = time.perf_counter() - t0
    return tuple(first[k] for k in nets)


def _peak_bytes(steps: Dict[str, Callable[[], None]], nets: Dict[str, torch.nn.Module], train_step: bool,
                device: torch.device) -> tuple:
    """Peak memory of a step of each network, with what lives between steps (parameters, optimizer state)."""
    if train_step:
        peaks = []
        for s in steps.values():
            s.optimizer.zero_grad(set_to_none=True)  # a step starts without gradients
            peaks.append(s.persistent_bytes() + peak_memory_bytes(s, device))
        return tuple(peaks)
    param_bytes = [sum(p.numel() * p.element_size() for p in n.parameters()) for n in nets.values()]
    return tuple(pb + peak_memory_bytes(s, device) for pb, s in zip(param_bytes, steps.values()))


def format_table(report: dict, title: str) -> str:
    """Markdown table: metric | without dMoE | with dMoE | ratio (one with/ratio pair per dMoE backend)."""
    name = "dMoE" if report["mode"] == "dmoe" else "MoE"
    size = "x".join(map(str, report["flops_size"]))
    backends = report.get("backends", ["auto"])
    if len(backends) == 1:
        head = f"| | without {name} | with {name} | ratio |"
    else:
        head = f"| | without {name} | " + " | ".join(f"{name} ({b}) | ratio" for b in backends) + " |"
    lines = [f"**{title}**", "", head, "|---|---:|" + "---:|---:|" * len(backends)]
    for key, (label, f) in _row_formats(report, size).items():
        if key in report["rows"]:
            base, *others = report["rows"][key]
            lines.append(f"| {label} | {f(base)} | " + " | ".join(f"{f(v)} | {v / base:.2f}x" for v in others) + " |")
    lines.append("")
    note = (f"{name} blocks: {report['dmoe_flops'] / 1e9:.1f} GFLOPs of the forward at {size} (routers + top-k "
            f"experts). FLOPs: 2 per multiply-add (FlopCounterMode).")
    if "train_s" in report["rows"]:
        where = report.get("gpu", f"{report['device']} ({report['threads']} threads)")
        note += (f" Times: median of {report['repeats']} interleaved runs on {where}; peak memory includes "
                 f"parameters{' and optimizer state' if report.get('train_step') else ''}.")
    lines.append(note)
    return "\n".join(lines) + "\n"


def _row_formats(report: dict, size: str) -> Dict[str, Tuple[str, Callable[[float], str]]]:
    """Row key -> (label, number format) of the table, in the table's order."""
    patch = f"{'x'.join(map(str, report['patch']))} x {report['batch']}"
    step = "Train step (nnU-Net: AMP, SGD, clip)" if report.get("train_step") else "Forward+backward"
    compiled = ", torch.compile" if report.get("compile") else ""
    return {
        "parameters": ("Parameters (M)", lambda v: f"{v / 1e6:.2f}"),
        "flops": (f"GFLOPs, forward at {size}", lambda v: f"{v / 1e9:.0f}" if v >= 1e11 else f"{v / 1e9:.2f}"),
        "forward_s": (f"Forward time (ms), {patch}", lambda v: f"{v * 1e3:.1f}"),
        "train_s": (f"{step} time (ms), {patch}{compiled}", lambda v: f"{v * 1e3:.1f}"),
        "first_s": (f"First step (s){compiled}", lambda v: f"{v:.1f}"),
        "peak_bytes": (f"Peak memory {'of a train step' if report.get('train_step') else 'forward+backward'} "
                       f"(MiB), {patch}", lambda v: f"{v / 2 ** 20:.0f}"),
    }
