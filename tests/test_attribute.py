"""The attribute block: training and test cases in one validated AttributeSpec."""
import re

import numpy as np
import pytest

from nnunet_dmoe.data.attribute import (UNKNOWN_CODE, AttributeSpec, decode_attribute_channel, decode_attribute_levels,
                                        encode_attribute_channel, fmt_cases)


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


# ------------------------------------------------------------------------------------------- channel decoding


def _channel(shape, fill):
    """A channel of ``shape`` filled from ``fill``: {value: number of voxels}, the rest 0."""
    flat = np.zeros(int(np.prod(shape)), dtype=np.float32)
    i = 0
    for value, n in fill.items():
        flat[i:i + n] = value
        i += n
    return flat.reshape(shape)


# (fill, level index): majority of rounded positive values, ties to the smaller code, blur and overshoot ignored
DECODE_TABLE = [
    ({2.0: 10, 1.4: 4}, 1),             # 1.4 rounds to code 1, the minority
    ({3.2: 5, 2.6: 4, 0.4: 20}, 2),     # 0.4 rounds to 0: not counted
    ({-0.7: 30, 1.0: 1}, 0),            # negative spline overshoot is not a code
    ({1.0: 6, 4.0: 6}, 0),              # tie: the smaller code
    ({}, None),                         # nothing positive: unknown
    ({0.3: 30, -1.0: 5}, None),
    ({4.0: 9, 5.0: 3, 6.0: 3}, 3),      # codes above 4 are a minority: ignored
]


@pytest.mark.parametrize("shape", [(6, 7), (1, 6, 7), (3, 4, 5)])
@pytest.mark.parametrize("fill,expected", DECODE_TABLE)
def test_numpy_and_torch_decoding_share_one_rule(shape, fill, expected):
    import torch

    from nnunet_dmoe.networks.attribute_input import decode_levels
    ch = _channel(shape, fill)
    assert decode_attribute_channel(ch, 4) == expected
    assert decode_attribute_channel(ch.astype(np.float16), 4) == expected
    batch = torch.from_numpy(np.stack([ch, _channel(shape, {2.0: 3})]))
    assert decode_levels(batch, 4).tolist() == [-1 if expected is None else expected, 1]
    assert decode_attribute_levels(batch[:, None], 4).tolist() == [-1 if expected is None else expected, 1]


def test_decoding_reads_read_only_and_integer_arrays():
    ch = _channel((4, 5), {3: 7})
    ro = ch.copy()
    ro.flags.writeable = False
    assert decode_attribute_channel(ro, 4) == 2
    assert decode_attribute_channel(ch.astype(np.uint8), 4) == 2
    assert decode_attribute_channel(ch.astype(np.int16)[:, ::-1], 4) == 2  # negative strides


def test_code_above_levels_is_an_error_naming_the_case_or_sample():
    import torch
    with pytest.raises(ValueError, match=r"^The attribute channel of caseX decodes to code 7 \(level index 6\), but "
                                         r"there are only 4 levels \(codes 1\.\.4, 0 = unknown\)\. Write the channel"):
        decode_attribute_channel(_channel((3, 4, 5), {7.0: 8, 6.0: 3, 2.0: 5}), 4, "caseX")
    # codes above num_levels count together: 5 and 6 outnumber the 2s
    with pytest.raises(ValueError, match="caseY decodes to code 5"):
        decode_attribute_channel(_channel((20,), {5.0: 4, 6.0: 3, 2.0: 5}), 4, "caseY")
    batch = torch.from_numpy(np.stack([_channel((6, 6), f) for f in ({9.0: 3}, {1.0: 3}, {5.0: 4, 6.0: 1})]))
    with pytest.raises(ValueError, match=r"of sample 0 of this batch decodes to code 9 \(level index 8\); sample 2 "
                                         r"of this batch decodes to code 5 \(level index 4\), but there are only 4"):
        decode_attribute_levels(batch, 4)
    # without the check (training) nothing syncs and the bad sample decodes to num_levels (routed as unknown)
    assert decode_attribute_levels(batch, 4, check=False).tolist() == [4, 0, 4]


def test_torch_decoding_without_check_traces_in_one_graph():
    """No host synchronisation in the training path: ``fullgraph=True`` fails on ``.item()``/``.tolist()``."""
    import torch
    import torch._dynamo as dynamo

    from nnunet_dmoe.networks.attribute_input import decode_levels
    dynamo.reset()
    compiled = torch.compile(lambda ch: decode_levels(ch, 4, check=False), backend="aot_eager", fullgraph=True)
    batch = torch.from_numpy(np.stack([_channel((2, 6, 6), f) for f in ({2.0: 9, 1.4: 2}, {}, {4.0: 5, 9.0: 6})]))
    try:
        assert compiled(batch).tolist() == [1, -1, 4]
    finally:
        dynamo.reset()
