"""Helpers shared by the distribution-aware (dMoE) dataset converters: output folder, problem summary, attribute
block and attribute channel, PNG writing, split files and the table of cases per attribute level.

Every converter follows the same steps: check the input and collect every bad input in :class:`Problems`; then,
inside :func:`staged_dataset` (a temporary folder beside the target), convert case by case, stop with one
``ValueError`` listing all problems, write ``dataset.json`` with the ``attribute`` block (:func:`write_dataset_json`)
and print the level table (:func:`level_table`). The new dataset replaces the target only when all of this has
succeeded; on any error or interruption the target is as it was.

Several attributes (a converter given several names or columns): one attribute channel per attribute after the image
channels, each ``noNorm``, and an ``"attributes"`` list of blocks in dataset.json instead of ``"attribute"``. With one
attribute everything is as before.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image

from nnunet_dmoe.data.attribute import UNKNOWN_LEVEL, AttributeSpec, channel_file, encode_attribute_channel, fmt_cases
from nnunet_dmoe.data.tables import read_attribute_table, read_text

UNKNOWN = UNKNOWN_LEVEL
_SPLIT_ALIASES = {"train": "train", "training": "train", "tr": "train",
                  "test": "test", "testing": "test", "ts": "test"}
_SPLIT_FILE_HELP = ("A split file is a CSV/TSV with the columns 'case' and 'split' (train or test), or a JSON file "
                    "{\"train\": [case, ...], \"test\": [case, ...]} or {case: \"train\" | \"test\"}.")


class Problems:
    """Collects every bad input file so that a converter can report all of them in one ``ValueError``."""

    def __init__(self):
        self.items: List[str] = []

    def add(self, where: str, what: str, fix: str) -> None:
        self.items.append(f"{where}: {what}. {fix}")

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self, context: str, limit: int = 200) -> None:
        """Raise one ``ValueError`` naming each problem (inside :func:`staged_dataset`, nothing is written then)."""
        if not self.items:
            return
        lines = "\n".join(f"  - {p}" for p in self.items[:limit])
        more = f"\n  ... and {len(self.items) - limit} more" if len(self.items) > limit else ""
        raise ValueError(f"{context}: {len(self.items)} problem(s) in the input, nothing was written. Fix all of "
                         f"them and run the command again:\n{lines}{more}")


class StagedDataset:
    """A raw dataset being written: everything goes into :attr:`path`, a temporary folder beside the target, and
    reaches :attr:`final` only when :func:`staged_dataset` commits it. ``stage_file`` does the same for files outside
    the dataset folder (a ``splits_final.json`` in ``nnUNet_preprocessed``)."""

    def __init__(self, tmp_root: str, final: str):
        self.tmp_root, self.final = tmp_root, final
        self.path = os.path.join(tmp_root, os.path.basename(final))  # same name: dataset.json's name stays right
        self.files: Dict[str, str] = {}  # final path -> staged path

    def stage_file(self, final: str) -> str:
        """Where to write ``final`` now; it is moved there at the commit."""
        staged = os.path.join(self.tmp_root, f"file{len(self.files)}_{os.path.basename(final)}")
        self.files[os.path.abspath(final)] = staged
        return staged


_TMP_PREFIX = ".nnunet_dmoe_tmp_"


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _remove_stale_temporaries(raw: str) -> None:
    """Temporary folders of writers killed without a chance to clean up (SIGKILL): their process is gone."""
    for name in os.listdir(raw):
        if not name.startswith(_TMP_PREFIX):
            continue
        pid = name[len(_TMP_PREFIX):].split("_")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(raw, name), ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _check_dataset_target(dataset_id, dataset_name: str, overwrite: bool, extra_files: Sequence[str], raw: str,
                          inputs: Sequence[Optional[str]]) -> List[str]:
    """The existing folders and files that the new dataset replaces; refuses what must not be replaced."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, (int, np.integer)) or not 0 < dataset_id < 1000:
        raise ValueError(f"-d: the dataset id must be an integer from 1 to 999, got {dataset_id!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", dataset_name):
        raise ValueError(f"-n: the dataset name may hold letters, digits, '_' and '-', got {dataset_name!r}")
    prefix = f"Dataset{int(dataset_id):03d}_"
    existing = sorted(os.path.join(raw, d) for d in os.listdir(raw)
                      if d.startswith(prefix) and os.path.isdir(os.path.join(raw, d)))
    existing += [f for f in extra_files if os.path.exists(f)]
    if existing and not overwrite:
        raise RuntimeError(f"Dataset id {int(dataset_id)} is taken: {', '.join(existing)} exist(s). Choose another "
                           f"id with -d, or pass --overwrite to replace it (it is replaced only after the new "
                           f"dataset has been written completely).")
    targets = existing + [os.path.join(raw, prefix + dataset_name)]
    for given in filter(None, inputs):
        for target in targets:
            if _inside(given, target):
                raise ValueError(f"the input {given} lies inside {target}, which this command would replace. Move "
                                 f"the input out of it first, or write the dataset under another id (-d).")
    return existing


