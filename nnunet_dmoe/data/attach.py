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

import filecmp
import os
import shutil
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_dmoe.data.attribute import (UNKNOWN_LEVEL, AttributeSpec, attribute_specs_from_dataset_json,
                                        cases_in_folder, channel_file, encode_attribute_channel, fmt_cases)
from nnunet_dmoe.data.tables import read_json_object
from nnunet_dmoe.errors import command

__all__ = ["attach_attribute", "attach_attribute_from_table", "load_model_dataset_json"]

_UNKNOWN_LEVELS = ("{n} case(s) have levels that the model does not know (its levels: {levels}): {cases}. "
                   "Correct the table, or leave the cell empty / 'unknown' for an unknown attribute.")
_MISSING_IN_TABLE = ("{n} case(s) in {folder} have no row in the attribute table: {cases}. Add them to the table "
                     "(an empty cell means 'unknown').")
_MISSING_CHANNELS = "{n} case(s) in {folder} lack image channels: {cases}. Each case needs the files {expected}."


def load_model_dataset_json(dataset_json: Optional[str] = None, dataset: Optional[str] = None) -> dict:
    """dataset.json from a path (a raw dataset or a model folder) or from a dataset name/id in ``nnUNet_raw``."""
    if dataset_json is None and dataset is None:
        raise ValueError("give the model's dataset.json (-dataset_json) or the dataset (-d)")
    if dataset_json is None:
        from nnunetv2.paths import nnUNet_raw
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        raw = nnUNet_raw.require()
        try:
            name = maybe_convert_to_dataset_name(dataset)
        except RuntimeError:
            raise ValueError(f"-d {dataset}: no such dataset in $nnUNet_raw ({raw}). Give the dataset's name or id "
                             f"there, or the model's dataset.json with -dataset_json.") from None
        dataset_json = os.path.join(raw, name, "dataset.json")
    if os.path.isdir(dataset_json):
        dataset_json = os.path.join(dataset_json, "dataset.json")
    if not os.path.isfile(dataset_json):
        raise ValueError(f"{dataset_json} does not exist")
    return read_json_object(dataset_json, "model's dataset.json",
                            "Give the dataset.json of the model's dataset (-dataset_json, or the dataset with -d).")


def attach_attribute(input_folder: str, case_levels, dataset_json: dict,
                     output_folder: Optional[str] = None, overwrite: bool = False,
                     verbose: bool = True, sources: Optional[Sequence[str]] = None, images: str = "copy"):
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
    images : str
        With an output folder: ``"copy"`` the image channels there, ``"link"`` them (symbolic links) or ``"none"``
        (the output folder then holds the attribute channels only).

    Returns the level written per case (one attribute), or a list of them (several).
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    specs = attribute_specs_from_dataset_json(dataset_json, where="the model's dataset.json")
    several = len(specs) > 1  # an "attributes" list of one is the single attribute
    tables = list(case_levels) if several and isinstance(case_levels, (list, tuple)) else [case_levels]
    if len(tables) != len(specs):
        raise ValueError(f"the model has {len(specs)} attributes ({', '.join(s.name for s in specs)}) but "
                         f"{len(tables)} attribute table column(s) are given. Give one column per attribute, in this "
                         f"order (-attribute_column {' -attribute_column '.join(s.name for s in specs)}).")
    sources = list(sources) if sources is not None else [None] * len(specs)
    file_ending, num_channels = dataset_json["file_ending"], len(dataset_json["channel_names"])
    image_channels = [c for c in range(num_channels) if c not in {s.channel for s in specs}]
    cases = _input_cases(input_folder, file_ending, image_channels)
    _check_tables(specs, tables, sources, cases, input_folder)
    output_folder = output_folder or input_folder
    targets, copy_images, existing = _planned_writes(input_folder, output_folder, images, overwrite, cases, specs,
                                                     image_channels, file_ending)
    os.makedirs(output_folder, exist_ok=True)
    example = cases[next(iter(cases))][image_channels[0]]
    rw = determine_reader_writer_from_dataset_json(dataset_json, example, verbose=False)()
    _check_replaceable(rw, existing, set(targets.values()), specs, cases, image_channels)
    staging = tempfile.mkdtemp(prefix=".nnunet_dmoe_tmp_", dir=output_folder)
    try:  # everything is written beside the targets first; they are replaced only when all cases are done
        staged = _write_channels(rw, cases, image_channels, specs, tables, targets, staging, several, verbose)
        if copy_images:
            staged += [(f, os.path.join(output_folder, os.path.basename(f))) for c in cases
                       for f in (cases[c][i] for i in image_channels)]
        _put_in_place(staged, staging, images)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    written = [{c: table[c] for c in cases} for table in tables]
    return written if several else written[0]


