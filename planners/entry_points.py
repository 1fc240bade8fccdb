"""``nnUNetv2_dmoe_plan_and_preprocess``: checks the attribute set-up of a raw dataset first, then runs nnU-Net's
fingerprinting, planning (with a dMoE-aware planner) and preprocessing through nnU-Net's own API."""
import functools
import multiprocessing
import os
import time
from typing import List, Optional, Sequence, Tuple

from nnunet_dmoe.data.attribute import (AttributeSpec, attribute_specs_from_dataset_json, channel_disagreement,
                                        channel_file, channel_suffix, fmt_cases)
from nnunet_dmoe.data.tables import read_json_object
from nnunet_dmoe.errors import command

Problem = Tuple[str, str]  # (kind, line of the message)
_POOL_WORTH_S = 20.0
_DATASET_JSON_KEYS = ("labels", "channel_names", "numTraining", "file_ending")  # those nnU-Net's planning reads
_DATASET_JSON_FIX = ("nnU-Net's dataset.json is a JSON object with 'labels', 'channel_names', 'numTraining' and "
                     "'file_ending': fix it, or write the dataset with an nnUNetv2_dmoe_convert_* command.")


def _raw_dataset(dataset_id: int) -> Tuple[str, dict, dict]:
    """The raw folder, its dataset.json and nnU-Net's training cases (case -> images, label)."""
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    raw = nnUNet_raw.require()
    prefix = f"Dataset{int(dataset_id):03d}_"
    if not any(d.startswith(prefix) and os.path.isdir(os.path.join(raw, d)) for d in os.listdir(raw)):
        raise ValueError(f"-d {dataset_id}: no such dataset in $nnUNet_raw ({raw}): no folder {prefix}<name>. Give "
                         f"the id of a raw dataset there.")
    folder = os.path.join(raw, convert_id_to_dataset_name(dataset_id))
    path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no dataset.json. Write the dataset with an nnUNetv2_dmoe_convert_* "
                                f"command, or add nnU-Net's dataset.json ({', '.join(_DATASET_JSON_KEYS)}).")
    dataset_json = read_json_object(path, "dataset.json", _DATASET_JSON_FIX)
    missing = [k for k in _DATASET_JSON_KEYS if k not in dataset_json]
    if "channel_names" in missing and "modality" in dataset_json:  # nnU-Net v1's name, which v2 still reads
        missing.remove("channel_names")
    if missing:
        raise ValueError(f"{path} lacks {', '.join(repr(k) for k in missing)}. {_DATASET_JSON_FIX}")
    if "dataset" not in dataset_json and not os.path.isdir(os.path.join(folder, "imagesTr")):
        raise FileNotFoundError(f"{folder} has no imagesTr folder: nnU-Net reads the training images from "
                                f"imagesTr/CASE_XXXX{dataset_json['file_ending']} (labels: labelsTr/CASE"
                                f"{dataset_json['file_ending']}).")
    return folder, dataset_json, get_filenames_of_train_images_and_targets(folder, dataset_json)


def _shown(path: str, folder: str) -> str:
    """``path`` relative to the raw dataset folder when inside it."""
    rel = os.path.relpath(path, folder)
    return path if rel.startswith("..") else rel


def _channel_file(entry: dict, case: str, suffix: str) -> Optional[str]:
    """The existing attribute-channel file ``<case><suffix>`` among a training case's images, or ``None``."""
    return next((f for f in entry["images"] if os.path.basename(f) == case + suffix and os.path.isfile(f)), None)


def _file_problems(specs: List[AttributeSpec], dataset: dict, dataset_json: dict, folder: str) -> List[Problem]:
    """Training cases missing from an attribute's cases or without its channel file; cases listed in ``cases``
    that have no image files."""
    ending, several = dataset_json["file_ending"], len(specs) > 1
    problems = []
    for spec in specs:
        suffix = channel_suffix(spec.channel, ending)
        cases, what = ((f"the cases of attribute '{spec.name}'", spec.name) if several else
                       ("attribute.cases", "attribute"))
        problems += [("missing", f"  {case}: missing from {cases}") for case in dataset if case not in spec.cases]
        problems += [("missing", f"  {case}: no {what}-channel file {case}{suffix}") for case, entry in dataset.items()
                     if _channel_file(entry, case, suffix) is None]
    channels = sorted(int(c) for c in dataset_json.get("channel_names", dataset_json.get("modality", {})))
    listed = {case: spec for spec in reversed(specs) for case in spec.cases}  # the first attribute listing it
    for case in sorted(set(listed) - set(dataset)):
        cases = f"the cases of attribute '{listed[case].name}'" if several else "attribute.cases"
        expected = ", ".join(f"imagesTr/{channel_file(case, c, ending)}" for c in channels)
        problems.append(("no_images", f"  {case}: listed in {cases} but has no image files (expected {expected})"))
    return problems


