"""HD95 and NSD checked against an independent implementation, MONAI's, on real 3D label pairs (PI-CAI whole-gland
segmentations by two methods, anisotropic MRI spacings) and on 2D shapes."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai import metrics as monai_metrics  # a test dependency (pyproject's "test" extra)

from conftest import real_data
from nnunet_dmoe.evaluation._metrics import metric_per_case

PICAI = real_data("picai_wholegland")
CASES = ["10000_1000000", "10001_1000001", "10002_1000002", "10003_1000003", "10004_1000004", "10005_1000005"]


def _monai(ref, pred, spacing, tolerance):
    y, y_pred = (torch.from_numpy(m[None, None].astype(np.float32)) for m in (ref, pred))
    hd95 = monai_metrics.compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                                    spacing=list(spacing)).item()
    nsd = monai_metrics.compute_surface_dice(y_pred, y, class_thresholds=[tolerance], include_background=True,
                                             spacing=list(spacing)).item()
    return hd95, nsd


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tolerance", [1.0, 2.5])
def test_hd95_and_nsd_agree_with_monai_on_picai(case, tolerance):
    ref_img = sitk.ReadImage(f"{PICAI}/reference/{case}.nii.gz")
    pred_img = sitk.ReadImage(f"{PICAI}/automatic/{case}.nii.gz")
    ref, pred = (sitk.GetArrayFromImage(i) > 0 for i in (ref_img, pred_img))
    spacing = ref_img.GetSpacing()[::-1]  # numpy (z, y, x) order
    assert len(set(spacing)) > 1 and ref.any() and pred.any()  # anisotropic, both non-empty
    ours = metric_per_case(ref, pred, spacing, nsd_tolerance=tolerance)
    hd95, nsd = _monai(ref, pred, spacing, tolerance)
    assert ours["HD95"] == pytest.approx(hd95, rel=1e-5, abs=1e-5)
    assert ours["NSD"] == pytest.approx(nsd, rel=1e-6, abs=1e-6)


def test_hd95_and_nsd_agree_with_monai_on_shifted_discs():
    yy, xx = np.mgrid[:64, :64]
    ref = (yy - 30) ** 2 + (xx - 30) ** 2 < 15 ** 2
    for shift, spacing in ((0, (1.0, 1.0)), (2, (0.7, 1.3)), (5, (1.0, 0.5))):
        pred = (yy - 30 - shift) ** 2 + (xx - 31) ** 2 < 13 ** 2
        ours = metric_per_case(ref, pred, spacing, nsd_tolerance=1.5)
        hd95, nsd = _monai(ref, pred, spacing, 1.5)
        assert ours["HD95"] == pytest.approx(hd95, rel=1e-5), shift
        assert ours["NSD"] == pytest.approx(nsd, rel=1e-6), shift
