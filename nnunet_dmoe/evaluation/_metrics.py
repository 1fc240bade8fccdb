"""Per-case segmentation metrics: Dice, IoU, HD95 and NSD of one label or region, on the reference's spacing.

Conventions (documentation/reference/fairness-metrics.md gives every formula):

======================================  ======  =====  ======  =====
case                                    Dice    IoU    HD95    NSD
======================================  ======  =====  ======  =====
both masks empty                        1       1      0       1
one mask empty, the other not           0       0      NaN     0
======================================  ======  =====  ======  =====

Unlike nnU-Net's ``evaluate_predictions`` (Dice NaN when both masks are empty), an empty prediction of an absent
structure counts as correct, so that a group's mean is not taken over a different set of cases per metric. HD95 of a
single empty mask has no finite value; it is NaN and means use ``nanmean``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

LabelOrRegion = Union[int, Tuple[int, ...]]

METRICS = ("Dice", "IoU", "HD95", "NSD")
HIGHER_IS_BETTER = {"Dice": True, "IoU": True, "HD95": False, "NSD": True}
DEFAULT_NSD_TOLERANCE_MM = 1.0

_BAD_LABEL = ("-l: {value!r} is not a label or a region. Give integer labels (-l 1 2) or regions as comma-separated "
              "labels without spaces (-l 1,2 for the union of labels 1 and 2).")
_BAD_TOLERANCE = "-nsd_tolerance must be a positive number of millimetres, got {value!r}"
_BAD_SPACING_LEN = "spacing {spacing} has {n} values but the masks have {ndim} axes"


def parse_label_or_region(text: Union[str, int, Sequence[int]]) -> LabelOrRegion:
    """``"2"`` -> ``2``; ``"1,2"`` -> ``(1, 2)`` (the union of labels 1 and 2). Integers and tuples pass through.

    >>> parse_label_or_region("1,2")
    (1, 2)
    >>> parse_label_or_region(3)
    3
    """
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        return int(text)
    if isinstance(text, (tuple, list)):
        parts = [parse_label_or_region(t) for t in text]
        if any(isinstance(p, tuple) for p in parts) or not parts:
            raise ValueError(_BAD_LABEL.format(value=text))
        return tuple(parts) if len(parts) > 1 else parts[0]
    try:
        parts = [int(p) for p in str(text).split(",")]
    except ValueError:
        raise ValueError(_BAD_LABEL.format(value=text)) from None
    return tuple(parts) if len(parts) > 1 else parts[0]


def label_name(label_or_region: LabelOrRegion) -> str:
    """Name of a label or region in outputs: ``2`` -> ``"2"``, ``(1, 2)`` -> ``"1,2"``, as typed after ``-l``."""
    if isinstance(label_or_region, tuple):
        return ",".join(str(i) for i in label_or_region)
    return str(label_or_region)


def region_or_label_to_mask(segmentation: np.ndarray, region_or_label: LabelOrRegion) -> np.ndarray:
    """Boolean mask of a label, or of the union of a region's labels (nnU-Net's function of the same name; not
    imported from ``nnunetv2.evaluation``, whose import pulls in torch and costs seconds per worker)."""
    if isinstance(region_or_label, tuple):
        return np.isin(segmentation, region_or_label)
    return segmentation == region_or_label


def _surface(mask: np.ndarray) -> np.ndarray:
    """Border voxels of ``mask``: foreground voxels with a face-neighbour in the background (outside counts as
    background)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _crop_to_union(mask_ref: np.ndarray, mask_pred: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of their union plus one background voxel on each side.

    Every surface voxel of either mask lies in that box, so distances between the surfaces are unchanged, and the
    distance transforms run on the box instead of the whole image.
    """
    union = mask_ref | mask_pred
    box = []
    for axis in range(union.ndim):
        hit = np.flatnonzero(np.any(union, axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(hit[0], hit[-1] + 1))
    box = tuple(box)
    return (np.pad(mask_ref[box], 1, constant_values=False), np.pad(mask_pred[box], 1, constant_values=False))


def surface_distances(mask_ref: np.ndarray, mask_pred: np.ndarray,
                      spacing: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each reference surface voxel to the prediction surface, and the other way round.

    Both masks must be non-empty. Uses ``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing`` on the
    bounding box of the union.
    """
    ref, pred = _crop_to_union(mask_ref, mask_pred)
    surf_ref, surf_pred = _surface(ref), _surface(pred)
    dist_to_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing)
    dist_to_ref = ndimage.distance_transform_edt(~surf_ref, sampling=spacing)
    return dist_to_pred[surf_ref], dist_to_ref[surf_pred]