def _input_cases(input_folder: str, file_ending: str, image_channels: List[int]) -> Dict[str, Dict[int, str]]:
    """The cases of ``input_folder`` (``case -> {channel: file}``); each must have every image channel."""
    if not os.path.isdir(input_folder):
        raise ValueError(f"input folder {input_folder} does not exist")
    cases = cases_in_folder(input_folder, file_ending)
    if not cases:
        raise ValueError(f"{input_folder} holds no nnU-Net-named images CASE_XXXX{file_ending}")
    incomplete = sorted(c for c, ch in cases.items() if any(i not in ch for i in image_channels))
    if incomplete:
        expected = ", ".join(channel_file("CASE", i, file_ending) for i in image_channels)
        raise ValueError(_MISSING_CHANNELS.format(n=len(incomplete), folder=input_folder,
                                                  cases=", ".join(incomplete), expected=expected))
    return cases


def _check_tables(specs: List[AttributeSpec], tables: List[Mapping], sources: List[Optional[str]], cases,
                  input_folder: str) -> None:
    """Every case has a row in each attribute's table, with a level of the model (or unknown)."""
    several = len(specs) > 1
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


def _planned_writes(input_folder: str, output_folder: str, images: str, overwrite: bool, cases, specs, image_channels,
                    file_ending: str) -> Tuple[Dict[tuple, str], bool, List[str]]:
    """The attribute-channel file of each ``(case, attribute index)``, whether the image channels are copied (or
    linked) into the output folder, and the files of both that exist already (sorted; any is an error without
    ``overwrite``)."""
    if images not in ("copy", "link", "none"):
        raise ValueError(f"images must be 'copy', 'link' or 'none', got {images!r}")
    if os.path.exists(output_folder) and not os.path.isdir(output_folder):
        raise ValueError(f"output folder {output_folder} is a file. Give a folder with -o (it is made if missing).")
    copy_images = os.path.abspath(output_folder) != os.path.abspath(input_folder) and images != "none"
    targets = {(c, k): os.path.join(output_folder, channel_file(c, spec.channel, file_ending))
               for c in cases for k, spec in enumerate(specs)}
    # everything this call would write: the attribute channels and, with an output folder, the image copies
    writes = list(targets.values())
    if copy_images:
        writes += [os.path.join(output_folder, os.path.basename(cases[c][i])) for c in cases for i in image_channels]
    existing = sorted(p for p in writes if os.path.lexists(p))
    if existing and not overwrite:
        raise FileExistsError(f"{len(existing)} file(s) exist already in {output_folder}: "
                              f"{fmt_cases(os.path.basename(p) for p in existing)}. Pass --overwrite (overwrite=True) "
                              f"to replace them: only attribute-channel files are replaced, never an image.")
    return targets, copy_images, existing


def _put_in_place(staged: List[Tuple[str, str]], staging: str, images: str) -> None:
    """Move the staged channels onto their targets; copy (or link, ``images="link"``) each image that is not in the
    output folder yet."""
    for source, target in staged:
        if os.path.dirname(source) == staging:
            os.replace(source, target)  # a rename: replaces a link itself, never writes through it
        elif os.path.lexists(target):  # an existing copy equals its source (_check_replaceable)
            continue
        elif images == "link":
            os.symlink(os.path.abspath(source), target)
        else:
            shutil.copy2(source, target)


def _write_channels(rw, cases, image_channels, specs, tables, targets, staging: str, several: bool, verbose: bool):
    """Each case's attribute channel(s) into ``staging``; returns (staged file, target) pairs."""
    staged = []
    for case, files in cases.items():
        images, properties = rw.read_images([files[i] for i in image_channels])
        for k, (spec, table) in enumerate(zip(specs, tables)):
            channel = encode_attribute_channel(images, spec.level_index(table[case]))
            path = os.path.join(staging, os.path.basename(targets[(case, k)]))
            rw.write_seg(channel, path, properties)
            staged.append((path, targets[(case, k)]))
            if verbose:
                name = (spec.name + " ") if several else ""
                print(f"{case}: {name}{table[case] or UNKNOWN_LEVEL} -> {targets[(case, k)]}")
    return staged


