"""Reader for the DVSA anonymised MOT bulk files → tidy defect table chunks.

Accepts ``test_result``, ``test_item``, ``item_detail``, ``item_group`` and the location lookup
``mdr_rfr_location``, each pipe- or comma-delimited (sniffed from the header), plain, gzipped or in
zip archives (any number of members); directories are searched recursively, skipping hidden files
and directories (and zip members under ``__MACOSX/`` or starting with ``.``). Tables are recognised
by their header, not their file names; DVSA's lookups motlens does not use (fuel types, test
outcomes and types) are recognised and left out. Bytes that are not UTF-8 are read as latin-1;
header rows repeated inside a file (from concatenated extracts) are dropped; comma files undo both
``""`` and ``\\"`` escapes; rows with the wrong number of fields, without a usable key, or (comma
``test_result``/``test_item``) with a line break inside a field are counted in the report and
skipped. A file that cannot be read at all raises :class:`BulkFormatError` naming the file and line.

Memory stays bounded: ``test_result`` and ``test_item`` are streamed in blocks and hash-partitioned
by ``test_id`` into Arrow files in a temporary directory (``tmp_dir``, default ``$TMPDIR``); each
partition is then joined with the (small) lookups and labelled (``training.mot_labels``). Partitions
are 32 MiB of input, up to 512 of them (16 GiB of input); beyond that a partition holding more than
1.5 × 32 MiB of input is split again by ``test_id`` into sub-partitions of ≈ 32 MiB before its join,
so memory is set by the partition size at any input size (docs/data.md "Bounded memory"). The
2 × 512 open partition files need an open-file limit above 1024: the soft limit is raised towards
the hard one, else :class:`BulkResourceError`.
"""

from __future__ import annotations

import codecs
import errno
import gzip
import io
import math
import os
import re
import tempfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
from tqdm import tqdm

from motlens.labels import SEVERITIES
from training import mot_labels
from training.tidy import TIDY_COLUMNS

_SUFFIXES = {".txt", ".csv", ".zip", ".gz", ".psv", ".jsonl", ".json", ".ndjson"}
_KIND_MARKERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("test_result", frozenset({"test_id", "test_result"})),
    ("test_item", frozenset({"test_id", "rfr_id", "rfr_type_code"})),
    ("item_detail", frozenset({"rfr_id", "rfr_desc"})),
    ("item_group", frozenset({"test_item_id", "item_name"})),
    ("rfr_location", frozenset({"lateral", "longitudinal"})),
)
_ALIASES = {
    "dmark": "dangerous_mark",
    "id": "location_id",
    "odometer": "test_mileage",
    "mot_test_rfr_location_type_id": "location_id",  # test_item from 2024 on
}
#: DVSA lookup tables motlens does not need (they come in DVSA's lookup zip): recognised and left out.
_UNUSED_KINDS: tuple[tuple[str, frozenset[str]], ...] = (
    ("mdr_fuel_types", frozenset({"type_code", "fuel_type"})),
    ("mdr_test_outcome", frozenset({"result_code", "result"})),
    ("mdr_test_type", frozenset({"type_code", "test_type"})),
)
UNUSED_KINDS = frozenset(k for k, _ in _UNUSED_KINDS)
#: Zip method 9, which Python's zipfile reads only with the zipfile-deflate64 package installed.
_DEFLATE64 = 9
_REQUIRED_KINDS = ("test_result", "test_item", "item_detail")
_MAX_BAD_FRACTION = 0.5
#: Open files stay bounded (2 per partition); beyond 16 GiB of input, partitions hold more than
#: ``bucket_bytes`` of input and are split again before their join (:meth:`BulkReader._split`).
_MAX_PARTITIONS = 512
#: A partition is split when it holds more than this many ``bucket_bytes`` of input, into
#: sub-partitions of ``bucket_bytes`` but never under ``_MIN_SUB_BYTES`` of input.
_SPLIT_ABOVE = 1.5
_MIN_SUB_BYTES = 1 << 20
#: How much of a partition a split reads before writing it out to the sub-partitions.
_SPLIT_READ_BYTES = 16 << 20
#: Open files beyond the partition files: the inputs, Python, Arrow, the tidy writer, the caller's own.
_SPARE_FILES = 64
SOURCE_NAME = "dvsa_bulk"


class BulkFormatError(ValueError):
    """An input file cannot be read; the message starts with ``path:line:``."""


class BulkResourceError(RuntimeError):
    """The machine lacks what a bulk read needs (open files, temporary disk); the message says what."""


