"""Attribute schema and attribute-channel codec.

The attribute of a case (tumour T-stage, age bin, race, ...) lives in two places (documentation/reference/dataset-json-attribute.md;
documentation/explanation/dmoe.md, "How the attribute reaches the network"):

1. the ``attribute`` block of an nnU-Net raw ``dataset.json``::

       "attribute": {"name": "tstage", "levels": ["T1", "T2", "T3", "T4"], "channel": 1,
                     "cases": {"RT_0001": "T2", "RT_0002": "T4"}}

2. an extra ``noNorm`` image channel whose voxels hold ``level_index + 1`` inside the image footprint (where any
   image channel is non-zero) and 0 elsewhere. A channel that is 0 everywhere means "unknown".

Both hold sensitive data (race, age, ...): the block is copied by nnU-Net into ``nnUNet_preprocessed``, the channel
into every preprocessed case. The plugin's trainers keep the per-case tables out of the model folder (its
dataset.json, the checkpoints' ``init_args``, debug.json): it holds the levels only (:func:`strip_attribute_tables`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

UNKNOWN_CODE = 0
UNKNOWN_LEVEL = "unknown"  # the name of the group / level of cases whose attribute is unknown, everywhere


def channel_suffix(channel: int, file_ending: str) -> str:
    """nnU-Net's file-name ending of image channel ``channel``: ``_0001.nii.gz``."""
    return f"_{int(channel):04d}{file_ending}"


def channel_file(case: str, channel: int, file_ending: str) -> str:
    """nnU-Net's file name of a case's channel: ``RT_0001_0001.nii.gz``."""
    return case + channel_suffix(channel, file_ending)


