"""Typed columns of the DVSA bulk tables: strings → numbers and dates, typed ``test_result``/``test_item`` rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from training.dvsa_report import FileReport


def _numeric(s: pd.Series, pattern: str, to: pa.DataType) -> pd.Series:
    """Parse numbers in Arrow (fast on millions of rows); anything else becomes NaN."""
    arr = pc.utf8_trim_whitespace(pa.array(s, type=pa.string(), from_pandas=True))
    arr = pc.if_else(pc.match_substring_regex(arr, pattern), arr, pa.scalar(None, pa.string()))
    out = pd.Series(pc.cast(arr, to).to_numpy(zero_copy_only=False), index=s.index, dtype="float64")
    return out.where(np.isfinite(out))  # a 400-digit mileage casts to inf: missing, like any non-number


def _int(s: pd.Series) -> pd.Series:
    return _numeric(s, r"^[+-]?\d{1,18}$", pa.int64())


def _float(s: pd.Series) -> pd.Series:
    return _numeric(s, r"^[+-]?(\d+\.?\d*|\.\d+)$", pa.float64())


def _date(s: pd.Series) -> pd.Series:
    d = pd.to_datetime(s, errors="coerce", format="ISO8601")
    retry = d.isna() & s.notna()
    if retry.any():
        d[retry] = pd.to_datetime(s[retry], errors="coerce", format="%d/%m/%Y")
    return d


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df.columns else pd.Series([None] * len(df), index=df.index, dtype=object)


def typed_results(df: pd.DataFrame, fr: FileReport) -> pd.DataFrame:
    """Typed ``test_result`` rows; rows without a numeric test_id or a date are bad rows."""
    out = pd.DataFrame(
        {
            "test_id": _int(df["test_id"]),
            "test_date": _date(_col(df, "test_date")),
            "test_class_id": _int(_col(df, "test_class_id")).fillna(4),
            "test_mileage": _float(_col(df, "test_mileage")),
            "make": _col(df, "make"),
            "model": _col(df, "model"),
            "fuel_type": _col(df, "fuel_type"),
            "first_use_date": _date(_col(df, "first_use_date")),
        }
    )
    ok = out["test_id"].notna() & out["test_date"].notna()
    for _ in range(int((~ok).sum())):
        fr.bad(None)
    return out[ok]


def typed_items(df: pd.DataFrame, fr: FileReport, start_seq: int) -> pd.DataFrame:
    """Typed ``test_item`` rows with their order of reading; rows without numeric keys are bad."""
    out = pd.DataFrame(
        {
            "test_id": _int(df["test_id"]),
            "seq": np.arange(start_seq, start_seq + len(df)),
            "rfr_id": _int(df["rfr_id"]),
            "rfr_type_code": _col(df, "rfr_type_code"),
            "location_id": _int(_col(df, "location_id")).fillna(0),
            "dangerous_mark": _col(df, "dangerous_mark"),
            "rfr_comment": _col(df, "rfr_comment"),
        }
    )
    ok = out["test_id"].notna() & out["rfr_id"].notna()
    for _ in range(int((~ok).sum())):
        fr.bad(None)
    return out[ok]