def _commit(staged: StagedDataset, existing: Sequence[str]) -> None:
    """Replace ``existing`` by the staged dataset: renames on one file system, the old data removed last."""
    trash = os.path.join(staged.tmp_root, ".replaced")
    os.makedirs(trash)
    moved = []
    try:
        for k, path in enumerate(existing):
            if os.path.abspath(path) in staged.files:
                continue  # os.replace below swaps it
            os.replace(path, os.path.join(trash, str(k)))
            moved.append((path, os.path.join(trash, str(k))))
        os.replace(staged.path, staged.final)
    except BaseException:
        for path, aside in reversed(moved):  # put the old dataset back
            os.replace(aside, path)
        raise
    for final, path in staged.files.items():
        os.makedirs(os.path.dirname(final), exist_ok=True)
        shutil.move(path, final)


@contextlib.contextmanager
def staged_dataset(dataset_id: int, dataset_name: str, overwrite: bool = False, extra_files: Sequence[str] = (),
                   raw_folder: Optional[str] = None, inputs: Sequence[Optional[str]] = ()):
    """Write ``raw_folder/DatasetXXX_Name`` (default ``$nnUNet_raw``) atomically; yields a :class:`StagedDataset`.

    Refuses (before anything is written) a taken id unless ``overwrite`` (any ``DatasetXXX_*`` folder with the same
    id, or a file in ``extra_files``), and any of ``inputs`` that lies inside a folder it would replace. The body
    writes into ``staged.path``, a temporary folder beside the target; only when the body returns does the new dataset
    replace the old one (renames), and with ``overwrite`` the old one is removed then. On any error or interruption
    (Ctrl-C; SIGTERM in the commands) the temporary folder is removed and the old dataset is exactly as before.
    """
    if raw_folder is None:
        from nnunetv2.paths import nnUNet_raw
        raw_folder = nnUNet_raw
    raw = os.fspath(raw_folder)
    os.makedirs(raw, exist_ok=True)
    _remove_stale_temporaries(raw)
    existing = _check_dataset_target(dataset_id, dataset_name, overwrite, extra_files, raw, inputs)
    final = os.path.join(raw, f"Dataset{int(dataset_id):03d}_{dataset_name}")
    staged = StagedDataset(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}_", dir=raw), final)
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            os.makedirs(os.path.join(staged.path, sub))
        yield staged
        _commit(staged, existing)
    finally:
        shutil.rmtree(staged.tmp_root, ignore_errors=True)
    for path in existing:
        if os.path.abspath(path) != os.path.abspath(final) and os.path.abspath(path) not in staged.files:
            print(f"--overwrite: replaced {path}")
    _warn_stale_preprocessed(final)
    print(f"Wrote {final}")


def _warn_stale_preprocessed(final: str) -> None:
    """Preprocessed data of this id were made from the data just replaced."""
    try:
        from nnunetv2.paths import nnUNet_preprocessed
    except ImportError:
        return
    if not nnUNet_preprocessed:
        return
    prefix = os.path.basename(final)[:len("Dataset000_")]
    folder = os.fspath(nnUNet_preprocessed)
    stale = [os.path.join(folder, d) for d in (os.listdir(folder) if os.path.isdir(folder) else [])
             if d.startswith(prefix) and os.path.isdir(os.path.join(folder, d))
             and any(f.endswith(".json") and f != "splits_final.json" for f in os.listdir(os.path.join(folder, d)))]
    for path in stale:
        print(f"Warning: {path} holds preprocessed data of the dataset that was just replaced; they are stale. Rerun "
              f"nnUNetv2_plan_and_preprocess -d {int(prefix[7:10])} (or nnUNetv2_dmoe_plan_and_preprocess) before "
              f"training.")


def attribute_block(name: str, levels: Sequence[str], channel: int, values: Mapping[str, Optional[str]],
                    split: Mapping[str, str]) -> dict:
    """The dataset.json ``attribute`` block, validated with :class:`AttributeSpec` (train and test cases).

    ``values`` maps case -> level (``None`` = unknown), ``split`` case -> ``"train"`` / ``"test"``: ``cases`` holds
    the training cases, ``test_cases`` the test cases (a project convention, for the fairness report).
    """
    cases = {c: v for c, v in values.items() if split[c] == "train"}
    test_cases = {c: v for c, v in values.items() if split[c] == "test"}
    return AttributeSpec(name=name, levels=list(levels), channel=channel, cases=cases, test_cases=test_cases).to_block()