def _case_channel_problems(specs: List[AttributeSpec], reader_class, folder: str,
                           task: Tuple[str, List[Optional[str]]]) -> List[Problem]:
    """Read one case's attribute-channel file(s) (each once) and apply the trainers' rule
    (:func:`nnunet_dmoe.data.attribute.channel_disagreement`): a code above the number of levels, or a level other than
    the one ``cases`` gives."""
    case, paths = task
    problems = []
    for spec, path in zip(specs, paths):
        if path is None or case not in spec.cases:  # reported by _file_problems
            continue
        what = f"attribute '{spec.name}': " if len(specs) > 1 else ""
        try:
            channel = reader_class().read_images((path,))[0]
        except Exception as e:  # an unreadable file is the user's to fix; name it
            problems.append(("unreadable", f"  {case}: cannot read {_shown(path, folder)} ({type(e).__name__}: {e})"))
            continue
        try:
            disagreement = channel_disagreement(spec, case, channel, name=_shown(path, folder))
        except ValueError as e:
            problems.append(("code", f"  {case}: {what}{e}"))
            continue
        if disagreement:
            problems.append(("disagree", f"  {case}: {what}{disagreement} ({_shown(path, folder)})"))
    return problems


def _channel_problems(specs: List[AttributeSpec], dataset: dict, dataset_json: dict, folder: str,
                      num_processes: int) -> List[Problem]:
    """:func:`_case_channel_problems` for every training case: in this process, and in ``num_processes`` processes
    once the cases read so far say that the rest would take more than ``_POOL_WORTH_S`` here (a process pool costs
    seconds to start: worth it for hundreds of CT volumes, not for small images)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    suffixes = [channel_suffix(spec.channel, dataset_json["file_ending"]) for spec in specs]
    tasks = [(case, [_channel_file(entry, case, s) for s in suffixes]) for case, entry in dataset.items()]
    # the reader is chosen by the file ending (no example file: nnU-Net prints a traceback for a file it can't open)
    reader_class = determine_reader_writer_from_dataset_json(dataset_json, verbose=False)
    work = functools.partial(_case_channel_problems, specs, reader_class, folder)
    results = [work(task) for task in tasks[:1]]  # the first case also pays for the imports: not timed
    start = time.perf_counter()
    for done, task in enumerate(tasks[1:], 1):
        results.append(work(task))
        rest = tasks[done + 1:]
        if num_processes > 1 and len(rest) >= num_processes and \
                (time.perf_counter() - start) / done * len(rest) > _POOL_WORTH_S:
            with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
                results += pool.map(work, rest, chunksize=max(1, len(rest) // (4 * num_processes)))
            break
    return [problem for found in results for problem in found]


_FIXES = {
    "missing": "Write the missing channels with nnUNetv2_dmoe_attach_attribute and list every training case in "
               "{cases}.",
    "no_images": "Add the image files of the cases listed without images to {images}, or remove them from {cases}.",
    "unreadable": "Rewrite or replace the files that cannot be read.",
    "code": "A code above the number of levels names no level (code k = level k-1, 0 = unknown): rewrite the channel "
            "with nnUNetv2_dmoe_attach_attribute -i {images} -t <table: case, level> -d {id} --overwrite, or correct "
            "the level list ('levels') in dataset.json.",
    "disagree": "Where the channel and {cases} disagree, correct the level in {cases} or rewrite the channel "
                "(nnUNetv2_dmoe_attach_attribute -i {images} -t <table: case, level> -d {id} --overwrite).",
}


def check_raw_dataset(dataset_id: int, num_processes: int = 1,
                      raw: Optional[Tuple[str, dict, dict]] = None) -> List[AttributeSpec]:
    """Validate the attribute block(s) of a raw dataset and its training cases before anything is planned: every
    case in each attribute's ``cases`` with its channel file, every case of ``cases`` with image files, and every
    channel file read once (in up to ``num_processes`` processes) and decoded by the trainers' rule: no code above the
    number of levels, the level that ``cases`` gives. Raises one ``ValueError`` listing every problem; returns the
    attributes (one, or several for dataset.json's ``"attributes"``). ``raw``: what :func:`_raw_dataset` returned."""
    folder, dataset_json, dataset = raw or _raw_dataset(dataset_id)
    where = os.path.join(folder, "dataset.json")
    specs = attribute_specs_from_dataset_json(dataset_json, where=where)
    problems = _file_problems(specs, dataset, dataset_json, folder)
    problems += _channel_problems(specs, dataset, dataset_json, folder, num_processes)
    if problems:
        names = dict(cases="attribute.cases" if len(specs) == 1 else "the cases of every attribute",
                     images=os.path.join(folder, "imagesTr"), id=dataset_id)
        fixes = [fix.format(**names) for kind, fix in _FIXES.items() if any(k == kind for k, _ in problems)]
        raise ValueError(f"{where}: {len(problems)} problem(s) with the attribute:\n"
                         + "\n".join(line for _, line in problems) + "\n" + "\n".join(fixes))
    return specs


def warn_if_preprocessed_is_stale(dataset_id: int, configurations: Sequence[str], no_preprocessing: bool,
                                  raw: Optional[Tuple[str, dict, dict]] = None) -> bool:
    """Print a warning when ``$nnUNet_preprocessed/<dataset>`` exists and the raw data (dataset.json, a training
    image or label) are newer than its dataset.json (or, without one, its newest plans); returns whether it did."""
    from nnunetv2.paths import nnUNet_preprocessed

    folder, _, dataset = raw or _raw_dataset(dataset_id)
    target = os.path.join(os.fspath(nnUNet_preprocessed), os.path.basename(folder)) if nnUNet_preprocessed else None
    if target is None or not os.path.isdir(target):
        return False
    made = [os.path.join(target, f) for f in os.listdir(target) if f.endswith(".json") and f != "splits_final.json"]
    reference = os.path.join(target, "dataset.json")
    reference = reference if reference in made else max(made, key=os.path.getmtime, default=None)
    if reference is None:
        return False
    files = [os.path.join(folder, "dataset.json")] + [f for e in dataset.values() for f in e["images"] + [e["label"]]]
    newest = max((f for f in files if os.path.isfile(f)), key=os.path.getmtime)
    if os.path.getmtime(newest) <= os.path.getmtime(reference):
        return False
    when = lambda f: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(f)))
    then = ("this run (--no_pp) rewrites only the fingerprint and plans: rerun without --no_pp (or "
            "nnUNetv2_plan_and_preprocess) before training." if no_preprocessing else
            f"this run rewrites them for -c {' '.join(configurations)}; the data of other configurations there stay "
            f"stale until you preprocess those too.")
    print(f"Warning: the preprocessed data in {target} are stale: the raw file {newest} ({when(newest)}) is newer than "
          f"{reference} ({when(reference)}); {then}")
    return True


