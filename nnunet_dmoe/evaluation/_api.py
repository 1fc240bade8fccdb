"""Library API of the fairness report: :func:`evaluate_folders` and :func:`compare_methods`."""
from __future__ import annotations

import multiprocessing
import os
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_dmoe.evaluation._cases import (COMBINATION_SEPARATOR, attribute_list, combination_groups, match_cases,
                                           read_pair, reader_for)
from nnunet_dmoe.evaluation._checks import (DeclaredLabels, check_case_values, check_label_arguments,
                                            check_output_folder, check_processes, declared_labels, label_values)
from nnunet_dmoe.evaluation._fairness import DEFAULT_CI_QUANTILES, FairnessFrame
from nnunet_dmoe.evaluation._metrics import (DEFAULT_NSD_TOLERANCE_MM, HIGHER_IS_BETTER, METRICS, LabelOrRegion,
                                             label_name, metrics_for_labels, parse_label_or_region)
from nnunet_dmoe.evaluation._report import SMALL_GROUP, console_table, write_report

_NO_LABELS = "-l: give at least one label or region to score (e.g. -l 1, or -l 1 2 1,2)."
_DUPLICATE_LABELS = "-l: {labels} are given more than once. Give each label or region once."
_NO_METHODS = "-compare: give at least one NAME=PRED_FOLDER."
_BAD_METHOD_NAME = "-compare: method names must be non-empty and unique, got {names}."


def _labels(labels: Sequence[Union[str, int, Sequence[int]]]) -> List[LabelOrRegion]:
    if not labels:
        raise ValueError(_NO_LABELS)
    parsed = [parse_label_or_region(lb) for lb in labels]
    names = [label_name(p) for p in parsed]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(_DUPLICATE_LABELS.format(labels=dup))
    return parsed


def _check_run(ref_folder: str, pred_folders: Mapping[str, str], output_folder: Optional[str],
               num_processes: int) -> None:
    """The refusals that need no file: fewer than one process, an output folder inside an input folder."""
    check_processes(num_processes)
    if output_folder is not None:
        check_output_folder(("output_folder", output_folder), {"reference": ref_folder, **pred_folders},
                            "the reference and prediction folders")


def _score_one(args) -> Tuple[Dict[str, Dict[str, float]], Tuple[int, ...], Tuple[int, ...]]:
    reader, case, ref_file, pred_file, labels, nsd_tolerance = args
    seg_ref, seg_pred, spacing = read_pair(reader, case, ref_file, pred_file)
    values = (label_values(seg_ref, "reference", ref_file, case), label_values(seg_pred, "prediction", pred_file, case))
    return (metrics_for_labels(seg_ref, seg_pred, spacing, labels, nsd_tolerance), *values)