def cases_in_folder(folder: str, file_ending: str) -> Dict[str, Dict[int, str]]:
    """``case -> {channel: path}`` of the nnU-Net-named images (``CASE_XXXX<file_ending>``) in ``folder``."""
    import os
    import re

    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + "$")
    cases: Dict[str, Dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        m = pattern.match(name)
        if m:
            cases.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(folder, name)
    return cases

_BAD_CODE = ("The attribute channel of {found}, but there are only {n} levels (codes 1..{n}, 0 = unknown). Write "
             "the channel with nnUNetv2_dmoe_attach_attribute using the levels of the model's dataset.json.")
_MISSING_BLOCK = (
    "{where} has no 'attribute' block. nnunet_dmoe needs one: "
    '"attribute": {{"name": ..., "levels": [...], "channel": <index of the noNorm attribute channel>, '
    '"cases": {{case_id: level}}}}. Write the dataset with one of the nnUNetv2_dmoe_convert_* commands or '
    "nnUNetv2_dmoe_make_synthetic, or add the block by hand."
)


def fmt_cases(items: Sequence[str], limit: int = 20, sep: str = ", ") -> str:
    """The first ``limit`` items of an error message's list, then how many more: ``a, b, ... (3 more)``."""
    items = list(items)
    return sep.join(items[:limit]) + (f"{sep}... ({len(items) - limit} more)" if len(items) > limit else "")


_NOT_A_NAME = object()
_LEVEL_NAME_RULE = 'Level names are text; a JSON integer n names the level "n" (write other numbers as text).'


def _level_name(value):
    """The one rule for level names in ``levels``, ``cases`` and ``test_cases``: text as it is, an integer ``n`` as
    ``"n"``, ``None`` (unknown) as ``None``; anything else (a float, a bool, a list) is not a level name."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(int(value))
    return _NOT_A_NAME


@dataclass
class AttributeSpec:
    """The ``attribute`` block of a dataset.json, validated.

    Parameters
    ----------
    name : str
        What the attribute is (``"tstage"``, ``"age"``, ``"race"``).
    levels : list of str
        Ordered level names. ``levels[i]`` is routed by router ``i`` and written as ``i + 1`` in the channel.
        Level names are text; an integer ``n`` (in ``levels``, ``cases`` or ``test_cases`` alike) names the
        level ``"n"``. Other values (floats, bools) are refused.
    channel : int
        Index of the attribute channel among the dataset's ``channel_names``.
    cases : dict
        Training case id -> level name. ``None`` marks a case whose attribute is unknown.
    test_cases : dict
        The same for the ``imagesTs`` cases (project convention, used by the fairness report; training ignores it).
    """

    name: str
    levels: List[str]
    channel: int
    # not in repr(): nnU-Net's debug.json holds the repr of a trainer's attributes, and a model folder to share must
    # not hold the patients' levels
    cases: Dict[str, Optional[str]] = field(default_factory=dict, repr=False)
    test_cases: Dict[str, Optional[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"attribute.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.levels, (list, tuple)) or len(self.levels) == 0:
            raise ValueError(f"attribute.levels must be a non-empty list of level names, got {self.levels!r}")
        names = [_level_name(lv) for lv in self.levels]
        if any(n is None or n is _NOT_A_NAME for n in names):
            raise ValueError(f"attribute.levels must be level names, got {self.levels!r}. {_LEVEL_NAME_RULE}")
        self.levels = names
        if len(set(self.levels)) != len(self.levels):
            raise ValueError(f"attribute.levels has duplicates: {self.levels}")
        if isinstance(self.channel, bool) or not isinstance(self.channel, (int, np.integer)) or self.channel < 0:
            raise ValueError(f"attribute.channel must be a channel index (int >= 0), got {self.channel!r}")
        self.channel = int(self.channel)
        for key in ("cases", "test_cases"):
            given = getattr(self, key)
            table = {c: _level_name(lv) for c, lv in given.items()}  # a copy: the caller's dict stays as it is
            bad = sorted(f"{c} ({given[c]!r})" for c, lv in table.items() if lv is _NOT_A_NAME)
            if bad:
                raise ValueError(f"attribute.{key} has values that are not level names: {fmt_cases(bad)}. "
                                 f"{_LEVEL_NAME_RULE} Use null for an unknown attribute.")
            bad = sorted(f"{c} ({lv!r})" for c, lv in table.items() if lv is not None and lv not in self.levels)
            if bad:
                raise ValueError(
                    f"attribute.{key} has levels that are not in attribute.levels {self.levels}: {fmt_cases(bad)}. "
                    f"Add the level to 'levels' or correct the case."
                )
            setattr(self, key, table)
        clash = sorted(c for c, lv in self.test_cases.items() if c in self.cases and self.cases[c] != lv)
        if clash:
            raise ValueError(f"these cases are in both attribute.cases and attribute.test_cases with different "
                             f"levels: {fmt_cases(clash)}. Keep one entry per case.")

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def level_index(self, level: Optional[str]) -> Optional[int]:
        """Router index of ``level``; ``None`` for an unknown attribute."""
        if level is None:
            return None
        try:
            return self.levels.index(_level_name(level))
        except ValueError:
            raise ValueError(f"level {level!r} is not one of attribute.levels {self.levels}") from None

    def case_level_index(self, case_id: str) -> Optional[int]:
        if case_id not in self.cases:
            raise KeyError(case_id)
        return self.level_index(self.cases[case_id])

    @property
    def all_cases(self) -> Dict[str, Optional[str]]:
        """``cases`` and ``test_cases`` together."""
        return {**self.cases, **self.test_cases}

    def to_block(self) -> dict:
        return {"name": self.name, "levels": list(self.levels), "channel": self.channel, "cases": dict(self.cases),
                "test_cases": dict(self.test_cases)}

    @classmethod
    def from_dataset_json(cls, dataset_json: Mapping, where: str = "dataset.json") -> "AttributeSpec":
        """Read and validate the ``attribute`` block, checking that ``channel`` is a ``noNorm`` channel of the
        dataset. A dataset.json with several attributes (``"attributes"``) has no single spec: use
        :func:`attribute_specs_from_dataset_json`."""
        if "attribute" not in dataset_json and isinstance(dataset_json.get("attributes"), list):
            raise ValueError(f"{where} holds several attributes ('attributes': "
                             f"{[b.get('name') for b in dataset_json['attributes'] if isinstance(b, Mapping)]}); "
                             f"this command takes one attribute. Use a dataset.json with a single 'attribute' block.")
        if "attribute" not in dataset_json:
            raise ValueError(_MISSING_BLOCK.format(where=where))
        return cls.from_block(dataset_json["attribute"], dataset_json, where)

    @classmethod
    def from_block(cls, block: Mapping, dataset_json: Mapping, where: str = "dataset.json") -> "AttributeSpec":
        """Read and validate one attribute block of ``dataset_json`` (its channel checked against the dataset's
        ``channel_names``)."""
        if not isinstance(block, Mapping):
            raise ValueError(f"{where}: an attribute block must be an object with name, levels, channel, cases; got "
                             f"{block!r}")
        missing = [k for k in ("name", "levels", "channel") if k not in block]
        if missing:
            raise ValueError(f"{where}: the attribute block lacks {missing}. Expected keys: name, levels, channel, cases.")
        try:
            spec = cls(name=block["name"], levels=block["levels"], channel=block["channel"],
                       cases=dict(block.get("cases") or {}), test_cases=dict(block.get("test_cases") or {}))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        channel_names = dataset_json.get("channel_names", dataset_json.get("modality"))
        if channel_names is not None:
            cn = channel_names.get(str(spec.channel))
            if cn is None:
                raise ValueError(
                    f"{where}: attribute.channel is {spec.channel} but channel_names has only "
                    f"{sorted(channel_names, key=int)}. Point attribute.channel at the attribute channel."
                )
            if cn.casefold() != "nonorm":
                raise ValueError(
                    f"{where}: attribute.channel {spec.channel} is channel_names[{spec.channel!r}] = {cn!r}, but the "
                    f"attribute channel must be 'noNorm' (nnU-Net would normalise it and destroy the level codes). "
                    f"Set channel_names[\"{spec.channel}\"] to \"noNorm\"."
                )
        return spec


def attribute_specs_from_dataset_json(dataset_json: Mapping, where: str = "dataset.json") -> List[AttributeSpec]:
    """Every attribute of a dataset, in order: ``[the "attribute" block]``, or the blocks of an ``"attributes"``
    list (several distribution axes, e.g. T-stage and centre), each as an ``attribute`` block with its own
    ``noNorm`` channel. Names and channels must differ; a dataset.json has one of the two keys, not both."""
    if "attribute" in dataset_json and "attributes" in dataset_json:
        raise ValueError(f"{where} has both 'attribute' and 'attributes'. Keep one: a single attribute block, or "
                         f"the list of all attribute blocks.")
    if "attributes" not in dataset_json:
        return [AttributeSpec.from_dataset_json(dataset_json, where)]
    blocks = dataset_json["attributes"]
    if not isinstance(blocks, list) or not blocks:
        raise ValueError(f"{where}: 'attributes' must be a non-empty list of attribute blocks (each with name, "
                         f"levels, channel, cases), got {blocks!r}")
    specs = [AttributeSpec.from_block(b, dataset_json, f"{where}, attributes[{i}]") for i, b in enumerate(blocks)]
    for what in ("name", "channel"):
        values = [getattr(s, what) for s in specs]
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:
            raise ValueError(f"{where}: the attributes share the {what} {', '.join(twice)}. Every attribute needs "
                             f"its own {what}" + (" (its own noNorm channel)." if what == "channel" else "."))
    return specs


TABLE_KEYS = ("cases", "test_cases")


def strip_attribute_tables(dataset_json: Mapping) -> dict:
    """A copy of ``dataset_json`` whose attribute block(s) keep name, levels and channel but not the per-case tables
    (``cases``, ``test_cases``): what a model folder needs to predict, without any patient's attribute."""
    out = dict(dataset_json)
    for key in ("attribute", "attributes"):
        if isinstance(out.get(key), Mapping):
            out[key] = {k: v for k, v in out[key].items() if k not in TABLE_KEYS}
        elif isinstance(out.get(key), list):
            out[key] = [{k: v for k, v in b.items() if k not in TABLE_KEYS} if isinstance(b, Mapping) else b
                        for b in out[key]]
    return out


def attribute_settings(specs: Sequence[AttributeSpec]) -> dict:
    """The plans' ``"dmoe"`` entries for the attributes: ``num_levels`` and ``attribute_channel``, as numbers for
    one attribute (what version 0.2 wrote), as lists (one entry per attribute) for several."""
    if len(specs) == 1:
        return {"num_levels": specs[0].num_levels, "attribute_channel": specs[0].channel}
    return {"num_levels": [s.num_levels for s in specs], "attribute_channel": [s.channel for s in specs]}


def encode_attribute_channel(images: np.ndarray, level_index: Optional[int]) -> np.ndarray:
    """Attribute channel for a case.

    ``images`` holds the case's image channels, channels first: ``(c, x, y)`` for a 2D case, ``(c, x, y, z)`` for a
    3D case (nnU-Net's readers return ``(c, 1, x, y)`` for 2D; that works as well). A single-channel image needs
    its channel axis (``image[None]``): a bare 3D volume would be read as 2D channels.

    Returns an ``uint8`` array of the spatial shape ``images.shape[1:]``: ``level_index + 1`` where any image
    channel is non-zero, :data:`UNKNOWN_CODE` (0) elsewhere, and 0 everywhere for an unknown attribute
    (``level_index=None``).
    """
    images = np.asarray(images)
    if images.ndim not in (3, 4):
        raise ValueError(f"encode_attribute_channel expects the image channels first, (c, x, y) or (c, x, y, z), "
                         f"got an array of shape {images.shape}. Add the channel axis of a single image: image[None].")
    footprint = np.any(images != 0, axis=0)
    out = np.full(footprint.shape, UNKNOWN_CODE, dtype=np.uint8)
    if level_index is not None:
        if level_index < 0 or level_index > 253:
            raise ValueError(f"level index {level_index} out of range 0..253")
        out[footprint] = level_index + 1
    return out


def decode_attribute_levels(channel, num_levels: int, check: bool = True,
                            names: Optional[Sequence[str]] = None):
    """Level index per sample of a batch of attribute channels (torch); -1 = unknown.

    The one decoding rule, used by the networks (:func:`nnunet_dmoe.networks.unet.decode_levels`) and by
    :func:`decode_attribute_channel`: the most frequent rounded positive value is the code (ties: the smaller
    code), so resampling blur at the footprint border does not matter; no positive value means unknown
    (:data:`UNKNOWN_CODE`); level index = code - 1. Codes above ``num_levels`` name no level: they are counted
    together, and a sample where they are the most frequent is an error.

    Parameters
    ----------
    channel : torch.Tensor
        ``(b, *spatial)`` or ``(b, 1, *spatial)``, any dtype.
    num_levels : int
        Levels of the attribute (codes ``1..num_levels``).
    check : bool
        Raise ``ValueError`` for a sample whose code is above ``num_levels``. This synchronises with the device
        once; without it (and while ``torch.compile`` traces) such a sample decodes to ``num_levels``, which the
        dMoE routes as unknown. The rest runs without host synchronisation and traces under ``torch.compile``.
    names : sequence of str, optional
        What to call each sample in the error (default: ``sample i of this batch``).

    Returns a ``torch.long`` tensor of shape ``(b,)``.
    """
    import torch

    b = channel.shape[0]
    codes = torch.round(channel.reshape(b, -1).float()).clamp_(UNKNOWN_CODE, num_levels + 1).long()
    counts = torch.zeros(b, num_levels + 2, device=channel.device, dtype=torch.long)
    counts.scatter_add_(1, codes, torch.ones((1, 1), device=channel.device, dtype=torch.long).expand_as(codes))
    positive = counts[:, 1:]  # codes 1..num_levels, then "above num_levels"
    level = torch.where(positive.sum(1) > 0, positive.argmax(1), torch.full((b,), -1, device=channel.device))
    if check and not torch.compiler.is_compiling():
        bad = (level == num_levels).nonzero().flatten().tolist()
        if bad:
            found = []
            for i in bad:
                raw = torch.round(channel[i].float()).long().flatten()
                code = int(raw[raw > num_levels].mode().values)
                found.append(f"{names[i] if names is not None else f'sample {i} of this batch'} decodes to code "
                             f"{code} (level index {code - 1})")
            raise ValueError(_BAD_CODE.format(found=fmt_cases(found, sep="; "), n=num_levels))
    return level


def decode_attribute_channel(channel: np.ndarray, num_levels: int, case: str = "this case") -> Optional[int]:
    """Level index stored in one case's attribute channel (any shape), ``None`` if unknown.

    The rule of :func:`decode_attribute_levels` (most frequent rounded positive value). Raises ``ValueError``
    naming ``case`` if that value does not name one of ``num_levels`` levels.
    """
    import torch

    values = np.ascontiguousarray(channel, dtype=np.float32)
    if not values.flags.writeable:  # a read-only memmap; torch tensors want writable memory
        values = values.copy()
    level = int(decode_attribute_levels(torch.from_numpy(values).reshape(1, -1), num_levels, names=[case])[0])
    return None if level < 0 else level


def channel_disagreement(spec: AttributeSpec, case: str, channel, name: Optional[str] = None) -> Optional[str]:
    """The rule of the trainers' start-up check (:mod:`nnunet_dmoe.trainers.seam.attribute_checks`), which
    ``nnUNetv2_dmoe_plan_and_preprocess`` applies to the raw channel files: one case's attribute channel (any shape)
    decoded by :func:`decode_attribute_channel` against the level that ``spec.cases`` gives ``case`` (unknown =
    code 0). Returns ``None`` when they agree, else ``"dataset.json says T2, the channel holds T3"``; raises
    ``ValueError`` (naming ``name``, default the case) for a code above the number of levels."""
    found = decode_attribute_channel(np.asarray(channel), spec.num_levels, case=name or case)
    expected = spec.case_level_index(case)
    if found == expected:
        return None
    level = (lambda i: UNKNOWN_LEVEL if i is None else spec.levels[i])
    return f"dataset.json says {level(expected)}, the channel holds {level(found)}"