def write_dataset_json(out: str, channel_names: Mapping[str, str], labels: Mapping[str, int], file_ending: str,
                       block: Union[dict, Sequence[dict]], **metadata) -> None:
    """nnU-Net's ``generate_dataset_json`` with the ``attribute`` block, or with several blocks (a list of more than
    one) the ``attributes`` list (copies: it mutates its arguments)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    blocks = _blocks(block)
    key = {"attribute": blocks[0]} if len(blocks) == 1 else {"attributes": blocks}
    generate_dataset_json(out, channel_names=dict(channel_names), labels=dict(labels),
                          num_training_cases=len(blocks[0]["cases"]), file_ending=file_ending,
                          **copy.deepcopy(key), **metadata)


def _blocks(block: Union[dict, Sequence[dict]]) -> List[dict]:
    return [block] if isinstance(block, Mapping) else list(block)


def attribute_names(value: Union[str, Sequence[str]], flag: str, allowed: Optional[Sequence[str]] = None) -> List[str]:
    """One or several attribute names (a converter's ``-a``) as a list: non-empty, no repeats, each allowed."""
    names = [value] if isinstance(value, str) else list(value)
    if not names:
        raise ValueError(f"{flag}: give at least one attribute")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{flag}: {', '.join(twice)} given more than once. Give each attribute once.")
    bad = [n for n in names if allowed is not None and n not in allowed]
    if bad:
        raise ValueError(f"{flag}: attribute must be one of {list(allowed)}, got {', '.join(map(repr, bad))}")
    return names


def attribute_channel_index(num_image_channels: int) -> int:
    """The attribute channel comes last, after the image channels."""
    return num_image_channels


def to_uint8(image: np.ndarray) -> Optional[np.ndarray]:
    """8-bit copy of an image already in 0..255 (floats in 0..1 are scaled by 255); ``None`` if it is not."""
    image = np.asarray(image)
    if image.size == 0 or not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 255:
        return None
    if image.dtype.kind == "f" and image.max() <= 1:
        image = image * 255.0
    return np.rint(image).astype(np.uint8)


def _level_indices(level_index) -> List[Optional[int]]:
    """One level index (one attribute) or a list of them (one per attribute)."""
    return list(level_index) if isinstance(level_index, (list, tuple)) else [level_index]


def write_png_case(folder: str, case: str, channels: Sequence[np.ndarray],
                   level_index: Union[None, int, Sequence[Optional[int]]]) -> None:
    """Write the 2D uint8 ``channels`` as ``case_0000.png`` ... and the attribute channel as the last file (a list
    of level indices: one attribute channel each, in order, after the image channels)."""
    channels = [np.asarray(c, dtype=np.uint8) for c in channels]
    stacked = np.stack(channels)
    attributes = [encode_attribute_channel(stacked, i) for i in _level_indices(level_index)]
    for k, arr in enumerate(channels + attributes):
        Image.fromarray(arr, mode="L").save(os.path.join(folder, channel_file(case, k, ".png")))


def write_nifti_case(folder: str, case: str, images: Sequence,
                     level_index: Union[None, int, Sequence[Optional[int]]]) -> None:
    """Copy the SimpleITK ``images`` as ``case_0000.nii.gz`` ... and write the attribute channel (uint8, on the grid
    of the first image) as the last file (a list of level indices: one attribute channel each, in order)."""
    import SimpleITK as sitk

    arrays = np.stack([sitk.GetArrayViewFromImage(img) for img in images])
    attributes = []
    for index in _level_indices(level_index):
        attributes.append(sitk.GetImageFromArray(encode_attribute_channel(arrays, index)))
        attributes[-1].CopyInformation(images[0])
    for k, img in enumerate(list(images) + attributes):
        sitk.WriteImage(img, os.path.join(folder, channel_file(case, k, ".nii.gz")), useCompression=True)


def write_png_label(folder: str, case: str, label: np.ndarray) -> None:
    Image.fromarray(np.asarray(label, dtype=np.uint8), mode="L").save(os.path.join(folder, f"{case}.png"))


def normalise_split(value: str) -> Optional[str]:
    return _SPLIT_ALIASES.get(str(value).strip().casefold())


def read_split_file(path: str) -> Dict[str, str]:
    """Case id -> ``"train"`` / ``"test"`` from a split file (see ``_SPLIT_FILE_HELP``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"-split {path}: the split file does not exist. {_SPLIT_FILE_HELP}")
    if path.lower().endswith(".json"):
        try:
            data = json.loads(read_text(path, "split file"))
        except json.JSONDecodeError as e:
            raise ValueError(f"-split {path}: not valid JSON ({e}). {_SPLIT_FILE_HELP}") from None
        if isinstance(data, Mapping) and data and all(isinstance(v, list) for v in data.values()):
            raw = {str(c): k for k, cases in data.items() for c in cases}
        elif isinstance(data, Mapping):
            raw = {str(k): str(v) for k, v in data.items()}
        else:
            raise ValueError(f"-split {path}: unexpected JSON content. {_SPLIT_FILE_HELP}")
    else:
        raw = read_attribute_table(path, id_column="case", attribute_column="split")
    split = {c: normalise_split(v) for c, v in raw.items()}
    bad = sorted(f"{c} ({raw[c]!r})" for c, s in split.items() if s is None)
    if bad:
        raise ValueError(f"-split {path}: split values must be train or test; found {fmt_cases(bad)}. "
                         f"{_SPLIT_FILE_HELP}")
    return split


def level_table(title: str, levels: Sequence[str], train: Mapping[str, Optional[str]],
                test: Mapping[str, Optional[str]]) -> str:
    """Cases per attribute level, train and test (layout of the dMoE paper's Table 6); ``None`` counts as unknown."""
    rows = list(levels) + ([UNKNOWN] if any(v is None for v in [*train.values(), *test.values()]) else [])

    def count(d, lv):
        return sum(1 for v in d.values() if (v if v is not None else UNKNOWN) == lv)

    width = max(len(r) for r in rows + ["level", "total"]) + 2
    lines = [title, f"{'level':<{width}}{'train':>8}{'test':>8}{'total':>8}"]
    for lv in rows:
        a, b = count(train, lv), count(test, lv)
        lines.append(f"{lv:<{width}}{a:>8}{b:>8}{a + b:>8}")
    lines.append(f"{'total':<{width}}{len(train):>8}{len(test):>8}{len(train) + len(test):>8}")
    return "\n".join(lines)


def finish(out: str, channel_names: Mapping[str, str], labels: Mapping[str, int], file_ending: str,
           block: Union[dict, Sequence[dict]], **metadata) -> str:
    """Write dataset.json (``dataset_name`` defaults to the folder name), drop an empty imagesTs/labelsTs, print the
    level table (one per attribute); return the table(s)."""
    metadata.setdefault("dataset_name", os.path.basename(out))
    write_dataset_json(out, channel_names, labels, file_ending, block, **metadata)
    for sub in ("labelsTs", "imagesTs"):
        path = os.path.join(out, sub)
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
    table = "\n\n".join(level_table(f"Cases per {b['name']} level in {os.path.basename(out)}", b["levels"],
                                    b["cases"], b["test_cases"]) for b in _blocks(block))
    print(table)
    return table


def progress(iterable, desc: str, total: Optional[int] = None):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="case")


def make_parser(description: str, input_help: str, default_name: str):
    """Argument parser with the flags every converter shares (nnU-Net style: single dash for values, double dash
    for switches)."""
    from nnunet_dmoe.cli import Parser

    parser = Parser(description=description)
    parser.add_argument("-i", type=str, required=True, help="[REQUIRED] " + input_help)
    parser.add_argument("-d", type=int, required=True, help="[REQUIRED] nnU-Net dataset id (1-999).")
    parser.add_argument("-n", type=str, default=default_name,
                        help=f"[OPTIONAL] Dataset name; the folder is DatasetXXX_<name>. Default: {default_name}")
    parser.add_argument("--overwrite", action="store_true",
                        help="[OPTIONAL] Delete and rewrite an existing dataset with the same id. Default: refuse")
    return parser


def add_split_and_age_arguments(parser, case_note: str, split_default: str, age_bins: Sequence[float]) -> None:
    """``-split`` and ``-age_bins``, shared by the 2D converters."""
    parser.add_argument("-split", type=str, default=None,
                        help=f"[OPTIONAL] Split file (CSV columns case,split or JSON {{\"train\": [...], \"test\": "
                             f"[...]}}); case = {case_note}. Default: {split_default}")
    parser.add_argument("-age_bins", type=float, nargs="+", default=list(age_bins),
                        help=f"[OPTIONAL] Age bin edges for -a age. Default: {' '.join(map(str, age_bins))}")


def split_from_file(cases: Sequence[str], split_file: str, problems: Problems) -> Dict[str, str]:
    """Split of ``cases`` from a split file; a case the file does not list is a problem."""
    split = read_split_file(split_file)
    missing = [c for c in cases if c not in split]
    for c in missing:
        problems.add(c, f"not listed in the split file {split_file}", "Add it as train or test.")
    extra = sorted(set(split) - set(cases))
    if extra:
        print(f"Note: {len(extra)} case(s) of the split file are not in the input and are ignored: "
              f"{fmt_cases(extra, limit=10)}")
    return {c: split[c] for c in cases if c in split}
