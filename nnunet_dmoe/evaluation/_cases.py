"""Which cases to score and which group each belongs to: file matching, reading, attribute sources."""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

from nnunet_dmoe.data.attribute import UNKNOWN_LEVEL, attribute_specs_from_dataset_json, fmt_cases
from nnunet_dmoe.data.tables import bin_labels, read_attribute_table

COMMON_FILE_ENDINGS = (".nii.gz", ".nii", ".png", ".nrrd", ".mha", ".tif", ".tiff", ".bmp", ".gipl")
UNKNOWN_GROUP = UNKNOWN_LEVEL
COMBINATION_SEPARATOR = " & "  # "T2 & centre B": one group of each attribute, in the attributes' order
SPACING_RTOL = 1e-4

_NO_FOLDER = "{flag} {folder} is not a folder. Give the folder that holds the {what} files."
_NO_FILES = ("{folder} holds no files ending in any of {endings}. Pass the file ending with -fe (e.g. -fe .nii.gz) "
             "or point {flag} at the segmentation folder.")
_MANY_ENDINGS = ("{folder} holds files with several endings {endings}; pass the one to score with -fe "
                 "(e.g. -fe {first}).")
_NO_FILES_WITH_ENDING = "{folder} holds no files ending in {ending!r}. Check -fe or the folder."
_MISSING_PRED = ("{n} reference case(s) have no prediction in {folder}: {cases}. Predict them, or remove them from "
                 "the reference folder.")
_EXTRA_PRED = ("{n} prediction(s) in {folder} have no reference case: {cases}. Remove them, or add their "
               "references to the reference folder.")
_SHAPE_MISMATCH = ("case {case}: the reference has shape {ref} but the prediction has shape {pred}. Predictions must "
                   "be on the reference's voxel grid (resample them, e.g. with nnU-Net's export).")
_SPACING_MISMATCH = ("case {case}: the reference has spacing {ref} but the prediction has spacing {pred}. Predictions "
                     "must be on the reference's voxel grid (resample them, or fix the header).")
_NO_ATTRIBUTE = ("{n} case(s) have no attribute in {source}: {cases}. Add them to the table (use an empty cell or "
                 "'unknown' for an unknown attribute), or remove them from the reference folder.")
_UNKNOWN_IS_LEVEL = ("{source}: a level is named {unknown!r}, which the report uses for cases whose attribute is "
                     "unknown. Rename the level.")


@dataclass
class CaseAttributes:
    """Group of every case: ``cases`` maps case id -> level (``None`` = unknown); ``levels`` fixes the order.

    Parameters
    ----------
    name : str
        What the attribute is ("center", "age").
    levels : list of str
        Ordered level names; reported in this order, levels without cases included (n=0).
    cases : dict
        Case id -> level name or ``None``.
    """

    name: str
    levels: List[str]
    cases: Dict[str, Optional[str]] = field(default_factory=dict)
    source: str = "the attribute mapping"

    def __post_init__(self):
        self.levels = [str(lv) for lv in self.levels]
        if UNKNOWN_GROUP in self.levels:
            raise ValueError(_UNKNOWN_IS_LEVEL.format(source=self.source, unknown=UNKNOWN_GROUP))
        if len(set(self.levels)) != len(self.levels):
            raise ValueError(f"{self.source}: levels has duplicates: {self.levels}")
        bad = sorted(f"{c} ({lv!r})" for c, lv in self.cases.items() if lv is not None and lv not in self.levels)
        if bad:
            raise ValueError(f"{self.source}: levels not in {self.levels}: {fmt_cases(bad)}")

    @classmethod
    def from_any(cls, attributes) -> "CaseAttributes":
        """A ``CaseAttributes``, an :class:`~nnunet_dmoe.data.attribute.AttributeSpec` (or anything with ``levels`` and
        ``cases``), or a plain mapping ``{case: level}`` (levels then in sorted order)."""
        if isinstance(attributes, cls):
            return attributes
        if hasattr(attributes, "levels") and hasattr(attributes, "cases"):
            return cls(getattr(attributes, "name", "attribute"), list(attributes.levels), dict(attributes.cases))
        if isinstance(attributes, Mapping):
            return cls("attribute", _sorted_levels(attributes.values()), dict(attributes))
        raise TypeError(f"attributes must be a CaseAttributes, an AttributeSpec or a mapping, got {type(attributes)}")

    def group_of(self, case_ids: Sequence[str]) -> List[str]:
        """Group name of each case (``"unknown"`` for ``None``); raises naming every case that is not listed."""
        missing = [c for c in case_ids if c not in self.cases]
        if missing:
            raise ValueError(_NO_ATTRIBUTE.format(n=len(missing), source=self.source, cases=fmt_cases(missing)))
        return [UNKNOWN_GROUP if self.cases[c] is None else self.cases[c] for c in case_ids]


