"""One reader for attribute tables (case id -> level), shared by the converters, the attribute-channel writer and
the fairness report.

Formats: CSV, TSV (by file ending or sniffed delimiter) and JSON (either ``{case_id: value}`` or a list of
records). Numeric columns can be binned by edges: ``bins=[20, 40, 60, 80]`` gives the levels
``<20, 20-40, 40-60, 60-80, >=80`` (left-closed intervals). Empty cells, ``NaN``, ``unknown`` and ``-1`` codes
given in ``missing_values`` become ``None`` (unknown attribute).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
from typing import Dict, List, Mapping, Optional, Sequence

from nnunet_dmoe.data.attribute import fmt_cases

DEFAULT_MISSING = ("", "nan", "na", "n/a", "none", "null", "unknown")


def bin_labels(edges: Sequence[float]) -> List[str]:
    """Level names for numeric ``edges``: ``[20, 40]`` -> ``['<20', '20-40', '>=40']``."""
    edges = [float(e) for e in edges]
    if not edges:
        raise ValueError("bins: give at least one edge")
    if any(b <= a for a, b in zip(edges[:-1], edges[1:])):
        raise ValueError(f"bins must be strictly increasing, got {edges}")
    fmt = [f"{e:g}" for e in edges]
    return [f"<{fmt[0]}"] + [f"{a}-{b}" for a, b in zip(fmt[:-1], fmt[1:])] + [f">={fmt[-1]}"]


def bin_value(value: float, edges: Sequence[float]) -> str:
    """Level name of ``value`` for ``edges`` (left-closed intervals)."""
    labels = bin_labels(edges)
    idx = sum(1 for e in edges if value >= float(e))
    return labels[idx]


def read_text(path: str, what: str = "table") -> str:
    """The text of a UTF-8 file (a byte-order mark, as Excel writes it, is dropped); other encodings are refused
    with a message that names the file."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: the {what} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}). "
                         f"Save it as UTF-8 (in Excel: 'CSV UTF-8') and run the command again.") from None


def read_json_object(path: str, what: str, fix: str) -> dict:
    """The JSON object ``{...}`` in the file ``path``: a missing file, one that is not UTF-8 JSON, or JSON other than
    an object is a ``ValueError`` that names the file, ``what`` it should be and the ``fix``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the {what} does not exist. {fix}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: the {what} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                         f"{e.start}). {fix}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the {what} is not valid JSON ({e}). {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the {what} must be a JSON object {{...}}, it holds a {type(data).__name__}. {fix}")
    return data


def read_rows(path: str, what: str = "attribute table") -> List[Dict[str, object]]:
    """The rows of a table (CSV, TSV, or JSON records) as dicts. CSV and TSV are read by pandas, every cell as text
    (an empty cell as ``""``); ``what`` names the table in errors."""
    import io

    import pandas as pd

    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        try:
            data = json.loads(read_text(path, what))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}). Fix the file, or give a CSV/TSV table.") from None
        if isinstance(data, Mapping):
            return [{"case": k, "value": v} for k, v in data.items()]
        if isinstance(data, list) and all(isinstance(r, Mapping) for r in data):
            return [dict(r) for r in data]
        raise ValueError(f"{path}: a JSON attribute table must be an object {{case: value}} or a list of records")
    text = read_text(path, what)
    if not text.strip():
        raise ValueError(f"{path}: the {what} is empty")
    if ext == ".tsv":
        delim = "\t"
    elif ext == ".csv":
        delim = ","
    else:
        delim = csv.Sniffer().sniff(text.splitlines()[0], delimiters=",\t;").delimiter
    try:
        frame = pd.read_csv(io.StringIO(text), sep=delim, dtype=str, keep_default_na=False, skipinitialspace=False)
    except pd.errors.ParserError as e:
        raise ValueError(f"{path}: not a {'TSV' if delim == chr(9) else 'CSV'} table ({e}). Fix the file.") from None
    return frame.to_dict("records")


def read_attribute_table(path: str, id_column: Optional[str] = None, attribute_column: Optional[str] = None,
                         bins: Optional[Sequence[float]] = None,
                         missing_values: Sequence[str] = DEFAULT_MISSING,
                         strip_suffix: Optional[str] = None) -> Dict[str, Optional[str]]:
    """Read ``case id -> level name`` (``None`` = unknown) from a table.

    Parameters
    ----------
    path : str
        CSV, TSV or JSON file.
    id_column, attribute_column : str
        Column names. For a JSON object ``{case: value}`` leave them ``None``.
    bins : sequence of float, optional
        Edges for a numeric column; values are replaced by :func:`bin_labels` names.
    missing_values : sequence of str
        Cell texts (case-insensitive) meaning "unknown".
    strip_suffix : str, optional
        Removed from the end of every id (e.g. ``".nii.gz"``).
    """
    if not os.path.isfile(path):
        raise ValueError(f"attribute table {path} does not exist")
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: the attribute table has no rows")
    id_column, attribute_column = _table_columns(path, rows[0], id_column, attribute_column)
    missing = {m.casefold() for m in missing_values}
    out: Dict[str, Optional[str]] = {}
    bad, dup = [], []
    for lineno, row in enumerate(rows, start=2):
        case = str(row[id_column]).strip()
        if strip_suffix and case.endswith(strip_suffix):
            case = case[: -len(strip_suffix)]
        if case in out:
            dup.append(case)
        try:
            out[case] = _cell_level(row[attribute_column], missing, bins)
        except _NotANumber as e:
            bad.append(f"row {lineno} ({case}): {e}")
    if dup:
        raise ValueError(f"{path}: case ids listed more than once: {fmt_cases(sorted(set(dup)))}")
    if bad:
        raise ValueError(f"{path}: column {attribute_column!r} is binned with edges {list(bins)} but these values "
                         f"are not numbers: {fmt_cases(bad, sep='; ')}")
    return out


def _table_columns(path: str, header: Mapping, id_column: Optional[str], attribute_column: Optional[str]):
    """The id and attribute column names (defaults ``case`` and ``value``), each checked against the table's
    ``header``."""
    given = {"id column": id_column, "attribute column": attribute_column}
    id_column, attribute_column = id_column or "case", attribute_column or "value"
    for what, col in (("id column", id_column), ("attribute column", attribute_column)):
        if col not in header:
            name = repr(col) if given[what] else f"{col!r} (the default)"
            raise ValueError(f"{path}: {what} {name} not found; the table has the columns {list(header)}. "
                             f"Name it with -id_column / -attribute_column.")
    return id_column, attribute_column


class _NotANumber(Exception):
    """A cell of a binned column that is not a number."""


def _cell_level(raw, missing, bins: Optional[Sequence[float]]) -> Optional[str]:
    """The level of one attribute cell: ``None`` for a text in ``missing`` (case-folded) or NaN, the bin label with
    ``bins``, else the text (a whole float without its ``.0``). A cell that ``bins`` cannot read raises
    :class:`_NotANumber` with the cell's ``repr``."""
    text = "" if raw is None else str(raw).strip()
    if text.casefold() in missing or (isinstance(raw, float) and math.isnan(raw)):
        return None
    if bins is not None:
        try:
            value = float(text)
        except ValueError:
            raise _NotANumber(repr(text)) from None
        return None if math.isnan(value) else bin_value(value, bins)
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    return text


