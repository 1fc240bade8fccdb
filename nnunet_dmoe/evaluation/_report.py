"""Writers of the fairness report: summary.json, per_case.csv, report.md, report.png and the console table.

Every writer takes ``{method: summary}`` (one entry for a single evaluation), so a single report and a
``-compare`` report share the same layout: one row per method, the paper's Table 1.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

PAPER_COLUMNS = ("Dice", "IoU")  # Table 1: All: ES-Dice, Dice, ES-IoU, IoU; then Dice and IoU per group
SURFACE_COLUMNS = ("NSD", "HD95")
WORST_MARK = "†"
SMALL_GROUP = 5  # combinations of several attributes with fewer cases are listed as "small" (unreliable means)


def _json_safe(obj):
    """NaN / inf -> None (JSON has no NaN), numpy scalars -> Python numbers."""
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


def write_summary_json(summary: Mapping, path: str) -> None:
    with open(path, "w") as f:
        json.dump(_json_safe(summary), f, indent=2, allow_nan=False)


def write_per_case_csv(rows: Sequence[Mapping], path: str) -> None:
    """One row per case and label (and method); NaN is written as ``nan``."""
    if not rows:
        return
    columns = list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([f"{r[c]:.8g}" if isinstance(r[c], float) else r[c] for c in columns])


def _num(x: Optional[float], digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _cell(value: float, ci: Optional[Sequence[float]], digits: int = 3) -> str:
    if ci is None:
        return _num(value, digits)
    return f"{_num(value, digits)} ({_num(ci[0], digits)}–{_num(ci[1], digits)})"


def _digits(metric: str) -> int:
    return 2 if metric == "HD95" else 3


def table_rows(summaries: Mapping[str, Mapping], metrics: Sequence[str]) -> List[List[str]]:
    """Header and one row per method: All (ES-M, M for each metric; no ES for HD95), then M per group."""
    first = next(iter(summaries.values()))
    groups = list(first["groups"])
    header = ["Method"]
    for m in metrics:
        if m in first["es"]:
            header.append(f"All: ES-{m}")
        header.append(f"All: {m}")
    header += [f"{g} (n={first['groups'][g]['n']}): {m}" for g in groups for m in metrics]
    rows = [header]
    for name, s in summaries.items():
        ci = s.get("ci", {})
        row = [name]
        for m in metrics:
            if m in s["es"]:
                row.append(_cell(s["es"][m], ci.get("es", {}).get(m), _digits(m)))
            row.append(_cell(s["overall"][m], ci.get("overall", {}).get(m), _digits(m)))
        for g in groups:
            for m in metrics:
                text = _cell(s["groups"][g][m], ci.get("groups", {}).get(g, {}).get(m), _digits(m))
                row.append(text + (f" {WORST_MARK}" if s["worst_group"].get(m) == g else ""))
        rows.append(row)
    return rows


def _markdown(rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _describe(first: Mapping, subject: Optional[str] = None) -> str:
    n_boot = first.get("n_boot")
    ci = (f"95% percentile-bootstrap CIs over cases ({n_boot} resamples, seed {first.get('seed')})" if n_boot
          else "no CIs (bootstrap off)")
    subject = subject or f"Attribute `{first['attribute']}`"
    return (f"{subject}, {first['n_cases']} cases, {ci}. NSD tolerance "
            f"{first['nsd_tolerance_mm']:g} mm. {WORST_MARK} marks the worst group (lowest Dice/IoU/NSD, highest "
            f"HD95) among the known groups. ES-M = M_all / (1 + Σ_g |M_g − M_all|); cases with an unknown attribute "
            f"count in M_all, not in the sum. HD95 in mm, no ES (lower is better).")


def _per_label(summaries: Mapping[str, Mapping], label: Optional[str]) -> Dict[str, Mapping]:
    return {k: (s if label is None else s["labels"][label]) for k, s in summaries.items()}


def _sections(summaries: Mapping[str, Mapping], depth: int = 2) -> List[str]:
    """The Segmentation and Surface tables (overall, then per label when there are several) of one grouping."""
    first = next(iter(summaries.values()))
    labels = first["labels_scored"]
    sections = [(None, first["top_level"])]
    if len(labels) > 1:
        sections += [(lb, f"label {lb}") for lb in labels]
    parts = []
    for label, title in sections:
        sub = _per_label(summaries, label)
        parts += [f"{'#' * depth} Segmentation ({title})", "", _markdown(table_rows(sub, PAPER_COLUMNS)), "",
                  f"{'#' * (depth + 1)} Surface metrics ({title})", "", _markdown(table_rows(sub, SURFACE_COLUMNS)),
                  ""]
    return parts


def _groupings(summaries: Mapping[str, Mapping]) -> List[tuple]:
    """``[(title, file suffix, {method: summary})]``: every attribute, then the combinations (several attributes)."""
    first = next(iter(summaries.values()))
    out = [(f"Attribute `{name}`", name, {k: s["attributes"][name] for k, s in summaries.items()})
           for name in first["attributes"]]
    combos = first["combinations"]
    out.append((f"Combinations ({combos['attribute']})", "combinations",
                {k: s["combinations"] for k, s in summaries.items()}))
    return out


def write_report_md(summaries: Mapping[str, Mapping], path: str) -> None:
    first = next(iter(summaries.values()))
    if "attributes" not in first:
        parts = ["# Fairness report", "", _describe(first), ""] + _sections(summaries)
    else:
        combos = first["combinations"]
        names = ", ".join(f"`{n}`" for n in combos["of"])
        parts = ["# Fairness report", "", _describe(first, f"Attributes {names}, each and combined"), "",
                 f"One section per attribute, then one over the combinations of groups (`{combos['separator'].strip()}`"
                 f" joins one group of each attribute; combinations without cases are left out; a case unknown for "
                 f"any attribute is in the combinations' unknown group).", ""]
        groupings = _groupings(summaries)
        for k, (title, _, sub) in enumerate(groupings):
            parts += [f"## {title}", ""]
            if k == len(groupings) - 1 and combos["small"]:
                parts += [f"Fewer than {SMALL_GROUP} cases (means unreliable): {', '.join(combos['small'])}.", ""]
            parts += _sections(sub, depth=3)
    with open(path, "w") as f:
        f.write("\n".join(parts))


def plot_report(summaries: Mapping[str, Mapping], path: str, metrics: Sequence[str] = PAPER_COLUMNS) -> None:
    """Per-group means of each metric with CI error bars, one colour per method, group sizes on the axis.

    Points, not bars: segmentation scores sit close to 1, and bars from 0 would hide the gaps between groups.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(summaries.values()))
    groups = list(first["groups"])
    x = np.arange(len(groups))
    step = 0.6 / len(summaries)
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(6.0, 1.1 * len(groups) * len(metrics) + 2), 4.2),
                             squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for k, (name, s) in enumerate(summaries.items()):
            means = np.array([s["groups"][g][m] for g in groups], dtype=float)
            ci = s.get("ci", {}).get("groups")
            pos = x - 0.3 + step * (k + 0.5)
            yerr = None
            if ci is not None:
                lo = np.array([ci[g][m][0] for g in groups], dtype=float)
                hi = np.array([ci[g][m][1] for g in groups], dtype=float)
                yerr = np.vstack([np.clip(means - lo, 0, None), np.clip(hi - means, 0, None)])
            es = s["es"].get(m)
            label = name + (f" (ES-{m} {_num(es)})" if es is not None else "")
            line = ax.errorbar(pos, means, yerr=yerr, fmt="o", capsize=3, label=label)
            color = line[0].get_color()
            worst = s["worst_group"].get(m)
            if worst in groups:
                j = groups.index(worst)
                ax.plot(pos[j], means[j], marker="o", markersize=12, markerfacecolor="none", color=color)
            ax.axhline(s["overall"][m], color=color, linestyle="--", linewidth=1)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{g}\n(n={first['groups'][g]['n']})" for g in groups])
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_ylabel(m)
        ax.set_title(f"{m} per {first['attribute']} group (circled: worst; dashed: all cases)", fontsize=9)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def console_table(summaries: Mapping[str, Mapping], metrics: Sequence[str]) -> str:
    """A compact text table: per method, rows All / groups / ES / worst, columns the metrics."""
    first = next(iter(summaries.values()))
    lines = [f"attribute {first['attribute']}, {first['n_cases']} cases, {first['top_level']}"
             + (f", 95% CI from {first['n_boot']} resamples" if first.get("n_boot") else "")]
    w = 24
    for name, s in summaries.items():
        ci = s.get("ci", {})
        lines.append("")
        lines.append(f"{name[:18]:<18} {'n':>5}  " + "".join(f"{m:<{w}}" for m in metrics))
        rows = [("All", first["n_cases"], s["overall"], ci.get("overall", {}))]
        rows += [(g, s["groups"][g]["n"], s["groups"][g], ci.get("groups", {}).get(g, {})) for g in s["groups"]]
        for g, n, vals, c in rows:
            cells = "".join(f"{_cell(vals[m], c.get(m), _digits(m)):<{w}}" for m in metrics)
            lines.append(f"{str(g)[:18]:<18} {n:>5}  {cells}")
        es_cells = "".join(f"{(_cell(s['es'][m], ci.get('es', {}).get(m)) if m in s['es'] else '-'):<{w}}"
                           for m in metrics)
        lines.append(f"{'ES':<18} {'':>5}  {es_cells}")
        lines.append(f"{'worst group':<18} {'':>5}  " + "".join(f"{str(s['worst_group'].get(m)):<{w}}"
                                                               for m in metrics))
        if "attributes" in s:  # several attributes: the table above is the first one's; one line for each grouping
            for sub in list(s["attributes"].values()) + [s["combinations"]]:
                es = ", ".join(f"ES-{m} {_num(sub['es'][m])}" for m in metrics if m in sub["es"])
                worst = ", ".join(f"{m} {sub['worst_group'].get(m)}" for m in metrics)
                lines.append(f"  {sub['attribute']}: {es}; worst group: {worst}")
    return "\n".join(lines)


def write_report(summaries: Mapping[str, Mapping], per_case_rows: Sequence[Mapping], output_folder: str,
                 summary_json: Mapping) -> None:
    """All four files into ``output_folder``; with several attributes report.png shows the first attribute and
    ``report_<attribute>.png`` / ``report_combinations.png`` the others and the combinations."""
    os.makedirs(output_folder, exist_ok=True)
    write_summary_json(summary_json, os.path.join(output_folder, "summary.json"))
    write_per_case_csv(per_case_rows, os.path.join(output_folder, "per_case.csv"))
    write_report_md(summaries, os.path.join(output_folder, "report.md"))
    plot_report(summaries, os.path.join(output_folder, "report.png"))
    if "attributes" in next(iter(summaries.values())):
        for _, suffix, sub in _groupings(summaries)[1:]:
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", suffix)
            plot_report(sub, os.path.join(output_folder, f"report_{safe}.png"))
