"""Cost report of the distribution-aware MoE (the paper's Table 7): parameters, GFLOPs, time and peak memory.

For a configuration from the plans (``-d DATASET -c CONFIG [-p PLANS]``) or a built-in preset (``-preset``), the
network is built twice through :func:`nnunet_dmoe.networks.unet.build_attribute_network`: without dMoE (attribute mode
``none``, the plans' U-Net) and with it (``dmoe``, or ``moe``). Reported:

- parameters (all trainable tensors);
- GFLOPs of one inference forward pass at a large input (default: the paper's 3D 384x384x128, 2D 224x224),
  counted with :class:`torch.utils.flop_counter.FlopCounterMode` on the meta device (nothing is run). Convention
  of that counter: 2 FLOPs per multiply-add of convolutions and matrix products; normalisation, activations and
  elementwise ops are not counted (``thop``/``fvcore``-style counts report multiply-adds, half these numbers).
  The experts are custom ops (``nnunet_dmoe::experts_torch``, ``nnunet_dmoe::experts_triton``) that register
  their formulas, so the dMoE part is the sparse top-k computation that is executed: routers for every token
  plus ``k`` of ``E`` expert MLPs per token;
- measured time of eval forward (no_grad) and train forward+backward at a small patch (``-patch``, ``-b``),
  runs interleaved, medians;
- peak memory of forward+backward: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the largest sum of live
  tensor allocations seen by ``torch.profiler`` (``profile_memory``) during the step, plus the parameters.
"""
from __future__ import annotations

import itertools
import json
import os
import statistics
import time
from contextlib import nullcontext
from copy import deepcopy
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from nnunet_dmoe.method.dmoe import BACKENDS
from nnunet_dmoe.errors import command

__all__ = ["PRESETS", "PRESET_NETWORKS", "PRESET_TRANSFORMER", "PRESET_IMAGE_CHANNELS", "preset_configuration",
           "resenc_m_configuration", "build_pair", "count_parameters", "dmoe_parameters", "dmoe_flops", "count_flops",
           "grouped_mm_flops", "time_interleaved", "peak_memory_bytes", "nnunet_loss", "NNUNetTrainStep",
           "profile_table", "cost_report", "format_table", "benchmark_entry_point"]

# name: (dim, features, blocks per encoder stage, input size for the GFLOPs, default patch)
PRESETS = {
    # nnU-Net's ResEnc-M 3D (nnUNetPlannerResEncM) at its six-stage depth
    "resenc_m_3d": (3, (32, 64, 128, 256, 320, 320), (1, 3, 4, 6, 6, 6), (384, 384, 128), (64, 64, 64)),
    # the same ResEnc-M blocks in 2D (nnU-Net's 2D feature cap is 512)
    "2d": (2, (32, 64, 128, 256, 512, 512), (1, 3, 4, 6, 6, 6), (224, 224), (128, 128)),
    # small enough for tests
    "tiny_3d": (3, (8, 16, 32), (1, 2, 2), (32, 32, 32), (16, 16, 16)),
    # the paper's 2D network: TransUNet with ViT-B/16 (built by PRESET_NETWORKS' builder with PRESET_TRANSFORMER's
    # block; its U-Net entries only give the timing patch check its strides: 16 per token)
    "transunet_2d": (2, (32, 64, 128, 256, 768), (1, 1, 1, 1, 1), (224, 224), (224, 224)),
}
# presets that are not a plans' U-Net: their builder (build_attribute_network's signature), which the preset's
# configuration names in place of the network class
PRESET_NETWORKS = {"transunet_2d": "nnunet_dmoe.networks.transformers.build_transunet_network"}
# the plans' "transformer" block of a preset: the paper's TransUNet (no conv stem, no skips)
PRESET_TRANSFORMER = {"transunet_2d": {"decoder": "paper"}}
# image channels of a preset (default 1): the paper's ViT sees RGB (HAM10000; FairSeg's grey images repeated to 3
# channels), so its patch embedding has 3 input channels, as Table 7 counts it
PRESET_IMAGE_CHANNELS = {"transunet_2d": 3}