class _RepeatableColumn(argparse.Action):
    """``-attribute_column A`` stores ``"A"``; several columns (``-attribute_column A B``, or the flag repeated)
    store the list ``["A", "B"]``."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, None)
        columns = ([] if before is None else [before] if isinstance(before, str) else list(before)) + list(values)
        setattr(namespace, self.dest, columns[0] if len(columns) == 1 else columns)


def add_attribute_table_arguments(parser, table_flag: str, table_help: str, required: bool,
                                  column_note: str = "", old_table_flag: Optional[str] = None) -> None:
    """The attribute-table flags of ``nnUNetv2_dmoe_attach_attribute`` and ``nnUNetv2_dmoe_evaluate``: the table
    (``table_flag``), ``-id_column``, ``-attribute_column`` (a column name; several, a list of them) and ``-bins``,
    read by :func:`read_attribute_table`. ``column_note`` says how several columns are used. ``parser`` is a
    :class:`nnunet_dmoe.cli.Parser` (the spellings of version 0.2 still work, with a warning)."""
    if old_table_flag is None:
        parser.add_argument(table_flag, type=str, required=required, default=None, help=table_help)
    else:
        parser.add_renamed(table_flag, old_table_flag, type=str, required=required, default=None, help=table_help)
    parser.add_renamed("-id_column", "--id-column", type=str, default=None,
                       help=f"[OPTIONAL] column of {table_flag} with the case id. Default: 'case'")
    parser.add_renamed("-attribute_column", "--attribute-column", type=str, nargs="+", default=None,
                       action=_RepeatableColumn,
                       help=f"[OPTIONAL] column of {table_flag} with the attribute; several for several attributes "
                            f"(-attribute_column stage centre){column_note}. Default: 'value'")
    parser.add_renamed("-bins", "--bins", nargs="+", type=float, default=None,
                       help="[OPTIONAL] edges that bin a numeric attribute column, e.g. -bins 60 70 gives the "
                            "levels <60, 60-70, >=70 (left-closed). Default: no binning")