def is_attribute_channel(values: np.ndarray, num_levels: int) -> bool:
    """Whether ``values`` can be an attribute channel of ``num_levels`` levels: whole numbers, 0 and at most one
    code in 1..num_levels (the code inside the image footprint, 0 outside; all 0 = unknown)."""
    found = np.unique(np.asarray(values))
    if not np.all(np.isfinite(found)) or not np.all(found == np.round(found)):
        return False
    positive = found[found != 0]
    return len(positive) <= 1 and bool(np.all((positive >= 1) & (positive <= num_levels)))


def _check_replaceable(rw, existing, channel_files, specs, cases, image_channels) -> None:
    """--overwrite replaces attribute channels only: an existing channel file must decode as one, and an image copy
    in the output folder must equal its source."""
    sources = {os.path.basename(cases[c][i]): cases[c][i] for c in cases for i in image_channels}
    levels = max(len(s.levels) for s in specs)
    for path in existing:
        if path in channel_files:
            values = rw.read_images([path])[0]
            if not is_attribute_channel(values, levels):
                found = np.unique(values)
                shown = fmt_cases([f"{v:g}" for v in found], limit=8)
                raise ValueError(f"{path} is not an attribute channel (values {shown}; expected 0 and one code "
                                 f"in 1..{levels}): it may be an image channel. Nothing was written. Check the model's dataset.json (attribute 'channel') and the file "
                                 f"names, or move the file away.")
        elif not filecmp.cmp(sources[os.path.basename(path)], path, shallow=False):
            raise ValueError(f"{path} exists and differs from {sources[os.path.basename(path)]}: --overwrite "
                             f"replaces attribute channels only, not images. Nothing was written. Choose an empty "
                             f"output folder (-o) or move the file away.")


def attach_attribute_from_table(input_folder: str, table: str, dataset_json: Optional[str] = None,
                                dataset: Optional[str] = None, id_column: Optional[str] = None,
                                columns: Union[None, str, List[str]] = None, bins: Optional[List[float]] = None,
                                output_folder: Optional[str] = None, overwrite: bool = False):
    """``nnUNetv2_dmoe_attach_attribute``: the attribute channel(s) of the cases of ``input_folder`` from the column(s)
    ``columns`` of ``table``, for the model whose dataset.json is ``dataset_json`` (a file or folder) or that of the
    raw dataset ``dataset``; see :func:`attach_attribute`, whose result it returns."""
    from nnunet_dmoe.data.tables import read_attribute_table

    model_json = load_model_dataset_json(dataset_json, dataset)
    ending = model_json.get("file_ending")
    several = isinstance(model_json.get("attributes"), list) and len(model_json["attributes"]) > 1
    if several:  # one column each, in the order of the list
        columns = _columns_per_attribute(model_json, columns, bins, table)
        case_levels = [read_attribute_table(table, id_column, c, strip_suffix=ending) for c in columns]
        sources = [f"column {c!r} of {table}" for c in columns]
    elif not isinstance(columns, (str, type(None))):
        raise ValueError(f"-attribute_column is given {len(columns)} times ({', '.join(columns)}) but the model "
                         f"has one attribute. Give one column.")
    else:
        case_levels = read_attribute_table(table, id_column, columns, bins, strip_suffix=ending)
        sources = None
    return attach_attribute(input_folder, case_levels, model_json, output_folder, overwrite, sources=sources)


def _columns_per_attribute(model_json: dict, columns: Union[None, str, List[str]], bins: Optional[List[float]],
                           table: str) -> List[str]:
    """The table column of each attribute of a model with several (default: the attributes' names)."""
    names = [b.get("name") for b in model_json["attributes"] if isinstance(b, dict)]
    columns = names if columns is None else ([columns] if isinstance(columns, str) else columns)
    if len(columns) != len(names):
        raise ValueError(f"the model has {len(names)} attributes ({', '.join(map(str, names))}); "
                         f"-attribute_column names {len(columns)} column(s) ({', '.join(columns)}) of "
                         f"{table}. Repeat -attribute_column once per attribute, in this order.")
    if bins is not None:
        raise ValueError("-bins bins one numeric column; this model has several attributes. Bin the "
                         "column in the table beforehand (its level names as in the model's dataset.json).")
    return columns


def _parser():
    from nnunet_dmoe.cli import Parser
    from nnunet_dmoe.data.tables import add_attribute_table_arguments
    parser = Parser(
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
    return parser


@command("nnUNetv2_dmoe_attach_attribute")
def attach_attribute_entry_point():
    args = _parser().parse_args()
    attach_attribute_from_table(args.i, args.t, args.dataset_json, args.d, args.id_column, args.attribute_column,
                                args.bins, args.o, args.overwrite)
