"""Typed columns of the DVSA bulk tables: strings → numbers and dates, typed ``test_result``/``test_item`` rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from training.dvsa_report import FileReport


def _trimmed(s: pd.Series) -> pa.Array:
    """Strings without surrounding spaces (only spaces, as ClickHouse's ``trimBoth`` on the native path)."""
    return pc.utf8_trim(pa.array(s, type=pa.string(), from_pandas=True), characters=" ")


def _int_exact(s: pd.Series) -> pd.Series:
    """Integers as nullable ``Int64``, exactly (a float cast merged ids above 2**53). ``+502`` and
    leading zeros are read as ClickHouse's ``toInt64OrNull`` reads them; anything else, or a value
    beyond int64, is missing."""
    arr = pc.replace_substring_regex(_trimmed(s), r"^\+([0-9])", r"\1")  # `+-5` stays no number (ClickHouse)
    arr = pc.replace_substring_regex(arr, r"^(-?)0+([0-9])", r"\1\2")  # leading zeros
    digits = pc.replace_substring_regex(arr, r"^-", "")
    ok = pc.and_(
        pc.match_substring_regex(arr, r"^-?[0-9]{1,19}$"),
        # 19 digits: at most int64's limits (equal-length digit strings compare as numbers); -2**63 too
        pc.or_(
            pc.or_(pc.less(pc.utf8_length(digits), 19), pc.less_equal(digits, "9223372036854775807")),
            pc.equal(arr, "-9223372036854775808"),
        ),
    )
    out = pc.cast(pc.if_else(ok, arr, pa.scalar(None, pa.string())), pa.int64())
    values = out.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get).array  # by position, not label
    return pd.Series(values, index=s.index, dtype="Int64")


def _int(s: pd.Series) -> pd.Series:
    """Integers as float64 with NaN for missing (the small lookup ids)."""
    return _int_exact(s).astype("float64")


def _float(s: pd.Series) -> pd.Series:
    """Parse numbers in Arrow (fast on millions of rows); anything else becomes NaN."""
    arr = _trimmed(s)
    arr = pc.if_else(pc.match_substring_regex(arr, r"^[+-]?(\d+\.?\d*|\.\d+)$"), arr, pa.scalar(None, pa.string()))
    out = pd.Series(pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False), index=s.index, dtype="float64")
    return out.where(np.isfinite(out))  # a 400-digit mileage casts to inf: missing, like any non-number


#: The date forms read (docs/data.md), the same in SQL (chload): ISO ``2021-03-04`` or ``dd/mm/yyyy``
#: (day and month of 1 or 2 digits), each optionally followed by `` `` or ``T`` and a time (ignored);
#: surrounding spaces are trimmed; years 1900–2261 (pandas' and ClickHouse's Date32 ranges).
DATE_ISO = r"^([0-9][0-9][0-9][0-9])-([0-9][0-9])-([0-9][0-9])(?:[T ].*)?$"
DATE_DMY = r"^([0-9][0-9]?)/([0-9][0-9]?)/([0-9][0-9][0-9][0-9])(?:[T ].*)?$"
DATE_YEARS = (1900, 2261)


def _date(s: pd.Series) -> pd.Series:
    """Dates (day precision) in the forms of :data:`DATE_ISO` / :data:`DATE_DMY`; anything else NaT."""
    t = _trimmed(s)
    out = None
    for pattern, fmt in ((DATE_ISO, "%Y-%m-%d"), (DATE_DMY, "%d/%m/%Y")):
        part = pc.if_else(pc.match_substring_regex(t, pattern), t, pa.scalar(None, pa.string()))
        part = pc.replace_substring_regex(part, pattern, r"\1-\2-\3" if fmt[1] == "Y" else r"\1/\2/\3")
        d = pd.to_datetime(pd.Series(part.to_numpy(zero_copy_only=False), index=s.index, dtype=object),
                           errors="coerce", format=fmt)  # fmt: skip
        out = d if out is None else out.fillna(d)
    assert out is not None
    return out.where(out.dt.year.between(*DATE_YEARS))


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series([None] * len(df), index=df.index, dtype=object)


def _int16(s: pd.Series, default: int = 4) -> pd.Series:
    return s.where(s.between(-(2**15), 2**15 - 1).fillna(False)).fillna(default).astype("int16")


def keep_usable(out: pd.DataFrame, fr: FileReport, keys: tuple[str, ...]) -> pd.DataFrame:
    """The rows of ``out`` (indexed by record number) with a value in every key column; the others
    are bad rows of ``fr``, counted by the first key they lack."""
    ok = pd.Series(True, index=out.index)
    for key in keys:
        lacking = ok & out[key].isna()
        fr.unusable(out.index[lacking.to_numpy()], key)
        ok &= ~lacking
    return out[ok.to_numpy()]


def typed_results(df: pd.DataFrame, fr: FileReport) -> pd.DataFrame:
    """Typed ``test_result`` rows; rows without a numeric test_id or a date are bad rows."""
    out = pd.DataFrame(
        {
            "test_id": _int_exact(df["test_id"]),
            "test_date": _date(_col(df, "test_date")),
            # a class beyond int16 (the column's type on both paths) is missing, as a non-number is
            "test_class_id": _int16(_int_exact(_col(df, "test_class_id"))),
            "test_mileage": _float(_col(df, "test_mileage")),
            "make": _col(df, "make"),
            "model": _col(df, "model"),
            "fuel_type": _col(df, "fuel_type"),
            "first_use_date": _date(_col(df, "first_use_date")),
        }
    )
    return keep_usable(out, fr, ("test_id", "test_date")).astype({"test_id": "int64"})


def typed_items(df: pd.DataFrame, fr: FileReport, start_seq: int) -> pd.DataFrame:
    """Typed ``test_item`` rows with their order of reading (``seq``); rows without numeric keys are bad."""
    out = pd.DataFrame(
        {
            "test_id": _int_exact(df["test_id"]),
            "seq": np.arange(start_seq, start_seq + len(df)),
            "rfr_id": _int_exact(df["rfr_id"]),
            "rfr_type_code": _col(df, "rfr_type_code"),
            "location_id": _int_exact(_col(df, "location_id")).fillna(0).astype("int64"),
            "dangerous_mark": _col(df, "dangerous_mark"),
            "rfr_comment": _col(df, "rfr_comment"),
        }
    )
    return keep_usable(out, fr, ("test_id", "rfr_id")).astype({"test_id": "int64", "rfr_id": "int64"})
