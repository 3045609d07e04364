"""Reader for MOT History API responses saved as JSON lines → tidy defect table chunks.

Each line holds one vehicle (or a JSON array of vehicles) as the API returns it:
``{"make", "model", "fuelType", "firstUsedDate"|"registrationDate", "motTests": [{"completedDate",
"odometerValue", "odometerUnit", "motTestNumber", "defects": [{"text", "type", "dangerous"}]}]}``.
The older API's ``rfrAndComments`` list is read like ``defects``. The section comes from the manual
reference at the end of ``text`` (tests from 20 May 2018 on); severity from ``type`` and
``dangerous`` (``training.mot_labels``). Lines that are not JSON are counted, not fatal.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from motlens.labels import OTHER_FUEL, fuel_code
from training import mot_labels
from training.dvsa_files import _data_size
from training.dvsa_reader import FileProgress
from training.dvsa_report import BulkFormatError, BulkReport, FileReport
from training.tidy import TIDY_COLUMNS

SOURCE_NAME = "mot_history_api"
_KM_TO_MILES = 0.621371


def _date(value: object) -> dt.date | None:
    """API dates: ``2023-05-21T10:22:45.000Z``, ``2013.11.15 10:57:45``, ``2010-03-01``."""
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return dt.date.fromisoformat(value[:10].replace(".", "-"))
    except ValueError:
        return None


def _fuel(value: object) -> str | None:
    """``fuelType`` as its DVSA code (``motlens.labels``, shared with serving); a spelling it does not know is OT."""
    if not isinstance(value, str) or not value.strip():
        return None
    return fuel_code(value) or OTHER_FUEL


def _miles(value: object, unit: object) -> float | None:
    try:
        v = float(str(value).replace(",", ""))
    except ValueError:
        return None
    if not math.isfinite(v) or v < 0:  # 1e400 parses as inf: a reading that means nothing
        return None
    miles = v * _KM_TO_MILES if str(unit or "").strip().lower() in ("km", "kilometres") else v
    return miles if miles <= float(np.finfo(np.float32).max) else None  # the column is float32: inf there


def _test_id(value: object) -> int | None:
    """``motTestNumber`` as an int64 id: an integer, an integral finite number or a string of digits;
    anything else (``true``, ``12.9``, ``1e400``, beyond int64) has no id."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            return None
        value = int(value)
    elif isinstance(value, str):
        v = value.strip()
        if not v.isascii() or not v.isdigit() or len(v) > 19:
            return None
        value = int(v)
    if not isinstance(value, int):
        return None
    return value if 0 <= value < 2**63 else None  # the tidy column is int64


def _flag(value: object) -> bool:
    """``dangerous`` read strictly: true, 1, or the text true/1/y/yes (any case); ``"false"`` is false."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value == 1
    return isinstance(value, str) and value.strip().lower() in ("true", "1", "y", "yes")


class _Malformed(ValueError):
    """A vehicle document whose structure is not the API's (counted as a bad row, not fatal)."""


def _objects(value: object, what: str) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise _Malformed(f"'{what}' is not a list of objects")
    return value


def _text(value: object) -> str | None:
    """A string field as a string; numbers become their text, anything else missing."""
    if value is None or isinstance(value, str):
        return value
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _vehicle_rows(vehicle: dict) -> tuple[list[dict], int]:
    """Tidy rows of one vehicle and how many defects had no label; :class:`_Malformed` when its
    structure is not the API's."""
    first_use = _date(vehicle.get("firstUsedDate") or vehicle.get("registrationDate") or vehicle.get("manufactureDate"))
    rows: list[dict] = []
    unlabelled = 0
    for test in _objects(vehicle.get("motTests"), "motTests"):
        when = _date(test.get("completedDate"))
        defects = _objects(test.get("defects") or test.get("rfrAndComments"), "defects")
        test_id = _test_id(test.get("motTestNumber"))
        age = (when - first_use).days / 365.25 if when and first_use and when >= first_use else None
        for d in defects:
            text = " ".join(str(d.get("text") or "").split())
            severity = mot_labels.api_severity(d.get("type"), _flag(d.get("dangerous")))
            section = mot_labels.section_from_text(text) if when and when >= mot_labels.EU_CUTOFF else None
            if not text or severity is None or section is None:
                unlabelled += 1
                continue
            rows.append(
                {
                    "text": text,
                    "section": section,
                    "severity": severity,
                    "make": _text(vehicle.get("make")),
                    "model": _text(vehicle.get("model")),
                    "fuel_type": _fuel(_text(vehicle.get("fuelType"))),
                    "vehicle_age_years": age,
                    "odometer_miles": _miles(test.get("odometerValue"), test.get("odometerUnit")),
                    "test_date": when,
                    "test_id": test_id,
                    "source": SOURCE_NAME,
                }
            )
    return rows, unlabelled


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(TIDY_COLUMNS))
    df["section"] = df["section"].astype("int8")
    df["vehicle_age_years"] = df["vehicle_age_years"].astype("float32")
    df["odometer_miles"] = df["odometer_miles"].astype("float32")
    df["test_id"] = df["test_id"].astype("Int64")
    return df


