"""One nnU-Net per attribute level (the dMoE paper's Table 8), with nnU-Net's own training CLI and predictor.

Layout (every model folder is an ordinary nnU-Net results folder)::

    $nnUNet_preprocessed/DatasetXXX_Name/per_level/<i>_<level>/DatasetXXX_Name/
        splits_final.json              this level's cases only: a K-fold split (K = min(5, cases)), nnU-Net's seed
        dataset.json, plans, data ...  links to the dataset's preprocessed files (nothing is copied)
    $nnUNet_results/DatasetXXX_Name/per_level/<i>_<level>/DatasetXXX_Name/<trainer>__<plans>__<configuration>/fold_f

Training level ``i`` is ``nnUNetv2_train DatasetXXX_Name CONFIGURATION f -tr TRAINER -p PLANS`` with
``nnUNet_preprocessed`` pointing at the level's view and ``nnUNet_results`` at the level's results root, so any
trainer works, nnU-Net's own included. Fold ``f`` is fold ``f`` of the level's own split (a replicate, as in the
demo). A level needs at least ``min_cases`` (default 2: one to train, one to validate) training cases of known
level; fewer is an error naming the level and its count. Cases of unknown level train no model.

Prediction reads each case's level from its attribute channel (or a table) and predicts it with its level's
model through ``nnUNetPredictor``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from nnunet_dmoe.data.attribute import AttributeSpec, cases_in_folder, channel_suffix, decode_attribute_channel
from nnunet_dmoe.errors import command

__all__ = ["PER_LEVEL_FOLDER", "level_folder_name", "level_splits", "make_level_view", "level_model_folder",
           "per_level_training_commands", "train_per_level", "case_levels_from_channel", "predict_per_level",
           "run_train_per_level", "train_per_level_entry_point", "run_predict_per_level",
           "predict_per_level_entry_point"]

PER_LEVEL_FOLDER = "per_level"
MAX_FOLDS = 5

_TOO_FEW = ("one network per level needs at least {min_cases} training cases of each level (one network trains on "
            "the others, one case validates); {levels}. Add cases of these levels, merge them with a neighbouring "
            "level in dataset.json's attribute block, or compare without per-level networks.")
_NO_FOLD = ("fold {fold} does not exist for level {level!r}: its {n} training cases give a {k}-fold split (folds "
            "0-{last}). Use a fold below {k}.")


def level_folder_name(index: int, level: str) -> str:
    """``<index>_<level>`` with characters outside ``[A-Za-z0-9.+-]`` replaced by ``_``."""
    return f"{index}_{re.sub(r'[^A-Za-z0-9.+-]+', '_', str(level)).strip('_') or 'level'}"


def level_splits(spec: AttributeSpec, identifiers: Sequence[str], min_cases: int = 2,
                 n_splits: int = MAX_FOLDS) -> Dict[int, List[dict]]:
    """Per level index, nnU-Net splits (list of ``{"train": [...], "val": [...]}``) of that level's training cases
    among ``identifiers`` (the preprocessed cases): nnU-Net's seeded K-fold with ``K = min(n_splits, cases)``.
    Raises ``ValueError`` naming every level with fewer than ``min_cases`` cases, and its count."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    if min_cases < 2:
        raise ValueError(f"min_cases must be at least 2 (one case to train on, one to validate), got {min_cases}")
    by_level: Dict[int, List[str]] = {i: [] for i in range(spec.num_levels)}
    for case in sorted(identifiers):
        index = spec.level_index(spec.cases.get(case)) if case in spec.cases else None
        if index is not None:
            by_level[index].append(case)
    few = [f"level {spec.levels[i]!r} has {len(c)} ({', '.join(c) or 'none'})" for i, c in by_level.items()
           if len(c) < min_cases]
    if few:
        raise ValueError(_TOO_FEW.format(min_cases=min_cases, levels="; ".join(few)))
    return {i: generate_crossval_split(cases, seed=12345, n_splits=min(n_splits, len(cases)))
            for i, cases in by_level.items()}


