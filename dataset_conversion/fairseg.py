"""Harvard-FairSeg (2D SLO fundus, optic disc and cup) -> nnU-Net raw dataset with a distribution-aware (dMoE)
attribute.

Input: the official folder of ``data_xxxxx.npz`` files, with keys ``slo_fundus`` (older releases:
``fundus_slo``), ``disc_cup_mask`` (older: ``disc_cup``; 0 background, -1 rim, -2 cup) and the demographic codes
``race`` (0 Asian, 1 Black, 2 White), ``gender``, ``ethnicity``/``hispanic``, ``language``, ``maritalstatus``
(-1 unknown) and ``age``. The official split comes from the sub-folder names (``Training/``, ``Test/``) or a split
file. Labels become background 0, rim 1, cup 2 (disc = rim + cup). Each case is the fundus image (``_0000.png``,
``rgb_to_0_1``: divided by 255) and the attribute channel (``_0001.png``, ``noNorm``); several attributes
(``-a race gender``) give one attribute channel each (``_0001.png``, ``_0002.png``, ...).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Union

import numpy as np

from nnunet_dmoe.dataset_conversion.common import (Problems, add_split_and_age_arguments, attribute_block,
                                                   attribute_channel_index, attribute_names, finish, make_parser,
                                                   normalise_split, progress, staged_dataset,
                                                   split_from_file, to_uint8, write_png_case, write_png_label)
from nnunet_dmoe.errors import command
from nnunet_dmoe.data.tables import bin_labels, bin_value

IMAGE_KEYS = ("slo_fundus", "fundus_slo")
MASK_KEYS = ("disc_cup_mask", "disc_cup")
MASK_TO_LABEL = {0: 0, -1: 1, -2: 2}
LABELS = {"background": 0, "rim": 1, "cup": 2}
CHANNEL_NAMES = {"0": "rgb_to_0_1", "1": "noNorm"}
# FairSeg's raw code for a missing demographic value; written as the attribute channel's unknown code
# (nnunet_dmoe.data.attribute.UNKNOWN_CODE, 0)
FAIRSEG_MISSING_CODE = -1
# code -> level, from the Harvard-FairSeg README; the level order is the router order
CODEBOOKS: Dict[str, Dict[int, str]] = {
    "race": {0: "Asian", 1: "Black", 2: "White"},
    "gender": {0: "Female", 1: "Male"},
    "ethnicity": {0: "Non-Hispanic", 1: "Hispanic"},
    "language": {0: "English", 1: "Spanish", 2: "Others"},
    "maritalstatus": {0: "Married or Partnered", 1: "Single", 2: "Divorced", 3: "Widowed", 4: "Legally Separated"},
}
ATTRIBUTE_KEYS = {"race": ("race",), "gender": ("gender", "male"), "ethnicity": ("ethnicity", "hispanic"),
                  "language": ("language",), "maritalstatus": ("maritalstatus",), "age": ("age",)}
AGE_BINS = (20, 40, 60, 80)


def _first_key(data, keys: Sequence[str]) -> Optional[str]:
    return next((k for k in keys if k in data), None)


def _level(data, attribute: str, age_bins: Sequence[float]):
    """(level or None, error text or None) of one npz file."""
    key = _first_key(data, ATTRIBUTE_KEYS[attribute])
    if key is None:
        return None, f"has no key {' or '.join(ATTRIBUTE_KEYS[attribute])} (keys: {sorted(data)})"
    value = np.asarray(data[key])
    if value.size != 1:
        return None, f"{key} holds {value.size} values, expected one code"
    value = value.item()
    if isinstance(value, (bytes, str)) or value is None:
        return None, f"{key} = {value!r} is not a numeric code"
    if value == FAIRSEG_MISSING_CODE:
        return None, None
    if attribute == "age":
        if not 0 <= value <= 130:
            return None, f"age = {value} is not an age in years"
        return bin_value(value, age_bins), None
    if value not in CODEBOOKS[attribute]:
        return None, (f"{key} = {value!r} is not one of the codes {CODEBOOKS[attribute]} "
                      f"({FAIRSEG_MISSING_CODE} = unknown)")
    return CODEBOOKS[attribute][int(value)], None


def _read_case(path: str, attributes: Sequence[str], age_bins: Sequence[float], problems: Problems):
    """(image uint8, label, [level of each attribute]) of one npz file, or ``None`` after recording every problem it
    has."""
    try:  # every array read now: a truncated file or an object array fails here, not later
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except Exception as e:  # a truncated or non-npz file, an object (pickled) array
        problems.add(path, f"cannot be read as .npz of plain arrays ({e})",
                     "Download the file again; it must hold numeric arrays only.")
        return None
    n = len(problems)
    image_key, mask_key = _first_key(data, IMAGE_KEYS), _first_key(data, MASK_KEYS)
    if image_key is None or mask_key is None:
        what, keys = ("image", IMAGE_KEYS) if image_key is None else ("mask", MASK_KEYS)
        problems.add(path, f"has no {what} key ({' or '.join(keys)}; keys: {sorted(data)})",
                     "Use the official Harvard-FairSeg .npz files.")
        return None
    image, mask = to_uint8(data[image_key]), np.asarray(data[mask_key])
    if image is None or image.ndim != 2:
        problems.add(path, f"{image_key} is not a 2D image with values in 0..255 (shape {data[image_key].shape})",
                     "Store the fundus image as a 2D 8-bit array.")
    elif mask.shape != image.shape:
        problems.add(path, f"{mask_key} shape {mask.shape} differs from {image_key} shape {image.shape}",
                     "Use the mask that belongs to this image.")
    bad = sorted(set(np.unique(mask).tolist()) - set(MASK_TO_LABEL))
    if bad:
        problems.add(path, f"{mask_key} has undeclared values {bad[:10]} (expected 0, -1 rim, -2 cup)",
                     "Fix the mask values.")
    levels = []
    for attribute in attributes:
        level, error = _level(data, attribute, age_bins)
        levels.append(level)
        if error:
            problems.add(path, error, "Fix the code or choose another attribute with -a.")
    if len(problems) > n:
        return None
    label = np.zeros(mask.shape, dtype=np.uint8)
    for code, value in MASK_TO_LABEL.items():
        label[mask == code] = value
    return image, label, levels


def _official_split(files: Dict[str, str], input_folder: str, problems: Problems) -> Dict[str, str]:
    """train/test from the first folder below ``input_folder`` (``Training/``, ``Test/``); flat folder: all train."""
    split = {}
    for case, path in files.items():
        parts = os.path.relpath(path, input_folder).split(os.sep)
        side = "train" if len(parts) == 1 else normalise_split(parts[0])
        if side is None:
            problems.add(path, f"the folder {parts[0]!r} names no split",
                         "Put the files in Training/ or Test/, or give a split file with -split.")
        split[case] = side
    if all(len(os.path.relpath(p, input_folder).split(os.sep)) == 1 for p in files.values()):
        print("Note: no Training/ and Test/ folders and no -split: all cases go to imagesTr.")
    return split


def convert_fairseg(input_folder: str, nnunet_dataset_id: int, attribute: Union[str, Sequence[str]] = "race",
                    age_bins: Sequence[float] = AGE_BINS, split_file: Optional[str] = None,
                    dataset_name: str = "FairSeg", overwrite: bool = False) -> str:
    """Convert Harvard-FairSeg into ``$nnUNet_raw/DatasetXXX_<dataset_name>``; returns its path.

    ``attribute``: one of :data:`ATTRIBUTE_KEYS`, or several (``["race", "gender"]``: an ``"attributes"`` list in
    dataset.json and one attribute channel per attribute, ``_0001.png``, ``_0002.png``, ... in this order)."""
    attributes = attribute_names(attribute, "-a", list(ATTRIBUTE_KEYS))
    if not os.path.isdir(input_folder):
        raise ValueError(f"-i {input_folder} is not a folder")
    problems = Problems()
    files: Dict[str, str] = {}
    for root, _, file_names in sorted(os.walk(input_folder)):
        for f in sorted(file_names):
            if f.endswith(".npz"):
                case = f[:-4]
                if case in files:
                    problems.add(os.path.join(root, f), f"the case name {case} is also {files[case]}",
                                 "Keep one of the two files.")
                files[case] = os.path.join(root, f)
    if not files:
        problems.add(input_folder, "holds no .npz files", "Point -i at the Harvard-FairSeg folder.")
    cases = sorted(files)
    split = split_from_file(cases, split_file, problems) if split_file else _official_split(files, input_folder,
                                                                                             problems)

    levels = {a: bin_labels(age_bins) if a == "age" else list(CODEBOOKS[a].values()) for a in attributes}
    with staged_dataset(nnunet_dataset_id, dataset_name, overwrite, inputs=[input_folder, split_file]) as staged:
        values = _write_cases(staged.path, cases, files, split, attributes, levels, age_bins, problems)
        problems.raise_if_any("Harvard-FairSeg")
        blocks = [attribute_block(a, levels[a], attribute_channel_index(1) + k, values[a], split)
                  for k, a in enumerate(attributes)]
        channel_names = {**CHANNEL_NAMES,
                         **{str(attribute_channel_index(1) + k): "noNorm" for k in range(len(attributes))}}
        finish(staged.path, channel_names, LABELS, ".png", blocks, reference="Tian et al., Harvard FairSeg, ICLR 2024",
               license="CC BY-NC-ND 4.0",
               description=f"Harvard-FairSeg optic disc (rim + cup) and cup; attribute{'s' * (len(attributes) > 1)} "
                           f"{', '.join(attributes)}",
               converted_by="nnUNetv2_dmoe_convert_fairseg")
    return staged.final


def _write_cases(out: str, cases, files, split, attributes, levels, age_bins, problems: Problems):
    """Each readable case as PNGs into ``out``; returns attribute -> case -> level."""
    values: Dict[str, Dict[str, Optional[str]]] = {a: {} for a in attributes}
    for case in progress(cases, "Harvard-FairSeg"):
        read = _read_case(files[case], attributes, age_bins, problems)
        if read is None or split.get(case) is None:  # a problem, reported below
            continue
        image, label, case_levels = read
        for a, level in zip(attributes, case_levels):
            values[a][case] = level
        suffix = "Tr" if split[case] == "train" else "Ts"
        write_png_case(os.path.join(out, "images" + suffix), case, [image],
                       [None if lv is None else levels[a].index(lv) for a, lv in zip(attributes, case_levels)])
        write_png_label(os.path.join(out, "labels" + suffix), case, label)
    return values


@command("nnUNetv2_dmoe_convert_fairseg")
def convert_fairseg_entry_point():
    parser = make_parser("Convert Harvard-FairSeg into an nnU-Net raw dataset with a distribution-aware (dMoE) "
                         "attribute.", "Folder of Harvard-FairSeg .npz files (official split: Training/ and Test/).",
                         "FairSeg")
    parser.add_argument("-a", type=str, nargs="+", default=["race"], choices=list(ATTRIBUTE_KEYS),
                        help="[OPTIONAL] Attribute; several (-a race gender) give several attributes, one attribute "
                             "channel each, in this order. Default: race")
    add_split_and_age_arguments(parser, "npz name without .npz", "from the Training/ and Test/ folder names",
                                AGE_BINS)
    args = parser.parse_args()
    convert_fairseg(args.i, args.d, attribute=args.a, age_bins=args.age_bins, split_file=args.split,
                    dataset_name=args.n, overwrite=args.overwrite)


if __name__ == "__main__":
    convert_fairseg_entry_point()
