"""The trainers' start-up check: dataset.json's attribute block against the preprocessed attribute channel."""
from typing import List, Sequence, Union

from nnunet_dmoe.data.attribute import AttributeSpec, channel_disagreement

__all__ = ["check_preprocessed_attribute"]

_CASES_DISAGREE = (
    "dataset.json's {block} and the preprocessed attribute channel (channel {channel}) disagree for "
    "{n} case(s):\n{lines}\nFix the {block} or rewrite the channel (nnUNetv2_dmoe_attach_attribute), then "
    "run nnUNetv2_plan_and_preprocess again."
)


def check_preprocessed_attribute(dataset, specs: Union[AttributeSpec, Sequence[AttributeSpec]]) -> int:
    """Compare dataset.json's level of every case of an nnU-Net dataset object (``nnUNetDatasetBlosc2`` etc.) with
    what its attribute channel decodes to, for one attribute or each of several (every case is loaded once); a code
    above the number of levels is an error too. Raises ``ValueError`` naming every case that disagrees or is
    missing, per attribute; returns the number of cases checked."""
    specs = [specs] if isinstance(specs, AttributeSpec) else list(specs)
    several = len(specs) > 1
    problems: List[List[str]] = [[] for _ in specs]
    for key in dataset.identifiers:
        data = None
        for spec, found_problems in zip(specs, problems):
            if key not in spec.cases:
                where = f"the cases of attribute '{spec.name}'" if several else "attribute.cases"
                found_problems.append(f"  {key}: missing from {where}")
                continue
            if data is None:
                data = dataset.load_case(key)[0]
            try:
                disagreement = channel_disagreement(spec, key, data[spec.channel])
            except ValueError as e:
                found_problems.append(f"  {key}: {e}")
                continue
            if disagreement:
                found_problems.append(f"  {key}: {disagreement}")
    messages = [_CASES_DISAGREE.format(block=f"attribute '{spec.name}'" if several else "attribute block",
                                       channel=spec.channel, n=len(lines), lines="\n".join(lines))
                for spec, lines in zip(specs, problems) if lines]
    if messages:
        raise ValueError("\n\n".join(messages))
    return len(dataset.identifiers)