def make_level_view(preprocessed_dataset_folder: str, level_folder: str, splits: List[dict]) -> str:
    """Write the level's view of a preprocessed dataset (links to its files plus the level's splits_final.json);
    returns the folder to use as ``nnUNet_preprocessed`` for this level."""
    dataset_name = os.path.basename(os.path.normpath(preprocessed_dataset_folder))
    root = os.path.join(preprocessed_dataset_folder, PER_LEVEL_FOLDER, level_folder)
    view = os.path.join(root, dataset_name)
    os.makedirs(view, exist_ok=True)
    for entry in sorted(os.listdir(preprocessed_dataset_folder)):
        if entry in (PER_LEVEL_FOLDER, "splits_final.json"):
            continue
        link = os.path.join(view, entry)
        target = os.path.relpath(os.path.join(preprocessed_dataset_folder, entry), view)
        if os.path.islink(link):
            if os.readlink(link) == target:
                continue
            os.remove(link)
        elif os.path.exists(link):
            raise RuntimeError(f"{link} exists and is not a link; remove it (it belongs to the per-level view)")
        os.symlink(target, link)
    with open(os.path.join(view, "splits_final.json"), "w") as f:
        json.dump(splits, f, indent=1)
    return root


def level_model_folder(dataset_name: str, level_folder: str, trainer: str, plans: str, configuration: str) -> str:
    """The level's nnU-Net model folder (``.../<trainer>__<plans>__<configuration>``, folds inside)."""
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    return os.path.join(_level_results_root(nnUNet_results.require(), dataset_name, level_folder), dataset_name,
                        convert_trainer_plans_config_to_identifier(trainer, plans, configuration))


def _level_results_root(results: str, dataset_name: str, level_folder: str) -> str:
    return os.path.join(results, dataset_name, PER_LEVEL_FOLDER, level_folder)


def _dataset(dataset: str):
    """(dataset name, preprocessed folder, AttributeSpec) of a dataset name or id."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(dataset)
    folder = os.path.join(nnUNet_preprocessed.require(), name)
    dataset_json = os.path.join(folder, "dataset.json")
    if not os.path.isfile(dataset_json):
        raise ValueError(f"{dataset_json} does not exist: run nnUNetv2_plan_and_preprocess for {name} first")
    with open(dataset_json) as f:
        spec = AttributeSpec.from_dataset_json(json.load(f), dataset_json)
    return name, folder, spec


def per_level_training_commands(dataset: str, configuration: str, fold: int, trainer: str,
                                plans: str = "nnUNetPlans", device: str = "cuda", extra_args: Sequence[str] = (),
                                min_cases: int = 2) -> List[dict]:
    """Prepare every level's view and return, per level, ``{"level", "cmd", "env", "model_folder"}``: the
    ``nnUNetv2_train`` call that trains it (nothing is run)."""
    from nnunetv2.paths import nnUNet_results

    from nnunet_dmoe.plans.loading import load_plans, plans_configuration

    if isinstance(fold, str) and not fold.isdigit():
        raise ValueError(f"fold {fold!r}: give a fold number (nnU-Net's 'all' would train on every level's cases)")
    fold = int(fold)
    name, folder, spec = _dataset(dataset)
    pm = load_plans(folder, plans, f"-p {plans}")
    data_folder = os.path.join(folder, plans_configuration(pm, configuration, folder, plans).data_identifier)
    if not os.path.isdir(data_folder):
        raise ValueError(f"{data_folder} does not exist: preprocess configuration {configuration} first")
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    identifiers = infer_dataset_class(data_folder).get_identifiers(data_folder)
    splits = level_splits(spec, identifiers, min_cases)
    for i, level_split in splits.items():
        if fold >= len(level_split):
            n = len(level_split[0]["train"]) + len(level_split[0]["val"])
            raise ValueError(_NO_FOLD.format(fold=fold, level=spec.levels[i], n=n, k=len(level_split),
                                             last=len(level_split) - 1))
    bin_dir = os.path.dirname(sys.executable)
    train = os.path.join(bin_dir, "nnUNetv2_train")
    train = train if os.path.isfile(train) else "nnUNetv2_train"
    jobs = []
    for i, level in enumerate(spec.levels):
        level_folder = level_folder_name(i, level)
        view = make_level_view(folder, level_folder, splits[i])
        results = _level_results_root(nnUNet_results.require(), name, level_folder)
        env = dict(os.environ, nnUNet_preprocessed=view, nnUNet_results=results)
        cmd = [train, name, configuration, str(fold), "-tr", trainer, "-p", plans, "-device", device,
               *extra_args]
        jobs.append({"level": level, "cmd": cmd, "env": env,
                     "model_folder": level_model_folder(name, level_folder, trainer, plans, configuration)})
    return jobs


def _run(cmd: List[str], env: Mapping[str, str]) -> None:
    if subprocess.run(cmd, env=dict(env)).returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (nnUNet_preprocessed={env['nnUNet_preprocessed']}, "
                           f"nnUNet_results={env['nnUNet_results']})")


def train_per_level(dataset: str, configuration: str, fold: int, trainer: str, plans: str = "nnUNetPlans",
                    device: str = "cuda", extra_args: Sequence[str] = (), min_cases: int = 2,
                    run: Optional[Callable[[List[str], Mapping[str, str]], None]] = None) -> Dict[str, str]:
    """Train one model per level (see the module docstring); returns level -> model folder. ``run(cmd, env)``
    runs one ``nnUNetv2_train`` call (default: a subprocess, an error if it fails)."""
    jobs = per_level_training_commands(dataset, configuration, fold, trainer, plans, device, extra_args, min_cases)
    for job in jobs:
        print(f"=== level {job['level']}: {' '.join(job['cmd'])}", flush=True)
        (run or _run)(job["cmd"], job["env"])
    return {job["level"]: job["model_folder"] for job in jobs}


# ---------------------------------------------------------------------------------------------------- predict
def _input_cases(input_folder: str, file_ending: str) -> Dict[str, List[str]]:
    """case id -> its image files (nnU-Net naming, channels in order) in ``input_folder``."""
    if not os.path.isdir(input_folder):
        raise ValueError(f"input folder {input_folder} does not exist")
    cases = cases_in_folder(input_folder, file_ending)
    if not cases:
        raise ValueError(f"{input_folder} holds no nnU-Net-named images CASE_XXXX{file_ending}")
    return {case: [cases[case][c] for c in sorted(cases[case])] for case in sorted(cases)}


def case_levels_from_channel(cases: Mapping[str, List[str]], dataset_json: dict) -> Dict[str, Optional[int]]:
    """Level index per case (``None`` = unknown) decoded from its attribute channel file."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    spec = AttributeSpec.from_dataset_json(dataset_json, "the model's dataset.json")
    suffix = channel_suffix(spec.channel, dataset_json["file_ending"])
    missing = sorted(c for c, files in cases.items() if not any(f.endswith(suffix) for f in files))
    if missing:
        raise ValueError(f"{len(missing)} case(s) have no attribute channel (CASE{suffix}): {', '.join(missing)}. "
                         f"Write it with nnUNetv2_dmoe_attach_attribute, or give the levels in a table (-t).")
    some = next(iter(cases.values()))[0]
    rw = determine_reader_writer_from_dataset_json(dataset_json, some, verbose=False)()
    out = {}
    for case, files in cases.items():
        channel, _ = rw.read_images([next(f for f in files if f.endswith(suffix))])
        out[case] = decode_attribute_channel(channel[0], spec.num_levels, case)
    return out