def ensure_open_files(needed: int) -> None:
    """Raise the soft ``RLIMIT_NOFILE`` to ``needed`` (up to the hard limit) when it is lower;
    :class:`BulkResourceError` naming the limit needed when the hard limit is lower still."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise (the C runtime's own is 8192 handles)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard == resource.RLIM_INFINITY or hard >= needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
            return
        except (ValueError, OSError):  # e.g. macOS caps the soft limit at OPEN_MAX below an unlimited hard one
            pass
    raise BulkResourceError(
        f"reading these bulk files needs up to {needed} open files at once, but this process may open only {soft} "
        f"(hard limit {hard}): raise it first, e.g. `ulimit -n {needed}` in the shell that runs motlens "
        "(a hard limit can be raised only by root: /etc/security/limits.conf, or LimitNOFILE= for a "
        "systemd service), or load into ClickHouse (`motlens data load --clickhouse`)"
    )


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
            "unlabelled": self.unlabelled,
            "rows_out": self.rows_out,
            "sections": {str(k): v for k, v in sorted(self.sections.items())},
            "severities": {s: self.severities.get(s, 0) for s in SEVERITIES},
        }


@dataclass(frozen=True)
class Source:
    """One readable table: a file, or a member of a zip archive."""

    path: Path
    member: str | None
    kind: str
    delimiter: str
    columns: tuple[str, ...]
    size: int

    @property
    def name(self) -> str:
        return f"{self.path}!{self.member}" if self.member else str(self.path)

    def open(self) -> IO[bytes]:
        return _open_bytes(self.path, self.member)


def _open_bytes(path: Path, member: str | None) -> IO[bytes]:
    if member is not None:
        zf = zipfile.ZipFile(path)
        return zf.open(member)
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")  # noqa: SIM115 - the caller closes it


def _expand(paths: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in _visible_files(p) if f.is_file() and f.suffix.lower() in _SUFFIXES))
        elif p.exists():
            out.append(p)
        else:
            raise BulkFormatError(f"{p}:0: no such file or directory")
    return out


def _visible_files(folder: Path) -> Iterator[Path]:
    """Files below ``folder`` except hidden ones and those in hidden directories (a name starting with
    ``.``, such as the staging directory a killed ``motlens data synth`` leaves in its output)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        yield from (Path(root, f) for f in files if not f.startswith("."))


def is_jsonl(path: Path, member: str | None = None) -> bool:
    """Whether a file holds JSON (MOT History API) rather than a delimited table."""
    name = f"{path}!{member}" if member else str(path)
    try:
        with _open_bytes(path, member) as fh:
            head = fh.read(4096).lstrip()
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error, RuntimeError, NotImplementedError) as e:
        # a fake .gz, an encrypted or deflate64 zip member, a corrupt local header …
        raise BulkFormatError(f"{name}:1: cannot open: {e}") from e
    return head[:1] in (b"{", b"[")


def sniff(path: Path, member: str | None = None, size: int = 0) -> Source:
    """Recognise a bulk table by its header line: delimiter, kind and normalised column names."""
    name = f"{path}!{member}" if member else str(path)
    try:
        with _open_bytes(path, member) as fh:
            head = fh.read(65536)
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error, RuntimeError, NotImplementedError) as e:
        raise BulkFormatError(f"{name}:1: cannot open: {e}") from e
    if b"\x00" in head[:4096]:
        raise BulkFormatError(f"{name}:1: binary data, not a delimited text table")
    first = head.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1").lstrip("\ufeff\xef\xbb\xbf")
    delimiter = "|" if first.count("|") >= first.count(",") else ","
    if first.count(delimiter) == 0:
        raise BulkFormatError(f"{name}:1: no pipe- or comma-delimited header in {first[:80]!r}")
    cols = [c.strip().strip('"').strip().lower() for c in first.split(delimiter)]
    cols = [_ALIASES.get(c, c) for c in cols]
    twice = sorted({c for c in cols if c and cols.count(c) > 1})
    if twice:
        raise BulkFormatError(f"{name}:1: the header names {', '.join(twice)} more than once")
    kind = next((k for k, marks in (*_KIND_MARKERS, *_UNUSED_KINDS) if marks <= set(cols)), None)
    if kind is None:
        raise BulkFormatError(f"{name}:1: header matches no DVSA table: {first[:120]!r}")
    return Source(path, member, kind, delimiter, tuple(cols), size)


