"""Predict new patients with their attribute, without writing anything next to their images.

``nnUNetv2_dmoe_predict`` takes every flag of ``nnUNetv2_predict`` and, in addition, the attribute: one level for
every case (``-attribute T2``; with several attributes one level per attribute, in the model's order) or a table
with a row per case (``-t TABLE -id_column COL -attribute_column COL``). It writes the attribute channel(s) into a
temporary folder that also links the images, runs nnU-Net's own ``nnUNetv2_predict`` on that folder, and deletes it.

The Python form, for an ``nnUNetPredictor`` that the caller holds (initialised from a model folder)::

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunet_dmoe.inference.predict import predict_with_attribute

    predictor = nnUNetPredictor(device=torch.device("cuda"))
    predictor.initialize_from_trained_model_folder(model_folder, use_folds=(0,))
    predict_with_attribute(predictor, "new_patients/", "predictions/", levels=["T2"])
    predict_with_attribute(predictor, "new_patients/", "predictions/", table={"case_001": "T3", "case_002": None})

It hands nnU-Net's ``predict_from_files`` the images and the temporary channel files as lists; other keyword
arguments go to ``predict_from_files``.
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence

from nnunet_dmoe.data.attach import attach_attribute
from nnunet_dmoe.data.attribute import (UNKNOWN_LEVEL, AttributeSpec, attribute_specs_from_dataset_json, cases_in_folder,
                                        channel_file, fmt_cases)
from nnunet_dmoe.errors import command

__all__ = ["case_levels", "predict_with_attribute", "run_predict", "predict_entry_point"]

UNKNOWN = UNKNOWN_LEVEL
_SHADOWED = ("-device", "-chk", "-prev_stage_predictions", "-part_id")


def has_unknown_router(trainer_name: str) -> bool:
    """Whether the trainer's model routes an unknown attribute (every trainer but the paper's setting,
    ``nnUNetTrainerDMoE_noUnknown`` and its subclasses; a trainer outside the plugin is assumed to)."""
    import nnunet_dmoe.trainers as trainers

    cls = getattr(trainers, trainer_name, None)
    return getattr(cls, "unknown_router", True)  # the trainer's declaration (nnUNetTrainerAttributeBase)


def case_levels(specs: Sequence[AttributeSpec], cases: Sequence[str], levels: Optional[Sequence[str]] = None,
                tables: Optional[Sequence[Mapping[str, Optional[str]]]] = None, allow_unknown: bool = False,
                unknown_router: bool = True, trainer: str = "the model") -> List[Dict[str, Optional[str]]]:
    """Each attribute's ``case -> level`` for ``cases``: from ``levels`` (one per attribute, for every case;
    ``"unknown"`` for an unknown one) or from ``tables`` (one per attribute). Errors name the case and the fix."""
    names = ", ".join(f"{s.name} {s.levels}" for s in specs)
    if (levels is None) == (tables is None):
        raise ValueError("give the attribute either as -attribute LEVEL (every case) or as a table (-t), not both")
    if levels is not None:
        if len(levels) != len(specs):
            raise ValueError(f"-attribute: the model has {len(specs)} attribute(s) ({names}); give one level per "
                             f"attribute, in this order, got {list(levels)}")
        out = []
        for spec, level in zip(specs, levels):
            if level.casefold() != UNKNOWN and level not in spec.levels:
                raise ValueError(f"-attribute {level}: the model does not know this level of {spec.name!r}. Its "
                                 f"levels: {', '.join(spec.levels)} (or unknown).")
            out.append({c: None if level.casefold() == UNKNOWN else level for c in cases})
    else:
        if len(tables) != len(specs):
            raise ValueError(f"the model has {len(specs)} attribute(s) ({names}); give one -attribute_column per "
                             f"attribute, in this order")
        out = []
        for spec, table in zip(specs, tables):
            missing = sorted(c for c in cases if c not in table)
            if missing and not allow_unknown:
                raise ValueError(f"{len(missing)} case(s) have no row for {spec.name!r} in the table: "
                                 f"{fmt_cases(missing, limit=len(missing))}. Add them, or pass --allow_unknown to "
                                 f"predict them with an unknown attribute.")
            out.append({c: table.get(c) for c in cases})
    unknown = sorted({c for table in out for c, v in table.items() if v is None})
    if unknown and not unknown_router:
        raise ValueError(f"{trainer} has no router for an unknown attribute (the paper's setting), but these cases "
                         f"have none: {fmt_cases(unknown)}. Give their levels, or predict with a model trained with "
                         f"nnUNetTrainerDMoE, which routes unknown attributes.")
    return out


def _attribute_folder(input_folder: str, dataset_json: dict, per_attribute, folder: str, images: str) -> None:
    several = len(per_attribute) > 1
    attach_attribute(input_folder, per_attribute if several else per_attribute[0], dataset_json, folder,
                     verbose=False, images=images)


def predict_with_attribute(predictor, input_folder: str, output_folder: str, levels: Optional[Sequence[str]] = None,
                           table=None, allow_unknown: bool = False, **predict_kwargs):
    """Predict every case of ``input_folder`` (the model's image channels, nnU-Net naming) with ``predictor`` (an
    initialised ``nnUNetPredictor``), the attribute from ``levels`` (one per attribute, for every case) or
    ``table`` (``case -> level``, or a list of them for several attributes). The attribute channels live in a
    temporary folder only."""
    specs = attribute_specs_from_dataset_json(predictor.dataset_json, where="the model's dataset.json")
    ending = predictor.dataset_json["file_ending"]
    cases = cases_in_folder(input_folder, ending)
    if not cases:
        raise ValueError(f"{input_folder} holds no nnU-Net-named images CASE_XXXX{ending}")
    tables = None if table is None else (list(table) if isinstance(table, (list, tuple)) else [table])
    per_attribute = case_levels(specs, sorted(cases), levels, tables, allow_unknown,
                                has_unknown_router(predictor.trainer_name), predictor.trainer_name)
    channels = {s.channel for s in specs}
    with tempfile.TemporaryDirectory(prefix="nnunet_dmoe_predict_") as tmp:
        _attribute_folder(input_folder, predictor.dataset_json, per_attribute, tmp, images="none")
        num_channels = len(predictor.dataset_json["channel_names"])
        list_of_lists = [[os.path.join(tmp, channel_file(c, i, ending)) if i in channels else files[i]
                          for i in range(num_channels)] for c, files in sorted(cases.items())]
        os.makedirs(output_folder, exist_ok=True)
        return predictor.predict_from_files(list_of_lists, [os.path.join(output_folder, c) for c in sorted(cases)],
                                            **predict_kwargs)


def _model_folder(dataset: str, trainer: str, plans: str, configuration: str) -> str:
    """The trained model's folder in $nnUNet_results (an error naming the flags and the fix when there is none)."""
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    if nnUNet_results is None:
        raise ValueError("$nnUNet_results is not set. Set it to the folder that holds your trained models.")
    try:
        model = get_output_folder(dataset, trainer, plans, configuration)
    except RuntimeError:
        raise ValueError(f"-d {dataset}: no such dataset (nnU-Net looks in $nnUNet_raw, $nnUNet_preprocessed and "
                         f"$nnUNet_results)") from None
    if not os.path.isfile(os.path.join(model, "dataset.json")):
        raise ValueError(f"no trained model in {model} (-d {dataset} -tr {trainer} -p {plans} -c {configuration}). "
                         f"Train it first, or check these flags and $nnUNet_results.")
    return model