# default patch for timings on CUDA (nnU-Net's ResEnc-M 3D trains 128^3 patches, batch 2)
CUDA_PATCH = {"resenc_m_3d": (128, 128, 128)}

_NO_SOURCE = "give either -d DATASET -c CONFIGURATION (plans from $nnUNet_preprocessed) or -preset {presets}"


def _sync(device):
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
    _sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.setdefault(k, []).append(time.process_time() - c0)
    return times


# ----------------------------------------------------------------------------------------------------- networks
def resenc_m_configuration(dim: int = 3, features: Sequence[int] = (32, 64, 128, 256, 320, 320),
                           blocks: Sequence[int] = (1, 3, 4, 6, 6, 6)):
    """nnU-Net ``ConfigurationManager`` of a ResidualEncoderUNet with ResEnc-M settings
    (:func:`nnunet_dmoe.plans.configuration.unet_configuration`)."""
    from nnunet_dmoe.plans.configuration import unet_configuration

    return unet_configuration(dim, features, blocks)


def preset_configuration(name: str):
    if name not in PRESETS:
        raise ValueError(f"-preset must be one of {sorted(PRESETS)}, got {name!r}")
    dim, features, blocks, flops_size, _ = PRESETS[name]
    cm = resenc_m_configuration(dim, features, blocks)
    if name in PRESET_NETWORKS:  # the network's defaults; its position embedding for the GFLOPs input
        cm.configuration["architecture"]["network_class_name"] = PRESET_NETWORKS[name]
        cm.configuration["patch_size"] = list(flops_size)
    if name in PRESET_TRANSFORMER:
        cm.configuration["transformer"] = deepcopy(PRESET_TRANSFORMER[name])
    return cm


def _with_dmoe_settings(configuration_manager, **dmoe):
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    from nnunet_dmoe.networks.unet import PLANS_KEY, current_settings

    cfg = deepcopy(configuration_manager.configuration)
    cfg[PLANS_KEY] = current_settings({**(cfg.get(PLANS_KEY) or {}), **dmoe})
    return ConfigurationManager(cfg)


def build_pair(configuration_manager, num_levels: int = 4, deep_supervision: bool = False,
               num_input_channels: int = 2, num_outputs: int = 2, attribute_channel: Optional[int] = None,
               mode: str = "dmoe", seed: int = 0):
    """(baseline, (d)MoE) networks of one configuration; the baseline is the plans' U-Net (attribute stripped)."""
    from pydoc import locate

    from nnunet_dmoe.networks.unet import build_attribute_network, dmoe_settings

    builder = build_attribute_network
    if configuration_manager.network_arch_class_name in PRESET_NETWORKS.values():
        builder = locate(configuration_manager.network_arch_class_name)
    if attribute_channel is None:
        attribute_channel = num_input_channels - 1
    cm = configuration_manager
    if "dmoe_attribute_channel" not in dmoe_settings(cm)[0]:
        cm = _with_dmoe_settings(cm, num_levels=num_levels, attribute_channel=attribute_channel)
    nets = []
    for routing in (None, mode):
        torch.manual_seed(seed)
        nets.append(builder(None, cm, num_input_channels, num_outputs, deep_supervision, routing=routing))
    return tuple(nets)


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


# --------------------------------------------------------------------------------------------------- measuring
def peak_memory_bytes(step: Callable[[], None], device) -> int:
    """Peak bytes allocated during ``step`` above what was allocated before it (activations, gradients, ...)."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    return max(itertools.accumulate((n for _, n in events), initial=0))


def _inputs(batch: int, num_input_channels: int, attribute_channel: int, patch: Sequence[int], num_levels: int,
            device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, num_input_channels, *patch, generator=g)
    x[:, attribute_channel] = (torch.arange(batch) % num_levels + 1).view(-1, *([1] * len(patch))).float()
    return x.to(device)


def nnunet_loss(num_outputs: int, compile_dice: bool = False):
    """nnU-Net's Dice + CE loss (``_build_loss`` without regions or ignore label) over ``num_outputs`` deep-supervision
    outputs, weights 1/2^i normalised. The lowest output keeps a weight of 1e-6, nnU-Net's choice under DDP
    (instead of 0), so that backward runs through every output."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    if compile_dice:
        loss.dc = torch.compile(loss.dc)
    weights = np.array([1 / (2 ** i) for i in range(num_outputs)])
    weights[-1] = 1e-6
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def _targets(net: torch.nn.Module, x: torch.Tensor, num_classes: int) -> List[torch.Tensor]:
    """Random label maps shaped like each deep-supervision output (found by one no-grad forward)."""
    with torch.no_grad():
        shapes = [o.shape for o in net.eval()(x)]
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, num_classes, (s[0], 1, *s[2:]), generator=g).float().to(x.device) for s in shapes]


