"""The demo's results: the fairness report of its runs, their mean and spread over replicates, and each training's
time (the sum of nnU-Net's epoch times)."""
from __future__ import annotations

import os
import time
from typing import Dict, List, Sequence

__all__ = ["fairness_report", "training_seconds", "write_training_times", "write_replicate_table"]


def fairness_report(output: str, raw: str, predictions: Dict[str, str], models: Dict[str, List[str]],
                    methods: Sequence[str], replicates: int, n_boot: int, t_start: float) -> dict:
    """The demo's last stage: the fairness report of the runs (``predictions``: run label -> prediction folder of
    the test split of the raw dataset ``raw``) in ``<output>/report``, their replicates' table and training times
    (``models``: run label -> model folders), printed; returns :func:`~nnunet_dmoe.evaluation.compare_methods`'
    result."""
    from nnunet_dmoe.evaluation import attributes_from_dataset_json, compare_methods
    from nnunet_dmoe.evaluation._api import print_summary

    report = os.path.join(output, "report")
    attributes = attributes_from_dataset_json(os.path.join(raw, "dataset.json"))
    result = compare_methods(predictions, os.path.join(raw, "labelsTs"), [1], attributes, report, n_boot=n_boot)
    summaries = result["methods"]
    if replicates > 1:
        write_replicate_table(summaries, methods, replicates, os.path.join(report, "replicates.md"))
    write_training_times(models, os.path.join(report, "training_times.md"))
    print()
    print_summary(summaries)
    if replicates > 1:
        print("\n" + open(os.path.join(report, "replicates.md")).read())
    print("\n" + open(os.path.join(report, "training_times.md")).read())
    print(f"\nDone in {time.time() - t_start:.0f} s.")
    print(f"Report: {os.path.join(report, 'report.md')}")
    print(f"Figure: {os.path.join(report, 'report.png')}")
    return result


def training_seconds(model_folder: str) -> float:
    """The sum of nnU-Net's epoch times of a finished training (its final checkpoint's log)."""
    import torch

    log = torch.load(os.path.join(model_folder, "checkpoint_final.pth"), map_location="cpu",
                     weights_only=False)["logging"]
    return float(sum(e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])))


def write_training_times(models: Dict[str, List[str]], path: str) -> None:
    """One row per run: the sum of its epoch times (one network per level: its networks together; a fine-tuned
    method: the fine-tuning only)."""
    lines = ["Training time: the sum of nnU-Net's epoch times (validation included; planning, preprocessing and "
             "prediction not)", "", "| Run | s |", "|---|---:|"]
    lines += [f"| {label} | {sum(training_seconds(m) for m in folders):.0f} |" for label, folders in models.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_replicate_table(summaries: Dict[str, dict], methods: Sequence[str], replicates: int, path: str) -> None:
    """Mean and standard deviation over replicates of ES-Dice, Dice and per-group Dice, one row per method."""
    import numpy as np
    first = summaries[next(iter(summaries))]
    groups = [g for g in first["groups"]]
    header = ["Method", "ES-Dice", "Dice"] + [f"Dice {g} (n={first['groups'][g]['n']})" for g in groups] + ["worst"]
    rows = []
    for m in methods:
        reps = [summaries[f"{m} r{r}"] for r in range(replicates)]

        def cell(values):
            v = np.array(values, dtype=float)
            return f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}" if np.isfinite(v).any() else "n/a"
        rows.append([m, cell([s["es"]["Dice"] for s in reps]), cell([s["overall"]["Dice"] for s in reps])]
                    + [cell([s["groups"][g].get("Dice") for s in reps]) for g in groups]
                    + [", ".join(sorted({str(s["worst_group"]["Dice"]) for s in reps}))])
    lines = [f"Mean ± SD over {replicates} replicates (folds 0..{replicates - 1}, each with its own seed)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