def predict_per_level(input_folder: str, output_folder: str, dataset: str, configuration: str, fold: int,
                      trainer: str, plans: str = "nnUNetPlans", device: str = "cuda",
                      levels: Optional[Mapping[str, Optional[str]]] = None,
                      checkpoint: str = "checkpoint_final.pth", save_probabilities: bool = False,
                      sequential: bool = False, num_processes: int = 3) -> Dict[str, str]:
    """Predict every case of ``input_folder`` (nnU-Net naming, attribute channel included) with its level's model;
    the level from ``levels`` (case -> level name) or else from the attribute channel. Returns case -> level."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(dataset)
    dataset_json = _models_dataset_json(name, trainer, plans, configuration)
    spec = AttributeSpec.from_dataset_json(dataset_json, "the per-level models' dataset.json")
    cases = _input_cases(input_folder, dataset_json["file_ending"])
    if levels is None:
        index = case_levels_from_channel(cases, dataset_json)
    else:
        absent = sorted(c for c in cases if c not in levels)
        if absent:
            raise ValueError(f"{len(absent)} case(s) of {input_folder} have no row in the table: {', '.join(absent)}")
        index = {c: spec.level_index(levels[c]) for c in cases}
    unknown = sorted(c for c, i in index.items() if i is None)
    if unknown:
        raise ValueError(f"{len(unknown)} case(s) have an unknown level: {', '.join(unknown)}. One network per level "
                         f"needs each case's level: give it in a table (-t) or write the channel with "
                         f"nnUNetv2_dmoe_attach_attribute.")
    os.makedirs(output_folder, exist_ok=True)
    for i, level in enumerate(spec.levels):
        mine = sorted(c for c, j in index.items() if j == i)
        if not mine:
            continue
        model = level_model_folder(name, level_folder_name(i, level), trainer, plans, configuration)
        if not os.path.isfile(os.path.join(model, f"fold_{fold}", checkpoint)):
            raise ValueError(f"level {level!r} ({len(mine)} case(s)) has no model {model}/fold_{fold}/{checkpoint}; "
                             f"train it with nnUNetv2_dmoe_train_per_level {name} {configuration} {fold} -tr "
                             f"{trainer} -p {plans}")
        print(f"=== level {level}: {len(mine)} case(s) with {model} (fold {fold})", flush=True)
        dev = torch.device(device)
        predictor = nnUNetPredictor(perform_everything_on_device=dev.type == "cuda", device=dev, verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(model, (fold,), checkpoint)
        inputs, outputs = [cases[c] for c in mine], [os.path.join(output_folder, c) for c in mine]
        if sequential:
            predictor.predict_from_files_sequential(inputs, outputs, save_probabilities, True)
        else:
            predictor.predict_from_files(inputs, outputs, save_probabilities, True, num_processes, num_processes)
    return {c: spec.levels[i] for c, i in index.items()}


def _models_dataset_json(dataset_name: str, trainer: str, plans: str, configuration: str) -> dict:
    """dataset.json of any of the dataset's per-level model folders of this trainer, plans and configuration."""
    import glob
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    root = _level_results_root(nnUNet_results.require(), dataset_name, "*")
    identifier = convert_trainer_plans_config_to_identifier(trainer, plans, configuration)
    found = sorted(glob.glob(os.path.join(root, dataset_name, identifier, "dataset.json")))
    if not found:
        raise ValueError(f"no per-level models {identifier} of {dataset_name} in {os.path.dirname(root)}; train them "
                         f"with nnUNetv2_dmoe_train_per_level {dataset_name} {configuration} FOLD -tr {trainer} "
                         f"-p {plans}")
    with open(found[0]) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ entry points