def _read_tables(table: str, id_column: Optional[str], attribute_columns: Optional[Sequence[str]],
                 specs: Sequence[AttributeSpec], ending: str) -> List[Dict[str, Optional[str]]]:
    """One ``case -> level`` table per attribute of the model, read from the columns of ``table``."""
    from nnunet_dmoe.data.tables import read_attribute_table

    columns = attribute_columns or [s.name for s in specs]
    if len(columns) != len(specs):
        raise ValueError(f"the model has {len(specs)} attribute(s) ({', '.join(s.name for s in specs)}); "
                         f"-attribute_column names {len(columns)}. Give one column per attribute, in this order.")
    return [read_attribute_table(table, id_column, c, strip_suffix=ending) for c in columns]


def run_predict(input_folder: str, output_folder: str, dataset: str, configuration: str,
                trainer: str = "nnUNetTrainerDMoE", plans: str = "nnUNetPlans", levels: Optional[Sequence[str]] = None,
                table: Optional[str] = None, id_column: Optional[str] = None,
                attribute_columns: Optional[Sequence[str]] = None, allow_unknown: bool = False,
                nnunet_args: Sequence[str] = ()) -> None:
    """The command: ``nnUNetv2_predict`` (with ``nnunet_args``, its other flags) of the model (dataset, trainer,
    plans, configuration) over ``input_folder``, the attribute from ``levels`` (every case) or ``table``, written
    with the images' links into a temporary folder."""
    from nnunet_dmoe.data.attach import load_model_dataset_json

    if (levels is None) == (table is None):
        raise ValueError("give the attribute: -attribute LEVEL for every case, or -t TABLE with a row per case")
    model = _model_folder(dataset, trainer, plans, configuration)
    dataset_json = load_model_dataset_json(model)
    specs = attribute_specs_from_dataset_json(dataset_json, where=os.path.join(model, "dataset.json"))
    ending = dataset_json["file_ending"]
    if not os.path.isdir(input_folder):
        raise ValueError(f"-i {input_folder} does not exist")
    cases = sorted(cases_in_folder(input_folder, ending))
    tables = None if table is None else _read_tables(table, id_column, attribute_columns, specs, ending)
    per_attribute = case_levels(specs, cases, levels, tables, allow_unknown, has_unknown_router(trainer), trainer)
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point as nnunet_predict

    with tempfile.TemporaryDirectory(prefix="nnunet_dmoe_predict_") as tmp:
        _attribute_folder(input_folder, dataset_json, per_attribute, tmp, images="link")
        argv = sys.argv
        sys.argv = [argv[0], "-i", tmp, "-o", output_folder, "-d", dataset, "-c", configuration, "-tr", trainer,
                    "-p", plans] + list(nnunet_args)
        try:
            nnunet_predict()
        finally:
            sys.argv = argv


