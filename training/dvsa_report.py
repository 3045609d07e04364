"""What a DVSA bulk read reports: its errors and its counts per file and in all."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from motlens.labels import SEVERITIES


class BulkFormatError(ValueError):
    """An input file cannot be read; the message starts with ``path:line:``, or ``path: record N:`` for
    a table refused for its bad rows (records as :class:`FileReport` counts them)."""


class BulkResourceError(RuntimeError):
    """The machine lacks what a bulk read needs (open files, temporary disk); the message says what."""


#: A file is refused when more than this share of its rows (and over :data:`MIN_REFUSED` rows) are bad.
MAX_BAD_FRACTION = 0.5
MIN_REFUSED = 100


@dataclass
class FileReport:
    """What reading one file (or zip member) found.

    ``rows`` counts every data row read (repeated header rows and blank lines aside), the bad ones
    included: ``rows - bad_rows`` rows went on. ``bad_records`` holds the record numbers of the
    first ten bad rows (docs/data.md "Bad rows"); ``bad_values`` counts the bad rows that had the
    right field count but no usable value, by the first key column lacking one (``test_date``, …).
    """

    name: str
    kind: str
    delimiter: str
    rows: int = 0
    bad_rows: int = 0
    header_rows: int = 0
    non_utf8_values: int = 0
    bad_records: list[int] = field(default_factory=list)
    bad_values: dict[str, int] = field(default_factory=dict)

    def skip(self, record: int, n: int = 1) -> None:
        """``n`` rows read and skipped, the first at ``record``."""
        self.rows += n
        self.bad_rows += n
        self._note([record])

    def unusable(self, records: Sequence[int], column: str) -> None:
        """Rows already counted as read, at ``records``, skipped for want of a usable ``column`` value."""
        if len(records):
            self.bad_rows += len(records)
            self.bad_values[column] = self.bad_values.get(column, 0) + len(records)
            self._note(records)

    def _note(self, records: Sequence[int]) -> None:
        """Keep the ten smallest record numbers: the readers find bad rows out of order (a parsed block
        ahead of the rows being typed)."""
        self.bad_records = sorted({*self.bad_records, *(int(r) for r in records[:10])})[:10]

    @property
    def mostly_bad(self) -> bool:
        """Whether the file is refused: most of its rows (and over :data:`MIN_REFUSED`) are bad."""
        return self.bad_rows > MIN_REFUSED and self.bad_rows > MAX_BAD_FRACTION * self.rows


@dataclass
class BulkReport:
    """Counts for a whole read: per-file rows and bad rows, joins, labels."""

    files: list[FileReport] = field(default_factory=list)
    #: DVSA lookup tables recognised and left out (:data:`UNUSED_KINDS`)
    unused_tables: list[str] = field(default_factory=list)
    duplicate_tests: int = 0
    duplicate_items: int = 0
    orphan_items: int = 0
    unknown_rfr: int = 0
    #: item_detail rows whose description fragment was prefixed with its item's name
    item_named_rfrs: int = 0
    unlabelled: int = 0
    rows_out: int = 0
    sections: Counter = field(default_factory=Counter)
    severities: Counter = field(default_factory=Counter)

    @property
    def rows_read(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def bad_rows(self) -> int:
        return sum(f.bad_rows for f in self.files)

    def add_labels(self, df: pd.DataFrame) -> None:
        self.rows_out += len(df)
        self.sections.update({int(k): int(v) for k, v in df["section"].value_counts().items()})
        self.severities.update({str(k): int(v) for k, v in df["severity"].value_counts().items()})

    def summary(self) -> str:
        """The counts on one line, with the files that had bad rows (for a log)."""
        keys = ("rows_read", "bad_rows", "duplicate_tests", "duplicate_items", "orphan_items", "unknown_rfr",
                "unlabelled", "rows_out")  # fmt: skip
        bad = "; ".join(
            f"{f.name}: {f.bad_rows} of {f.rows} rows bad{f' {f.bad_values}' if f.bad_values else ''}, "
            f"first bad records {f.bad_records}"
            for f in self.files
            if f.bad_rows
        )
        return ", ".join(f"{k}={getattr(self, k)}" for k in keys) + (f" ({bad})" if bad else "")

    def to_dict(self) -> dict:
        return {
            "files": [vars(f) for f in self.files],
            "unused_tables": list(self.unused_tables),
            "rows_read": self.rows_read,
            "bad_rows": self.bad_rows,
            "duplicate_tests": self.duplicate_tests,
            "duplicate_items": self.duplicate_items,
            "orphan_items": self.orphan_items,
            "unknown_rfr": self.unknown_rfr,
            "item_named_rfrs": self.item_named_rfrs,
            "unlabelled": self.unlabelled,
            "rows_out": self.rows_out,
            "sections": {str(k): v for k, v in sorted(self.sections.items())},
            "severities": {s: self.severities.get(s, 0) for s in SEVERITIES},
        }