def run_train_per_level(dataset: str, configuration: str, fold: str, trainer: str, plans: str = "nnUNetPlans",
                        device: str = "cuda", min_cases: int = 2, flops_size: Optional[Sequence[int]] = None,
                        continue_training: bool = False, npz: bool = False, cost_only: bool = False) -> None:
    """The command: train one model per level (nnU-Net's ``--c`` / ``--npz`` passed on) unless ``cost_only``, print
    their folders, then the table of their parameters and GFLOPs next to the dMoE's."""
    from nnunet_dmoe.commands.per_level_cost import per_level_cost_table

    if not cost_only:
        extra = [f for f, on in (("--c", continue_training), ("--npz", npz)) if on]
        folders = train_per_level(dataset, configuration, fold, trainer, plans, device, extra, min_cases)
        print("\nModels:\n" + "\n".join(f"  {lv}: {f}" for lv, f in folders.items()))
    print("\n" + per_level_cost_table(dataset, configuration, plans, flops_size))


def _train_parser():
    import argparse
    parser = argparse.ArgumentParser(
        description="Train one nnU-Net per attribute level (the dMoE paper's Table 8) with nnUNetv2_train, each on "
                    "its level's cases, then print their total parameters and GFLOPs next to the dMoE's.")
    parser.add_argument("dataset_name_or_id", help="[REQUIRED] dataset name or id")
    parser.add_argument("configuration", help="[REQUIRED] configuration, e.g. 2d or 3d_fullres")
    parser.add_argument("fold", help="[REQUIRED] fold of each level's own split (0..min(5, cases)-1)")
    parser.add_argument("-tr", default="nnUNetTrainerNoAttribute",
                        help="[OPTIONAL] trainer of every level's model (any nnU-Net trainer). "
                             "Default: nnUNetTrainerNoAttribute")
    parser.add_argument("-p", default="nnUNetPlans", help="[OPTIONAL] plans identifier. Default: nnUNetPlans")
    parser.add_argument("-device", default="cuda", help="[OPTIONAL] cuda, cpu or mps. Default: cuda")
    parser.add_argument("-min_cases", type=int, default=2,
                        help="[OPTIONAL] fewest training cases a level may have. Default: 2")
    parser.add_argument("-flops_size", type=int, nargs="+", default=None,
                        help="[OPTIONAL] input size for the GFLOPs. Default: 384 384 128 (3D), 224 224 (2D)")
    parser.add_argument("--c", action="store_true", help="[OPTIONAL] continue each level's training (nnU-Net's --c)")
    parser.add_argument("--npz", action="store_true", help="[OPTIONAL] nnU-Net's --npz for each level")
    parser.add_argument("--cost_only", action="store_true",
                        help="[OPTIONAL] print the parameter/GFLOPs table without training")
    return parser


