"""The cost of one network per attribute level (the dMoE paper's Table 8): parameters and GFLOPs of one plans'
U-Net, of one per level, and of the dMoE network."""
from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["per_level_cost", "format_per_level_cost", "per_level_cost_table"]


def per_level_cost(configuration_manager, num_levels: int, num_input_channels: int, num_outputs: int,
                   attribute_channel: int, flops_size: Sequence[int]) -> dict:
    """Parameters and forward GFLOPs (at ``flops_size``, FLOPs = 2 per multiply-add) of one plans' U-Net, of
    ``num_levels`` of them (one per level) and of the dMoE network (:mod:`nnunet_dmoe.commands.benchmark`)."""
    from nnunet_dmoe.commands.benchmark.flops import count_flops, count_parameters
    from nnunet_dmoe.commands.benchmark.presets import build_pair

    base, dmoe = build_pair(configuration_manager, num_levels, deep_supervision=False,
                            num_input_channels=num_input_channels, num_outputs=num_outputs,
                            attribute_channel=attribute_channel, mode="dmoe")
    params = {"unet": count_parameters(base), "dmoe": count_parameters(dmoe)}
    flops = {k: count_flops(n, flops_size, num_input_channels)["total"] for k, n in (("unet", base), ("dmoe", dmoe))}
    return {"levels": num_levels, "flops_size": tuple(flops_size),
            "parameters": {"unet": params["unet"], "per_level": num_levels * params["unet"], "dmoe": params["dmoe"]},
            "flops_per_case": {"unet": flops["unet"], "per_level": flops["unet"], "dmoe": flops["dmoe"]},
            "flops_all_models": {"unet": flops["unet"], "per_level": num_levels * flops["unet"],
                                 "dmoe": flops["dmoe"]}}


def format_per_level_cost(cost: dict, title: str) -> str:
    """Markdown table: one U-Net | one U-Net per level | dMoE."""
    size = "x".join(map(str, cost["flops_size"]))
    g = (lambda v: f"{v / 1e9:.0f}" if v >= 1e11 else f"{v / 1e9:.2f}")  # noqa: E731
    rows = [("Parameters (M), all networks", "parameters", lambda v: f"{v / 1e6:.2f}"),
            (f"GFLOPs per case (its network), forward at {size}", "flops_per_case", g),
            (f"GFLOPs, every network once, forward at {size}", "flops_all_models", g)]
    lines = [f"**{title}**", "", f"| | one U-Net | one U-Net per level ({cost['levels']}) | dMoE |",
             "|---|---:|---:|---:|"]
    for label, key, fmt in rows:
        v = cost[key]
        lines.append(f"| {label} | {fmt(v['unet'])} | {fmt(v['per_level'])} | {fmt(v['dmoe'])} |")
    lines += ["", "Per-level networks: the plans' U-Net (attribute-blind) once per level. FLOPs: 2 per multiply-add "
                  "(torch's FlopCounterMode, meta device); dMoE counts its sparse top-k experts."]
    return "\n".join(lines) + "\n"


def per_level_cost_table(dataset: str, configuration: str, plans: str, flops_size: Optional[Sequence[int]]) -> str:
    """The markdown table of :func:`per_level_cost` for a configuration of a preprocessed dataset's plans
    (``flops_size`` default: 384x384x128 in 3D, 224x224 in 2D)."""
    from nnunet_dmoe.plans.loading import load_configuration

    cm, num_levels, channels, outputs, attribute_channel, patch = load_configuration(dataset, configuration, plans)
    size = tuple(flops_size) if flops_size else ((384, 384, 128) if len(patch) == 3 else (224, 224))
    cost = per_level_cost(cm, num_levels, channels, outputs, attribute_channel, size)
    return format_per_level_cost(cost, f"dataset {dataset}, configuration {configuration}, plans {plans}")
