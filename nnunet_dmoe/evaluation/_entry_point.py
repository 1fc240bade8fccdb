"""``nnUNetv2_dmoe_evaluate``: parses the command line and calls :func:`evaluate_folders` / :func:`compare_methods`."""
from __future__ import annotations

import os

from typing import Dict, List, Optional, Sequence, Union

from nnunet_dmoe.data.tables import read_json_object
from nnunet_dmoe.errors import command
from nnunet_dmoe.evaluation._api import compare_methods, evaluate_folders, print_summary
from nnunet_dmoe.evaluation._cases import attributes_from_dataset_json, attributes_from_table, detect_file_ending
from nnunet_dmoe.evaluation._checks import check_output_folder, check_processes, find_dataset_json
from nnunet_dmoe.evaluation._metrics import DEFAULT_NSD_TOLERANCE_MM
from nnunet_dmoe.evaluation._routing import add_routing_to_report, read_routing
from nnunet_dmoe.data.tables import add_attribute_table_arguments

_BAD_COMPARE = ("-compare: {item!r} is not NAME=PRED_FOLDER. Give each method as a name, '=', and its prediction "
                "folder, e.g. -compare dMoE=preds/dmoe baseline=preds/base.")
_PRED_AND_COMPARE = "Give either -pred FOLDER (one method) or -compare NAME=PRED_FOLDER ... (several), not both."
_NO_PRED = "Give -pred FOLDER (one method) or -compare NAME=PRED_FOLDER ... (several methods)."
_NO_ATTRIBUTE_SOURCE = ("Give the attribute of each case: -dataset_json PATH (a dataset.json with an 'attribute' "
                        "block) or -attributes TABLE -id_column C -attribute_column A.")
_BOTH_ATTRIBUTE_SOURCES = "Give the attribute either with -dataset_json or with -attributes (a table), not both."
_TABLE_ONLY = "{flag} goes with -attributes TABLE (it describes the table); with -dataset_json leave it out."
_DATASET_JSON_FIX = "Give the dataset.json of the reference's dataset (nnU-Net's format) with -dataset_json."


def parse_compare(items: Sequence[str]) -> Dict[str, str]:
    """``["a=x", "b=y"]`` -> ``{"a": "x", "b": "y"}`` (the name is everything before the first ``=``)."""
    out = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise ValueError(_BAD_COMPARE.format(item=item))
        if name in out:
            raise ValueError(f"-compare: the method name {name!r} is given twice. Give each method once.")
        out[name] = folder
    return out


def _parser():
    from nnunet_dmoe.cli import Parser

    parser = Parser(
        description="Fairness report of segmentations: Dice, IoU, HD95 and NSD per case, per attribute group and "
                    "overall, equity-scaled (ES) metrics, worst group and 95% bootstrap CIs. Writes summary.json, "
                    "per_case.csv, report.md and report.png into -o. Note: summary.json and per_case.csv hold the "
                    "group (e.g. race, age) of every case.")
    parser.add_argument("-ref", type=str, required=True,
                        help="[REQUIRED] folder with the reference segmentations")
    parser.add_argument("-pred", type=str, default=None,
                        help="[REQUIRED unless -compare] folder with the predictions, matched to -ref by case id")
    parser.add_argument("-l", nargs="+", type=str, required=True,
                        help="[REQUIRED] labels to score, e.g. -l 1 2. A region (union of labels) is written with "
                             "commas and no spaces: -l 1 2 1,2 scores label 1, label 2 and their union. Labels that "
                             "do not exist (0, negative, not in the dataset) are refused")
    parser.add_argument("-o", type=str, required=True,
                        help="[REQUIRED] output folder for the report; not inside -ref, -pred or a -compare folder")
    parser.add_argument("-dataset_json", type=str, default=None,
                        help="[REQUIRED unless -attributes] dataset.json whose 'attribute' block gives the level of "
                             "each case ('cases' and 'test_cases' merged; levels in the block's order). With an "
                             "'attributes' list every attribute is reported, alone and in combination. Its "
                             "'labels' (if any) are the labels -l and the files may hold; without -dataset_json a "
                             "dataset.json next to -ref is used, else the labels found in -ref")
    add_attribute_table_arguments(parser, "-attributes", "[REQUIRED unless -dataset_json] table (CSV, TSV or JSON) "
                                  "with the attribute of each case; empty cells / 'unknown' mean unknown",
                                  required=False, column_note=" (each reported alone and every combination of their "
                                                              "groups; the first gives report.png)",
                                  old_table_flag="--attributes")
    parser.add_argument("-fe", type=str, default=None,
                        help="[OPTIONAL] file ending of the segmentations, e.g. .nii.gz. Default: detected from -ref "
                             "(.nii.gz .nii .png .nrrd .mha .tif .tiff .bmp .gipl)")
    parser.add_renamed("-nsd_tolerance", "--nsd-tolerance", type=float, default=DEFAULT_NSD_TOLERANCE_MM,
                       help=f"[OPTIONAL] NSD tolerance in mm. Default: {DEFAULT_NSD_TOLERANCE_MM}")
    parser.add_renamed("-bootstrap", "--bootstrap", type=int, default=1000,
                       help="[OPTIONAL] bootstrap resamples for the 95%% CIs; 0 turns CIs off. Default: 1000")
    parser.add_renamed("-seed", "--seed", type=int, default=0, help="[OPTIONAL] seed of the bootstrap. Default: 0")
    parser.add_renamed("-compare", "--compare", nargs="+", type=str, default=None, metavar="NAME=PRED_FOLDER",
                       help="[OPTIONAL] several methods in one table and one figure, each as NAME=PRED_FOLDER; "
                            "replaces -pred. Default: off")
    parser.add_argument("-np", type=int, default=1,
                        help="[OPTIONAL] processes (1 or more) for reading and scoring the cases. Default: 1")
    parser.add_renamed("-routing", "--routing", type=str, default=None, metavar="FOLDER",
                        help="[OPTIONAL] output folder of nnUNetv2_dmoe_routing_report: its routing.png and a table "
                             "of the routing per block go into report.md. Default: off")
    parser.add_argument("--disable_progress_bar", action="store_true",
                        help="[OPTIONAL] no progress bar while the cases are scored (shown on a terminal only)")
    return parser


