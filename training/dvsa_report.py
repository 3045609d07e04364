"""What a DVSA bulk read reports: its errors and its counts per file and in all."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from motlens.labels import SEVERITIES


class BulkFormatError(ValueError):
    """An input file cannot be read; the message starts with ``path:line:``."""


class BulkResourceError(RuntimeError):
    """The machine lacks what a bulk read needs (open files, temporary disk); the message says what."""


@dataclass
class FileReport:
    """What reading one file (or zip member) found."""

    name: str
    kind: str
    delimiter: str
    rows: int = 0
    bad_rows: int = 0
    header_rows: int = 0
    non_utf8_values: int = 0
    bad_lines: list[int] = field(default_factory=list)

    def bad(self, line: int | None) -> None:
        self.bad_rows += 1
        if line is not None and len(self.bad_lines) < 10:
            self.bad_lines.append(line)


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
