"""Fairness evaluation: per-case Dice/IoU/HD95/NSD, per-group means, equity-scaled metrics, worst group and
bootstrap CIs, written as a paper-style report (``nnUNetv2_dmoe_evaluate``).

Formulas and conventions: documentation/reference/fairness-metrics.md.
"""
from nnunet_dmoe.evaluation._api import compare_methods, evaluate_folders, score_folder, summarise
from nnunet_dmoe.evaluation._cases import (COMBINATION_SEPARATOR, UNKNOWN_GROUP, CaseAttributes, attribute_list,
                                           attributes_from_dataset_json, attributes_from_table, combination_groups,
                                           match_cases)
from nnunet_dmoe.evaluation._entry_point import evaluate_entry_point
from nnunet_dmoe.evaluation._fairness import (DEFAULT_CI_QUANTILES, FairnessFrame, equity_scaled, resample_counts,
                                              resample_seeds, weighted_means, worst_of)
from nnunet_dmoe.evaluation._metrics import (DEFAULT_NSD_TOLERANCE_MM, HIGHER_IS_BETTER, METRICS, label_name,
                                             metric_per_case, metrics_for_labels, parse_label_or_region,
                                             surface_distances)

__all__ = [
    "evaluate_folders", "compare_methods", "score_folder", "summarise", "evaluate_entry_point",
    "CaseAttributes", "UNKNOWN_GROUP", "attributes_from_dataset_json", "attributes_from_table", "match_cases",
    "COMBINATION_SEPARATOR", "attribute_list", "combination_groups",
    "FairnessFrame", "DEFAULT_CI_QUANTILES", "equity_scaled", "resample_counts", "resample_seeds", "weighted_means",
    "worst_of",
    "METRICS", "HIGHER_IS_BETTER", "DEFAULT_NSD_TOLERANCE_MM", "metric_per_case", "metrics_for_labels",
    "surface_distances", "parse_label_or_region", "label_name",
]