def _input_folders(ref: str, pred: Optional[str], compare: Optional[Sequence[str]]) -> Dict[str, str]:
    """``{flag: folder}`` of every input folder (-ref, -pred or each -compare method) for the -o check."""
    if pred is not None and compare is not None:
        raise ValueError(_PRED_AND_COMPARE)
    if pred is None and compare is None:
        raise ValueError(_NO_PRED)
    if pred is not None:
        return {"-ref": ref, "-pred": pred}
    return {"-ref": ref, **{f"-compare {n}": f for n, f in parse_compare(compare).items()}}


def _attributes(ref: str, dataset_json: Optional[str], table: Optional[str], id_column: Optional[str],
                attribute_column: Union[None, str, List[str]], bins: Optional[List[float]],
                file_ending: Optional[str]):
    """The attribute(s) of every case from -dataset_json or from -attributes (a table)."""
    if dataset_json is not None and table is not None:
        raise ValueError(_BOTH_ATTRIBUTE_SOURCES)
    if dataset_json is not None:
        for flag, value in (("-id_column", id_column), ("-attribute_column", attribute_column), ("-bins", bins)):
            if value is not None:
                raise ValueError(_TABLE_ONLY.format(flag=flag))
        _check_json_object(dataset_json)
        return attributes_from_dataset_json(dataset_json)
    if table is not None:
        ending = file_ending or (detect_file_ending(ref) if os.path.isdir(ref) else None)
        return attributes_from_table(table, id_column, attribute_column, bins=bins, strip_suffix=ending)
    raise ValueError(_NO_ATTRIBUTE_SOURCE)


def _check_json_object(path: Optional[str]) -> None:
    """A dataset.json that exists must be a JSON object (its absence is reported where it is read)."""
    if path is not None and os.path.isfile(path):
        read_json_object(path, "dataset.json", _DATASET_JSON_FIX)


def evaluate_command(ref: str, labels: Sequence[str], output_folder: str, pred: Optional[str] = None,
                     compare: Optional[Sequence[str]] = None, dataset_json: Optional[str] = None,
                     attribute_table: Optional[str] = None, id_column: Optional[str] = None,
                     attribute_column: Union[None, str, List[str]] = None, bins: Optional[List[float]] = None,
                     file_ending: Optional[str] = None, nsd_tolerance: float = DEFAULT_NSD_TOLERANCE_MM,
                     n_boot: int = 1000, seed: int = 0, num_processes: int = 1, routing: Optional[str] = None,
                     progress: bool = True) -> dict:
    """``nnUNetv2_dmoe_evaluate``: the fairness report of ``pred`` (one method) or of each ``NAME=FOLDER`` of
    ``compare`` against ``ref`` into ``output_folder``, the attribute from ``dataset_json`` or ``attribute_table``;
    with ``routing``, the routing report of that folder joins it. Returns the summary per method."""
    check_processes(num_processes, "-np ")  # refusals that need no file come before any work
    if os.path.exists(output_folder) and not os.path.isdir(output_folder):
        raise ValueError(f"-o {output_folder} is a file. Give a folder for the report (it is made if missing).")
    check_output_folder(("-o", output_folder), _input_folders(ref, pred, compare),
                        "-ref, -pred and the -compare folders")
    if routing is not None:
        read_routing(routing)  # fail before the evaluation
    attributes = _attributes(ref, dataset_json, attribute_table, id_column, attribute_column, bins, file_ending)
    _check_json_object(dataset_json or find_dataset_json(ref))  # the labels are read from it
    common = dict(labels=labels, attributes=attributes, output_folder=output_folder, n_boot=n_boot, seed=seed,
                  file_ending=file_ending, nsd_tolerance=nsd_tolerance, num_processes=num_processes,
                  dataset_json=dataset_json, progress=progress)
    if compare is not None:
        summaries = compare_methods(parse_compare(compare), ref, **common)["methods"]
    else:
        name = os.path.basename(os.path.normpath(pred))
        summaries = {name: evaluate_folders(ref, pred, method_name=name, **common)}
    print_summary(summaries)
    if routing is not None:
        add_routing_to_report(routing, output_folder)
    print(f"\nReport written to {output_folder} (summary.json, per_case.csv, report.md, report.png)")
    return summaries


@command("nnUNetv2_dmoe_evaluate")
def evaluate_entry_point(argv: Optional[List[str]] = None):
    """``nnUNetv2_dmoe_evaluate``; ``argv`` defaults to the command line. Bad input: one line on stderr, exit 2."""
    a = _parser().parse_args(argv)
    evaluate_command(a.ref, a.l, a.o, pred=a.pred, compare=a.compare, dataset_json=a.dataset_json,
                     attribute_table=a.attributes, id_column=a.id_column, attribute_column=a.attribute_column,
                     bins=a.bins, file_ending=a.fe, nsd_tolerance=a.nsd_tolerance, n_boot=a.bootstrap, seed=a.seed,
                     num_processes=a.np, routing=a.routing, progress=not a.disable_progress_bar)
