"""Add an attribute to an nnU-Net raw dataset that exists already, from a table of patient attributes.

For each attribute column of the table, :func:`add_attribute` writes into ``nnUNet_raw/DatasetXXX_Name``:

- the attribute block of dataset.json (``"attribute"``; with several attributes the ``"attributes"`` list): name
  (the column's), levels, ``cases`` for ``imagesTr`` and ``test_cases`` for ``imagesTs``;
- a ``noNorm`` entry in ``channel_names`` for the attribute channel (the next free channel index);
- one attribute-channel file ``CASE_{channel:04d}<file_ending>`` per case in ``imagesTr`` and ``imagesTs``, written
  with nnU-Net's reader/writer for the dataset on the grid of the case's first image channel (spacing, origin,
  direction): ``level index + 1`` inside the image footprint, 0 elsewhere and 0 everywhere for an unknown level.

Everything is written into a temporary folder beside the dataset first and moved in at the end; on any error the
dataset stays as it was. Run it once per call of nnU-Net's planning: the dataset's preprocessed data do not hold the
new channel until ``nnUNetv2_plan_and_preprocess`` runs again.

Sensitive data: the table's attribute is copied into dataset.json and into the channel files (every copy:
documentation/reference/dataset-json-attribute.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from nnunet_dmoe.data.attribute import (UNKNOWN_LEVEL, AttributeSpec, cases_in_folder, channel_file,
                                        encode_attribute_channel, fmt_cases)
from nnunet_dmoe.data.tables import read_json_object
from nnunet_dmoe.errors import command

__all__ = ["add_attribute", "add_attribute_from_table", "case_files", "level_order"]

# a numeric column is taken for categories (stage codes 1-4, grades) only if it holds whole numbers spanning fewer than
# this many values; otherwise it is continuous (age, BMI) and needs -bins
MAX_NUMERIC_LEVELS = 12
_DATASET_JSON_FIX = ("Give an nnU-Net raw dataset whose dataset.json is a JSON object with 'channel_names' and "
                     "'file_ending' (nnU-Net's dataset format).")


def case_files(folder: str, file_ending: str, num_channels: int, what: str) -> Dict[str, List[str]]:
    """``case -> [file of channel 0, 1, ...]`` of an nnU-Net image folder whose cases have ``num_channels``
    channels; a case that lacks one is an error that names it."""
    found = cases_in_folder(folder, file_ending)
    incomplete = sorted(f"{c} (has {sorted(ch)})" for c, ch in found.items() if sorted(ch) != list(range(num_channels)))
    if incomplete:
        raise ValueError(f"{folder}: these {what} cases do not have exactly the channels 0..{num_channels - 1} of "
                         f"dataset.json's channel_names: {fmt_cases(incomplete, limit=len(incomplete))}. Each case "
                         f"needs {channel_file('CASE', 0, file_ending)} ... {channel_file('CASE', num_channels - 1, file_ending)}.")
    return {c: [ch[i] for i in range(num_channels)] for c, ch in found.items()}


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def level_order(values: Sequence[str], column: str) -> List[str]:
    """The levels of a categorical column, sorted (numbers by value, then text). A numeric column with fractions, or
    whose whole numbers span :data:`MAX_NUMERIC_LEVELS` values or more (ages 45 ... 80), is refused as continuous: it
    needs bins."""
    distinct = sorted(set(values))
    numbers = [_number(v) for v in distinct]
    if distinct and all(n is not None for n in numbers):
        if max(numbers) - min(numbers) >= MAX_NUMERIC_LEVELS or any(not float(n).is_integer() for n in numbers):
            raise ValueError(f"column {column!r} looks continuous ({len(distinct)} distinct numbers from "
                             f"{min(numbers):g} to {max(numbers):g}). Give bin edges, e.g. -bins 50 65 for the "
                             f"levels <50, 50-65, >=65, or -levels with every value to use the values as levels.")
        return [v for _, v in sorted(zip(numbers, distinct))]
    return sorted(distinct, key=lambda v: (_number(v) is None, _number(v) or 0, v))


def _block(name: str, column_levels: Mapping[str, Optional[str]], levels: Optional[Sequence[str]], channel: int,
           train: Sequence[str], test: Sequence[str], table: str, allow_unknown: bool) -> dict:
    """The attribute block of one column; every case of the dataset must have a value (else ``allow_unknown``)."""
    missing = sorted(c for c in list(train) + list(test) if c not in column_levels)
    empty = sorted(c for c in list(train) + list(test) if c in column_levels and column_levels[c] is None)
    if (missing or empty) and not allow_unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} case(s) have no row: {fmt_cases(missing, limit=len(missing))}")
        if empty:
            parts.append(f"{len(empty)} case(s) have no value: {fmt_cases(empty, limit=len(empty))}")
        raise ValueError(f"{table}, column {name!r}: {'; '.join(parts)}. Add them to the table, or pass "
                         f"--allow_unknown to write them as unknown (the dMoE routes them with its 'unknown' router).")
    values = {c: column_levels.get(c) for c in list(train) + list(test)}
    known = [v for v in values.values() if v is not None]
    if levels is None:
        levels = level_order(known, name)
    else:
        levels = [str(v) for v in levels]
        other = sorted({f"{c} ({v!r})" for c, v in values.items() if v is not None and v not in levels})
        if other:
            raise ValueError(f"{table}, column {name!r}: values that are not in -levels {levels}: "
                             f"{fmt_cases(other, limit=len(other))}. Add them to -levels or correct the table.")
    if not levels:
        raise ValueError(f"{table}, column {name!r}: no case of the dataset has a value. Check -id_column and the "
                         f"case ids (the image file names without _0000 and the file ending).")
    spec = AttributeSpec(name=name, levels=list(levels), channel=channel,
                         cases={c: values[c] for c in train}, test_cases={c: values[c] for c in test})
    return spec.to_block()


def _existing_blocks(dataset_json: dict) -> List[dict]:
    if "attributes" in dataset_json:
        return list(dataset_json["attributes"])
    return [dataset_json["attribute"]] if "attribute" in dataset_json else []


def add_attribute(dataset_folder: str, tables: Sequence[Mapping[str, Optional[str]]], names: Sequence[str],
                  levels: Optional[Sequence[str]] = None, allow_unknown: bool = False, overwrite: bool = False,
                  table: str = "the table", verbose: bool = True) -> dict:
    """Add one attribute per ``tables[k]`` (case id -> level name, ``None`` unknown; e.g. from
    :func:`nnunet_dmoe.data.tables.read_attribute_table`) named ``names[k]`` to the raw dataset ``dataset_folder``.

    ``levels`` orders the levels of a single attribute (default: sorted; binned values come in bin order when the
    caller passes the bin labels). An attribute of the same name that the dataset has already is replaced only with
    ``overwrite`` (its channel index is kept); other attributes stay. Returns the new dataset.json.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    path, dataset_json = _read_dataset_json(dataset_folder)
    blocks = _check_names(path, dataset_json, tables, names, levels, overwrite)
    file_ending, num_channels = dataset_json["file_ending"], len(dataset_json["channel_names"])
    train, test = _dataset_cases(dataset_folder, file_ending, num_channels)
    have = {b["name"]: b for b in blocks}
    new_blocks, next_channel = [], num_channels
    for name, column in zip(names, tables):
        channel = int(have[name]["channel"]) if name in have else next_channel
        next_channel += name not in have
        new_blocks.append(_block(name, column, levels, channel, sorted(train), sorted(test), table, allow_unknown))
    new_json = _new_dataset_json(dataset_json, blocks, new_blocks)
    attribute_channels = {int(b["channel"]) for b in blocks}
    image_channels = [c for c in range(num_channels) if c not in attribute_channels]
    rw = determine_reader_writer_from_dataset_json(dataset_json, train[next(iter(train))][0], verbose=False)()
    specs = [AttributeSpec.from_block(b, new_json) for b in new_blocks]
    # beside the dataset (the same file system: the moves below are renames), not inside it
    staging = tempfile.mkdtemp(prefix=".nnunet_dmoe_add_attribute_",
                               dir=os.path.dirname(os.path.abspath(dataset_folder)))
    try:
        writes = _stage_channels(rw, dataset_folder, {"imagesTr": train, "imagesTs": test}, image_channels, specs,
                                 file_ending, staging, verbose)
        staged_json = os.path.join(staging, "dataset.json")
        with open(staged_json, "w") as f:
            json.dump(new_json, f, indent=4, sort_keys=False)
        writes.append((staged_json, path))
        _move_in(writes, os.path.join(staging, "backup"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return new_json


def _read_dataset_json(dataset_folder: str) -> Tuple[str, dict]:
    """The path and content of the raw dataset's dataset.json, with the keys that :func:`add_attribute` reads."""
    path = os.path.join(dataset_folder, "dataset.json")
    if not os.path.isfile(path):
        raise ValueError(f"{dataset_folder} is not an nnU-Net raw dataset: it has no dataset.json. Give the dataset "
                         f"with -d (name or id in $nnUNet_raw).")
    dataset_json = read_json_object(path, "dataset.json", _DATASET_JSON_FIX)
    missing = [k for k in ("channel_names", "file_ending") if k not in dataset_json]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(repr(k) for k in missing)}. {_DATASET_JSON_FIX}")
    return path, dataset_json


def _check_names(path: str, dataset_json: dict, tables: Sequence, names: Sequence[str],
                 levels: Optional[Sequence[str]], overwrite: bool) -> List[dict]:
    """Refuse a column count that differs from the names, a name given twice, and (without ``overwrite``) a name
    that the dataset has already; returns the dataset's attribute blocks."""
    if len(tables) != len(names) or (levels is not None and len(names) != 1):
        raise ValueError("give one table column per attribute name, and -levels only for a single column")
    twice = sorted({n for n in names if list(names).count(n) > 1})
    if twice:
        raise ValueError(f"-attribute_column: {', '.join(twice)} given more than once. Give each column once.")
    blocks = _existing_blocks(dataset_json)
    have = {b["name"]: b for b in blocks}
    again = [n for n in names if n in have]
    if again and not overwrite:
        raise ValueError(f"{path} has the attribute(s) {', '.join(again)} already (channel "
                         f"{', '.join(str(have[n]['channel']) for n in again)}). Pass --overwrite to replace them.")
    return blocks


def _dataset_cases(dataset_folder: str, file_ending: str, num_channels: int) -> Tuple[dict, dict]:
    """The image files of every case of imagesTr and (if there is one) imagesTs; imagesTr must hold a case."""
    train_folder, test_folder = os.path.join(dataset_folder, "imagesTr"), os.path.join(dataset_folder, "imagesTs")
    if not os.path.isdir(train_folder):
        raise ValueError(f"{dataset_folder} has no imagesTr folder. An nnU-Net raw dataset holds its training images "
                         f"there (imagesTr/CASE_XXXX{file_ending}).")
    train = case_files(train_folder, file_ending, num_channels, "imagesTr")
    test = case_files(test_folder, file_ending, num_channels, "imagesTs") if os.path.isdir(test_folder) else {}
    if not train:
        raise ValueError(f"{dataset_folder}/imagesTr holds no images CASE_XXXX{file_ending}")
    return train, test


def _new_dataset_json(dataset_json: dict, blocks: List[dict], new_blocks: List[dict]) -> dict:
    """``dataset_json`` with the new attribute blocks (replacing those of the same name) and their ``noNorm``
    channels."""
    names = [b["name"] for b in new_blocks]
    blocks = [b for b in blocks if b["name"] not in names] + new_blocks
    channel_names = dict(dataset_json["channel_names"])
    for b in new_blocks:
        channel_names[str(b["channel"])] = "noNorm"
    new_json = {k: v for k, v in dataset_json.items() if k not in ("attribute", "attributes")}
    new_json["channel_names"] = channel_names
    new_json.update({"attribute": blocks[0]} if len(blocks) == 1 else {"attributes": blocks})
    return new_json


def _stage_channels(rw, dataset_folder: str, folders: Mapping[str, Mapping[str, List[str]]],
                    image_channels: List[int], specs: List[AttributeSpec], file_ending: str, staging: str,
                    verbose: bool) -> List[Tuple[str, str]]:
    """Each case's attribute channel(s) into ``staging``, on the grid of its image channels; returns (staged file,
    target) pairs. An unreadable case is an error that names it (nothing is written yet)."""
    writes = []
    for folder, cases in folders.items():
        for case, files in cases.items():
            try:
                images, properties = rw.read_images([files[i] for i in image_channels])
            except Exception as e:
                shown = ", ".join(os.path.basename(files[i]) for i in image_channels)
                raise ValueError(f"{folder}/{case}: cannot read {shown} ({type(e).__name__}: {e}). Nothing was "
                                 f"written. Fix or remove the case.") from None
            for spec in specs:
                level = spec.all_cases[case]
                file = channel_file(case, spec.channel, file_ending)
                staged = os.path.join(staging, folder + "__" + file)
                rw.write_seg(encode_attribute_channel(images, spec.level_index(level)), staged, properties)
                writes.append((staged, os.path.join(dataset_folder, folder, file)))
                if verbose:
                    print(f"{folder}/{case}: {spec.name} {level or UNKNOWN_LEVEL}")
    return writes


def _move_in(writes: Sequence[Tuple[str, str]], backup: str) -> None:
    """Rename every staged file onto its target, the file it replaces kept in ``backup``: renames are quick, and on
    an error (or an interruption) while moving every target is put back as it was."""
    os.makedirs(backup)
    moved: List[tuple] = []
    try:
        for i, (source, target) in enumerate(writes):
            saved = None
            if os.path.lexists(target):
                saved = os.path.join(backup, str(i))
                os.replace(target, saved)
            moved.append((target, saved))
            os.replace(source, target)
        moved = []
    finally:
        for target, saved in reversed(moved):
            if os.path.lexists(target):
                os.remove(target)
            if saved is not None:
                os.replace(saved, target)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Add patient attributes from a table (CSV, TSV, JSON) to an existing nnU-Net raw dataset: the "
                    "attribute block(s) in dataset.json, a noNorm attribute channel, and a channel file per case of "
                    "imagesTr and imagesTs. Then run nnUNetv2_plan_and_preprocess again.")
    p.add_argument("-d", required=True, help="[REQUIRED] dataset name or id in $nnUNet_raw")
    p.add_argument("-t", required=True, help="[REQUIRED] the table: one row per case")
    p.add_argument("-id_column", required=True,
                   help="[REQUIRED] column with the case id (the file name without _0000 and the file ending)")
    p.add_argument("-attribute_column", required=True, nargs="+",
                   help="[REQUIRED] column(s) with an attribute; each becomes an attribute of that name")
    p.add_argument("-levels", nargs="+", default=None,
                   help="[OPTIONAL] level order of a single column. Default: sorted (numbers by value)")
    p.add_argument("-bins", nargs="+", type=float, default=None,
                   help="[OPTIONAL] edges that bin a numeric single column (age): -bins 50 65 gives the levels <50, "
                        "50-65, >=65 (left-closed). A continuous column needs them")
    p.add_argument("--allow_unknown", "-allow_unknown", action="store_true",
                   help="[OPTIONAL] write cases without a row or a value as unknown, instead of refusing")
    p.add_argument("--overwrite", action="store_true", help="[OPTIONAL] replace attributes of the same name")
    return p


