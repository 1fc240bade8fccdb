"""Flags as nnU-Net spells them; the spellings of version 0.2 keep working for one version, with a warning."""
from nnunet_dmoe.evaluation._entry_point import _parser

NEW = ["-ref", "r", "-pred", "p", "-l", "1", "-o", "o", "-attributes", "t.csv", "-id_column", "case",
       "-attribute_column", "stage", "centre", "-bins", "60", "70", "-bootstrap", "5", "-seed", "3",
       "-nsd_tolerance", "2", "-routing", "rt"]
OLD = ["-ref", "r", "-pred", "p", "-l", "1", "-o", "o", "--attributes", "t.csv", "--id-column", "case",
       "--attribute-column", "stage", "--attribute-column", "centre", "--bins", "60", "70", "--bootstrap", "5",
       "--seed", "3", "--nsd-tolerance", "2", "--routing", "rt"]


def test_old_spellings_set_the_same_options_and_warn(capsys):
    new = vars(_parser().parse_args(NEW))
    assert capsys.readouterr().err == ""
    assert new["attribute_column"] == ["stage", "centre"] and new["bins"] == [60.0, 70.0]
    assert (new["attributes"], new["id_column"], new["bootstrap"], new["seed"], new["nsd_tolerance"]) == \
           ("t.csv", "case", 5, 3, 2.0)
    old = vars(_parser().parse_args(OLD))
    assert old == new
    err = capsys.readouterr().err
    for flag, replacement in (("--attributes", "-attributes"), ("--id-column", "-id_column"),
                              ("--bootstrap", "-bootstrap"), ("--nsd-tolerance", "-nsd_tolerance")):
        assert f"warning: {flag} is deprecated, use {replacement} (the old spelling is removed in version 0.4)" in err


def test_one_attribute_column_is_a_name():
    args = _parser().parse_args(["-ref", "r", "-pred", "p", "-l", "1", "-o", "o", "-attribute_column", "stage"])
    assert args.attribute_column == "stage"


def test_every_command_is_in_the_reference():
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    scripts = re.findall(r"^(nnUNetv2_dmoe_\w+) = ", (root / "pyproject.toml").read_text(), flags=re.M)
    reference = (root / "documentation" / "reference" / "commands.md").read_text()
    assert len(scripts) >= 15 and not [s for s in scripts if f"`{s}`" not in reference]


def test_evaluate_progress_bar_switch():
    base = ["-ref", "r", "-pred", "p", "-l", "1", "-o", "o", "-dataset_json", "d.json"]
    assert _parser().parse_args(base).disable_progress_bar is False
    assert _parser().parse_args(base + ["--disable_progress_bar"]).disable_progress_bar is True