def _autocast(device: torch.device):
    # nnU-Net autocasts (fp16) on CUDA only: "If the device_type is 'cpu' then it's slow as heck"
    return torch.autocast(device.type, enabled=True) if device.type == "cuda" else nullcontext()


class NNUNetTrainStep:
    """One training iteration as ``nnUNetTrainer.train_step`` runs it: ``zero_grad(set_to_none=True)``, forward and
    deep-supervision loss under autocast (CUDA), GradScaler (CUDA), unscale, gradient-norm clip 12, SGD step
    (lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5, ``configure_optimizers``)."""

    def __init__(self, net: torch.nn.Module, x: torch.Tensor, targets: List[torch.Tensor], compile_dice: bool = False):
        self.net, self.x, self.targets = net, x, targets
        self.device = x.device
        self.loss = nnunet_loss(len(targets), compile_dice)
        self.optimizer = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
        self.scaler = torch.GradScaler("cuda") if self.device.type == "cuda" else None

    def __call__(self):
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device):
            loss = self.loss(self.net(self.x), self.targets)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 12)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 12)
            self.optimizer.step()

    def persistent_bytes(self) -> int:
        """Parameters and optimizer state (momentum), which live between steps."""
        tensors = list(self.net.parameters()) + [t for st in self.optimizer.state.values() for t in st.values()
                                                 if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _set_backend(net: torch.nn.Module, backend: str):
    from nnunet_dmoe.method.dmoe import DistributionAwareMoE

    for m in net.modules():
        if isinstance(m, DistributionAwareMoE):
            m.backend = None if backend == "auto" else backend


def profile_table(step: Callable[[], None], device, steps: int = 2, rows: int = 15) -> str:
    """torch.profiler table of ``steps`` calls: top CUDA kernels by self CUDA time (CUDA) or CPU ops by self CPU
    time (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return f"{steps} steps, sorted by {key}\n" + prof.key_averages().table(sort_by=key, row_limit=rows)


def cost_report(configuration_manager, *, num_levels: int, num_input_channels: int, num_outputs: int,
                attribute_channel: int, flops_size: Sequence[int], patch: Sequence[int], batch: int = 2,
                device="cpu", repeats: int = 9, mode: str = "dmoe", measure: bool = True,
                train_step: Optional[bool] = None, compile: bool = False, backends: Sequence[str] = ("auto",),
                profile: bool = False, warmup: int = 1) -> dict:
    """Everything the table shows, as numbers (see the module docstring for how each is obtained).

    ``train_step`` (default: on CUDA): time :class:`NNUNetTrainStep` instead of forward+backward. ``compile``:
    ``torch.compile`` the networks (and the Dice loss) as nnU-Net does; the first step (compilation included) is
    reported and the eval forward is left out (eval mode would compile again). ``backends``: one (d)MoE network per
    dMoE backend ("auto", "triton", "grouped_mm"), all timed interleaved with the baseline. Each row of the report
    holds one value per network: baseline first.
    """
    device = torch.device(device)
    train_step = device.type == "cuda" if train_step is None else train_step
    base, moe = build_pair(configuration_manager, num_levels, deep_supervision=True,
                           num_input_channels=num_input_channels, num_outputs=num_outputs,
                           attribute_channel=attribute_channel, mode=mode)
    nets = {"base": base}
    for i, b in enumerate(backends):
        net = moe if i == 0 else deepcopy(moe)
        _set_backend(net, b)
        nets[b] = net
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
    x = _inputs(batch, num_input_channels, attribute_channel, patch, num_levels, device)
    for net in nets.values():
        net.to(device)
    run_nets = {k: torch.compile(n) if compile else n for k, n in nets.items()}

    if not compile:
        def forward(net):
            def run():
                with torch.no_grad(), _autocast(device):
                    net(x)
            return run

        for n in nets.values():
            n.eval()
        t = time_interleaved({k: forward(n) for k, n in run_nets.items()}, repeats, warmup=warmup, device=device)
        rows["forward_s"] = tuple(statistics.median(t[k]) for k in nets)

    targets = _targets(base, x, num_outputs)
    for n in nets.values():
        n.train()
    if train_step:
        steps = {k: NNUNetTrainStep(n, x, targets, compile_dice=compile) for k, n in run_nets.items()}
    else:
        def fwd_bwd(net):
            def run():
                out = net(x)
                sum(o.float().mean() for o in out).backward()
                net.zero_grad(set_to_none=True)
            return run
        steps = {k: fwd_bwd(n) for k, n in run_nets.items()}
    first = {}
    for k, step in steps.items():  # the first step of each (compilation, cudnn autotuning) separately
        t0 = time.perf_counter()
        step()
        _sync(device)
        first[k] = time.perf_counter() - t0
    rows["first_s"] = tuple(first[k] for k in nets)
    t = time_interleaved(steps, repeats, warmup=warmup, device=device)
    rows["train_s"] = tuple(statistics.median(t[k]) for k in nets)
    report["train_runs_s"] = {k: v for k, v in t.items()}
    if train_step:
        peaks = []
        for s in steps.values():
            s.optimizer.zero_grad(set_to_none=True)  # a step starts without gradients
            peaks.append(s.persistent_bytes() + peak_memory_bytes(s, device))
        rows["peak_bytes"] = tuple(peaks)
    else:
        param_bytes = [sum(p.numel() * p.element_size() for p in n.parameters()) for n in nets.values()]
        rows["peak_bytes"] = tuple(pb + peak_memory_bytes(s, device) for pb, s in zip(param_bytes, steps.values()))
    if profile:
        report["profiles"] = {k: profile_table(s, device) for k, s in steps.items()}
    return report


def format_table(report: dict, title: str) -> str:
    """Markdown table: metric | without dMoE | with dMoE | ratio (one with/ratio pair per dMoE backend)."""
    name = "dMoE" if report["mode"] == "dmoe" else "MoE"
    size = "x".join(map(str, report["flops_size"]))
    patch = f"{'x'.join(map(str, report['patch']))} x {report['batch']}"
    step = "Train step (nnU-Net: AMP, SGD, clip)" if report.get("train_step") else "Forward+backward"
    compiled = ", torch.compile" if report.get("compile") else ""
    fmt = {
        "parameters": ("Parameters (M)", lambda v: f"{v / 1e6:.2f}"),
        "flops": (f"GFLOPs, forward at {size}", lambda v: f"{v / 1e9:.0f}" if v >= 1e11 else f"{v / 1e9:.2f}"),
        "forward_s": (f"Forward time (ms), {patch}", lambda v: f"{v * 1e3:.1f}"),
        "train_s": (f"{step} time (ms), {patch}{compiled}", lambda v: f"{v * 1e3:.1f}"),
        "first_s": (f"First step (s){compiled}", lambda v: f"{v:.1f}"),
        "peak_bytes": (f"Peak memory {'of a train step' if report.get('train_step') else 'forward+backward'} "
                       f"(MiB), {patch}", lambda v: f"{v / 2 ** 20:.0f}"),
    }
    backends = report.get("backends", ["auto"])
    if len(backends) == 1:
        head = f"| | without {name} | with {name} | ratio |"
    else:
        head = f"| | without {name} | " + " | ".join(f"{name} ({b}) | ratio" for b in backends) + " |"
    lines = [f"**{title}**", "", head, "|---|---:|" + "---:|---:|" * len(backends)]
    for key, (label, f) in fmt.items():
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


# ------------------------------------------------------------------------------------------------- entry point
def _from_plans(dataset: str, configuration: str, plans_identifier: str):
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_dmoe.data.attribute import AttributeSpec

    if nnUNet_preprocessed is None:
        raise RuntimeError("nnUNet_preprocessed is not set; set it to the folder nnUNetv2_plan_and_preprocess wrote, "
                           "or use -preset")
    folder = os.path.join(nnUNet_preprocessed, maybe_convert_to_dataset_name(dataset))
    plans_file = os.path.join(folder, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise ValueError(f"no plans {plans_file} (-d {dataset} -p {plans_identifier}); run "
                         f"nnUNetv2_plan_and_preprocess first or check -p")
    with open(plans_file) as f:
        plans = PlansManager(json.load(f))
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    if configuration not in plans.available_configurations:
        raise ValueError(f"-c {configuration!r} is not in {plans_file}; it has {plans.available_configurations}")
    spec = AttributeSpec.from_dataset_json(dataset_json, os.path.join(folder, "dataset.json"))
    cm = plans.get_configuration(configuration)
    num_outputs = plans.get_label_manager(dataset_json).num_segmentation_heads
    channels = len(dataset_json.get("channel_names", dataset_json.get("modality")))
    return cm, spec.num_levels, channels, num_outputs, spec.channel, tuple(cm.patch_size)


def _stages_argument(values: Sequence[str]):
    """``-stages``: one rule name (downsampling, all) or stage indices."""
    if len(values) == 1 and not values[0].isdigit():
        return values[0]
    if not all(v.isdigit() for v in values):
        raise ValueError(f"-stages: give downsampling, all, or stage indices (e.g. -stages 1 2 3), got "
                         f"{' '.join(values)}")
    return [int(v) for v in values]


@command("nnUNetv2_dmoe_benchmark")
def benchmark_entry_point():
    from nnunet_dmoe.cli import Parser

    parser = Parser(description="Cost of the distribution-aware MoE vs the plain U-Net: "
                                                 "parameters, GFLOPs, time, peak memory (the paper's Table 7).")
    parser.add_argument("-d", type=str, default=None,
                        help="[OPTIONAL] dataset name or id whose plans to use (needs -c); or use -preset")
    parser.add_argument("-c", type=str, default=None, help="[OPTIONAL] configuration in the plans, e.g. 3d_fullres")
    parser.add_argument("-p", type=str, default="nnUNetPlans", help="[OPTIONAL] plans identifier. Default: nnUNetPlans")
    parser.add_renamed("-preset", "--preset", type=str, default=None,
                        help=f"[OPTIONAL] built-in architecture instead of plans: {', '.join(PRESETS)}")
    parser.add_argument("-num_levels", type=int, default=4,
                        help="[OPTIONAL] attribute levels for a preset (plans: from dataset.json). Default: 4")
    parser.add_argument("-mode", type=str, default="dmoe", choices=("dmoe", "moe"),
                        help="[OPTIONAL] dmoe (router per level) or moe (one router). Default: dmoe")
    parser.add_argument("-flops_size", type=int, nargs="+", default=None,
                        help="[OPTIONAL] input size for the GFLOPs. Default: 384 384 128 (3D), 224 224 (2D)")
    parser.add_argument("-patch", type=int, nargs="+", default=None,
                        help="[OPTIONAL] patch size for the timings. Default: the preset's small patch, or the plans' "
                             "patch")
    parser.add_argument("-b", type=int, default=2, help="[OPTIONAL] batch size for the timings. Default: 2")
    parser.add_argument("-device", type=str, default="cpu", help="[OPTIONAL] cpu or cuda. Default: cpu")
    parser.add_argument("-repeats", type=int, default=9,
                        help="[OPTIONAL] timed runs per network (interleaved; median reported). Default: 9")
    parser.add_argument("-o", type=str, default=None, help="[OPTIONAL] also write the table to this markdown file")
    parser.add_argument("-json", type=str, default=None,
                        help="[OPTIONAL] also write the report (all numbers, every timed run) to this JSON file")
    parser.add_argument("-backend", type=str, nargs="+", default=["auto"], choices=BACKENDS,
                        help="[OPTIONAL] dMoE backend(s): one dMoE network per backend, timed interleaved with the "
                             "baseline. auto: Triton on CUDA, PyTorch ops on CPU. Default: auto")
    parser.add_argument("-stages", type=str, nargs="+", default=None,
                        help="[OPTIONAL] encoder stages followed by a (d)MoE block: downsampling (every stage whose "
                             "stride is not 1, the paper's placement), all (stage 0 at full resolution too), or stage "
                             "indices, e.g. -stages 1 2 3. Default: the plans' setting, else downsampling")
    parser.add_argument("--no_timing", action="store_true", help="[OPTIONAL] parameters and GFLOPs only")
    parser.add_argument("--train_step", action="store_true",
                        help="[OPTIONAL] time nnU-Net's whole train step (loss, GradScaler, clip, SGD) on CPU too. "
                             "On CUDA it is always the train step (fp16 autocast, as nnU-Net trains)")
    parser.add_argument("--compile", action="store_true",
                        help="[OPTIONAL] torch.compile the networks and the Dice loss as nnU-Net does (default mode); "
                             "reports the first step (compilation) and leaves out the eval forward")
    parser.add_argument("--profile", action="store_true",
                        help="[OPTIONAL] torch.profiler table of 2 steps per network: top CUDA kernels (CUDA) or CPU "
                             "ops (CPU)")
    args = parser.parse_args()

    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"-device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("-device cuda was given but torch sees no CUDA device")
    if (args.preset is None) == (args.d is None):
        raise ValueError(_NO_SOURCE.format(presets=", ".join(PRESETS)) + f" (got -d {args.d}, -preset {args.preset})")
    if args.preset is not None:
        cm = preset_configuration(args.preset)
        dim, _, _, flops_size, patch = PRESETS[args.preset]
        if args.device == "cuda":
            patch = CUDA_PATCH.get(args.preset, patch)
        channels = PRESET_IMAGE_CHANNELS.get(args.preset, 1) + 1  # image channels, then the attribute
        num_levels, outputs, attribute_channel = args.num_levels, 2, channels - 1
        title = f"preset {args.preset}"
    else:
        if args.c is None:
            raise ValueError(f"-d {args.d} needs -c CONFIGURATION")
        cm, num_levels, channels, outputs, attribute_channel, plans_patch = _from_plans(args.d, args.c, args.p)
        dim = len(plans_patch)
        flops_size = (384, 384, 128) if dim == 3 else (224, 224)
        patch = plans_patch
        title = f"dataset {args.d}, configuration {args.c}, plans {args.p}"
    if args.stages is not None:
        cm = _with_dmoe_settings(cm, stages=_stages_argument(args.stages))
        title += f", stages {' '.join(args.stages)}"
    flops_size = tuple(args.flops_size) if args.flops_size else flops_size
    patch = tuple(args.patch) if args.patch else patch
    for flag, value in (("-flops_size", flops_size), ("-patch", patch)):
        if len(value) != dim:
            raise ValueError(f"{flag} needs {dim} numbers for this {dim}D network, got {list(value)}")
    strides = np.prod(np.array(cm.network_arch_init_kwargs["strides"], dtype=np.int64), axis=0)
    if not args.no_timing and any(p < 2 * st for p, st in zip(patch, strides)):
        raise ValueError(f"-patch {list(patch)} is too small for this network: instance norm needs at least 2 voxels "
                         f"per axis at the bottleneck, so at least {[int(2 * st) for st in strides]}")
    report = cost_report(cm, num_levels=num_levels, num_input_channels=channels, num_outputs=outputs,
                         attribute_channel=attribute_channel, flops_size=flops_size, patch=patch, batch=args.b,
                         device=args.device, repeats=args.repeats, mode=args.mode, measure=not args.no_timing,
                         train_step=True if args.train_step else None, compile=args.compile,
                         backends=args.backend, profile=args.profile)
    table = format_table(report, title)
    for name, text in report.get("profiles", {}).items():
        table += f"\n**Profile: {'baseline' if name == 'base' else f'{args.mode} ({name})'}**\n\n```\n{text}\n```\n"
    print(table)
    if args.o:
        with open(args.o, "w") as f:
            f.write(table)
        print(f"written to {args.o}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in report.items() if k != "profiles"}, f, indent=1)
        print(f"written to {args.json}")


if __name__ == "__main__":
    benchmark_entry_point()
