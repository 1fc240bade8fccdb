"""Radiotherapy target volumes (3D CT/MR, CTV) -> nnU-Net raw dataset with the tumour T-stage as distribution-aware
(dMoE) attribute.

Input: a manifest CSV (or TSV), one row per case, paths relative to the manifest's folder::

    case_id,image_CT,label,tstage,split
    RT_0001,ct/RT_0001.nii.gz,ctv/RT_0001.nii.gz,cT2a,train
    RT_0002,ct/RT_0002.nii.gz,,pT4b,test

- ``image_<channel>``: one column per modality; ``<channel>`` becomes the nnU-Net channel name (``CT`` -> CT
  normalisation, anything else -> z-score). Any SimpleITK-readable file.
- ``label``: the label map (values 0..number of ``-labels``); may be empty for test cases.
- ``tstage``: normalised to T0, Tis, T1 ... T4 (``T1a``, ``cT1b``, ``pT1``, ``ypT3`` -> ``T1``/``T3``); empty or
  ``unknown`` -> unknown attribute; anything else (``TX``) is an error unless ``--unparsable_as_unknown``.
- ``split``: optional, train (default) or test.
- further attributes (``-attribute_column centre``): each named column becomes one more attribute after the T-stage
  (an ``"attributes"`` list in dataset.json, one ``noNorm`` channel each); its levels are the values found, sorted;
  empty or ``unknown`` -> unknown. Other columns are ignored.

Checks per case: every image and the label on the same grid (size, spacing, origin, direction), label values
declared. Images are copied, the attribute channel (``noNorm``, uint8) is written last on the grid of the first image.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from nnunet_dmoe.dataset_conversion.common import (Problems, attribute_block, attribute_channel_index,
                                                   finish, make_parser, normalise_split,
                                                   progress, staged_dataset, write_nifti_case)
from nnunet_dmoe.errors import command
from nnunet_dmoe.data.tables import DEFAULT_MISSING, read_rows

_TSTAGE = re.compile(r"^(?:[cpyra]{1,3})?T?(is|[0-4])[a-d]?\d?$", re.IGNORECASE)
_STAGE_ORDER = ["T0", "Tis", "T1", "T2", "T3", "T4"]


def normalise_tstage(text) -> Optional[str]:
    """``'cT2b'`` -> ``'T2'``, ``'pTis'`` -> ``'Tis'``; ``None`` for a missing value; ``ValueError`` if unparsable."""
    text = "" if text is None else str(text).strip()
    if text.casefold() in DEFAULT_MISSING:
        return None
    m = _TSTAGE.match(text.replace(" ", ""))
    if m is None:
        raise ValueError(f"cannot read the T-stage {text!r}")
    return "Tis" if m.group(1).lower() == "is" else f"T{m.group(1)}"


def _geometry(img: sitk.Image) -> tuple:
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def _same_grid(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and all(np.allclose(x, y, atol=1e-4) for x, y in zip(a[1:], b[1:]))


def _read_manifest(manifest: str, id_column: str, tstage_column: str, attribute_columns: Sequence[str] = ()):
    rows = read_rows(manifest, "manifest")
    columns = list(rows[0]) if rows else []
    image_columns = [c for c in columns if c.startswith("image_")]
    missing = [c for c in (id_column, tstage_column, "label", *attribute_columns) if c not in columns]
    if not rows or missing or not image_columns:
        raise ValueError(f"-i {manifest}: needs rows and the columns {id_column!r}, 'image_<channel>' (one per "
                         f"modality, e.g. image_CT), 'label', {tstage_column!r}; found {columns} "
                         f"(missing {missing + ([] if image_columns else ['image_<channel>'])}). "
                         f"Rename the columns or pass -id_column / -tstage_column / -attribute_column.")
    return rows, image_columns


def _check_row(row: dict, lineno: int, where: str, image_columns: List[str], id_column: str, tstage_column: str,
               base: str, unparsable_as_unknown: bool, problems: Problems):
    """(case, split, stage, image paths, label path or None) of one manifest row, or ``None`` after recording."""
    n = len(problems)
    case = (row[id_column] or "").strip()
    here = f"{where} row {lineno} ({case or 'no case id'})"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-.]*", case):
        problems.add(here, f"case id {case!r} is empty or has characters other than letters, digits, _ - .",
                     "Give each case a plain id.")
    split = normalise_split(row.get("split") or "train")
    if split is None:
        problems.add(here, f"split {row['split']!r} is not train or test", "Write train or test.")
    try:
        stage = normalise_tstage(row[tstage_column])
    except ValueError as e:
        stage = None
        if not unparsable_as_unknown:
            problems.add(here, str(e), "Write T1..T4 (suffixes and c/p/y prefixes are fine), leave it empty for "
                                       "unknown, or pass --unparsable_as_unknown.")
    paths = [os.path.join(base, (row[c] or "").strip()) for c in image_columns]
    label = (row["label"] or "").strip()
    label = os.path.join(base, label) if label else None
    for c, p in zip(image_columns, paths):
        if not row[c] or not os.path.isfile(p):
            problems.add(here, f"the image {c} file {p} is missing", "Fix the path in the manifest.")
    if label is None and split == "train":
        problems.add(here, "the label (mask) is missing", "Give the label path; only test cases may have none.")
    elif label is not None and not os.path.isfile(label):
        problems.add(here, f"the label (mask) file {label} is missing", "Fix the path in the manifest.")
    return None if len(problems) > n else (case, split, stage, paths, label)


def _convert_case(out: str, entry, level_index, num_labels: int, image_columns: List[str],
                  where: str, problems: Problems) -> None:
    case, split, _, paths, label_path = entry
    try:
        images = [sitk.ReadImage(p) for p in paths]
        label = sitk.ReadImage(label_path) if label_path else None
    except RuntimeError as e:
        problems.add(f"{where} ({case})", f"SimpleITK cannot read a file of this case: {str(e).strip()[-300:]}",
                     "Convert the file to NIfTI or another SimpleITK-readable format.")
        return
    reference = _geometry(images[0])
    files = list(zip(image_columns[1:], paths[1:], images[1:]))
    if label is not None:
        files.append(("label", label_path, label))
    n = len(problems)
    for what, path, img in files:
        if not _same_grid(_geometry(img), reference):
            problems.add(f"{where} ({case})", f"{what} {path} is not on the grid of {image_columns[0]} {paths[0]} "
                         f"(size/spacing/origin/direction {_geometry(img)} vs {reference})",
                         "Resample it onto the image grid (nearest neighbour for labels).")
    if label is not None:
        values = np.unique(sitk.GetArrayViewFromImage(label))
        bad = [v for v in values.tolist() if v not in range(num_labels + 1)]
        if bad:
            problems.add(f"{where} ({case})", f"label {label_path} has undeclared values {bad[:10]} "
                         f"(declared 0..{num_labels})", "Declare the labels with -labels or fix the label map.")
    if len(problems) > n:
        return
    suffix = "Tr" if split == "train" else "Ts"
    write_nifti_case(os.path.join(out, "images" + suffix), case, images, level_index)
    if label is not None:
        sitk.WriteImage(sitk.Cast(label, sitk.sitkUInt8), os.path.join(out, "labels" + suffix, f"{case}.nii.gz"),
                        useCompression=True)


def convert_rt(manifest: str, nnunet_dataset_id: int, labels: Sequence[str] = ("CTV",),
               levels: Optional[Sequence[str]] = None, unparsable_as_unknown: bool = False,
               id_column: str = "case_id", tstage_column: str = "tstage", dataset_name: str = "RT",
               overwrite: bool = False, attribute_columns: Sequence[str] = ()) -> str:
    """Convert a radiotherapy manifest into ``$nnUNet_raw/DatasetXXX_<dataset_name>``; returns its path.

    ``labels`` names the label values 1, 2, ... (0 is background). ``levels`` fixes the T-stage levels and their
    router order (default: the stages found, in the order T0, Tis, T1 ... T4). ``attribute_columns`` names further
    manifest columns (e.g. ``["centre"]``) that become attributes after the T-stage, levels = the values found,
    sorted; with any, dataset.json holds an ``"attributes"`` list (T-stage first) instead of ``"attribute"``.
    """
    if not os.path.isfile(manifest):
        raise ValueError(f"-i {manifest}: the manifest does not exist")
    attribute_columns = list(attribute_columns)
    clash = sorted({c for c in attribute_columns if attribute_columns.count(c) > 1 or c == tstage_column
                    or c in (id_column, "label", "split") or c.startswith("image_")})
    if clash:
        raise ValueError(f"-attribute_column: {clash} repeat a column or name the id, T-stage, label, split or an "
                         f"image column. Name each further attribute column once.")
    rows, image_columns = _read_manifest(manifest, id_column, tstage_column, attribute_columns)
    problems = Problems()
    entries, extra = _read_entries(manifest, rows, image_columns, id_column, tstage_column, attribute_columns,
                                   unparsable_as_unknown, problems)
    levels = _tstage_levels(manifest, levels, entries, problems)

    extra_levels = [sorted({extra[e[0]][k] for e in entries} - {None}) for k in range(len(attribute_columns))]
    for column, found_levels in zip(attribute_columns, extra_levels):
        if not found_levels:
            problems.add(manifest, f"no case has a known {column}", "Fill the column, or leave it out of "
                                                                    "-attribute_column.")

    with staged_dataset(nnunet_dataset_id, dataset_name, overwrite, inputs=[manifest]) as staged:
        for entry in progress(entries, "radiotherapy"):
            indices = [None if entry[2] is None else levels.index(entry[2])]
            indices += [None if v is None else lv.index(v) for v, lv in zip(extra[entry[0]], extra_levels)]
            _convert_case(staged.path, entry, indices, len(labels), image_columns, manifest, problems)
        problems.raise_if_any("radiotherapy manifest")
        _finish_rt(staged.path, manifest, labels, levels, entries, extra, attribute_columns, extra_levels,
                   image_columns)
    return staged.final


def _read_entries(manifest: str, rows, image_columns: List[str], id_column: str, tstage_column: str,
                  attribute_columns: List[str], unparsable_as_unknown: bool, problems: Problems):
    """The checked rows (:func:`_check_row`) and each case's values of the further attribute columns; a case id
    listed twice is a problem."""
    base = os.path.dirname(os.path.abspath(manifest))
    entries, extra = [], {}
    for lineno, row in enumerate(rows, start=2):
        entry = _check_row(row, lineno, manifest, image_columns, id_column, tstage_column, base,
                           unparsable_as_unknown, problems)
        if entry is not None:
            entries.append(entry)
            extra[entry[0]] = [None if (row[c] or "").strip().casefold() in DEFAULT_MISSING else row[c].strip()
                               for c in attribute_columns]
    ids = [e[0] for e in entries]
    for case in sorted({c for c in ids if ids.count(c) > 1}):
        problems.add(manifest, f"case id {case} is listed more than once", "Give every case its own id.")
    return entries, extra


def _tstage_levels(manifest: str, levels: Optional[Sequence[str]], entries: list, problems: Problems) -> List[str]:
    """The T-stage levels: ``levels`` normalised, or the stages found in router order. A case whose stage is not
    one of them is a problem (and leaves ``entries``)."""
    found = {e[2] for e in entries if e[2] is not None}
    try:
        levels = [normalise_tstage(lv) for lv in levels] if levels else [s for s in _STAGE_ORDER if s in found]
    except ValueError as e:
        raise ValueError(f"-levels: {e}; give T-stages such as T1 T2 T3 T4") from None
    twice = sorted({lv for lv in levels if levels.count(lv) > 1})
    if twice:
        raise ValueError(f"-levels: {', '.join(twice)} given more than once (after normalising, e.g. t2 = T2). "
                         f"Give each T-stage once, in router order.")
    for entry in [e for e in entries if e[2] is not None and e[2] not in levels]:
        problems.add(f"{manifest} ({entry[0]})", f"T-stage {entry[2]} is not one of -levels {levels}",
                     "Add it to -levels or correct the row.")
        entries.remove(entry)
    if not levels:
        problems.add(manifest, "no case has a known T-stage", "Fill the T-stage column.")
    return levels


def _finish_rt(out, manifest, labels, levels, entries, extra, attribute_columns, extra_levels, image_columns):
    channel_names = {str(k): c[len("image_"):] for k, c in enumerate(image_columns)}
    first = attribute_channel_index(len(image_columns))
    split = {e[0]: e[1] for e in entries}
    blocks = [attribute_block("tstage", levels, first, {e[0]: e[2] for e in entries}, split)]
    blocks += [attribute_block(column, lv, first + 1 + k, {e[0]: extra[e[0]][k] for e in entries}, split)
               for k, (column, lv) in enumerate(zip(attribute_columns, extra_levels))]
    channel_names.update({str(first + k): "noNorm" for k in range(len(blocks))})
    finish(out, channel_names, {"background": 0, **{n: k + 1 for k, n in enumerate(labels)}}, ".nii.gz", blocks,
           description=f"Radiotherapy target volumes from {os.path.abspath(manifest)}; attribute T-stage"
                       + "".join(f", {c}" for c in attribute_columns),
           converted_by="nnUNetv2_dmoe_convert_rt")


@command("nnUNetv2_dmoe_convert_rt")
def convert_rt_entry_point():
    parser = make_parser("Convert a radiotherapy manifest (images, label, T-stage) into an nnU-Net raw dataset with "
                         "the T-stage as distribution-aware (dMoE) attribute.",
                         "Manifest CSV/TSV: case_id, image_<channel> (one per modality), label, tstage, optional "
                         "split (train/test); paths relative to the manifest.", "RT")
    parser.add_argument("-labels", type=str, nargs="+", default=["CTV"],
                        help="[OPTIONAL] Names of the label values 1, 2, ... (0 = background). Default: CTV")
    parser.add_argument("-levels", type=str, nargs="+", default=None,
                        help="[OPTIONAL] T-stage levels in router order, e.g. T1 T2 T3 T4. Default: the stages "
                             "found, ordered T0 Tis T1 T2 T3 T4")
    parser.add_argument("-id_column", type=str, default="case_id", help="[OPTIONAL] Case id column. Default: case_id")
    parser.add_argument("-tstage_column", type=str, default="tstage",
                        help="[OPTIONAL] T-stage column. Default: tstage")
    parser.add_renamed("-attribute_column", "-attribute_columns", type=str, nargs="+", default=[],
                       help="[OPTIONAL] Further manifest columns used as attributes after the T-stage, e.g. "
                            "-attribute_column centre: several attributes, one noNorm channel each; levels = the "
                            "values found, sorted. Default: none (the T-stage only)")
    parser.add_argument("--unparsable_as_unknown", action="store_true",
                        help="[OPTIONAL] Treat an unreadable T-stage (e.g. TX) as unknown. Default: error")
    args = parser.parse_args()
    convert_rt(args.i, args.d, labels=args.labels, levels=args.levels, unparsable_as_unknown=args.unparsable_as_unknown,
               id_column=args.id_column, tstage_column=args.tstage_column, dataset_name=args.n,
               overwrite=args.overwrite, attribute_columns=args.attribute_column)


if __name__ == "__main__":
    convert_rt_entry_point()
