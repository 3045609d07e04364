"""DVSA bulk files: discovery, header sniffing, byte streams read as UTF-8 and raw row streaming.

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
"""

from __future__ import annotations

import codecs
import gzip
import io
import os
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from training.dvsa_report import BulkFormatError, FileReport

_SUFFIXES = {".txt", ".csv", ".zip", ".gz", ".psv", ".jsonl", ".json", ".ndjson"}
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_TABLE_SUFFIXES = (".txt", ".csv", ".psv")
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
#: Columns beyond those that recognise a table without which none of its rows can be used.
_NEEDED = {"test_result": ("test_date",), "rfr_location": ("location_id",)}
#: Zip method 9, which Python's zipfile reads only with the zipfile-deflate64 package installed.
_DEFLATE64 = 9


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
    if missing := [c for c in _NEEDED.get(kind, ()) if c not in cols]:
        raise BulkFormatError(f"{name}:1: the {kind} table has no {', '.join(missing)} column: {first[:120]!r}")
    return Source(path, member, kind, delimiter, tuple(cols), size)


def discover(paths: Sequence[Path]) -> tuple[list[Source], list[Path]]:
    """Split inputs (files, directories, zips) into bulk tables and MOT History API JSON files."""
    sources: list[Source] = []
    api: list[Path] = []
    for p in _expand(paths):
        if zipfile.is_zipfile(p):
            try:
                with zipfile.ZipFile(p) as zf:
                    members = [i for i in zf.infolist() if not i.is_dir() and not _hidden_member(i.filename)]
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:  # e.g. a broken central directory
                raise BulkFormatError(f"{p}:1: corrupt zip archive: {e}") from e
            for info in members:
                if info.compress_type == _DEFLATE64:
                    _deflate64(p, info.filename)
                if not _is_table_name(info.filename) and is_jsonl(p, info.filename):
                    raise BulkFormatError(f"{p}!{info.filename}:1: zipped API JSON is not supported; unzip it")
                sources.append(sniff(p, info.filename, info.file_size))
        elif p.suffix.lower() in _JSON_SUFFIXES or (not _is_table_name(p.name) and is_jsonl(p)):
            api.append(p)
        else:
            sources.append(sniff(p, None, _data_size(p)))
    return sources, api


def _is_table_name(name: str) -> bool:
    """A file or zip member name that says delimited table (``.csv``, ``.txt``, ``.psv``, also gzipped):
    never read as API JSON whatever its bytes, so a damaged table is refused naming it, not taken for
    JSON and missed (or, zipped, refused as JSON)."""
    return name.lower().removesuffix(".gz").endswith(_TABLE_SUFFIXES)


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
    """Stream one table as DataFrames of strings (column names normalised; empty → None) indexed by
    the rows' record numbers (the header is record 1; the parser's records: a blank line is none, a
    quoted field may span lines, a lone carriage return ends one); ``progress(n)`` is called with each
    piece of ``n`` bytes read (uncompressed)."""
    cols = list(source.columns)
    skipped: list[int] = []  # records the parser skipped, not yet passed by the rows handed out
    last = 1  # the record last handed out (the header)

    def on_invalid(row) -> str:
        skipped.append(row.number)
        fr.skip(row.number, 1 + (row.text or "").count("\n"))  # a quote that ran on: the lines it swallowed too
        return "skip"

    def records(n: int) -> np.ndarray:
        """The record numbers of the next ``n`` parsed rows: the next ones the parser did not skip (it
        reports those of a block before handing out its rows, sometimes a block ahead)."""
        nonlocal last, skipped
        ahead = np.asarray(skipped, dtype=np.int64)
        numbers = np.arange(last + 1, last + 1 + n + len(ahead), dtype=np.int64)
        numbers = numbers[~np.isin(numbers, ahead)][:n]
        if n:
            last = int(numbers[-1])
            skipped = [r for r in skipped if r > last]
        return numbers

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
                numbers = records(batch.num_rows)
                first = pc.replace_substring_regex(batch.column(0), "^\ufeff", "")  # a concatenated file's BOM
                repeated = pc.fill_null(pc.equal(pc.utf8_lower(pc.utf8_trim_whitespace(first)), cols[0]), False)
                n_repeated = pc.sum(repeated).as_py() or 0
                if n_repeated:
                    fr.header_rows += n_repeated
                    batch = batch.filter(pc.invert(repeated))
                    numbers = numbers[~repeated.to_numpy(zero_copy_only=False)]
                if source.delimiter == "," and source.kind in ("test_result", "test_item"):
                    batch, numbers = _drop_runaway_rows(batch, numbers, fr)
                df = batch.to_pandas()
                df.index = pd.Index(numbers)
                fr.rows += len(df)
                check_damage(source, fr)
                pending.append(df)
                n_pending += len(df)
                if n_pending >= chunk_rows:
                    yield pd.concat(pending)
                    pending, n_pending = [], 0
        except (pa.ArrowInvalid, OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
            raise BulkFormatError(f"{source.name}:{fh.lines + 1}: unreadable from this line on: {e}") from e
    check_damage(source, fr)
    if pending:
        yield pd.concat(pending)


def _drop_runaway_rows(batch: pa.RecordBatch, numbers: np.ndarray, fr: FileReport) -> tuple[pa.RecordBatch, np.ndarray]:
    """Rows of the two big tables with a line break inside a field, as bad rows: their fields (codes,
    dates, makes, models) hold none, so it is a quote that ran on and took the lines after it into
    one field (when the field count still matched, the row looked whole). Each counts 1 + the lines
    it swallowed. (A lookup's description may span lines, so lookups are not checked.)"""
    breaks = np.zeros(batch.num_rows, dtype=np.int64)
    for col in batch.columns:
        breaks += pc.fill_null(pc.count_substring(col, "\n"), 0).to_numpy(zero_copy_only=False)
    runaway = breaks > 0
    if not runaway.any():
        return batch, numbers
    for record, n in zip(numbers[runaway].tolist(), breaks[runaway].tolist(), strict=True):
        fr.skip(record, 1 + n)
    return batch.filter(pa.array(~runaway)), numbers[~runaway]


def check_damage(source: Source, fr: FileReport) -> None:
    """Occasional bad rows are counted; a file where most rows are bad (:attr:`FileReport.mostly_bad`)
    is the wrong file or a damaged one: :class:`BulkFormatError` naming its first bad record and what
    most of its bad rows lack (the header's field count, quotes that close, or a usable key value)."""
    if not fr.mostly_bad:
        return
    shape = fr.bad_rows - sum(fr.bad_values.values())
    column, n = max(fr.bad_values.items(), key=lambda kv: kv[1], default=("", 0))
    if n > shape:
        what, why = f"have no readable {column}", 'the forms read are in docs/data.md "Bad rows"'
    else:
        what, why = (
            f"are not well-formed rows of the header's {len(source.columns)} fields",
            f"not a {source.kind} table",
        )
        n = shape
    rows = f"{fr.bad_rows} of {fr.rows} rows " + (what if n == fr.bad_rows else f"are bad, {n} of them {what}")
    raise BulkFormatError(f"{source.name}: record {fr.bad_records[0]}: {rows}; {why}")
