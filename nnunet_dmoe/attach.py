"""Write the attribute channel for a folder of new cases, so that ``nnUNetv2_predict`` can run on them.

The folder holds nnU-Net-named images (``CASE_XXXX.ext``, the image channels of the model's dataset.json without
the attribute channel). For every case the level comes from a table (case id -> level); the attribute channel
``CASE_{channel:04d}.ext`` is written with nnU-Net's own reader/writer for that file type, on the image's grid:
``level_index + 1`` inside the image footprint, 0 elsewhere (0 everywhere for an unknown level).

A model with several attributes (an ``"attributes"`` list in its dataset.json) gets one channel per attribute,
``CASE_{channel:04d}.ext`` with each attribute's channel, from one table column per attribute.

The channel carries a sensitive attribute into the folder: delete it with the images when they are deleted.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Dict, Optional, Sequence

import numpy as np

from nnunet_dmoe.attribute import attribute_specs_from_dataset_json, encode_attribute_channel, fmt_cases

__all__ = ["attach_attribute", "load_model_dataset_json"]

_UNKNOWN_LEVELS = ("{n} case(s) have levels that the model does not know (its levels: {levels}): {cases}. "
                   "Correct the table, or leave the cell empty / 'unknown' for an unknown attribute.")
_MISSING_IN_TABLE = ("{n} case(s) in {folder} have no row in the attribute table: {cases}. Add them to the table "
                     "(an empty cell means 'unknown').")
_MISSING_CHANNELS = "{n} case(s) in {folder} lack image channels: {cases}. Each case needs the files {expected}."


def load_model_dataset_json(dataset_json: Optional[str] = None, dataset: Optional[str] = None) -> dict:
    """dataset.json from a path (a raw dataset or a model folder) or from a dataset name/id in ``nnUNet_raw``."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    if dataset_json is None and dataset is None:
        raise ValueError("give the model's dataset.json (-dataset_json) or the dataset (-d)")
    if dataset_json is None:
        from nnunetv2.paths import nnUNet_raw
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        dataset_json = os.path.join(nnUNet_raw.require(), maybe_convert_to_dataset_name(dataset), "dataset.json")
    if os.path.isdir(dataset_json):
        dataset_json = os.path.join(dataset_json, "dataset.json")
    if not os.path.isfile(dataset_json):
        raise ValueError(f"{dataset_json} does not exist")
    return load_json(dataset_json)


def _cases_in(folder: str, file_ending: str) -> Dict[str, Dict[int, str]]:
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + "$")
    cases: Dict[str, Dict[int, str]] = {}
    for f in sorted(os.listdir(folder)):
        m = pattern.match(f)
        if m:
            cases.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(folder, f)
    return cases