def _check_labels(folder: str, dataset_json: dict, dataset: dict) -> None:
    """Every training case has its label file (nnU-Net's fingerprinting reads them all)."""
    missing = sorted(case for case, entry in dataset.items() if not os.path.isfile(entry["label"]))
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} training case(s) have no label file in labelsTr: "
                                f"{fmt_cases(missing)} (expected labelsTr/CASE{dataset_json['file_ending']}). Add "
                                f"the labels, or remove the cases' images from imagesTr.")


def plan_and_preprocess(dataset_ids: Sequence[int], planner: str = "nnUNetPlannerDMoE",
                        configurations: Sequence[str] = ("2d", "3d_fullres"), num_processes: Optional[List[int]] = None,
                        gpu_memory_target_in_gb: Optional[float] = None, verify_dataset_integrity: bool = False,
                        no_preprocessing: bool = False) -> List[str]:
    """Returns the plans identifier per dataset."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset, preprocess_dataset)
    from nnunet_dmoe.planners.nnUNetPlannerDMoE import PLANNERS

    if planner not in PLANNERS:
        raise ValueError(f"-pl {planner!r}: choose one of {sorted(PLANNERS)}")
    _check_num_processes(num_processes, configurations)
    for d in dataset_ids:  # before anything is written
        raw = _raw_dataset(d)
        warn_if_preprocessed_is_stale(d, configurations, no_preprocessing, raw)
        check_raw_dataset(d, max(num_processes or [2]), raw)
        _check_labels(*raw)
    identifiers = []
    for d in dataset_ids:
        extract_fingerprint_dataset(d, num_processes=max(num_processes or [2]),
                                    check_dataset_integrity=verify_dataset_integrity)
        _, plans_identifier = plan_experiment_dataset(d, PLANNERS[planner], gpu_memory_target_in_gb)
        identifiers.append(plans_identifier)
        if not no_preprocessing:
            preprocess_dataset(d, plans_identifier, list(configurations), num_processes or [2] * len(configurations))
    return identifiers


@command("nnUNetv2_dmoe_plan_and_preprocess")
def plan_and_preprocess_entry_point():
    import argparse
    parser = argparse.ArgumentParser(description="nnU-Net's plan and preprocess with a dMoE-aware planner. Checks the "
                                                 "raw dataset first: the attribute block, and every training case's "
                                                 "attribute channel (its file, a code within the levels, the level "
                                                 "that dataset.json gives the case); warns when the preprocessed "
                                                 "data are older than the raw data.")
    parser.add_argument("-d", nargs="+", type=int, required=True, help="[REQUIRED] dataset id(s)")
    parser.add_argument("-pl", default="nnUNetPlannerDMoE",
                        help="[OPTIONAL] nnUNetPlannerDMoE (plans nnUNetDMoEPlans) or nnUNetPlannerResEncMDMoE (plans "
                             "nnUNetResEncUNetMDMoEPlans). Default: nnUNetPlannerDMoE")
    parser.add_argument("-c", nargs="+", default=["2d", "3d_fullres"],
                        help="[OPTIONAL] configurations to preprocess. Default: 2d 3d_fullres")
    parser.add_argument("-np", nargs="+", type=int, default=None,
                        help="[OPTIONAL] processes per configuration. Default: 2")
    parser.add_argument("-gpu_memory_target", type=float, default=None,
                        help="[OPTIONAL] GPU memory target in GB. Default: the planner's (8)")
    parser.add_argument("--verify_dataset_integrity", action="store_true",
                        help="[OPTIONAL] run nnU-Net's dataset integrity check")
    parser.add_argument("--no_pp", action="store_true", help="[OPTIONAL] plan only, do not preprocess")
    args = parser.parse_args()
    plan_and_preprocess_command(args.d, args.pl, args.c, args.np, args.gpu_memory_target,
                                args.verify_dataset_integrity, args.no_pp)


def plan_and_preprocess_command(dataset_ids: Sequence[int], planner: str, configurations: Sequence[str],
                                num_processes: Optional[List[int]], gpu_memory_target_in_gb: Optional[float],
                                verify_dataset_integrity: bool, no_preprocessing: bool) -> List[str]:
    """``nnUNetv2_dmoe_plan_and_preprocess``: :func:`plan_and_preprocess`, then how to train on each dataset."""
    ids = plan_and_preprocess(dataset_ids, planner, configurations, num_processes, gpu_memory_target_in_gb,
                              verify_dataset_integrity, no_preprocessing)
    for d, p in zip(dataset_ids, ids):
        print(f"Dataset {d}: plans '{p}'. Train with: nnUNetv2_train {d} 3d_fullres 0 -tr nnUNetTrainerDMoE -p {p}")
    return ids


def _check_num_processes(num_processes: Optional[List[int]], configurations: Sequence[str]) -> None:
    """-np: numbers of at least 1, one for all configurations or one per configuration of -c."""
    if num_processes is None:
        return
    shown = " ".join(map(str, num_processes))
    if min(num_processes, default=1) < 1:
        raise ValueError(f"-np {shown}: give at least 1 process per configuration")
    if len(num_processes) not in (1, len(configurations)):
        raise ValueError(f"-np {shown}: give one number for all configurations, or one per configuration of -c "
                         f"({' '.join(configurations)})")