def add_attribute_from_table(dataset: str, table: str, id_column: str, columns: List[str],
                             levels: Optional[List[str]] = None, bins: Optional[List[float]] = None,
                             allow_unknown: bool = False, overwrite: bool = False) -> dict:
    """``nnUNetv2_dmoe_add_attribute``: the columns ``columns`` of ``table`` as attributes of the raw dataset
    ``dataset`` (name or id in ``$nnUNet_raw``); see :func:`add_attribute`. Returns the new dataset.json."""
    from nnunet_dmoe.data.tables import bin_labels, read_attribute_table

    if (bins is not None or levels is not None) and len(columns) > 1:
        raise ValueError("-bins and -levels apply to one column: run the command once per column that needs them "
                         "(each run adds its attribute to the dataset)")
    if bins is not None and levels is not None:
        raise ValueError("give -bins or -levels, not both: the bins name the levels")
    folder = _raw_dataset_folder(dataset)
    _, dataset_json = _read_dataset_json(folder)
    tables = [read_attribute_table(table, id_column, c, bins, strip_suffix=dataset_json["file_ending"])
              for c in columns]
    levels = bin_labels(bins) if bins is not None else levels  # the bins in their order, each a level
    new = add_attribute(folder, tables, columns, levels, allow_unknown, overwrite, table)
    print(f"{folder}: attribute(s) {', '.join(columns)} added (channel_names: {new['channel_names']}). "
          f"Run nnUNetv2_plan_and_preprocess -d {dataset} again before training.")
    return new


def _raw_dataset_folder(dataset: str) -> str:
    """The folder of the dataset ``dataset`` (name or id) in ``$nnUNet_raw``."""
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if nnUNet_raw is None:
        raise ValueError("$nnUNet_raw is not set. Set it to the folder that holds your DatasetXXX_Name folders.")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        raise ValueError(f"-d {dataset}: no such dataset in $nnUNet_raw ({nnUNet_raw})") from None
    return os.path.join(nnUNet_raw, name)


@command("nnUNetv2_dmoe_add_attribute")
def add_attribute_entry_point():
    a = _parser().parse_args()
    add_attribute_from_table(a.d, a.t, a.id_column, a.attribute_column, a.levels, a.bins, a.allow_unknown,
                             a.overwrite)
