"""Model folders to share: without the patients' attribute tables.

The plugin's trainers write model folders that hold the attribute's levels but no per-case table
(:func:`nnunet_dmoe.data.attribute.strip_attribute_tables`). Folders trained by version 0.2 or earlier hold the tables of
their dataset.json in three places: ``dataset.json``, each checkpoint's ``init_args["dataset_json"]`` and each
fold's ``debug.json``. ``nnUNetv2_dmoe_strip_attribute_table FOLDER`` removes them from every file below ``FOLDER``
(a model folder, or nnU-Net's results folder of a dataset); prediction, ``--c`` and ``--val`` work as before.
"""
from __future__ import annotations

import json
import os
from typing import List, Mapping

from nnunet_dmoe.data.attribute import TABLE_KEYS, strip_attribute_tables
from nnunet_dmoe.errors import command

__all__ = ["attribute_table_entries", "strip_attribute_table"]

_REMOVED = "(removed by nnUNetv2_dmoe_strip_attribute_table: it held the attribute table)"


def attribute_table_entries(dataset_json: Mapping) -> List[str]:
    """The ``'case': 'level'`` texts of every table of ``dataset_json``, as ``str()`` of a dict writes them."""
    blocks = dataset_json.get("attributes") or [dataset_json.get("attribute")]
    return [f"{case!r}: {level!r}" for b in blocks if isinstance(b, Mapping) for key in TABLE_KEYS
            for case, level in (b.get(key) or {}).items()]


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=4)
    os.replace(tmp, path)


def _strip_checkpoint(path: str) -> List[str]:
    """Strip ``init_args["dataset_json"]``; returns the table entries it held (for debug.json)."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    dataset_json = (checkpoint.get("init_args") or {}).get("dataset_json")
    if not isinstance(dataset_json, Mapping):
        return []
    entries = attribute_table_entries(dataset_json)
    if entries:
        checkpoint["init_args"]["dataset_json"] = strip_attribute_tables(dataset_json)
        torch.save(checkpoint, path + ".tmp")
        os.replace(path + ".tmp", path)
    return entries


def strip_attribute_table(folder: str, verbose: bool = True) -> List[str]:
    """Remove the per-case attribute tables from every dataset.json, checkpoint and debug.json below ``folder``.
    Returns the files it changed."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder. Give a model folder (.../Trainer__Plans__configuration).")
    changed, entries, debug_files = [], [], []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if name == "dataset.json":
                with open(path) as f:
                    data = json.load(f)
                found = attribute_table_entries(data)
                if found:
                    entries += found
                    _write_json(path, strip_attribute_tables(data))
                    changed.append(path)
            elif name.endswith(".pth"):
                found = _strip_checkpoint(path)
                if found:
                    entries += found
                    changed.append(path)
            elif name == "debug.json":
                debug_files.append(path)
    entries = set(entries)
    for path in debug_files:  # nnU-Net writes str() of the trainer's attributes: drop each that lists the table
        with open(path) as f:
            debug = json.load(f)
        leaking = [k for k, v in debug.items() if isinstance(v, str) and any(e in v for e in entries)]
        if leaking:
            _write_json(path, {k: (_REMOVED if k in leaking else v) for k, v in debug.items()})
            changed.append(path)
    if verbose:
        print("\n".join(f"stripped {p}" for p in changed) or f"{folder}: no attribute table found, nothing changed")
    return changed


@command("nnUNetv2_dmoe_strip_attribute_table")
def strip_attribute_table_entry_point():
    import argparse

    p = argparse.ArgumentParser(description="Remove the patients' attribute tables (cases, test_cases) from a model "
                                            "folder trained by nnunet_dmoe 0.2 or earlier, so that it can be shared. "
                                            "The levels stay: prediction, --c and --val work as before.")
    p.add_argument("folder", help="model folder (or a dataset's results folder): every file below it is checked")
    a = p.parse_args()
    strip_attribute_table(a.folder)