def _squeeze(mask_ref: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float]):
    """Drops axes of length 1 (a 2D image read by nnU-Net is (1, x, y) with a dummy spacing of 999), so that the
    surface of a 2D mask is its in-plane border."""
    keep = [a for a, s in enumerate(mask_ref.shape) if s > 1] or [0]
    shape = tuple(mask_ref.shape[a] for a in keep)
    return mask_ref.reshape(shape), mask_pred.reshape(shape), [float(spacing[a]) for a in keep]


def metric_per_case(mask_ref: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float],
                    nsd_tolerance: float = DEFAULT_NSD_TOLERANCE_MM) -> Dict[str, float]:
    """Dice, IoU, HD95 (mm) and NSD (at ``nsd_tolerance`` mm) of two boolean masks on a grid of ``spacing``.

    Returns also ``n_ref`` and ``n_pred`` (voxel counts, as nnU-Net's summary).

    >>> ref = np.zeros((1, 6, 6), bool); ref[0, 1:4, 1:4] = True
    >>> pred = np.zeros_like(ref); pred[0, 1:4, 2:5] = True
    >>> m = metric_per_case(ref, pred, spacing=(999, 1.0, 1.0))
    >>> round(m["Dice"], 4), m["IoU"], m["HD95"], round(m["NSD"], 4)
    (0.6667, 0.5, 1.0, 1.0)
    >>> metric_per_case(np.zeros((4, 4), bool), np.zeros((4, 4), bool), (1, 1))["HD95"]
    0.0
    """
    mask_ref, mask_pred = np.asarray(mask_ref, dtype=bool), np.asarray(mask_pred, dtype=bool)
    assert mask_ref.shape == mask_pred.shape, (mask_ref.shape, mask_pred.shape)
    if len(spacing) != mask_ref.ndim:
        raise ValueError(_BAD_SPACING_LEN.format(spacing=list(spacing), n=len(spacing), ndim=mask_ref.ndim))
    if not nsd_tolerance > 0:
        raise ValueError(_BAD_TOLERANCE.format(value=nsd_tolerance))
    n_ref, n_pred = int(np.count_nonzero(mask_ref)), int(np.count_nonzero(mask_pred))
    out = {"n_ref": n_ref, "n_pred": n_pred}
    if n_ref == 0 and n_pred == 0:
        out.update(Dice=1.0, IoU=1.0, HD95=0.0, NSD=1.0)
        return out
    if n_ref == 0 or n_pred == 0:
        out.update(Dice=0.0, IoU=0.0, HD95=float("nan"), NSD=0.0)
        return out
    tp = int(np.count_nonzero(mask_ref & mask_pred))
    out["Dice"] = 2.0 * tp / (n_ref + n_pred)
    out["IoU"] = tp / (n_ref + n_pred - tp)
    d_ref, d_pred = surface_distances(*_squeeze(mask_ref, mask_pred, spacing))
    out["HD95"] = float(max(np.percentile(d_ref, 95), np.percentile(d_pred, 95)))
    out["NSD"] = float((np.count_nonzero(d_ref <= nsd_tolerance) + np.count_nonzero(d_pred <= nsd_tolerance))
                       / (d_ref.size + d_pred.size))
    return out


def metrics_for_labels(seg_ref: np.ndarray, seg_pred: np.ndarray, spacing: Sequence[float],
                       labels_or_regions: Sequence[LabelOrRegion],
                       nsd_tolerance: float = DEFAULT_NSD_TOLERANCE_MM) -> Dict[str, Dict[str, float]]:
    """:func:`metric_per_case` for every label or region of two label maps: ``{label_name: {metric: value}}``."""
    results = {}
    for r in labels_or_regions:
        results[label_name(r)] = metric_per_case(region_or_label_to_mask(seg_ref, r),
                                                 region_or_label_to_mask(seg_pred, r), spacing, nsd_tolerance)
    return results


__all__: List[str] = ["METRICS", "HIGHER_IS_BETTER", "DEFAULT_NSD_TOLERANCE_MM", "metric_per_case",
                      "metrics_for_labels", "surface_distances", "parse_label_or_region", "label_name"]
