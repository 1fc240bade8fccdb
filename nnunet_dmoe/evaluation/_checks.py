"""Refusals of impossible input to the fairness report, so that it never scores what cannot be scored.

* A label after ``-l`` (or a member of a region) must be a foreground label: not 0 (the background), not negative,
  and one of the **declared labels**.
* Every value in a label map must be an integer label, and one of the declared labels.
* The output folder must not be, or lie inside, an input folder (its files would be read as cases next time).
* At least one process.

**Declared labels.** When a dataset.json with ``"labels"`` is known (given with ``-dataset_json``, or found next to
the reference folder: in it, or in its parent when it is ``labelsTr``, ``labelsTs`` or ``gt_segmentations``), the
declared labels are every integer of its ``"labels"`` values (region lists included): labels after ``-l`` are
checked against them before any file is read, and every reference and prediction file must hold only them.
Without one, the reference folder defines the labels: the values found in any reference file plus 0. A label after
``-l`` must then occur in some reference, and a prediction may hold only those values; a real label that no
reference holds needs a dataset.json to be declared. Non-integer and negative values are refused in every file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

BACKGROUND = 0
LABEL_FOLDERS = ("labelsTr", "labelsTs", "gt_segmentations")  # nnU-Net's folders; dataset.json is in the parent
_FAST_RANGE = 64  # label maps whose values span at most this many integers are checked value by value

_LABEL_ZERO = "-l {arg}: label 0 is the background, which is not scored. Score foreground labels: {fix}."
_LABEL_NEGATIVE = ("-l {arg}: label {value} is negative; labels are 0 (background), 1, 2, ... Score foreground "
                   "labels: {fix}.")
_LABEL_UNDECLARED = "-l {arg}: label {value} is not a label of {source}: {listing}. Score a foreground label: {fix}."
_LABEL_ABSENT = ("-l {arg}: no reference in {folder} holds label {value} (they hold {found}). Score a label they hold "
                 "({fix}), or give -dataset_json with the dataset's 'labels' if label {value} exists but no reference "
                 "case holds it.")
_NOT_INTEGER = ("{role} {file} (case {case}) holds the non-integer value(s) {values}: a label map holds integer "
                "labels only. Export the segmentation as labels (argmax, or a threshold of the probabilities), not as "
                "probabilities or a float image.")
_NEGATIVE_VALUE = ("{role} {file} (case {case}) holds the negative value(s) {values}: labels are 0 (background), 1, "
                   "2, ... Fix the file.")
_VALUE_UNDECLARED = ("{role} {file} (case {case}) holds {values}, which {verb} not a label of {source}: {listing}. "
                     "{fix}")
_FIX_PREDICTION = ("Map the prediction's values to the dataset's labels; if {values} {verb} a real label, declare it "
                   "in a dataset.json 'labels' and pass it with -dataset_json.")
_FIX_REFERENCE = "Fix the reference, or add the label to {source}."
_BAD_LABELS_BLOCK = ("{path}: 'labels' must map names to integer labels (or lists of them, for regions), got "
                     "{name!r}: {value!r}. Fix the dataset.json.")
_OUTPUT_IN_INPUT = ("{out_flag} {out} is {relation} the {flag} folder {folder}: its report files would be written "
                    "among the cases (and read as cases next time). Give an output folder outside {inputs}.")
_PROCESSES = "{flag}{n}: give at least 1 process for reading and scoring the cases (e.g. {flag}1)."


@dataclass(frozen=True)
class DeclaredLabels:
    """The labels of a dataset: ``values`` (sorted, 0 included), ``names`` (value -> name, where a name has one
    integer) and ``source`` (where they come from, for messages)."""

    values: Tuple[int, ...]
    names: Mapping[int, str]
    source: str

    def listing(self) -> str:
        """``0 (background), 1 (rim), 3``."""
        return ", ".join(f"{v} ({self.names[v]})" if v in self.names else str(v) for v in self.values)

    def fix(self) -> str:
        foreground = [str(v) for v in self.values if v > BACKGROUND]
        return "-l " + " ".join(foreground) if foreground else "none is declared; add them to 'labels'"


def _ints(value) -> Optional[List[int]]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        return None
    return list(items)


def labels_from_dataset_json(path: str) -> Optional[DeclaredLabels]:
    """The declared labels of a dataset.json (``None`` when it has no ``"labels"``)."""
    if not os.path.isfile(path):
        raise ValueError(f"-dataset_json {path} does not exist. Give the dataset's dataset.json.")
    with open(path) as f:
        block = json.load(f).get("labels")
    if block is None:
        return None
    values, names = set(), {}
    for name, value in dict(block).items():
        ints = _ints(value)
        if ints is None:
            raise ValueError(_BAD_LABELS_BLOCK.format(path=path, name=name, value=value))
        values.update(ints)
        if not isinstance(value, (list, tuple)) or len(ints) == 1:
            names.setdefault(ints[0], name)
    return DeclaredLabels(tuple(sorted(values | {BACKGROUND})), names, f"{path} 'labels'")


def find_dataset_json(ref_folder: str) -> Optional[str]:
    """``ref_folder/dataset.json``, else the parent's when ``ref_folder`` is one of :data:`LABEL_FOLDERS`."""
    candidates = [os.path.join(ref_folder, "dataset.json")]
    if os.path.basename(os.path.normpath(ref_folder)) in LABEL_FOLDERS:
        candidates.append(os.path.join(os.path.dirname(os.path.normpath(ref_folder)), "dataset.json"))
    return next((c for c in candidates if os.path.isfile(c)), None)


