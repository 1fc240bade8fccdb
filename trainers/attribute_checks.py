"""The trainers' start-up check: dataset.json's attribute block against the preprocessed attribute channel."""
import numpy as np

from nnunet_dmoe.attribute import AttributeSpec, decode_attribute_channel

__all__ = ["check_preprocessed_attribute"]

_CASES_DISAGREE = (
    "dataset.json's attribute block and the preprocessed attribute channel (channel {channel}) disagree for "
    "{n} case(s):\n{lines}\nFix the attribute block or rewrite the channel (nnUNetv2_dmoe_attach_attribute), then "
    "run nnUNetv2_plan_and_preprocess again."
)


def check_preprocessed_attribute(dataset, spec: AttributeSpec) -> int:
    """Compare dataset.json's level of every case of an nnU-Net dataset object (``nnUNetDatasetBlosc2`` etc.) with
    what its attribute channel decodes to; a code above the number of levels is an error too. Raises
    ``ValueError`` naming every case that disagrees or is missing; returns the number of cases checked."""
    problems = []
    name = (lambda i: "unknown" if i is None else spec.levels[i])
    for key in dataset.identifiers:
        if key not in spec.cases:
            problems.append(f"  {key}: missing from attribute.cases")
            continue
        data = dataset.load_case(key)[0]
        try:
            found = decode_attribute_channel(np.asarray(data[spec.channel]), spec.num_levels, case=key)
        except ValueError as e:
            problems.append(f"  {key}: {e}")
            continue
        expected = spec.case_level_index(key)
        if found != expected:
            problems.append(f"  {key}: dataset.json says {name(expected)}, the channel holds {name(found)}")
    if problems:
        raise ValueError(_CASES_DISAGREE.format(channel=spec.channel, n=len(problems), lines="\n".join(problems)))
    return len(dataset.identifiers)
