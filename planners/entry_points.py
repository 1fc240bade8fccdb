"""``nnUNetv2_dmoe_plan_and_preprocess``: checks the attribute set-up of a raw dataset first, then runs nnU-Net's
fingerprinting, planning (with a dMoE-aware planner) and preprocessing through nnU-Net's own API."""
import os
from typing import List, Optional, Sequence

from nnunet_dmoe.attribute import AttributeSpec, attribute_specs_from_dataset_json


def check_raw_dataset(dataset_id: int) -> List[AttributeSpec]:
    """Validate the attribute block(s) and that every training case has each attribute's channel file; returns
    the attributes (one, or several for dataset.json's ``"attributes"``)."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    folder = join(nnUNet_raw.require(), convert_id_to_dataset_name(dataset_id))
    dataset_json = load_json(join(folder, "dataset.json"))
    specs = attribute_specs_from_dataset_json(dataset_json, where=join(folder, "dataset.json"))
    dataset = get_filenames_of_train_images_and_targets(folder, dataset_json)
    problems = []
    for spec in specs:
        suffix = f"_{spec.channel:04d}{dataset_json['file_ending']}"
        cases, what = (("attribute.cases", "attribute") if len(specs) == 1 else
                       (f"the cases of attribute '{spec.name}'", spec.name))
        problems += [f"  {case}: missing from {cases}" for case in dataset if case not in spec.cases]
        problems += [f"  {case}: no {what}-channel file {case}{suffix}" for case, entry in dataset.items()
                     if not any(os.path.basename(f) == case + suffix for f in entry["images"])]
    if problems:
        raise ValueError(f"{join(folder, 'dataset.json')}: {len(problems)} problem(s) with the attribute:\n"
                         + "\n".join(problems) + "\nWrite the channel with nnUNetv2_dmoe_attach_attribute and list "
                         + ("every training case in attribute.cases." if len(specs) == 1 else
                            "every training case in the cases of every attribute."))
    return specs


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
    for d in dataset_ids:
        check_raw_dataset(d)
    identifiers = []
    for d in dataset_ids:
        extract_fingerprint_dataset(d, num_processes=max(num_processes or [2]),
                                    check_dataset_integrity=verify_dataset_integrity)
        _, plans_identifier = plan_experiment_dataset(d, PLANNERS[planner], gpu_memory_target_in_gb)
        identifiers.append(plans_identifier)
        if not no_preprocessing:
            preprocess_dataset(d, plans_identifier, list(configurations), num_processes or [2] * len(configurations))
    return identifiers


def plan_and_preprocess_entry_point():
    import argparse
    parser = argparse.ArgumentParser(description="nnU-Net's plan and preprocess with a dMoE-aware planner. Checks the "
                                                 "attribute block and channel of the raw dataset first.")
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
    ids = plan_and_preprocess(args.d, args.pl, args.c, args.np, args.gpu_memory_target,
                              args.verify_dataset_integrity, args.no_pp)
    for d, p in zip(args.d, ids):
        print(f"Dataset {d}: plans '{p}'. Train with: nnUNetv2_train {d} 3d_fullres 0 -tr nnUNetTrainerDMoE -p {p}")
