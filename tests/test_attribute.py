"""The attribute block: training and test cases in one validated AttributeSpec."""
import re

import numpy as np
import pytest

from nnunet_dmoe.attribute import UNKNOWN_CODE, AttributeSpec, encode_attribute_channel, fmt_cases


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


@pytest.mark.parametrize("key", ["cases", "test_cases"])
def test_integer_levels_name_text_levels_in_cases_and_test_cases_alike(key):
    table = {"c": 2, "d": np.int64(1), "e": None}
    spec = AttributeSpec(name="grade", levels=[1, "2"], channel=0, **{key: table})
    assert spec.levels == ["1", "2"]
    assert getattr(spec, key) == {"c": "2", "d": "1", "e": None}
    assert table == {"c": 2, "d": np.int64(1), "e": None}  # the caller's dict is left as it is
    assert [spec.level_index(v) for v in (2, "2", 1, None)] == [1, 1, 0, None]
    # the same through dataset.json
    dj = _dj(**{"levels": ["T1", "2"], "cases": {"a": "T1"}, key: {"c": 2}})
    assert getattr(AttributeSpec.from_dataset_json(dj), key)["c"] == "2"


@pytest.mark.parametrize("key", ["cases", "test_cases"])
@pytest.mark.parametrize("value", [2.0, True, ["T1"]])
def test_other_values_are_not_level_names_in_cases_and_test_cases_alike(key, value):
    expected = f"x.json: attribute.{key} has values that are not level names: z ({value!r}). Level names are text"
    with pytest.raises(ValueError, match=re.escape(expected)):
        AttributeSpec.from_dataset_json(_dj(**{"levels": ["T1", "2"], "cases": {"a": "T1"}, key: {"z": value}}),
                                        where="x.json")


@pytest.mark.parametrize("levels", [["T1", 2.5], ["T1", None], [True, "T2"]])
def test_other_values_are_not_level_names_in_levels(levels):
    with pytest.raises(ValueError, match=r"attribute.levels must be level names"):
        AttributeSpec(name="x", levels=levels, channel=0)


# ------------------------------------------------------------------------------------------- channel encoding


def test_encode_2d_channels_first():
    images = np.zeros((2, 3, 4), dtype=np.float32)  # (c, x, y)
    images[0, 0, 1] = 0.5
    images[1, 2, 3] = -1.0  # any channel non-zero counts, negative values too
    out = encode_attribute_channel(images, 2)
    assert out.dtype == np.uint8 and out.shape == (3, 4)
    expected = np.zeros((3, 4), dtype=np.uint8)
    expected[0, 1] = expected[2, 3] = 3
    np.testing.assert_array_equal(out, expected)
    # nnU-Net's 2D layout (c, 1, x, y) gives the same channel with its singleton axis
    np.testing.assert_array_equal(encode_attribute_channel(images[:, None], 2), expected[None])


def test_encode_3d_channels_first_and_unknown():
    volume = np.zeros((2, 3, 4), dtype=np.int16)
    volume[1, 2, :2] = 7
    out = encode_attribute_channel(volume[None], 0)  # (1, x, y, z): one image channel
    assert out.shape == (2, 3, 4)
    assert np.argwhere(out).tolist() == [[1, 2, 0], [1, 2, 1]] and set(out[out > 0].tolist()) == {1}
    unknown = encode_attribute_channel(volume[None], None)
    assert unknown.shape == (2, 3, 4) and unknown.dtype == np.uint8 and not unknown.any()
    assert UNKNOWN_CODE == 0


@pytest.mark.parametrize("shape", [(5, 6), (1, 2, 3, 4, 5)])
def test_encode_refuses_arrays_without_channel_axis(shape):
    with pytest.raises(ValueError, match=r"channels first, \(c, x, y\) or \(c, x, y, z\).*image\[None\]"):
        encode_attribute_channel(np.ones(shape), 1)


# ---------------------------------------------------------------------------------------------- error lists


def test_fmt_cases_lists_at_most_limit_items():
    assert fmt_cases(["a", "b"]) == "a, b"
    assert fmt_cases((f"c{i}" for i in range(5)), limit=3) == "c0, c1, c2, ... (2 more)"
    assert fmt_cases(["x", "y", "z"], limit=2, sep="; ") == "x; y; ... (1 more)"


def test_spec_error_lists_twenty_cases_then_the_count():
    cases = {f"case{i:02d}": "T9" for i in range(25)}
    with pytest.raises(ValueError) as e:
        AttributeSpec(name="tstage", levels=["T1"], channel=0, cases=cases)
    assert "case19 ('T9'), ... (5 more). Add the level" in str(e.value) and "case20" not in str(e.value)