def discover(paths: Sequence[Path]) -> tuple[list[Source], list[Path]]:
    """Split inputs (files, directories, zips) into bulk tables and MOT History API JSON files."""
    sources: list[Source] = []
    api: list[Path] = []
    for p in _expand(paths):
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as zf:
                members = [i for i in zf.infolist() if not i.is_dir() and not _hidden_member(i.filename)]
            for info in members:
                if info.compress_type == _DEFLATE64:
                    _deflate64(p, info.filename)
                if is_jsonl(p, info.filename):
                    raise BulkFormatError(f"{p}!{info.filename}:1: zipped API JSON is not supported; unzip it")
                sources.append(sniff(p, info.filename, info.file_size))
        elif p.suffix.lower() in (".jsonl", ".json", ".ndjson") or is_jsonl(p):
            api.append(p)
        else:
            sources.append(sniff(p, None, _data_size(p)))
    return sources, api


def _hidden_member(name: str) -> bool:
    """A zip member to skip as a directory's hidden files are: any part of its path starting with
    ``.``, or macOS's ``__MACOSX/`` metadata (AppleDouble ``._*.csv`` files, binary)."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def _deflate64(path: Path, member: str) -> None:
    """Make Deflate64 members readable when the optional ``zipfile-deflate64`` package is installed
    (DVSA's 2022 and 2023 archives use it); a clear error naming the ways out otherwise."""
    try:
        import zipfile_deflate64  # noqa: F401 - registers the method with zipfile on import
    except ImportError:
        raise BulkFormatError(
            f"{path}!{member}:1: compressed with Deflate64 (zip method 9), which Python's zipfile cannot read: "
            "`pip install zipfile-deflate64` (motlens then reads it), or extract the archive first "
            "(`7z x` or `unzip`) and pass the extracted files"
        ) from None


def _data_size(path: Path) -> int:
    """Bytes of table text in ``path``: for ``.gz`` the uncompressed size from the gzip trailer
    (ISIZE, modulo 4 GiB: a wrapped or unreadable value counts as 8× the file), so partitions are
    sized by what is read, not by what is stored."""
    stored = path.stat().st_size
    if path.suffix.lower() != ".gz" or stored < 18:
        return stored
    try:
        with open(path, "rb") as fh:
            fh.seek(-4, io.SEEK_END)
            isize = int.from_bytes(fh.read(4), "little")
    except OSError:
        return stored * 8
    return isize if isize >= stored else stored * 8


class _Utf8Stream(io.RawIOBase):
    """A byte stream re-encoded as valid UTF-8: bytes that are not UTF-8 are read as latin-1.

    Counts the lines handed out (to name the line where reading failed) and the non-UTF-8 byte
    sequences met (``FileReport.non_utf8_values``).
    """

    def __init__(self, fh: IO[bytes], fr: FileReport, progress: Callable[[int], object] | None = None):
        self._fh = fh
        self._fr = fr
        self._progress = progress
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self._buf = b""
        self._eof = False
        self.lines = 0

    def readable(self) -> bool:
        return True

    def _fill(self, want: int) -> None:
        while len(self._buf) < want and not self._eof:
            data = self._fh.read(1 << 16)  # small pieces, so a failure is located to the line
            self._eof = not data
            if data.isascii() and not self._decoder.getstate()[0]:
                out = data
            else:
                text, bad = _ESCAPED.subn(_as_latin1, self._decoder.decode(data, final=self._eof))
                out = text.encode("utf-8")
                self._fr.non_utf8_values += bad
            self.lines += data.count(b"\n")
            self._buf += out
            if self._progress is not None and data:
                self._progress(len(data))

    def readinto(self, b) -> int:
        view = memoryview(b)
        self._fill(len(view))
        n = min(len(view), len(self._buf))
        view[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


# Bytes that are not UTF-8 decode (surrogateescape) to U+DC80–U+DCFF; read them as latin-1.
_ESCAPED = re.compile("[\udc80-\udcff]+")


def _as_latin1(m: re.Match) -> str:
    return "".join(chr(ord(c) - 0xDC00) for c in m.group())


def iter_raw(
    source: Source, fr: FileReport, chunk_rows: int = 200_000, progress: Callable[[int], object] | None = None
) -> Iterator[pd.DataFrame]:
    """Stream one table as DataFrames of strings (column names normalised; empty → None);
    ``progress(n)`` is called with each piece of ``n`` bytes read (uncompressed)."""
    cols = list(source.columns)

    def on_invalid(row) -> str:
        fr.bad(row.number)  # a row whose quotes ran on counts the lines it swallowed too
        for _ in range((row.text or "").count("\n")):
            fr.bad(None)
        return "skip"

    read = pacsv.ReadOptions(column_names=cols, skip_rows=1, block_size=4 << 20, use_threads=False)
    parse = pacsv.ParseOptions(
        delimiter=source.delimiter,
        quote_char='"' if source.delimiter == "," else False,
        escape_char="\\" if source.delimiter == "," else False,  # DVSA writes \" inside quoted fields
        invalid_row_handler=on_invalid,
        ignore_empty_lines=True,
    )
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in cols}, null_values=[""], strings_can_be_null=True
    )
    pending: list[pd.DataFrame] = []
    n_pending = 0
    with _Utf8Stream(source.open(), fr, progress) as fh:
        try:
            reader = pacsv.open_csv(fh, read_options=read, parse_options=parse, convert_options=convert)
            for batch in reader:
                repeated = pc.equal(pc.utf8_lower(pc.utf8_trim_whitespace(batch.column(0))), cols[0])
                n_repeated = pc.sum(repeated).as_py() or 0
                if n_repeated:
                    fr.header_rows += n_repeated
                    batch = batch.filter(pc.invert(pc.fill_null(repeated, False)))
                if source.delimiter == "," and source.kind in ("test_result", "test_item"):
                    batch = _drop_runaway_rows(batch, fr)
                df = batch.to_pandas()
                fr.rows += len(df)
                _check_shape(source, fr)
                pending.append(df)
                n_pending += len(df)
                if n_pending >= chunk_rows:
                    yield pd.concat(pending, ignore_index=True)
                    pending, n_pending = [], 0
        except (pa.ArrowInvalid, OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
            raise BulkFormatError(f"{source.name}:{fh.lines + 1}: unreadable from this line on: {e}") from e
    _check_shape(source, fr)
    if pending:
        yield pd.concat(pending, ignore_index=True)


def _drop_runaway_rows(batch: pa.RecordBatch, fr: FileReport) -> pa.RecordBatch:
    """Rows of the two big tables with a line break inside a field, as bad rows: their fields (codes,
    dates, makes, models) hold none, so it is a quote that ran on and took the lines after it into
    one field (when the field count still matched, the row looked whole). Each counts 1 + the lines
    it swallowed. (A lookup's description may span lines, so lookups are not checked.)"""
    breaks = None
    for col in batch.columns:
        n = pc.fill_null(pc.count_substring(col, "\n"), 0)
        breaks = n if breaks is None else pc.add(breaks, n)
    swallowed = pc.sum(breaks).as_py() if breaks is not None else 0
    if not swallowed:
        return batch
    runaway = pc.greater(breaks, 0)
    for _ in range(pc.sum(runaway).as_py() + swallowed):
        fr.bad(None)
    return batch.filter(pc.invert(runaway))


def _check_shape(source: Source, fr: FileReport) -> None:
    """Occasional bad rows are counted; a file where most rows are bad is the wrong file."""
    if fr.bad_rows > 100 and fr.bad_rows > _MAX_BAD_FRACTION * (fr.rows + fr.bad_rows):
        raise BulkFormatError(
            f"{source.name}:{fr.bad_lines[0]}: {fr.bad_rows} of {fr.rows + fr.bad_rows} rows "
            f"do not have the {len(source.columns)} fields of the header; not a {source.kind} table"
        )


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


#: A defect row is a duplicate when all of these repeat (as the ClickHouse path's ReplacingMergeTree key).
_ITEM_KEY = ["test_id", "rfr_id", "rfr_type_code", "location_id", "dangerous_mark", "rfr_comment"]

_RESULT_SCHEMA = pa.schema(
    [
        ("test_id", pa.int64()),
        ("test_date", pa.timestamp("ns")),
        ("test_class_id", pa.int16()),
        ("test_mileage", pa.float64()),
        ("make", pa.string()),
        ("model", pa.string()),
        ("fuel_type", pa.string()),
        ("first_use_date", pa.timestamp("ns")),
    ]
)
_ITEM_SCHEMA = pa.schema(
    [
        ("test_id", pa.int64()),
        ("seq", pa.int64()),
        ("rfr_id", pa.int64()),
        ("rfr_type_code", pa.string()),
        ("location_id", pa.int64()),
        ("dangerous_mark", pa.string()),
        ("rfr_comment", pa.string()),
    ]
)


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


class _Partitions:
    """Hash partitions of one table by test_id, as Arrow IPC stream files: partition
    ``(test_id // stride) % n`` (``stride`` > 1 splits a partition of ``stride`` partitions again)."""

    def __init__(self, root: Path, name: str, n: int, schema: pa.Schema, stride: int = 1):
        self.paths = [root / f"{name}-{i:04d}.arrow" for i in range(n)]
        self.schema = schema
        self.stride = stride
        self._writers: dict[int, ipc.RecordBatchStreamWriter] = {}

    def write(self, df: pd.DataFrame) -> None:
        self.write_table(pa.Table.from_pandas(df, schema=self.schema, preserve_index=False))

    def write_table(self, table: pa.Table) -> None:
        n = len(self.paths)
        ids = table.column("test_id").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        buckets = ids // self.stride % n
        if n > 1:  # one gather, then a slice per partition (a filter per partition scanned every row n times)
            order = np.argsort(buckets, kind="stable")  # rows keep their order within a partition
            table, buckets = table.take(pa.array(order)), buckets[order]
        bounds = np.searchsorted(buckets, np.arange(n + 1))
        try:
            for b in np.flatnonzero(np.diff(bounds)):
                w = self._writers.get(int(b))
                if w is None:
                    w = self._writers[int(b)] = ipc.new_stream(self.paths[int(b)], self.schema)
                w.write_table(table.slice(bounds[b], bounds[b + 1] - bounds[b]))
        except OSError as e:  # a full disk, or open files beyond the limit
            where = self.paths[0].parent
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise BulkResourceError(
                    f"cannot open another temporary partition file in {where}: {e}; the process holds "
                    f"{len(self._writers)} of them and other open files: raise the open-file limit (ulimit -n)"
                ) from e
            raise BulkResourceError(
                f"cannot write the temporary partition files in {where}: {e}; they need about as much free "
                "space as the input (uncompressed): choose another place with --tmp-dir or TMPDIR"
            ) from e

    def close(self) -> None:
        for w in self._writers.values():
            w.close()

    def abandon(self) -> None:
        """Close the files after a failure, quietly: the temporary directory is removed next."""
        for w in self._writers.values():
            try:
                w.close()
            except (OSError, pa.ArrowException):
                pass
        self._writers.clear()

    def read(self, i: int) -> pd.DataFrame:
        if not self.paths[i].exists():
            return self.schema.empty_table().to_pandas()
        with ipc.open_stream(self.paths[i]) as r:
            return r.read_all().to_pandas()

    def size(self, i: int) -> int:
        return self.paths[i].stat().st_size if self.paths[i].exists() else 0

    def split(self, i: int, into: _Partitions) -> None:
        """Stream partition ``i`` into ``into`` (rows keep their order), then delete it. Its batches are
        small (a block's share: ≈ 1/512 of it) and are gathered into ≈ ``_SPLIT_READ_BYTES`` before
        each write, so the sub-partitions do not get batches a further ``len(into.paths)`` times smaller."""
        if self.paths[i].exists():
            try:
                with ipc.open_stream(self.paths[i]) as r:
                    pending: list[pa.RecordBatch] = []
                    size = 0
                    for batch in r:
                        pending.append(batch)
                        size += batch.nbytes
                        if size >= _SPLIT_READ_BYTES:
                            into.write_table(pa.Table.from_batches(pending, schema=self.schema))
                            pending, size = [], 0
                    if pending:
                        into.write_table(pa.Table.from_batches(pending, schema=self.schema))
            except BaseException:
                into.abandon()
                raise
            self.paths[i].unlink()
        into.close()


@dataclass
class Lookups:
    detail: pd.DataFrame  # one row per (rfr_id, test_class_id)
    group_root: dict[tuple[int, int], str]  # (test_item_id, class) → top-level item_group name
    locations: dict[int, str]


def load_lookups(sources: list[Source], report: BulkReport) -> Lookups:
    frames: dict[str, list[pd.DataFrame]] = {"item_detail": [], "item_group": [], "rfr_location": []}
    names: dict[str, list[str]] = {k: [] for k in frames}
    for src in sources:
        if src.kind in UNUSED_KINDS:
            report.unused_tables.append(src.name)
        if src.kind in frames:
            fr = FileReport(src.name, src.kind, src.delimiter)
            report.files.append(fr)
            names[src.kind].append(src.name)
            frames[src.kind].extend(iter_raw(src, fr))
    for kind, needed in (("item_detail", "rfr_id"), ("item_group", "test_item_id"), ("rfr_location", "location_id")):
        if names[kind] and not frames[kind] and kind == "item_detail":
            raise BulkFormatError(f"{names[kind][0]}:2: the item_detail table holds no rows")
        if frames[kind] and not any(needed in f.columns for f in frames[kind]):
            raise BulkFormatError(f"{names[kind][0]}:1: the {kind} table has no {needed} column")
    detail = pd.concat(frames["item_detail"], ignore_index=True)
    detail = pd.DataFrame(
        {
            "rfr_id": _int(detail["rfr_id"]),
            "test_class_id": _int(_col(detail, "test_class_id")).fillna(4),
            "test_item_id": _int(_col(detail, "test_item_id")),
            "rfr_desc": _col(detail, "rfr_desc"),
            "rfr_insp_manual_desc": _col(detail, "rfr_insp_manual_desc"),
            "rfr_advisory_text": _col(detail, "rfr_advisory_text"),
            "rfr_deficiency_category": _col(detail, "rfr_deficiency_category"),
        }
    )
    detail = detail[detail["rfr_id"].notna()].drop_duplicates(["rfr_id", "test_class_id"], keep="last")
    group_root: dict[tuple[int, int], str] = {}
    if frames["item_group"]:
        g = pd.concat(frames["item_group"], ignore_index=True)
        ids, cls, parents = (
            _int(g["test_item_id"]),
            _int(_col(g, "test_class_id")).fillna(4),
            _int(_col(g, "parent_id")),  # without parents every group is its own root
        )
        nodes = {
            (int(i), int(c)): (int(p) if p == p else 0, str(n or ""))
            for i, c, p, n in zip(ids, cls, parents, _col(g, "item_name"), strict=True)
            if i == i
        }
        for i, c in nodes:
            node, seen = (i, c), set()
            while nodes.get(node, (0, ""))[0] and node not in seen:
                seen.add(node)
                node = (nodes[node][0], c)
            group_root[(i, c)] = nodes.get(node, (0, ""))[1]
    locations: dict[int, str] = {}
    if frames["rfr_location"]:
        loc = pd.concat(frames["rfr_location"], ignore_index=True)
        parts = [c for c in ("lateral", "longitudinal", "vertical", "horizontal") if c in loc.columns]
        for lid, *vals in zip(_int(loc["location_id"]), *(loc[c] for c in parts), strict=True):
            if lid == lid:
                locations[int(lid)] = " ".join(v.strip() for v in vals if v and v.strip())
    return Lookups(detail, group_root, locations)


def _defect_text(location: str, desc: str, comment: str, ref: str) -> str:
    text = " ".join(p.strip() for p in (location, desc, comment) if p and p.strip())
    if ref and mot_labels.section_from_text(desc) is None:
        text = f"{text} ({ref.strip()})"
    return text


def label_defects(m: pd.DataFrame, post: pd.Series, lk: Lookups) -> tuple[np.ndarray, np.ndarray, pd.Series]:
    """Text, section (-1 = none) and severity (None = none) of defect rows joined with ``item_detail``.

    ``m`` needs rfr_id, test_class_id, test_item_id, location_id, rfr_comment, rfr_type_code,
    dangerous_mark and the item_detail columns; ``post`` marks tests on or after 20 May 2018.
    Texts are built once per distinct combination: they repeat massively.
    """
    key = pd.DataFrame(
        {
            "rfr_id": m["rfr_id"].to_numpy(),
            "test_class_id": m["test_class_id"].to_numpy(),
            "location_id": m["location_id"].to_numpy(),
            "comment_code": pd.factorize(m["rfr_comment"])[0],
            "advisory": mot_labels.normalised(m["rfr_type_code"], str.upper).eq("A").to_numpy(),
            "post": np.asarray(post, dtype=bool),
        }
    )
    gid = key.groupby(list(key.columns), sort=False).ngroup().to_numpy()
    first = key.drop_duplicates().index.to_numpy()
    cols = ["rfr_desc", "rfr_advisory_text", "rfr_insp_manual_desc", "rfr_comment", "location_id", "test_item_id",
            "test_class_id"]  # fmt: skip
    uniq = m[cols].iloc[first].assign(advisory=key["advisory"].to_numpy()[first], post=key["post"].to_numpy()[first])
    texts: list[str] = []
    sections: list[int] = []
    for row in uniq.itertuples(index=False):
        desc = row.rfr_desc
        if row.advisory and isinstance(row.rfr_advisory_text, str) and row.rfr_advisory_text.strip():
            desc = row.rfr_advisory_text
        ref = row.rfr_insp_manual_desc if mot_labels.is_reference(row.rfr_insp_manual_desc) else ""
        comment = row.rfr_comment if isinstance(row.rfr_comment, str) else ""
        text = _defect_text(lk.locations.get(int(row.location_id), ""), desc, comment, ref)
        section = mot_labels.section_from_text(text) if row.post else None
        if section is None and row.test_item_id == row.test_item_id:
            root = lk.group_root.get((int(row.test_item_id), int(row.test_class_id)), "")
            section = mot_labels.section_from_group(root)
        texts.append(text)
        sections.append(-1 if section is None else section)
    severity = mot_labels.bulk_severity(m["rfr_type_code"], m["rfr_deficiency_category"], m["dangerous_mark"])
    return np.asarray(texts, dtype=object)[gid], np.asarray(sections, dtype=np.int8)[gid], severity


class FileProgress:
    """A byte-granular bar's progress through one file of ``size`` bytes: called with the bytes just
    read, it never moves the bar past the file (a .gz's size may be an estimate); :meth:`finish`
    moves it to the file's end."""

    def __init__(self, bar: Any, size: int) -> None:
        self.bar, self.left = bar, size

    def __call__(self, k: int) -> None:
        step = min(k, self.left)
        if step > 0:
            self.left -= step
            self.bar.update(step)

    def finish(self) -> None:
        self(self.left)


class BulkReader:
    """Iterate tidy chunks from DVSA bulk files; ``report`` fills in as reading proceeds."""

    def __init__(
        self,
        paths: Sequence[Path],
        chunk_rows: int = 200_000,
        bucket_bytes: int = 32 << 20,
        tmp_dir: Path | None = None,
        max_partitions: int = _MAX_PARTITIONS,
    ):
        self.sources, self.api_paths = discover(paths)
        self.chunk_rows = chunk_rows
        self.bucket_bytes = bucket_bytes
        self.max_partitions = max_partitions
        self.tmp_dir = tmp_dir  # None: tempfile's choice ($TMPDIR, $TEMP, $TMP, else /tmp)
        self.report = BulkReport()
        kinds = {s.kind for s in self.sources}
        missing = [k for k in _REQUIRED_KINDS if k not in kinds]
        if missing:
            names = ", ".join(str(p) for p in paths)
            raise BulkFormatError(f"{names}:0: no {', '.join(missing)} table among the inputs")

    @property
    def partitions(self) -> int:
        """How many hash partitions the read uses (two open files each while reading)."""
        size = sum(s.size for s in self.sources if s.kind in ("test_result", "test_item"))
        return min(self.max_partitions, max(1, math.ceil(size / self.bucket_bytes)))

    def __iter__(self) -> Iterator[pd.DataFrame]:
        n = self.partitions
        ensure_open_files(2 * n + _SPARE_FILES)  # before any work, not after hours of it
        lookups = load_lookups(self.sources, self.report)
        big = [s for s in self.sources if s.kind in ("test_result", "test_item")]
        total = sum(s.size for s in big)
        quiet = total < 50 << 20  # as the other bars: shown for big inputs only
        with tempfile.TemporaryDirectory(prefix="motlens-bulk-", dir=self.tmp_dir) as tmp:
            results = _Partitions(Path(tmp), "result", n, _RESULT_SCHEMA)
            items = _Partitions(Path(tmp), "item", n, _ITEM_SCHEMA)
            try:
                self._partition(big, results, items, quiet)
            except BaseException:
                results.abandon()  # open files would keep the temporary directory from being removed
                items.abandon()
                raise
            results.close()
            items.close()
            arrow_bytes = sum(p.size(i) for p in (results, items) for i in range(n))
            sub_bytes = max(self.bucket_bytes, _MIN_SUB_BYTES)
            with tqdm(total=n, unit="part", desc="join + label", disable=quiet) as bar:
                for i in range(n):
                    # the partition's share of the input, from its share of the Arrow bytes
                    share = total * (results.size(i) + items.size(i)) / max(1, arrow_bytes)
                    parts = [(results, items, i)]
                    if share > _SPLIT_ABOVE * sub_bytes:
                        parts = self._split(Path(tmp), results, items, i, math.ceil(share / sub_bytes))
                        bar.total += len(parts) - 1  # the bar counts what is joined
                        bar.refresh()
                    for res, it, j in parts:
                        tidy = self._join(res.read(j), it.read(j), lookups)
                        bar.update(1)  # before the yields: the caller's writing runs between them
                        for start in range(0, len(tidy), self.chunk_rows):
                            yield tidy.iloc[start : start + self.chunk_rows].reset_index(drop=True)

    def _split(
        self, root: Path, results: _Partitions, items: _Partitions, i: int, k: int
    ) -> list[tuple[_Partitions, _Partitions, int]]:
        """Split partition ``i`` of both tables into ``k`` (≤ 512) sub-partitions by ``test_id // n``
        (all its ids are ``i`` modulo ``n``); the partition's files are deleted once split."""
        k = min(k, _MAX_PARTITIONS)
        ensure_open_files(2 * k + _SPARE_FILES)
        n = len(results.paths)
        sub_res = _Partitions(root, f"result-{i:04d}", k, results.schema, stride=n)
        sub_it = _Partitions(root, f"item-{i:04d}", k, items.schema, stride=n)
        results.split(i, sub_res)
        items.split(i, sub_it)
        return [(sub_res, sub_it, j) for j in range(k)]

    def _partition(self, big: list[Source], results: _Partitions, items: _Partitions, quiet: bool) -> None:
        """Read the big tables into their hash partitions, with a byte-granular bar."""
        seq = 0
        with tqdm(total=sum(s.size for s in big), unit="B", unit_scale=True, desc="read bulk", disable=quiet) as bar:
            for src in big:
                fr = FileReport(src.name, src.kind, src.delimiter)
                self.report.files.append(fr)
                advance = FileProgress(bar, src.size)
                for raw in iter_raw(src, fr, self.chunk_rows, progress=advance):
                    if src.kind == "test_result":
                        results.write(typed_results(raw, fr))
                    else:
                        typed = typed_items(raw, fr, seq)
                        seq += len(raw)
                        items.write(typed)
                advance.finish()

    def _join(self, res: pd.DataFrame, it: pd.DataFrame, lk: Lookups) -> pd.DataFrame:
        rep = self.report
        dup = res.duplicated("test_id", keep="first")
        rep.duplicate_tests += int(dup.sum())
        res = res[~dup]
        dup = it.duplicated(_ITEM_KEY, keep="first")
        rep.duplicate_items += int(dup.sum())
        it = it[~dup]
        m = it.merge(res, on="test_id", how="inner", sort=False)
        rep.orphan_items += len(it) - len(m)
        m = m.merge(lk.detail, on=["rfr_id", "test_class_id"], how="left", sort=False)
        miss = m["rfr_desc"].isna() & m["rfr_id"].isin(lk.detail["rfr_id"])
        if miss.any():  # a class without its own lookup row: use the rfr's first entry
            by_rfr = lk.detail.drop_duplicates("rfr_id").set_index("rfr_id")
            for c in ("test_item_id", "rfr_desc", "rfr_insp_manual_desc", "rfr_advisory_text",
                      "rfr_deficiency_category"):  # fmt: skip
                m.loc[miss, c] = m.loc[miss, "rfr_id"].map(by_rfr[c])
        known = m["rfr_desc"].notna()
        rep.unknown_rfr += int((~known).sum())
        m = m[known].sort_values("seq", kind="stable").reset_index(drop=True)
        if m.empty:
            return pd.DataFrame(columns=list(TIDY_COLUMNS))

        text, section, severity = label_defects(m, m["test_date"] >= pd.Timestamp(mot_labels.EU_CUTOFF), lk)
        age = (m["test_date"] - m["first_use_date"]).dt.days / 365.25
        mileage = m["test_mileage"].where(m["test_mileage"] >= 0)
        out = pd.DataFrame(
            {
                "text": text,
                "section": section,
                "severity": severity,
                "make": m["make"],
                "model": m["model"],
                "fuel_type": m["fuel_type"],
                "vehicle_age_years": age.where((age >= 0) & (age < 150)).astype("float32"),
                "odometer_miles": mileage.astype("float32"),
                "test_date": m["test_date"],
                "test_id": m["test_id"].astype("int64"),
                "source": SOURCE_NAME,
            }
        )
        labelled = (out["section"] >= 0) & out["severity"].notna()
        rep.unlabelled += int((~labelled).sum())
        out = out[labelled].reset_index(drop=True)
        rep.add_labels(out)
        return out


def read_bulk(
    paths: Sequence[Path], chunk_rows: int = 200_000, report: BulkReport | None = None, tmp_dir: Path | None = None
) -> Iterator[pd.DataFrame]:
    """Tidy chunks from DVSA bulk files; pass ``report`` (or use :class:`BulkReader`) to get the counts."""
    reader = BulkReader(paths, chunk_rows, tmp_dir=tmp_dir)
    if report is not None:
        reader.report = report
    yield from reader