def score_folder(ref_folder: str, pred_folder: str, labels: Sequence[LabelOrRegion], file_ending: Optional[str] = None,
                 nsd_tolerance: float = DEFAULT_NSD_TOLERANCE_MM, num_processes: int = 1,
                 declared: Optional[DeclaredLabels] = None,
                 progress: bool = False) -> Tuple[List[str], List[Dict[str, Dict[str, float]]]]:
    """Case ids and ``[{label: {metric: value}}]`` per case, cases matched by id between the two folders.

    Refuses (``ValueError``, naming the file or ``-l``) a label that does not exist and a label map holding a value
    that is not a label: ``declared`` are the dataset's labels (``None``: the values found in the references plus
    0), see :mod:`nnunet_dmoe.evaluation._checks`. The values are taken from the arrays read for scoring.
    ``progress`` shows a progress bar on a terminal (tqdm, stderr).
    """
    from tqdm import tqdm

    check_processes(num_processes)
    check_label_arguments(labels, declared)
    ending, triples = match_cases(ref_folder, pred_folder, file_ending)
    reader = reader_for(ending, triples[0][1])
    jobs = [(reader, case, r, p, list(labels), nsd_tolerance) for case, r, p in triples]
    if num_processes > 1:
        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            results = list(tqdm(pool.imap(_score_one, jobs, chunksize=max(1, len(jobs) // (4 * num_processes))),
                                total=len(jobs), desc="scoring cases", disable=None if progress else True))
    else:
        results = [_score_one(j) for j in tqdm(jobs, desc="scoring cases", disable=None if progress else True)]
    check_case_values(ref_folder, triples, [r[1] for r in results], [r[2] for r in results], labels, declared)
    return [t[0] for t in triples], [r[0] for r in results]


def _lo_hi(ci: Sequence[Mapping[str, float]]) -> Dict[str, List[float]]:
    """``[{m: lo}, {m: hi}]`` (fairlearn's layout) -> ``{m: [lo, hi]}`` (summary.json's)."""
    return {k: [ci[0][k], ci[1][k]] for k in ci[0]}


def _frame_summary(ff: FairnessFrame) -> dict:
    out = {"overall": ff.overall,
           "groups": {g: {"n": ff.group_sizes[g], **means} for g, means in ff.by_group.items()},
           "es": ff.es, "worst_group": ff.worst_group}
    if ff.ci_quantiles is not None:
        groups_ci = ff.by_group_ci
        out["ci"] = {"quantiles": list(ff.ci_quantiles), "overall": _lo_hi(ff.overall_ci), "es": _lo_hi(ff.es_ci),
                     "groups": {g: {m: [groups_ci[0][g][m], groups_ci[1][g][m]] for m in ff.metrics}
                                for g in ff.groups}}
    return out


def _frame(scores: Mapping[str, Sequence[float]], groups, levels, n_boot, seed) -> FairnessFrame:
    boot = dict(n_boot=n_boot, ci_quantiles=DEFAULT_CI_QUANTILES) if n_boot else {}
    return FairnessFrame(scores=scores, groups=groups, levels=levels, higher_is_better=HIGHER_IS_BETTER,
                         random_state=seed, **boot)


def _attribute_summary(name: str, levels: Sequence[str], groups: Sequence[str], n_cases: int,
                       label_scores: Mapping[str, Mapping[str, np.ndarray]], n_boot: int, seed: int,
                       nsd_tolerance: float) -> dict:
    """The summary of one grouping of the cases (an attribute, or the combinations of several)."""
    names = list(label_scores)
    frames = {ln: _frame(label_scores[ln], groups, levels, n_boot, seed) for ln in names}
    if len(names) == 1:
        top, top_level = frames[names[0]], f"label {names[0]}"
    else:
        with warnings.catch_warnings():  # a case whose HD95 is NaN for every label keeps NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean_scores = {m: np.nanmean(np.stack([label_scores[ln][m] for ln in names]), axis=0) for m in METRICS}
        top, top_level = _frame(mean_scores, groups, levels, n_boot, seed), "mean over labels " + " ".join(names)
    return {"attribute": name, "levels": list(levels), "n_cases": n_cases,
            "labels_scored": names, "top_level": top_level, "metrics": list(METRICS),
            "higher_is_better": dict(HIGHER_IS_BETTER), "nsd_tolerance_mm": float(nsd_tolerance),
            "n_boot": int(n_boot or 0), "seed": seed, **_frame_summary(top),
            "labels": {ln: _frame_summary(f) for ln, f in frames.items()}}


def summarise(case_ids: Sequence[str], per_case: Sequence[Mapping[str, Mapping[str, float]]],
              attributes, labels: Sequence[LabelOrRegion], n_boot: int = 1000, seed: int = 0,
              nsd_tolerance: float = DEFAULT_NSD_TOLERANCE_MM) -> Tuple[dict, List[dict]]:
    """The summary dict (see :func:`evaluate_folders`) and the per-case rows of already scored cases.

    ``attributes``: one attribute (a :class:`CaseAttributes`, AttributeSpec or mapping) or a list of them. With
    several, the summary is the first attribute's (the single-attribute layout) plus ``"attributes"`` (``{name:
    summary}``, every attribute in order) and ``"combinations"`` (the same summary over the combinations of groups
    that have cases, e.g. ``"T2 & B"``, with ``"separator"``, ``"of"`` (the attribute names) and ``"small"`` (the
    combinations with fewer than 5 cases)); a case unknown for any attribute is in the combinations' unknown group.
    """
    attrs = attribute_list(attributes)
    names = [label_name(lb) for lb in labels]
    label_scores = {ln: {m: np.array([pc[ln][m] for pc in per_case], dtype=float) for m in METRICS} for ln in names}
    groups = [a.group_of(case_ids) for a in attrs]
    per_attribute = [_attribute_summary(a.name, a.levels, g, len(case_ids), label_scores, n_boot, seed, nsd_tolerance)
                     for a, g in zip(attrs, groups)]
    summary = dict(per_attribute[0])
    if len(attrs) == 1:
        rows = [{"case": c, "group": g, "label": ln, **{m: float(pc[ln][m]) for m in METRICS},
                 "n_ref": pc[ln]["n_ref"], "n_pred": pc[ln]["n_pred"]}
                for c, g, pc in zip(case_ids, groups[0], per_case) for ln in names]
        return summary, rows
    combo_groups, combo_levels = combination_groups(attrs, case_ids)
    combos = _attribute_summary(COMBINATION_SEPARATOR.join(a.name for a in attrs), combo_levels, combo_groups,
                                len(case_ids), label_scores, n_boot, seed, nsd_tolerance)
    combos.update(separator=COMBINATION_SEPARATOR, of=[a.name for a in attrs],
                  small=[g for g in combo_levels if combos["groups"][g]["n"] < SMALL_GROUP])
    summary.update(attributes={a.name: s for a, s in zip(attrs, per_attribute)}, combinations=combos)
    rows = [{"case": c, "group": cg, **{f"group_{a.name}": g[i] for a, g in zip(attrs, groups)}, "label": ln,
             **{m: float(pc[ln][m]) for m in METRICS}, "n_ref": pc[ln]["n_ref"], "n_pred": pc[ln]["n_pred"]}
            for i, (c, cg, pc) in enumerate(zip(case_ids, combo_groups, per_case)) for ln in names]
    return summary, rows


def evaluate_folders(ref_folder: str, pred_folder: str, labels: Sequence[Union[str, int, Sequence[int]]],
                     attributes, output_folder: Optional[str], n_boot: int = 1000, seed: int = 0,
                     file_ending: Optional[str] = None, nsd_tolerance: float = DEFAULT_NSD_TOLERANCE_MM,
                     num_processes: int = 1, method_name: Optional[str] = None,
                     dataset_json: Optional[str] = None, progress: bool = False) -> dict:
    """Fairness report of one folder of predictions against a folder of references.

    Impossible input is refused with a ``ValueError`` before anything is written: a label that does not exist (0,
    negative, or not declared), a file holding a value that is not a label (non-integer, or not declared), an output
    folder inside an input folder, ``num_processes < 1``. The declared labels are ``dataset_json``'s ``"labels"``,
    else those of a dataset.json next to ``ref_folder``, else the values found in the references plus 0 (the rule:
    :mod:`nnunet_dmoe.evaluation._checks`).

    Parameters
    ----------
    ref_folder, pred_folder : str
        Label maps in any nnU-Net-readable format, matched by case id (file name minus ``file_ending``).
    labels : sequence
        Labels (``1``) or regions (``(1, 2)`` or ``"1,2"``: the union) to score.
    attributes : CaseAttributes, AttributeSpec or mapping, or a list of them
        Level of every case (``None`` = unknown); see :func:`attributes_from_dataset_json`,
        :func:`attributes_from_table`. A list (several attributes) reports each attribute and every combination
        of groups (see :func:`summarise`).
    output_folder : str or None
        Where summary.json, per_case.csv, report.md and report.png go; ``None`` writes nothing.
    n_boot : int
        Bootstrap resamples for the 95% CIs (0: no CIs). seed : int — seed of the bootstrap.
    file_ending : str, optional
        Auto-detected from the reference folder when ``None``.
    nsd_tolerance : float
        NSD tolerance in mm (default 1.0).
    num_processes : int
        Worker processes for reading and scoring (default 1).
    method_name : str, optional
        Row name in report.md and report.png. Default: the name of ``pred_folder``.
    dataset_json : str, optional
        dataset.json whose ``"labels"`` declare the labels. Default: ``ref_folder/dataset.json``, or the one in its
        parent when ``ref_folder`` is ``labelsTr``, ``labelsTs`` or ``gt_segmentations``, if there is one.

    Returns
    -------
    dict
        The summary as written to summary.json (NaN stays ``float('nan')`` here; the file holds ``null``).
    """
    _check_run(ref_folder, {"prediction": pred_folder}, output_folder, num_processes)
    declared = declared_labels(ref_folder, dataset_json)
    labels = _labels(labels)
    attributes = attribute_list(attributes)
    case_ids, per_case = score_folder(ref_folder, pred_folder, labels, file_ending, nsd_tolerance, num_processes,
                                      declared, progress)
    summary, rows = summarise(case_ids, per_case, attributes, labels, n_boot, seed, nsd_tolerance)
    summary.update(reference=ref_folder, prediction=pred_folder)
    if output_folder is not None:
        name = method_name or os.path.basename(os.path.normpath(pred_folder))
        write_report({name: summary}, rows, output_folder, summary)
    return summary


def compare_methods(pred_folders: Mapping[str, str], ref_folder: str,
                    labels: Sequence[Union[str, int, Sequence[int]]], attributes, output_folder: Optional[str],
                    n_boot: int = 1000, seed: int = 0, file_ending: Optional[str] = None,
                    nsd_tolerance: float = DEFAULT_NSD_TOLERANCE_MM, num_processes: int = 1,
                    dataset_json: Optional[str] = None, progress: bool = False) -> dict:
    """Several methods against the same references, in one table (the paper's Table 1) and one figure.

    Refuses impossible input as :func:`evaluate_folders` does (``dataset_json`` as there). Every method is
    bootstrapped with the same seed, so the resamples are the same case sets for all methods (paired).
    Returns ``{"reference": ref_folder, "methods": {name: summary}}`` (summary as in :func:`evaluate_folders`, with
    ``prediction`` set to the method's folder); per_case.csv gets a ``method`` column.
    """
    names = list(pred_folders)
    if not names:
        raise ValueError(_NO_METHODS)
    if any(not str(n).strip() for n in names) or len(set(names)) != len(names):
        raise ValueError(_BAD_METHOD_NAME.format(names=names))
    _check_run(ref_folder, {f"{n!r} prediction": pred_folders[n] for n in names}, output_folder, num_processes)
    declared = declared_labels(ref_folder, dataset_json)
    labels = _labels(labels)
    attributes = attribute_list(attributes)
    summaries, all_rows = {}, []
    for name in names:  # one reference folder: match_cases gives every method the same cases
        case_ids, per_case = score_folder(ref_folder, pred_folders[name], labels, file_ending, nsd_tolerance,
                                          num_processes, declared, progress)
        summary, rows = summarise(case_ids, per_case, attributes, labels, n_boot, seed, nsd_tolerance)
        summary.update(reference=ref_folder, prediction=pred_folders[name])
        summaries[name] = summary
        all_rows += [{"method": name, **r} for r in rows]
    result = {"reference": ref_folder, "methods": summaries}
    if output_folder is not None:
        write_report(summaries, all_rows, output_folder, result)
    return result


def print_summary(summaries: Mapping[str, Mapping]) -> None:
    """The one-screen console table of ``{method: summary}``."""
    print(console_table(summaries, METRICS))
