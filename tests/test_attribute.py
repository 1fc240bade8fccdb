"""The attribute block: training and test cases in one validated AttributeSpec."""
import pytest

from nnunet_dmoe.attribute import AttributeSpec


def _dj(**attribute):
    block = {"name": "tstage", "levels": ["T1", "T2"], "channel": 1, "cases": {"a": "T1", "b": None}}
    block.update(attribute)
    return {"channel_names": {"0": "CT", "1": "noNorm"}, "attribute": block}


def test_test_cases_round_trip_and_merge():
    spec = AttributeSpec.from_dataset_json(_dj(test_cases={"t": 2, "u": None}, levels=["T1", "2"]))
    assert spec.test_cases == {"t": "2", "u": None}  # JSON numbers name levels as text
    assert spec.all_cases == {"a": "T1", "b": None, "t": "2", "u": None}
    assert AttributeSpec(**{k: v for k, v in spec.to_block().items()}) == spec
    assert AttributeSpec.from_dataset_json(_dj()).to_block()["test_cases"] == {}


@pytest.mark.parametrize("test_cases,message", [
    ({"t": "T9"}, r"x.json: attribute.test_cases has levels that are not in attribute.levels .*t \('T9'\)"),
    ({"a": "T2"}, r"x.json: these cases are in both attribute.cases and attribute.test_cases .*: a\."),
])
def test_bad_test_cases(test_cases, message):
    with pytest.raises(ValueError, match=message):
        AttributeSpec.from_dataset_json(_dj(test_cases=test_cases), where="x.json")