@command("nnUNetv2_dmoe_train_per_level")
def train_per_level_entry_point():
    args = _train_parser().parse_args()
    run_train_per_level(args.dataset_name_or_id, args.configuration, args.fold, args.tr, args.p, args.device,
                        args.min_cases, args.flops_size, args.c, args.npz, args.cost_only)


def run_predict_per_level(input_folder: str, output_folder: str, dataset: str, configuration: str, fold: int,
                          trainer: str, plans: str = "nnUNetPlans", checkpoint: str = "checkpoint_final.pth",
                          device: str = "cuda", table: Optional[str] = None, id_column: Optional[str] = None,
                          attribute_column: Optional[str] = None, num_processes: int = 3, sequential: bool = False,
                          save_probabilities: bool = False) -> Dict[str, str]:
    """The command: :func:`predict_per_level`, the levels from the attribute ``table`` (columns ``id_column``,
    ``attribute_column``) when given, else from the attribute channel; prints how many cases of each level."""
    levels = None
    if table:
        from nnunet_dmoe.data.tables import read_attribute_table
        levels = read_attribute_table(table, id_column, attribute_column)
    chosen = predict_per_level(input_folder, output_folder, dataset, configuration, fold, trainer, plans, device,
                               levels, checkpoint, save_probabilities, sequential, num_processes)
    counts = {lv: sum(1 for v in chosen.values() if v == lv) for lv in dict.fromkeys(chosen.values())}
    print("Predicted " + ", ".join(f"{n} case(s) of {lv}" for lv, n in counts.items()) + f" into {output_folder}")
    return chosen


def _predict_parser():
    from nnunet_dmoe.cli import Parser
    parser = Parser(
        description="Predict each case with the model of its attribute level (trained by "
                    "nnUNetv2_dmoe_train_per_level); the level from the case's attribute channel or a table.")
    parser.add_argument("-i", required=True, help="[REQUIRED] input folder (nnU-Net naming, attribute channel "
                                                  "included unless -t is given)")
    parser.add_argument("-o", required=True, help="[REQUIRED] output folder")
    parser.add_argument("-d", required=True, help="[REQUIRED] dataset name or id")
    parser.add_argument("-c", required=True, help="[REQUIRED] configuration")
    parser.add_argument("-f", type=int, default=0, help="[OPTIONAL] fold. Default: 0")
    parser.add_argument("-tr", default="nnUNetTrainerNoAttribute",
                        help="[OPTIONAL] trainer of the per-level models. Default: nnUNetTrainerNoAttribute")
    parser.add_argument("-p", default="nnUNetPlans", help="[OPTIONAL] plans identifier. Default: nnUNetPlans")
    parser.add_argument("-chk", default="checkpoint_final.pth",
                        help="[OPTIONAL] checkpoint name. Default: checkpoint_final.pth")
    parser.add_argument("-device", default="cuda", help="[OPTIONAL] cuda, cpu or mps. Default: cuda")
    parser.add_argument("-t", default=None, help="[OPTIONAL] attribute table (CSV, TSV, JSON) instead of the channel")
    parser.add_renamed("-id_column", "--id-column", default=None,
                       help="[OPTIONAL] case id column of -t. Default: 'case'")
    parser.add_renamed("-attribute_column", "--attribute-column", default=None,
                       help="[OPTIONAL] level column of -t. Default: 'value'")
    parser.add_argument("-npp", type=int, default=3, help="[OPTIONAL] processes for preprocessing and export. "
                                                          "Default: 3")
    parser.add_argument("--sequential", action="store_true",
                        help="[OPTIONAL] predict in this process, no worker processes (quicker for a few cases)")
    parser.add_argument("--save_probabilities", action="store_true", help="[OPTIONAL] also write .npz probabilities")
    return parser


@command("nnUNetv2_dmoe_predict_per_level")
def predict_per_level_entry_point():
    args = _predict_parser().parse_args()
    run_predict_per_level(args.i, args.o, args.d, args.c, args.f, args.tr, args.p, args.chk, args.device, args.t,
                          args.id_column, args.attribute_column, args.npp, args.sequential, args.save_probabilities)