def _sorted_levels(values) -> List[str]:
    known = sorted({str(v) for v in values if v is not None})
    try:
        return sorted(known, key=float)
    except ValueError:
        return known


def attributes_from_dataset_json(path: str) -> Union[CaseAttributes, List[CaseAttributes]]:
    """The attribute of every case from a dataset.json; ``cases`` (imagesTr ids) and ``test_cases`` (imagesTs ids)
    merged, levels in the block's order. One ``CaseAttributes`` for an ``"attribute"`` block, a list of them (in
    order) for an ``"attributes"`` list; every function here takes either."""
    if not os.path.isfile(path):
        raise ValueError(f"-dataset_json {path} does not exist")
    with open(path) as f:
        dataset_json = json.load(f)
    specs = attribute_specs_from_dataset_json(dataset_json, where=path)
    found = [CaseAttributes(spec.name, spec.levels, spec.all_cases, source=path) for spec in specs]
    return found if "attributes" in dataset_json else found[0]


def attributes_from_table(path: str, id_column: Optional[str] = None,
                          attribute_column: Union[None, str, Sequence[str]] = None,
                          bins: Optional[Sequence[float]] = None, strip_suffix: Optional[str] = None,
                          ) -> Union[CaseAttributes, List[CaseAttributes]]:
    """Case -> level from a CSV/TSV/JSON table (:func:`nnunet_dmoe.data.tables.read_attribute_table`). Levels are the
    bin names in order when ``bins`` is given, else the sorted values (numerically when all are numbers).

    ``attribute_column`` may name several columns (several attributes): the result is then a list of
    ``CaseAttributes``, one per column in order; ``bins`` cannot be used with several columns."""
    if attribute_column is not None and not isinstance(attribute_column, str):
        columns = list(attribute_column)
        if len(columns) > 1:
            if bins is not None:
                raise ValueError(f"-bins bins one numeric column, but {len(columns)} attribute columns are given "
                                 f"({', '.join(columns)}). Bin the column in the table beforehand, or give one "
                                 f"-attribute_column.")
            return [attributes_from_table(path, id_column, c, None, strip_suffix) for c in columns]
        attribute_column = columns[0] if columns else None
    cases = read_attribute_table(path, id_column, attribute_column, bins=bins, strip_suffix=strip_suffix)
    levels = bin_labels(bins) if bins is not None else _sorted_levels(cases.values())
    return CaseAttributes(attribute_column or "attribute", levels, cases, source=path)


def attribute_list(attributes) -> List[CaseAttributes]:
    """``attributes`` as a list of :class:`CaseAttributes`: a list or tuple (several attributes, each as
    :meth:`CaseAttributes.from_any` takes it) or one attribute. Names must differ."""
    items = list(attributes) if isinstance(attributes, (list, tuple)) else [attributes]
    if not items:
        raise ValueError("attributes: give at least one attribute")
    found = [CaseAttributes.from_any(a) for a in items]
    names = [a.name for a in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"the attributes share the name(s) {twice}. Give every attribute its own name.")
    return found


