"""HAM10000 / ISIC 2018 Task 1 (2D dermoscopy, lesion) -> nnU-Net raw dataset with a distribution-aware (dMoE)
attribute.

Input: a folder with the official ``ISIC2018_Task1-2_Training_Input/ISIC_xxxxxxx.jpg`` and
``ISIC2018_Task1_Training_GroundTruth/ISIC_xxxxxxx_segmentation.png`` (0/255), plus the HAM10000 metadata CSV
(``lesion_id,image_id,dx,dx_type,age,sex,localization,dataset``). The attribute is age in the dMoE paper's bins
(<20, 20-40, 40-60, 60-80, >=80) or any other metadata column; several columns (``-a age sex``) give several
attributes, one attribute channel each (``_0003.png``, ``_0004.png``, ...). The split comes from a split file or is
drawn
(seeded) by ``lesion_id``, because several images can show the same lesion.

Each case is written as four grayscale PNGs, R, G, B (``rgb_to_0_1``: divided by 255, so colours stay comparable
between images) and the attribute channel (``noNorm``): nnU-Net's PNG reader refuses a case that mixes an RGB file
with a grayscale file.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from nnunet_dmoe.data.attribute import fmt_cases
from nnunet_dmoe.dataset_conversion.common import (Problems, attribute_block, attribute_channel_index,
                                                   add_split_and_age_arguments, attribute_names, finish, make_parser,
                                                   progress, split_from_file, staged_dataset, write_png_case,
                                                   write_png_label)
from nnunet_dmoe.errors import command
from nnunet_dmoe.data.tables import bin_labels, read_attribute_table

IMAGE_DIR = "ISIC2018_Task1-2_Training_Input"
MASK_DIR = "ISIC2018_Task1_Training_GroundTruth"
METADATA_NAME = "HAM10000_metadata.csv"
AGE_BINS = (20, 40, 60, 80)
ATTRIBUTES = ("age", "sex", "localization", "dataset", "dx", "dx_type")
CHANNEL_NAMES = {"0": "rgb_to_0_1", "1": "rgb_to_0_1", "2": "rgb_to_0_1", "3": "noNorm"}
LABELS = {"background": 0, "lesion": 1}


def _lesion_split(lesions: Dict[str, str], test_fraction: float, seed: int) -> Dict[str, str]:
    """Seeded train/test split of images grouped by lesion: lesions are drawn in random order into the test set
    until it holds ``test_fraction`` of the images."""
    groups: Dict[str, list] = {}
    for image, lesion in sorted(lesions.items()):
        groups.setdefault(lesion, []).append(image)
    order = sorted(groups)
    np.random.RandomState(seed).shuffle(order)
    target = int(round(test_fraction * len(lesions)))
    split, n_test = {}, 0
    for lesion in order:
        side = "test" if n_test < target else "train"
        n_test += len(groups[lesion]) if side == "test" else 0
        split.update({image: side for image in groups[lesion]})
    return split


def lesion_folds(lesions: Dict[str, str], num_folds: int, seed: int) -> list:
    """nnU-Net ``splits_final.json`` content: ``num_folds`` folds of the training images, grouped by lesion."""
    order = sorted(set(lesions.values()))
    np.random.RandomState(seed).shuffle(order)
    fold_of = {lesion: k % num_folds for k, lesion in enumerate(order)}
    folds = []
    for k in range(num_folds):
        val = sorted(i for i, lesion in lesions.items() if fold_of[lesion] == k)
        folds.append({"train": sorted(i for i in lesions if i not in set(val)), "val": val})
    return folds


def _read_case(image_path: str, mask_path: str, problems: Problems):
    """RGB array (3, H, W) and label (H, W) of one case, or ``None`` after recording what is wrong."""
    arrays = []
    for path in (image_path, mask_path):
        try:
            with Image.open(path) as img:
                arrays.append(np.asarray(img))
        except (OSError, ValueError) as e:  # truncated or not an image
            problems.add(path, f"cannot be read as an image ({e})", "Download or export the file again.")
            return None
    image, mask = arrays
    if image.ndim != 3 or image.shape[2] != 3:
        problems.add(image_path, f"expected an RGB image, got shape {image.shape}", "Convert it to 8-bit RGB.")
        return None
    if mask.ndim != 2 or mask.shape != image.shape[:2]:
        problems.add(mask_path, f"mask shape {mask.shape} differs from image shape {image.shape[:2]}",
                     "Use the mask that belongs to this image (grayscale, same size).")
        return None
    bad = sorted(set(np.unique(mask).tolist()) - {0, 255})
    if bad:
        problems.add(mask_path, f"undeclared mask values {bad[:10]} (expected 0 and 255)",
                     "Binarise the mask to 0 (background) and 255 (lesion).")
        return None
    return image.transpose(2, 0, 1), (mask == 255).astype(np.uint8)


def convert_ham10000(input_folder: str, nnunet_dataset_id: int, metadata: Optional[str] = None,
                     attribute: Union[str, Sequence[str]] = "age", age_bins: Sequence[float] = AGE_BINS,
                     split_file: Optional[str] = None,
                     test_fraction: float = 0.2, seed: int = 12345, num_folds: int = 5,
                     dataset_name: str = "HAM10000", overwrite: bool = False) -> str:
    """Convert HAM10000 / ISIC 2018 Task 1 into ``$nnUNet_raw/DatasetXXX_<dataset_name>``; returns its path.

    With ``nnUNet_preprocessed`` set, also writes ``splits_final.json`` (``num_folds`` folds of the training images
    grouped by ``lesion_id``) to ``$nnUNet_preprocessed/DatasetXXX_<dataset_name>/``.

    ``attribute``: a metadata column, or several (``["age", "sex"]``: an ``"attributes"`` list in dataset.json and one
    attribute channel per column, in this order).
    """
    from nnunetv2.paths import nnUNet_preprocessed

    metadata = metadata or os.path.join(input_folder, METADATA_NAME)
    image_dir, mask_dir = os.path.join(input_folder, IMAGE_DIR), os.path.join(input_folder, MASK_DIR)
    names = _check_settings(input_folder, image_dir, mask_dir, attribute, num_folds, test_fraction)
    bins = {a: (list(age_bins) if a == "age" else None) for a in names}
    if not os.path.isfile(metadata):
        raise FileNotFoundError(f"the HAM10000 metadata CSV {metadata} does not exist. Put {METADATA_NAME} into -i, "
                                f"or give its path with -metadata.")
    all_values = {a: read_attribute_table(metadata, id_column="image_id", attribute_column=a, bins=bins[a])
                  for a in names}
    lesions = read_attribute_table(metadata, id_column="image_id", attribute_column="lesion_id")
    problems = Problems()
    cases, image_files, mask_files = _find_cases(image_dir, mask_dir, all_values[names[0]], metadata, problems)
    known = [c for c in cases if c in all_values[names[0]]]  # the same rows for every column
    lesion_of = {c: lesions[c] or c for c in known}
    split = (split_from_file(known, split_file, problems) if split_file
             else _lesion_split(lesion_of, test_fraction, seed))
    _warn_shared_lesions(split, lesion_of)
    levels = {a: bin_labels(bins[a]) if bins[a] else sorted({v[c] for c in known if v[c] is not None})
              for a, v in all_values.items()}
    for a in names:
        if not levels[a]:
            problems.add(metadata, f"no image has a known {a}", "Choose another attribute with -a.")
    name = f"Dataset{int(nnunet_dataset_id):03d}_{dataset_name}"
    splits_path = (os.path.join(os.fspath(nnUNet_preprocessed), name, "splits_final.json")
                   if nnUNet_preprocessed.is_set() else None)
    with staged_dataset(nnunet_dataset_id, dataset_name, overwrite, extra_files=[splits_path] if splits_path else [],
                        inputs=[input_folder, metadata, split_file]) as staged:
        _write_cases(staged.path, cases, image_files, mask_files, split, names, levels, all_values, problems)
        problems.raise_if_any("HAM10000")
        blocks = _finish_ham(staged.path, cases, split, names, levels, all_values,
                             f"split {split_file or f'seeded by lesion_id (seed {seed}, test fraction {test_fraction})'}")
        if splits_path:
            _write_folds(staged, splits_path, {c: lesion_of[c] for c in blocks[0]["cases"]}, num_folds, seed)
    return staged.final


def _check_settings(input_folder: str, image_dir: str, mask_dir: str, attribute: Union[str, Sequence[str]],
                    num_folds: int, test_fraction: float) -> List[str]:
    """Refuse a missing official folder, unknown attributes and impossible folds or test fraction; returns the
    attribute names."""
    for folder in (image_dir, mask_dir):
        if not os.path.isdir(folder):
            raise ValueError(f"-i {input_folder}: the official ISIC 2018 folder {os.path.basename(folder)} is missing "
                             f"(expected {IMAGE_DIR}/ and {MASK_DIR}/ inside -i).")
    names = attribute_names(attribute, "-a", ATTRIBUTES)
    if num_folds < 2:
        raise ValueError(f"-num_folds must be at least 2 (nnU-Net's cross-validation needs two folds), got "
                         f"{num_folds}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"-test_fraction must be in [0, 1), got {test_fraction}")
    return names


def _find_cases(image_dir: str, mask_dir: str, values: Dict[str, Optional[str]], metadata: str,
                problems: Problems) -> Tuple[List[str], Dict[str, str], Dict[str, str]]:
    """The images (cases, case -> image file, case -> mask file); a missing mask or metadata row is a problem."""
    cases = sorted(os.path.splitext(f)[0] for f in os.listdir(image_dir) if f.lower().endswith((".jpg", ".png")))
    image_files = {os.path.splitext(f)[0]: os.path.join(image_dir, f) for f in os.listdir(image_dir)}
    mask_files = {c: os.path.join(mask_dir, f"{c}_segmentation.png") for c in cases}
    for case in cases:
        if not os.path.isfile(mask_files[case]):
            problems.add(image_files[case], f"the mask {mask_files[case]} is missing",
                         "Add the mask, or remove the image from the input folder.")
        if case not in values:
            problems.add(image_files[case], f"no row with image_id {case} in {metadata}",
                         "Add its metadata row, or remove the image from the input folder.")
    if not cases:
        problems.add(image_dir, "holds no .jpg images", "Point -i at the folder that holds the ISIC 2018 folders.")
    return cases, image_files, mask_files


def _warn_shared_lesions(split: Dict[str, str], lesion_of: Dict[str, str]) -> None:
    shared = sorted({lesion_of[c] for c in split if split[c] == "train"}
                    & {lesion_of[c] for c in split if split[c] == "test"})
    if shared:
        print(f"Warning: the split file puts images of {len(shared)} lesion(s) into both train and test "
              f"({fmt_cases(shared, limit=10)}); test scores will be optimistic.")


def _finish_ham(out: str, cases, split, names, levels, all_values, split_note: str) -> List[dict]:
    """dataset.json of the converted dataset; returns its attribute blocks."""
    blocks = [attribute_block(a, levels[a], attribute_channel_index(3) + k, {c: all_values[a][c] for c in cases},
                              split) for k, a in enumerate(names)]
    channel_names = {**CHANNEL_NAMES, **{str(attribute_channel_index(3) + k): "noNorm" for k in range(len(names))}}
    finish(out, channel_names, LABELS, ".png", blocks,
           reference="Tschandl et al., Sci Data 5, 180161 (2018); Codella et al., ISIC 2018",
           license="CC BY-NC-SA 4.0 (images), CC BY-NC 4.0 (dataset)",
           description=f"HAM10000 lesion segmentation; attribute{'s' * (len(names) > 1)} {', '.join(names)}; "
                       f"{split_note}",
           converted_by="nnUNetv2_dmoe_convert_ham10000")
    return blocks


def _write_cases(out, cases, image_files, mask_files, split, names, levels, all_values, problems: Problems):
    for case in progress(cases, "HAM10000"):
        has_mask = os.path.isfile(mask_files[case])
        read = _read_case(image_files[case], mask_files[case], problems) if has_mask else None
        if read is None or case not in split:  # a problem, reported below
            continue
        suffix = "Tr" if split[case] == "train" else "Ts"
        indices = [None if all_values[a][case] is None else levels[a].index(all_values[a][case]) for a in names]
        write_png_case(os.path.join(out, "images" + suffix), case, list(read[0]), indices)
        write_png_label(os.path.join(out, "labels" + suffix), case, read[1])


def _write_folds(staged, splits_path: str, train_lesions, num_folds: int, seed: int) -> None:
    """splits_final.json, folds grouped by lesion, staged to land with the dataset."""
    n_folds = min(num_folds, len(set(train_lesions.values())))
    if n_folds < 2:
        print(f"Not writing {splits_path}: fewer than 2 training lesions.")
        return
    with open(staged.stage_file(splits_path), "w") as f:
        json.dump(lesion_folds(train_lesions, n_folds, seed), f, indent=2)
    print(f"Writing {splits_path} ({n_folds} folds grouped by lesion_id)")


@command("nnUNetv2_dmoe_convert_ham10000")
def convert_ham10000_entry_point():
    parser = make_parser("Convert HAM10000 / ISIC 2018 Task 1 into an nnU-Net raw dataset with a distribution-aware "
                         "(dMoE) attribute.", f"Folder holding {IMAGE_DIR}/ and {MASK_DIR}/.", "HAM10000")
    parser.add_argument("-metadata", type=str, default=None,
                        help=f"[OPTIONAL] HAM10000 metadata CSV. Default: -i/{METADATA_NAME}")
    parser.add_argument("-a", type=str, nargs="+", default=["age"], choices=ATTRIBUTES,
                        help="[OPTIONAL] Metadata column used as attribute; several (-a age sex) give several "
                             "attributes, one attribute channel each, in this order. Default: age")
    add_split_and_age_arguments(parser, "image id (ISIC_xxxxxxx)", "a seeded split grouped by lesion_id", AGE_BINS)
    parser.add_argument("-test_fraction", type=float, default=0.2,
                        help="[OPTIONAL] Fraction of images in the test set without -split. Default: 0.2")
    parser.add_argument("-seed", type=int, default=12345, help="[OPTIONAL] Seed of the split and folds. Default: 12345")
    parser.add_argument("-num_folds", type=int, default=5,
                        help="[OPTIONAL] Folds in splits_final.json (grouped by lesion_id). Default: 5")
    args = parser.parse_args()
    convert_ham10000(args.i, args.d, metadata=args.metadata, attribute=args.a, age_bins=args.age_bins,
                     split_file=args.split, test_fraction=args.test_fraction, seed=args.seed,
                     num_folds=args.num_folds, dataset_name=args.n, overwrite=args.overwrite)


if __name__ == "__main__":
    convert_ham10000_entry_point()