def _parser():
    import argparse

    p = argparse.ArgumentParser(
        description="nnUNetv2_predict with the patients' attribute: the attribute channel is made in a temporary "
                    "folder, never next to the images.",
        epilog="Every other flag of nnUNetv2_predict (-f, -chk, -step_size, -device, -npp, -nps, --save_probabilities, "
               "...) is passed on to it unchanged: see nnUNetv2_predict -h.", allow_abbrev=False)
    p.add_argument("-i", required=True, help="[REQUIRED] folder with the cases' image channels (nnU-Net naming)")
    p.add_argument("-o", required=True, help="[REQUIRED] output folder")
    p.add_argument("-d", required=True, help="[REQUIRED] dataset name or id of the model")
    p.add_argument("-c", required=True, help="[REQUIRED] configuration of the model")
    p.add_argument("-tr", default="nnUNetTrainerDMoE", help="[OPTIONAL] trainer. Default: nnUNetTrainerDMoE")
    p.add_argument("-p", default="nnUNetPlans", help="[OPTIONAL] plans identifier. Default: nnUNetPlans")
    p.add_argument("-attribute", nargs="+", default=None,
                   help="[OPTIONAL] the level of every case (one per attribute, in the model's order; 'unknown' for "
                        "none). Either this or -t")
    p.add_argument("-t", default=None, help="[OPTIONAL] table (CSV, TSV, JSON) with a row per case. Either this or "
                                            "-attribute")
    p.add_argument("-id_column", default=None, help="[OPTIONAL] the table's case-id column. Default: 'case'")
    p.add_argument("-attribute_column", nargs="+", default=None,
                   help="[OPTIONAL] the table's attribute column(s), one per attribute of the model in its order. "
                        "Default: the attributes' names")
    p.add_argument("--allow_unknown", "-allow_unknown", action="store_true",
                   help="[OPTIONAL] predict cases without a row in the table with an unknown attribute (needs a "
                        "model with an 'unknown' router)")
    # nnUNetv2_predict's valued flags that begin like one of ours (-device like -d, -chk like -c, ...): declared, so
    # that argparse does not read "-device cpu" as "-d evice"; passed on as given
    for flag in _SHADOWED:
        p.add_argument(flag, default=None, help=argparse.SUPPRESS)
    return p


@command("nnUNetv2_dmoe_predict")
def predict_entry_point():
    a, passed_on = _parser().parse_known_args()
    for flag in _SHADOWED:
        value = getattr(a, flag.lstrip("-"))
        passed_on += [flag, value] if value is not None else []
    run_predict(a.i, a.o, a.d, a.c, a.tr, a.p, a.attribute, a.t, a.id_column, a.attribute_column, a.allow_unknown,
                passed_on)