def combination_groups(attributes: Sequence[CaseAttributes], case_ids: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Group of every case over several attributes (``"T2 & B"``, :data:`COMBINATION_SEPARATOR`) and the
    combinations that have cases, in the order of the attributes' levels. A case whose attribute is unknown for any
    attribute is in the ``"unknown"`` group."""
    per_attribute = [a.group_of(case_ids) for a in attributes]
    groups = [UNKNOWN_GROUP if UNKNOWN_GROUP in combo else COMBINATION_SEPARATOR.join(combo)
              for combo in zip(*per_attribute)]
    present = set(groups)
    levels = [COMBINATION_SEPARATOR.join(c) for c in itertools.product(*[a.levels for a in attributes])]
    return groups, [lv for lv in levels if lv in present]


def _list_files(folder: str, ending: str) -> Dict[str, str]:
    return {f[: -len(ending)]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.endswith(ending) and not f.startswith(".") and os.path.isfile(os.path.join(folder, f))}


def detect_file_ending(folder: str, flag: str = "-ref") -> str:
    """The one file ending of :data:`COMMON_FILE_ENDINGS` found in ``folder`` (``.nii.gz`` wins over ``.nii``)."""
    found = []
    for f in os.listdir(folder):
        for e in COMMON_FILE_ENDINGS:  # longest-first where they overlap: .nii.gz before .nii
            if f.endswith(e) and not f.startswith("."):
                found.append(e)
                break
    found = sorted(set(found), key=COMMON_FILE_ENDINGS.index)
    if not found:
        raise ValueError(_NO_FILES.format(folder=folder, endings=list(COMMON_FILE_ENDINGS), flag=flag))
    if len(found) > 1:
        raise ValueError(_MANY_ENDINGS.format(folder=folder, endings=found, first=found[0]))
    return found[0]


def match_cases(ref_folder: str, pred_folder: str, file_ending: Optional[str] = None,
                ) -> Tuple[str, List[Tuple[str, str, str]]]:
    """``(file_ending, [(case_id, ref_file, pred_file), ...])`` sorted by case id; a missing or extra prediction is
    an error naming the cases."""
    for flag, folder, what in (("-ref", ref_folder, "reference"), ("-pred", pred_folder, "prediction")):
        if not os.path.isdir(folder):
            raise ValueError(_NO_FOLDER.format(flag=flag, folder=folder, what=what))
    ending = file_ending or detect_file_ending(ref_folder)
    ref, pred = _list_files(ref_folder, ending), _list_files(pred_folder, ending)
    if not ref:
        raise ValueError(_NO_FILES_WITH_ENDING.format(folder=ref_folder, ending=ending))
    missing, extra = sorted(set(ref) - set(pred)), sorted(set(pred) - set(ref))
    if missing:
        raise ValueError(_MISSING_PRED.format(n=len(missing), folder=pred_folder, cases=fmt_cases(missing)))
    if extra:
        raise ValueError(_EXTRA_PRED.format(n=len(extra), folder=pred_folder, cases=fmt_cases(extra)))
    return ending, [(c, ref[c], pred[c]) for c in sorted(ref)]


def reader_for(file_ending: str, example_file: str):
    """An instance of nnU-Net's reader for ``file_ending`` that can open ``example_file``."""
    return determine_reader_writer_from_file_ending(file_ending, example_file, verbose=False)()


def read_pair(reader, case: str, ref_file: str, pred_file: str) -> Tuple[np.ndarray, np.ndarray, List[float]]:
    """Reference and prediction label maps (spatial axes only) and the reference's spacing; checks the grids."""
    seg_ref, props_ref = reader.read_seg(ref_file)
    seg_pred, props_pred = reader.read_seg(pred_file)
    spacing_ref = [float(s) for s in props_ref["spacing"]]
    spacing_pred = [float(s) for s in props_pred["spacing"]]
    if seg_ref.shape != seg_pred.shape:
        raise ValueError(_SHAPE_MISMATCH.format(case=case, ref=tuple(seg_ref.shape[1:]),
                                                pred=tuple(seg_pred.shape[1:])))
    if not np.allclose(spacing_ref, spacing_pred, rtol=SPACING_RTOL, atol=0):
        raise ValueError(_SPACING_MISMATCH.format(case=case, ref=spacing_ref, pred=spacing_pred))
    return seg_ref[0], seg_pred[0], spacing_ref