def _documents(path: Path, fr: FileReport, progress: Callable[[int], object]) -> Iterator[tuple[int, object]]:
    """(line, parsed JSON) of a JSON-lines file, or of a whole ``.json`` file (pretty-printed allowed);
    ``progress(n)`` is told of the bytes read (uncompressed)."""
    try:
        data = path.read_bytes() if path.suffix.lower() == ".json" else None
        if data is None:  # a gzipped JSON-lines file is read through gzip (discover saw through it too)
            fh = gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")  # noqa: SIM115
        else:
            fh = None
    except OSError as e:
        raise BulkFormatError(f"{path}:0: cannot open: {e}") from e
    if data is not None:
        if b"\x00" in data:
            raise BulkFormatError(f"{path}:1: binary data, not JSON")
        try:
            doc = json.loads(_decode(data, fr))
        except json.JSONDecodeError as e:
            raise BulkFormatError(f"{path}:{e.lineno}: not JSON: {e.msg}") from e
        except ValueError as e:  # an integer literal beyond Python's 4300 digits
            raise BulkFormatError(f"{path}:1: not JSON: {e}") from e
        except RecursionError as e:
            raise BulkFormatError(f"{path}:1: JSON nested too deeply") from e
        progress(len(data))
        yield 1, doc
        return
    assert fh is not None
    with fh:
        yield from _lines(path, fh, fr, progress)


def _lines(path: Path, fh: Any, fr: FileReport, progress: Callable[[int], object]) -> Iterator[tuple[int, object]]:
    lineno = 0
    pending = 0  # bytes not yet reported: the bar moves every 64 KiB, not every line
    try:
        for lineno, raw in enumerate(fh, start=1):
            pending += len(raw)
            if pending >= 1 << 16:
                progress(pending)
                pending = 0
            if b"\x00" in raw:
                raise BulkFormatError(f"{path}:{lineno}: binary data, not JSON lines")
            if not raw.strip():
                continue
            try:
                doc = json.loads(_decode(raw, fr))
            # RecursionError: nesting beyond any vehicle; ValueError (JSONDecodeError is one): also an
            # integer literal beyond Python's 4300 digits
            except (ValueError, RecursionError):
                fr.skip(lineno)
                continue
            yield lineno, doc
    except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt .gz
        raise BulkFormatError(f"{path}:{lineno + 1}: unreadable: {e}") from e
    if pending:
        progress(pending)


def _decode(raw: bytes, fr: FileReport) -> str:
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is no JSON
    except UnicodeDecodeError:
        fr.non_utf8_values += 1
        return raw.decode("latin-1")


def read_jsonl(
    paths: Sequence[Path], chunk_rows: int = 200_000, report: BulkReport | None = None
) -> Iterator[pd.DataFrame]:
    """Tidy chunks from MOT History API JSON-lines (or whole JSON) files; counts go into ``report``."""
    report = report if report is not None else BulkReport()
    rows: list[dict] = []
    # overlapping downloads repeat vehicles: each test counts once. The chunk's own test ids are a set;
    # earlier chunks' are sorted int64 arrays (8 bytes a test, where a set of all took ≈ 94)
    chunk_tests: set[int] = set()
    seen = _SeenTests()

    def flush() -> Iterator[pd.DataFrame]:
        nonlocal rows
        ids = np.fromiter(chunk_tests, dtype=np.int64, count=len(chunk_tests))
        known = seen.contains(ids)
        if known.any():
            repeated = set(ids[known].tolist())
            report.duplicate_tests += len(repeated)
            rows = [r for r in rows if r["test_id"] not in repeated]
        seen.add(ids[~known])
        chunk_tests.clear()
        if rows:
            df = _frame(rows)
            report.add_labels(df)
            yield df
        rows = []

    sizes = [_data_size(p) if p.suffix.lower() == ".gz" else p.stat().st_size for p in map(Path, paths)]
    with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="read API JSON", disable=sum(sizes) < 50 << 20) as bar:
        for path, size in zip(map(Path, paths), sizes, strict=True):
            fr = FileReport(str(path), "mot_history_api", "")
            report.files.append(fr)
            advance = FileProgress(bar, size)
            for lineno, doc in _documents(path, fr, advance):
                vehicles = doc if isinstance(doc, list) else [doc]
                for v in vehicles:
                    if not isinstance(v, dict):
                        fr.skip(lineno)
                        continue
                    try:
                        got, unlabelled = _vehicle_rows(v)
                    except (_Malformed, AttributeError, TypeError, ValueError, OverflowError):
                        fr.skip(lineno)
                        continue
                    fr.rows += 1
                    report.unlabelled += unlabelled
                    ids = {r["test_id"] for r in got if r["test_id"] is not None}
                    if repeated := ids & chunk_tests:
                        report.duplicate_tests += len(repeated)
                        got = [r for r in got if r["test_id"] not in repeated]
                    chunk_tests.update(ids)
                    rows.extend(got)
                if len(rows) >= chunk_rows:
                    yield from flush()
            advance.finish()
            if fr.rows and fr.bad_rows == fr.rows:
                raise BulkFormatError(f"{path}:{fr.bad_records[0]}: no line is MOT History API JSON")
        yield from flush()


class _SeenTests:
    """A set of int64 test ids as a few sorted arrays (runs); a new run is merged into the one before
    while it is at least half that one's size, so there are O(log n) runs and each id is copied
    O(log n) times."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def contains(self, ids: np.ndarray) -> np.ndarray:
        found = np.zeros(len(ids), dtype=bool)
        for run in self.runs:
            at = np.searchsorted(run, ids).clip(max=len(run) - 1)
            found |= run[at] == ids
        return found

    def add(self, ids: np.ndarray) -> None:
        """Add ids (distinct, none already present)."""
        if not len(ids):
            return
        run = np.sort(ids)
        while self.runs and 2 * len(run) >= len(self.runs[-1]):
            run = np.sort(np.concatenate([self.runs.pop(), run]))
        self.runs.append(run)
