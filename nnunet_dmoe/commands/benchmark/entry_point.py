"""``nnUNetv2_dmoe_benchmark``: the cost table of a configuration from the plans or of a built-in preset."""
from __future__ import annotations

import json
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from nnunet_dmoe.commands.benchmark.presets import (CUDA_PATCH, PRESET_IMAGE_CHANNELS, PRESETS, preset_configuration,
                                                    stages_argument, with_dmoe_settings)
from nnunet_dmoe.commands.benchmark.report import cost_report, format_table
from nnunet_dmoe.errors import command
from nnunet_dmoe.method.dmoe import BACKENDS

__all__ = ["run_benchmark", "benchmark_entry_point"]

_NO_SOURCE = "give either -d DATASET -c CONFIGURATION (plans from $nnUNet_preprocessed) or -preset {presets}"


class _Network(NamedTuple):
    """The network to report on, where it comes from, and its default sizes."""
    configuration_manager: object
    dim: int
    num_levels: int
    num_input_channels: int
    num_outputs: int
    attribute_channel: int
    flops_size: Tuple[int, ...]
    patch: Tuple[int, ...]
    title: str


def _preset_network(preset: str, num_levels: int, device: str) -> _Network:
    cm = preset_configuration(preset)
    dim, _, _, flops_size, patch = PRESETS[preset]
    if device == "cuda":
        patch = CUDA_PATCH.get(preset, patch)
    channels = PRESET_IMAGE_CHANNELS.get(preset, 1) + 1  # image channels, then the attribute
    return _Network(cm, dim, num_levels, channels, 2, channels - 1, flops_size, patch, f"preset {preset}")


def _plans_network(dataset: str, configuration: Optional[str], plans: str) -> _Network:
    from nnunet_dmoe.plans.loading import load_configuration

    if configuration is None:
        raise ValueError(f"-d {dataset} needs -c CONFIGURATION")
    cm, num_levels, channels, outputs, attribute_channel, plans_patch = load_configuration(dataset, configuration,
                                                                                           plans)
    dim = len(plans_patch)
    flops_size = (384, 384, 128) if dim == 3 else (224, 224)
    return _Network(cm, dim, num_levels, channels, outputs, attribute_channel, flops_size, plans_patch,
                    f"dataset {dataset}, configuration {configuration}, plans {plans}")


def _check_sizes(configuration_manager, dim: int, flops_size: Sequence[int], patch: Sequence[int],
                 timing: bool) -> None:
    for flag, value in (("-flops_size", flops_size), ("-patch", patch)):
        if len(value) != dim:
            raise ValueError(f"{flag} needs {dim} numbers for this {dim}D network, got {list(value)}")
    strides = np.prod(np.array(configuration_manager.network_arch_init_kwargs["strides"], dtype=np.int64), axis=0)
    if timing and any(p < 2 * st for p, st in zip(patch, strides)):
        raise ValueError(f"-patch {list(patch)} is too small for this network: instance norm needs at least 2 voxels "
                         f"per axis at the bottleneck, so at least {[int(2 * st) for st in strides]}")


def _write_outputs(report: dict, title: str, mode: str, markdown: Optional[str], json_path: Optional[str]) -> None:
    table = format_table(report, title)
    for name, text in report.get("profiles", {}).items():
        table += f"\n**Profile: {'baseline' if name == 'base' else f'{mode} ({name})'}**\n\n```\n{text}\n```\n"
    print(table)
    if markdown:
        with open(markdown, "w") as f:
            f.write(table)
        print(f"written to {markdown}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({k: v for k, v in report.items() if k != "profiles"}, f, indent=1)
        print(f"written to {json_path}")


def run_benchmark(*, dataset: Optional[str] = None, configuration: Optional[str] = None, plans: str = "nnUNetPlans",
                  preset: Optional[str] = None, num_levels: int = 4, mode: str = "dmoe",
                  flops_size: Optional[Sequence[int]] = None, patch: Optional[Sequence[int]] = None, batch: int = 2,
                  device: str = "cpu", repeats: int = 9, markdown: Optional[str] = None,
                  json_path: Optional[str] = None, backends: Sequence[str] = ("auto",),
                  stages: Optional[Sequence[str]] = None, timing: bool = True, train_step: bool = False,
                  compile: bool = False, profile: bool = False) -> dict:
    """Print the cost table of the plans' configuration (``dataset``, ``configuration``, ``plans``) or of ``preset``
    and write it to ``markdown`` and the report to ``json_path`` (when given); returns the report. The arguments are
    the command's flags (``train_step``: the train step on CPU too; ``timing=False``: parameters and GFLOPs only)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"-device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("-device cuda was given but torch sees no CUDA device")
    if (preset is None) == (dataset is None):
        raise ValueError(_NO_SOURCE.format(presets=", ".join(PRESETS)) + f" (got -d {dataset}, -preset {preset})")
    net = (_preset_network(preset, num_levels, device) if preset is not None
           else _plans_network(dataset, configuration, plans))
    cm, title = net.configuration_manager, net.title
    if stages is not None:
        cm = with_dmoe_settings(cm, stages=stages_argument(stages))
        title += f", stages {' '.join(stages)}"
    flops_size = tuple(flops_size) if flops_size else net.flops_size
    patch = tuple(patch) if patch else net.patch
    _check_sizes(cm, net.dim, flops_size, patch, timing)
    report = cost_report(cm, num_levels=net.num_levels, num_input_channels=net.num_input_channels,
                         num_outputs=net.num_outputs, attribute_channel=net.attribute_channel, flops_size=flops_size,
                         patch=patch, batch=batch, device=device, repeats=repeats, mode=mode, measure=timing,
                         train_step=True if train_step else None, compile=compile, backends=backends,
                         profile=profile)
    _write_outputs(report, title, mode, markdown, json_path)
    return report


def _parser():
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
    return parser


@command("nnUNetv2_dmoe_benchmark")
def benchmark_entry_point():
    args = _parser().parse_args()
    run_benchmark(dataset=args.d, configuration=args.c, plans=args.p, preset=args.preset, num_levels=args.num_levels,
                  mode=args.mode, flops_size=args.flops_size, patch=args.patch, batch=args.b, device=args.device,
                  repeats=args.repeats, markdown=args.o, json_path=args.json, backends=args.backend,
                  stages=args.stages, timing=not args.no_timing, train_step=args.train_step, compile=args.compile,
                  profile=args.profile)