def declared_labels(ref_folder: str, dataset_json: Optional[str] = None) -> Optional[DeclaredLabels]:
    """The labels of ``dataset_json`` or of the dataset.json found next to ``ref_folder``; ``None`` when neither
    declares labels (the reference files then define them)."""
    path = dataset_json or find_dataset_json(ref_folder)
    return labels_from_dataset_json(path) if path else None


def _members(label) -> Tuple[int, ...]:
    return label if isinstance(label, tuple) else (label,)


def _arg(label) -> str:
    return ",".join(str(v) for v in _members(label))


def check_label_arguments(labels: Sequence, declared: Optional[DeclaredLabels]) -> None:
    """Refuses background, negative and (when ``declared``) undeclared labels or region members, before reading."""
    fix = declared.fix() if declared else "e.g. -l 1 (the labels the references hold)"
    for label in labels:
        for value in _members(label):
            if value == BACKGROUND:
                raise ValueError(_LABEL_ZERO.format(arg=_arg(label), fix=fix))
            if value < 0:
                raise ValueError(_LABEL_NEGATIVE.format(arg=_arg(label), value=value, fix=fix))
            if declared is not None and value not in declared.values:
                raise ValueError(_LABEL_UNDECLARED.format(arg=_arg(label), value=value, source=declared.source,
                                                          listing=declared.listing(), fix=fix))


def _fmt(values: Iterable) -> str:
    return ", ".join(f"{v:g}" for v in values)


def label_values(seg: np.ndarray, role: str, file: str, case: str) -> Tuple[int, ...]:
    """The sorted values of a label map; refuses non-integer (0.6, NaN) and negative values, naming the file.

    Labels are few and small: one comparison per integer between the minimum and the maximum finds them (and shows
    that nothing else is there), much faster than sorting a volume; other maps take :func:`_any_values`."""
    if seg.size == 0:
        return ()
    lo, hi = seg.min(), seg.max()
    if np.isfinite(lo) and np.isfinite(hi) and 0 <= lo and hi - lo <= _FAST_RANGE:
        found, counted = [], 0
        for value in range(int(np.ceil(lo)), int(np.floor(hi)) + 1):
            n = np.count_nonzero(seg == value)
            if n:
                found.append(value)
                counted += n
        if counted == seg.size:
            return tuple(found)
    return _any_values(seg, role, file, case)


def _any_values(seg: np.ndarray, role: str, file: str, case: str) -> Tuple[int, ...]:
    with np.errstate(invalid="ignore"):
        odd = ~np.isfinite(seg) | (seg != np.round(seg))
    if np.any(odd):
        raise ValueError(_NOT_INTEGER.format(role=role, file=file, case=case, values=_fmt(np.unique(seg[odd])[:5])))
    if seg.min() < 0:
        found = np.unique(seg[seg < 0])
        raise ValueError(_NEGATIVE_VALUE.format(role=role, file=file, case=case, values=_fmt(found[:5])))
    return tuple(int(v) for v in np.unique(seg))


def _check_file(role, file, case, values, allowed: DeclaredLabels, fix: str) -> None:
    bad = sorted(set(values) - set(allowed.values))
    if bad:
        verb = "is" if len(bad) == 1 else "are"
        raise ValueError(_VALUE_UNDECLARED.format(role=role, file=file, case=case, values=_fmt(bad[:10]), verb=verb,
                                                  source=allowed.source, listing=allowed.listing(),
                                                  fix=fix.format(values=_fmt(bad[:10]), verb=verb,
                                                                 source=allowed.source)))


def check_case_values(ref_folder: str, triples: Sequence[Tuple[str, str, str]], ref_values: Sequence[Sequence[int]],
                      pred_values: Sequence[Sequence[int]], labels: Sequence,
                      declared: Optional[DeclaredLabels]) -> None:
    """After reading: every file holds declared labels only, and (without a dataset.json) every label after ``-l``
    occurs in some reference. See the module docstring for the rule."""
    if declared is None:
        found = sorted(set().union(*ref_values) | {BACKGROUND})
        declared = DeclaredLabels(tuple(found), {BACKGROUND: "background"}, f"the reference folder {ref_folder}")
        for label in labels:
            for value in _members(label):
                if value not in found:
                    raise ValueError(_LABEL_ABSENT.format(arg=_arg(label), folder=ref_folder, value=value,
                                                          found=_fmt(found), fix=declared.fix()))
    else:
        for (case, ref_file, _), values in zip(triples, ref_values):
            _check_file("reference", ref_file, case, values, declared, _FIX_REFERENCE)
    for (case, _, pred_file), values in zip(triples, pred_values):
        _check_file("prediction", pred_file, case, values, declared, _FIX_PREDICTION)


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def check_output_folder(output: Tuple[str, str], inputs: Mapping[str, str], inputs_text: str) -> None:
    """Refuses an output folder equal to or inside an input folder (``{flag: folder}``), links resolved.
    ``output`` is ``(flag, folder)``; ``inputs_text`` names the inputs in the fix."""
    out_flag, out = output
    real_out = os.path.realpath(out)
    for flag, folder in inputs.items():
        real = os.path.realpath(folder)
        if _inside(real_out, real):
            relation = "the same folder as" if real_out == real else "inside"
            raise ValueError(_OUTPUT_IN_INPUT.format(out_flag=out_flag, out=out, relation=relation, flag=flag,
                                                     folder=folder, inputs=inputs_text))


def check_processes(n: int, flag: str = "num_processes=") -> None:
    """Refuses fewer than one process; ``flag`` as it is written before the number (``"-np "``)."""
    if not n >= 1:
        raise ValueError(_PROCESSES.format(flag=flag, n=n))

