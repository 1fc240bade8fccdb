"""A synthetic fairness dataset (2D or 3D) whose segmentation target depends on the attribute.

Generative model, per case (all random draws from one seeded generator):

* attribute level ``a`` drawn with imbalanced frequencies (default: T-stages T1-T4 at 4/31/59/6 %, the paper's
  radiotherapy proportions); every level gets at least one training and one test case;
* a body: an ellipsoid (ellipse in 2D) of random size and position, intensity ``0.35 + 0.05 a`` (a mild
  level-dependent appearance shift) plus Gaussian noise, exactly 0 outside (the image footprint);
* a visible tumour (GTV): a ball of random radius inside the body, intensity ``0.85 - 0.06 a`` (lower contrast for
  later stages);
* the label is the clinical target (CTV): the GTV grown by a margin of ``margin[a]`` voxels (default 0/1/2/3 for
  T1-T4). The margin is invisible in the image, as a CTV's margin is in a CT: a model can only get it right if it
  knows the level (or guesses it from the weak appearance shift).

Written as an nnU-Net raw dataset: image ``_0000`` + attribute channel ``_0001`` (``noNorm``), labels 0/1,
``imagesTs``/``labelsTs``, and the ``attribute`` block (``cases`` for training, ``test_cases`` for the test split).
3D as NIfTI (1 mm isotropic), 2D as PNG.

A second attribute, the treating centre (``centres``: e.g. ``("A", "B")``), makes a dataset with two
distribution axes (dataset.json's ``"attributes"``, channels ``_0001`` T-stage and ``_0002`` centre). Each centre
has its contouring convention, an extra CTV margin ``centre_margins[c]`` on top of the stage's (invisible in the
image, like the stage's), and its scanner, an intensity shift ``centre_shifts[c]`` of the body. Centres are drawn
independently of the stage with ``centre_proportions``, after the stages (the single-attribute data stay the same).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from nnunet_dmoe.data.attribute import channel_file, encode_attribute_channel
from nnunet_dmoe.errors import command

__all__ = ["make_synthetic_dataset", "allocate_levels", "DEFAULT_LEVELS", "DEFAULT_PROPORTIONS", "DEFAULT_MARGINS",
           "DEFAULT_CENTRES", "DEFAULT_CENTRE_PROPORTIONS", "DEFAULT_CENTRE_MARGINS", "DEFAULT_CENTRE_SHIFTS"]

DEFAULT_LEVELS = ("T1", "T2", "T3", "T4")
DEFAULT_PROPORTIONS = (0.04, 0.31, 0.59, 0.06)
DEFAULT_MARGINS = (0, 1, 2, 3)
# smallest image axis: below it the smallest targets (radius 8 % of the image) can miss every voxel
MIN_SIZE = 16
# the second attribute (opt-in): a frequent centre A and a rare centre B that contours 2 voxels more generously on
# a brighter scanner
DEFAULT_CENTRES = ("A", "B")
DEFAULT_CENTRE_PROPORTIONS = (0.75, 0.25)
DEFAULT_CENTRE_MARGINS = (0, 2)
DEFAULT_CENTRE_SHIFTS = (0.0, 0.1)


def allocate_levels(n: int, proportions: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """``n`` level indices with frequencies close to ``proportions`` and every level at least once, shuffled."""
    p = np.asarray(proportions, dtype=float)
    if n < len(p):
        raise ValueError(f"need at least {len(p)} cases to give each of the {len(p)} levels one, got {n}")
    counts = np.maximum(1, np.floor(p / p.sum() * n).astype(int))
    while counts.sum() < n:
        counts[np.argmax(p / p.sum() * n - counts)] += 1
    while counts.sum() > n:
        counts[np.argmax(np.where(counts > 1, counts - p / p.sum() * n, -np.inf))] -= 1
    levels = np.repeat(np.arange(len(p)), counts)
    return rng.permutation(levels)


def _ball(shape, center, radii):
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def _grow(mask: np.ndarray, margin: int) -> np.ndarray:
    if margin <= 0:
        return mask
    from scipy.ndimage import binary_dilation, generate_binary_structure
    structure = generate_binary_structure(mask.ndim, 1)
    return binary_dilation(mask, structure, iterations=margin)


def _make_case(shape, level: int, margins, rng: np.random.Generator, extra_margin: int = 0, shift: float = 0.0,
               max_extra: int = 0):
    shape = np.array(shape)
    body_radii = shape * rng.uniform(0.32, 0.42, size=len(shape))
    body_center = shape / 2 + rng.uniform(-0.06, 0.06, size=len(shape)) * shape
    body = _ball(shape, body_center, body_radii)
    gtv_radius = rng.uniform(0.08, 0.14) * shape.min()
    offset = rng.uniform(-0.35, 0.35, size=len(shape)) * (body_radii - gtv_radius - max(margins) - max_extra - 1)
    gtv = _ball(shape, body_center + offset, [gtv_radius] * len(shape))
    image = np.where(body, 0.35 + 0.05 * level + shift + rng.normal(0, 0.05, size=body.shape), 0.0)
    image[gtv] = 0.85 - 0.06 * level + rng.normal(0, 0.05, size=int(gtv.sum()))
    image = np.clip(image, 0.01, 1.0) * body  # strictly positive inside the body, 0 outside
    label = (_grow(gtv, margins[level] + extra_margin) & body).astype(np.uint8)
    return image.astype(np.float32), label


def _write(image: np.ndarray, attrs: Sequence[np.ndarray], label: np.ndarray, img_dir: str, lab_dir: str, case: str,
           dim: int):
    """Image ``_0000``, the attribute channels ``_0001``, ``_0002``, ... and the label."""
    if dim == 3:
        import SimpleITK as sitk
        files = [(image, os.path.join(img_dir, f"{case}_0000.nii.gz"))]
        files += [(a.astype(np.float32), os.path.join(img_dir, channel_file(case, i + 1, ".nii.gz")))
                  for i, a in enumerate(attrs)]
        for arr, path in files + [(label, os.path.join(lab_dir, f"{case}.nii.gz"))]:
            itk = sitk.GetImageFromArray(arr)
            itk.SetSpacing((1.0, 1.0, 1.0))
            sitk.WriteImage(itk, path, True)
    else:
        from PIL import Image
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(os.path.join(img_dir, f"{case}_0000.png"))
        for i, a in enumerate(attrs):
            Image.fromarray(a.astype(np.uint8)).save(os.path.join(img_dir, channel_file(case, i + 1, ".png")))
        Image.fromarray(label).save(os.path.join(lab_dir, f"{case}.png"))


def make_synthetic_dataset(dataset_id: int = 990, dim: int = 3, num_train: int = 40, num_test: int = 20,
                           size: Optional[Sequence[int]] = None, seed: int = 0,
                           levels: Sequence[str] = DEFAULT_LEVELS, proportions: Sequence[float] = DEFAULT_PROPORTIONS,
                           margins: Sequence[int] = DEFAULT_MARGINS, name: str = "SyntheticFairness",
                           raw_folder: Optional[str] = None, overwrite: bool = False,
                           centres: Optional[Sequence[str]] = None,
                           centre_proportions: Sequence[float] = DEFAULT_CENTRE_PROPORTIONS,
                           centre_margins: Sequence[int] = DEFAULT_CENTRE_MARGINS,
                           centre_shifts: Sequence[float] = DEFAULT_CENTRE_SHIFTS) -> str:
    """Write ``Dataset{id:03d}_{name}`` into ``raw_folder`` (default ``$nnUNet_raw``) and return its path.
    ``centres``: the second attribute (see the module's docstring), ``None`` for the single-attribute dataset."""
    from nnunet_dmoe.dataset_conversion.common import staged_dataset

    size = _check_settings(dim, num_train, num_test, size, levels, proportions, margins, centres, centre_proportions,
                           centre_margins, centre_shifts)
    with staged_dataset(dataset_id, name, overwrite, raw_folder=raw_folder) as staged:
        _write_dataset(staged.path, dim, num_train, num_test, size, seed, levels, proportions, margins, centres,
                       centre_proportions, centre_margins, centre_shifts)
    return staged.final


def _check_settings(dim, num_train, num_test, size, levels, proportions, margins, centres, centre_proportions,
                    centre_margins, centre_shifts) -> tuple:
    """Every setting checked before anything is written; returns the image size."""
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    if not (len(levels) == len(proportions) == len(margins)):
        raise ValueError(f"levels ({len(levels)}), proportions ({len(proportions)}) and margins ({len(margins)}) "
                         f"must have the same length")
    if centres is not None and not (len(centres) == len(centre_proportions) == len(centre_margins)
                                    == len(centre_shifts)):
        raise ValueError(f"centres ({len(centres)}), centre_proportions ({len(centre_proportions)}), centre_margins "
                         f"({len(centre_margins)}) and centre_shifts ({len(centre_shifts)}) must have the same length")
    if centres is not None and min(centre_margins) < 0:
        raise ValueError(f"centre_margins must be >= 0, got {list(centre_margins)}")
    for flag, values in (("-proportions", proportions), ("centre_proportions", centre_proportions if centres else [1])):
        if min(values) <= 0 or not np.all(np.isfinite(values)):
            raise ValueError(f"{flag}: every level's frequency must be a positive number, got {list(values)}")
    if min(margins) < 0:
        raise ValueError(f"-margins: margins are voxel counts >= 0, got {list(margins)}")
    for what, n in (("num_train", num_train), ("num_test", num_test)):
        if n < max(len(levels), len(centres or ())):
            raise ValueError(f"{what} = {n}: need at least one case per level ({len(levels)} levels"
                             + (f", {len(centres)} centres)" if centres else ")"))
    size = tuple(size) if size is not None else ((40, 40, 40) if dim == 3 else (96, 96))
    if len(size) != dim:
        raise ValueError(f"-size {' '.join(map(str, size))} does not have {dim} dimensions (-dim {dim})")
    if min(size) < MIN_SIZE:
        raise ValueError(f"-size {' '.join(map(str, size))}: every axis needs at least {MIN_SIZE} voxels, or the "
                         f"targets are empty. Give a larger -size.")
    return size


def _write_dataset(out, dim, num_train, num_test, size, seed, levels, proportions, margins, centres,
                   centre_proportions, centre_margins, centre_shifts) -> None:
    from nnunet_dmoe.dataset_conversion.common import attribute_block, finish

    rng = np.random.default_rng(seed)
    split_levels = {"train": allocate_levels(num_train, proportions, rng),  # both first: fixed draw order
                    "test": allocate_levels(num_test, proportions, rng)}
    split_centres = {part: (allocate_levels(len(split_levels[part]), centre_proportions, rng) if centres else
                            np.zeros(len(split_levels[part]), dtype=int)) for part in ("train", "test")}
    max_extra = max(centre_margins) if centres else 0
    values, centre_values, split = {}, {}, {}
    for part, prefix, suffix in (("train", "syn", "Tr"), ("test", "synts", "Ts")):
        img_dir, lab_dir = os.path.join(out, "images" + suffix), os.path.join(out, "labels" + suffix)
        for i, (level, centre) in enumerate(zip(split_levels[part], split_centres[part])):
            case, level, centre = f"{prefix}_{i:04d}", int(level), int(centre)
            extra = (centre_margins[centre], centre_shifts[centre], max_extra) if centres else ()
            image, label = _make_case(size, level, margins, rng, *extra)
            if not label.any():
                raise ValueError(f"-size {' '.join(map(str, size))}: case {case} has an empty target. Give a larger "
                                 f"-size.")
            attrs = [encode_attribute_channel(image[None], level)]
            if centres:
                attrs.append(encode_attribute_channel(image[None], centre))
                centre_values[case] = centres[centre]
            _write(image, attrs, label, img_dir, lab_dir, case, dim)
            values[case], split[case] = levels[level], part

    blocks = [attribute_block("tstage", levels, 1, values, split)]
    channels = {0: "MR" if dim == 3 else "gray", 1: "noNorm"}
    synthetic = {"seed": seed, "proportions": list(proportions), "margins": list(margins), "size": list(size)}
    description = "nnunet_dmoe synthetic fairness dataset: CTV = GTV + level-dependent margin"
    if centres:
        blocks.append(attribute_block("centre", centres, 2, centre_values, split))
        channels[2] = "noNorm"
        synthetic.update(centre_proportions=list(centre_proportions), centre_margins=list(centre_margins),
                         centre_shifts=list(centre_shifts))
        description += " + centre-dependent margin (two attributes)"
    finish(out, channels, {"background": 0, "target": 1}, ".nii.gz" if dim == 3 else ".png",
           blocks[0] if len(blocks) == 1 else blocks, description=description, synthetic=synthetic)


@command("nnUNetv2_dmoe_make_synthetic")
def make_synthetic_entry_point():
    import argparse
    parser = argparse.ArgumentParser(description="Write the synthetic fairness dataset (target margin depends on "
                                                 "the attribute level) as an nnU-Net raw dataset into $nnUNet_raw.")
    parser.add_argument("-d", type=int, default=990, help="[OPTIONAL] dataset id. Default: 990")
    parser.add_argument("-dim", type=int, default=3, choices=(2, 3), help="[OPTIONAL] 2 (PNG) or 3 (NIfTI). Default: 3")
    parser.add_argument("-num_train", type=int, default=40, help="[OPTIONAL] training cases. Default: 40")
    parser.add_argument("-num_test", type=int, default=20, help="[OPTIONAL] test cases. Default: 20")
    parser.add_argument("-size", type=int, nargs="+", default=None,
                        help="[OPTIONAL] image size in voxels. Default: 40 40 40 (3D), 96 96 (2D)")
    parser.add_argument("-seed", type=int, default=0, help="[OPTIONAL] random seed. Default: 0")
    parser.add_argument("-proportions", type=float, nargs="+", default=list(DEFAULT_PROPORTIONS),
                        help="[OPTIONAL] level frequencies. Default: 0.04 0.31 0.59 0.06 (T1-T4)")
    parser.add_argument("-margins", type=int, nargs="+", default=list(DEFAULT_MARGINS),
                        help="[OPTIONAL] CTV margin per level in voxels. Default: 0 1 2 3")
    parser.add_argument("--centres", action="store_true",
                        help="[OPTIONAL] add the second attribute, the centre (channel _0002; dataset.json "
                             "'attributes'): centres A and B, frequencies 0.75/0.25, extra CTV margin 0/2, body "
                             "intensity shift 0/0.1")
    parser.add_argument("--overwrite", action="store_true", help="[OPTIONAL] replace an existing dataset with this id")
    args = parser.parse_args()
    make_synthetic_command(args.d, args.dim, args.num_train, args.num_test, args.size, args.seed, args.proportions,
                           args.margins, args.centres, args.overwrite)


def make_synthetic_command(dataset_id: int, dim: int, num_train: int, num_test: int, size: Optional[Sequence[int]],
                           seed: int, proportions: Sequence[float], margins: Sequence[int], centres: bool,
                           overwrite: bool) -> str:
    """``nnUNetv2_dmoe_make_synthetic``: :func:`make_synthetic_dataset` with one level per proportion (T1-T4 for
    four, else L1, L2, ...) and, with ``centres``, the centres A and B as second attribute."""
    n = len(proportions)
    levels = DEFAULT_LEVELS if n == len(DEFAULT_LEVELS) else tuple(f"L{i + 1}" for i in range(n))
    return make_synthetic_dataset(dataset_id, dim, num_train, num_test, size, seed, levels, proportions, margins,
                                  overwrite=overwrite, centres=DEFAULT_CENTRES if centres else None)
