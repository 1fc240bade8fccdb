"""The routing section of ``report.md`` (``nnUNetv2_dmoe_evaluate -routing FOLDER``): the figure and a short table
from the output of ``nnUNetv2_dmoe_routing_report``."""
from __future__ import annotations

import json
import os
import shutil
from typing import Mapping

__all__ = ["read_routing", "routing_markdown", "add_routing_to_report"]

_MISSING = ("-routing {folder}: no {name} there. Give the output folder (-o) of nnUNetv2_dmoe_routing_report, "
            "which writes routing.json and routing.png.")


def read_routing(folder: str) -> dict:
    """The report of ``folder`` (routing.json), checked to come with its routing.png."""
    for name in ("routing.json", "routing.png"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(_MISSING.format(folder=folder, name=name))
    try:
        with open(os.path.join(folder, "routing.json"), encoding="utf-8") as f:
            report = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8 text
        raise ValueError(f"-routing {folder}: routing.json is not a routing report (not valid JSON: {e}). Write it "
                         f"again with nnUNetv2_dmoe_routing_report.") from None
    if not isinstance(report, dict) or "blocks" not in report:
        raise ValueError(f"-routing {folder}: routing.json is not a routing report (no 'blocks'). Write it with "
                         f"nnUNetv2_dmoe_routing_report.")
    return report


def _top_experts(levels: Mapping[str, Mapping], k: int) -> str:
    parts = []
    for level, row in levels.items():
        if row["fraction"] is None:
            continue
        top = sorted(range(len(row["fraction"])), key=lambda e: -row["fraction"][e])[:k]
        parts.append(f"{level}: " + " ".join(map(str, top)))
    return "; ".join(parts)


def routing_markdown(report: Mapping, figure: str = "routing.png") -> str:
    """A section: per block its width, the Jensen-Shannon divergence between levels and each level's top-k experts."""
    model = report["model"]
    lines = ["## Routing", "",
             f"Model `{os.path.basename(model['folder'])}` (folds {', '.join(map(str, model['folds']))}), "
             f"{model['routing']} routing, top-{model['top_k']} of {model['num_experts']} experts, "
             f"{report['input']['cases']} cases. JS: Jensen-Shannon divergence (base 2, 0 = same routing, 1 = "
             f"disjoint experts) between the levels' routing distributions, mean / max over pairs of levels "
             f"(unknown included). Top experts: the k experts that receive most tokens.", "",
             "| block | channels | " + " | ".join(f"JS {a}" for a in report["blocks"][0]["js_divergence"])
             + " | top experts per level |",
             "|" + "---|" * (3 + len(report["blocks"][0]["js_divergence"]))]
    for b in report["blocks"]:
        js = [("-" if v["mean"] is None else f"{v['mean']:.3f} / {v['max']:.3f}") for v in b["js_divergence"].values()]
        top = " · ".join(_top_experts(levels, b["top_k"]) for levels in b["attributes"].values())
        lines.append(f"| {b['label']} | {b['channels']} | " + " | ".join(js) + f" | {top} |")
    lines += ["", f"![routing per level]({figure})", ""]
    return "\n".join(lines)


def add_routing_to_report(routing_folder: str, output_folder: str) -> None:
    """Copy routing.png into ``output_folder`` and append the routing section to its report.md."""
    report = read_routing(routing_folder)
    source = os.path.join(routing_folder, "routing.png")
    target = os.path.join(output_folder, "routing.png")
    if os.path.abspath(source) != os.path.abspath(target):
        shutil.copyfile(source, target)
    with open(os.path.join(output_folder, "report.md"), "a") as f:
        f.write("\n" + routing_markdown(report))
