"""The routing report's summaries and outputs: Jensen-Shannon divergence between levels, routing.json, routing.png."""
from __future__ import annotations

import json
import math
from typing import Mapping, Sequence

import numpy as np

__all__ = ["JS_NOTE", "js_divergence", "js_summary", "js_text", "write_routing_json", "plot_routing"]

JS_NOTE = ("Jensen-Shannon divergence (base 2, in [0, 1]) between the routing distributions fraction / k of the "
           "levels (unknown included) that have tokens; mean and max over all pairs of those levels.")


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence of two distributions, base 2 (0 = identical, 1 = disjoint supports)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = 0.5 * (p + q)

    def kl(a):
        keep = a > 0
        return float(np.sum(a[keep] * np.log2(a[keep] / m[keep])))

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def js_summary(levels: Mapping[str, Mapping], top_k: int) -> dict:
    """The divergence between every pair of levels with tokens (their fractions / k), its mean and max."""
    present = [lv for lv, r in levels.items() if r["tokens"]]
    pairs = {}
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            pairs[f"{a} | {b}"] = js_divergence(np.array(levels[a]["fraction"]) / top_k,
                                                np.array(levels[b]["fraction"]) / top_k)
    values = list(pairs.values())
    return {"levels": present, "mean": float(np.mean(values)) if values else None,
            "max": float(np.max(values)) if values else None, "pairs": pairs}


def write_routing_json(report: Mapping, path: str) -> None:
    """Write the report (routing.json)."""
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def js_text(block: Mapping) -> str:
    """One line of a block's divergences between levels, per attribute."""
    parts = []
    for name, js in block["js_divergence"].items():
        text = "n/a (fewer than 2 levels with tokens)" if js["mean"] is None else \
            f"mean {js['mean']:.3f}, max {js['max']:.3f}"
        parts.append(f"JS {name}: {text}" if len(block["js_divergence"]) > 1 else f"JS between levels: {text}")
    return "; ".join(parts)


def plot_routing(report: Mapping, path: str) -> None:
    """One heat map per block: rows (attribute, level), columns experts, cells the fraction of tokens routed to the
    expert (a row sums to k); the title holds the Jensen-Shannon divergence between the levels (base 2)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = report["blocks"]
    ncols = min(3, len(blocks))
    nrows = math.ceil(len(blocks) / ncols)
    e = max(b["num_experts"] for b in blocks)
    n_rows = sum(len(levels) for levels in blocks[0]["attributes"].values())
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * (0.55 * e + 3.2), nrows * (0.4 * n_rows + 1.8)),
                             squeeze=False)
    for ax in axes.flat[len(blocks):]:
        ax.axis("off")
    several = len(blocks[0]["attributes"]) > 1
    for ax, block in zip(axes.flat, blocks):
        labels, values = [], []
        for attr, levels in block["attributes"].items():
            for level, row in levels.items():
                labels.append(f"{attr}={level}" if several else level)
                labels[-1] += f" (n={row['tokens']})" if row["tokens"] else " (no tokens)"
                values.append(row["fraction"] if row["fraction"] is not None else [np.nan] * block["num_experts"])
        data = np.ma.masked_invalid(np.array(values, dtype=float))
        image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(data.filled(np.nan)):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        ax.set_xticks(range(block["num_experts"]))
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_title(f"{block['label']} ({block['channels']} ch, top-{block['top_k']})\n{js_text(block)}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of tokens")
    fig.suptitle(f"Routing per level ({report['model']['routing']}): fraction of tokens per expert, rows sum to k",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

