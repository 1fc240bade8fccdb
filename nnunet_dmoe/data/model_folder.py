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
from typing import List, Mapping, Tuple

from nnunet_dmoe.data.attribute import TABLE_KEYS, strip_attribute_tables
from nnunet_dmoe.data.tables import read_json_object
from nnunet_dmoe.errors import command

__all__ = ["attribute_table_entries", "strip_attribute_table"]

_REMOVED = "(removed by nnUNetv2_dmoe_strip_attribute_table: it held the attribute table)"
_JSON_FIX = "Replace it with the file that nnU-Net wrote, or move it out of the folder, and run the command again."


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

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, or not a checkpoint
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e}). Replace it with "
                         f"the checkpoint that training wrote, or move it out of the folder, and run the command "
                         f"again.") from None
    init_args = checkpoint.get("init_args") if isinstance(checkpoint, Mapping) else None
    dataset_json = init_args.get("dataset_json") if isinstance(init_args, Mapping) else None
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
    Returns the files it changed. Every dataset.json and debug.json is read before anything is written."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder. Give a model folder (.../Trainer__Plans__configuration).")
    tables, debug_files = _model_files(folder)
    jsons = {p: read_json_object(p, os.path.basename(p), _JSON_FIX) for p in tables + debug_files
             if not p.endswith(".pth")}
    changed, entries = [], []
    for path in tables:  # in the order of the walk
        found = attribute_table_entries(jsons[path]) if path in jsons else _strip_checkpoint(path)
        if found and path in jsons:
            _write_json(path, strip_attribute_tables(jsons[path]))
        if found:
            entries += found
            changed.append(path)
    entries = set(entries)
    for path in debug_files:  # nnU-Net writes str() of the trainer's attributes: drop each that lists the table
        debug = jsons[path]
        leaking = [k for k, v in debug.items() if isinstance(v, str) and any(e in v for e in entries)]
        if leaking:
            _write_json(path, {k: (_REMOVED if k in leaking else v) for k, v in debug.items()})
            changed.append(path)
    if verbose:
        print("\n".join(f"stripped {p}" for p in changed) or f"{folder}: no attribute table found, nothing changed")
    return changed


def _model_files(folder: str) -> Tuple[List[str], List[str]]:
    """The files below ``folder`` that can hold a table, dataset.json and checkpoints (``*.pth``), and the
    debug.json files, each in the order of the walk."""
    tables, debug_files = [], []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if name == "dataset.json" or name.endswith(".pth"):
                tables.append(path)
            elif name == "debug.json":
                debug_files.append(path)
    return tables, debug_files


@command("nnUNetv2_dmoe_strip_attribute_table")
def strip_attribute_table_entry_point():
    import argparse

    p = argparse.ArgumentParser(description="Remove the patients' attribute tables (cases, test_cases) from a model "
                                            "folder trained by nnunet_dmoe 0.2 or earlier, so that it can be shared. "
                                            "The levels stay: prediction, --c and --val work as before.")
    p.add_argument("folder", help="model folder (or a dataset's results folder): every file below it is checked")
    strip_attribute_table(p.parse_args().folder)