def attach_attribute(input_folder: str, case_levels, dataset_json: dict,
                     output_folder: Optional[str] = None, overwrite: bool = False,
                     verbose: bool = True, sources: Optional[Sequence[str]] = None):
    """Write the attribute channel for every case of ``input_folder``.

    Parameters
    ----------
    input_folder : str
        nnU-Net-named image files of new cases.
    case_levels : mapping, or a list of mappings
        Case id -> level name (``None`` = unknown), e.g. from :func:`nnunet_dmoe.read_attribute_table`. For a
        model with several attributes (``"attributes"`` in its dataset.json) one mapping per attribute, in the
        order of that list.
    dataset_json : dict
        The model's dataset.json (levels, attribute channel(s), file ending, channel count).
    output_folder : str, optional
        Where to write. Default: into ``input_folder``. Otherwise the image channels are copied there as well, so
        that the folder can be handed to ``nnUNetv2_predict -i``.
    overwrite : bool
        Replace existing attribute-channel files (else an existing one is an error).
    sources : list of str, optional
        Where each mapping came from (e.g. ``"column 'stage' of t.csv"``), named in the errors.

    Returns the level written per case (one attribute), or a list of them (several).
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    specs = attribute_specs_from_dataset_json(dataset_json, where="the model's dataset.json")
    several = len(specs) > 1  # an "attributes" list of one is the single attribute
    tables = list(case_levels) if several and isinstance(case_levels, (list, tuple)) else [case_levels]
    if len(tables) != len(specs):
        raise ValueError(f"the model has {len(specs)} attributes ({', '.join(s.name for s in specs)}) but "
                         f"{len(tables)} attribute table column(s) are given. Give one column per attribute, in this "
                         f"order (--attribute-column {' --attribute-column '.join(s.name for s in specs)}).")
    sources = list(sources) if sources is not None else [None] * len(specs)
    file_ending = dataset_json["file_ending"]
    num_channels = len(dataset_json["channel_names"])
    image_channels = [c for c in range(num_channels) if c not in {s.channel for s in specs}]
    if not os.path.isdir(input_folder):
        raise ValueError(f"input folder {input_folder} does not exist")
    cases = _cases_in(input_folder, file_ending)
    if not cases:
        raise ValueError(f"{input_folder} holds no nnU-Net-named images CASE_XXXX{file_ending}")

    incomplete = sorted(c for c, ch in cases.items() if any(i not in ch for i in image_channels))
    if incomplete:
        expected = ", ".join(f"CASE_{i:04d}{file_ending}" for i in image_channels)
        raise ValueError(_MISSING_CHANNELS.format(n=len(incomplete), folder=input_folder,
                                                  cases=", ".join(incomplete), expected=expected))
    for spec, table, source in zip(specs, tables, sources):
        where = "" if not several else f"attribute {spec.name!r}" + (f" ({source})" if source else "") + ": "
        not_in_table = sorted(c for c in cases if c not in table)
        if not_in_table:
            raise ValueError(where + _MISSING_IN_TABLE.format(n=len(not_in_table), folder=input_folder,
                                                              cases=", ".join(not_in_table)))
        unknown = sorted(f"{c} ({table[c]!r})" for c in cases
                         if table[c] is not None and str(table[c]) not in spec.levels)
        if unknown:
            raise ValueError(where + _UNKNOWN_LEVELS.format(n=len(unknown), levels=spec.levels,
                                                            cases=", ".join(unknown)))

    output_folder = output_folder or input_folder
    copy_images = os.path.abspath(output_folder) != os.path.abspath(input_folder)
    targets = {(c, k): os.path.join(output_folder, f"{c}_{spec.channel:04d}{file_ending}")
               for c in cases for k, spec in enumerate(specs)}
    # everything this call would write: the attribute channels and, with an output folder, the image copies
    writes = list(targets.values())
    if copy_images:
        writes += [os.path.join(output_folder, os.path.basename(cases[c][i])) for c in cases for i in image_channels]
    existing = sorted(p for p in writes if os.path.lexists(p))
    if existing and not overwrite:
        raise FileExistsError(f"{len(existing)} file(s) exist already in {output_folder}: "
                              f"{fmt_cases(os.path.basename(p) for p in existing)}. "
                              f"Pass --overwrite (overwrite=True) to replace them.")
    os.makedirs(output_folder, exist_ok=True)

    example = cases[next(iter(cases))][image_channels[0]]
    rw = determine_reader_writer_from_dataset_json(dataset_json, example, verbose=False)()
    for case, files in cases.items():
        image_files = [files[i] for i in image_channels]
        images, properties = rw.read_images(image_files)
        if copy_images:
            for f in image_files:
                shutil.copy2(f, output_folder)
        for k, (spec, table) in enumerate(zip(specs, tables)):
            channel = encode_attribute_channel(images, spec.level_index(table[case]))
            target = targets[(case, k)]
            if os.path.lexists(target):  # overwrite: replace the file, never write through a link
                os.remove(target)
            rw.write_seg(channel, target, properties)
            if verbose:
                print(f"{case}: {(spec.name + ' ') if several else ''}{table[case] or 'unknown'} -> {target}")
    written = [{c: table[c] for c in cases} for table in tables]
    return written if several else written[0]


def attach_attribute_entry_point():
    import argparse
    from nnunet_dmoe.tables import add_attribute_table_arguments, read_attribute_table
    parser = argparse.ArgumentParser(
        description="Write the attribute channel for a folder of new cases (nnU-Net naming) from a table, so that "
                    "nnUNetv2_predict can run on it with a dMoE model.")
    parser.add_argument("-i", required=True, help="[REQUIRED] folder with the cases' image channels")
    add_attribute_table_arguments(parser, "-t", "[REQUIRED] attribute table (CSV, TSV or JSON): case id -> level; "
                                                "empty cells / 'unknown' mean unknown", required=True,
                                  column_note=". A model with several attributes ('attributes' in its dataset.json) "
                                              "needs one column per attribute, matched by order (the first column "
                                              "to the first attribute); the default there is the attributes' "
                                              "names")
    parser.add_argument("-dataset_json", default=None,
                        help="[OPTIONAL] the model's dataset.json (or its model folder). Either this or -d")
    parser.add_argument("-d", default=None, help="[OPTIONAL] dataset name or id in nnUNet_raw. Either this or -dataset_json")
    parser.add_argument("-o", default=None, help="[OPTIONAL] output folder. Default: write into -i")
    parser.add_argument("--overwrite", action="store_true", help="[OPTIONAL] replace existing attribute channels")
    args = parser.parse_args()
    try:
        dataset_json = load_model_dataset_json(args.dataset_json, args.d)
        columns = args.attribute_column
        several = isinstance(dataset_json.get("attributes"), list) and len(dataset_json["attributes"]) > 1
        if several:  # one column each, in the order of the list
            names = [b.get("name") for b in dataset_json["attributes"] if isinstance(b, dict)]
            columns = names if columns is None else ([columns] if isinstance(columns, str) else columns)
            if len(columns) != len(names):
                raise ValueError(f"the model has {len(names)} attributes ({', '.join(map(str, names))}); "
                                 f"--attribute-column names {len(columns)} column(s) ({', '.join(columns)}) of "
                                 f"{args.t}. Repeat --attribute-column once per attribute, in this order.")
            if args.bins is not None:
                raise ValueError("--bins bins one numeric column; this model has several attributes. Bin the "
                                 "column in the table beforehand (its level names as in the model's dataset.json).")
            case_levels = [read_attribute_table(args.t, args.id_column, c,
                                                strip_suffix=dataset_json.get("file_ending")) for c in columns]
            sources = [f"column {c!r} of {args.t}" for c in columns]
        elif not isinstance(columns, (str, type(None))):
            raise ValueError(f"--attribute-column is given {len(columns)} times ({', '.join(columns)}) but the model "
                             f"has one attribute. Give one column.")
        else:
            case_levels = read_attribute_table(args.t, args.id_column, columns, args.bins,
                                               strip_suffix=dataset_json.get("file_ending"))
            sources = None
        attach_attribute(args.i, case_levels, dataset_json, args.o, args.overwrite, sources=sources)
    except (ValueError, FileExistsError, RuntimeError) as e:
        # bad input: one clear message instead of a traceback
        sys.exit(f"nnUNetv2_dmoe_attach_attribute: error: {e}")
