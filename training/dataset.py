"""Tidy defect rows → the de-duplicated training set (docs/training.md "Training set").

MOT texts repeat massively, so the unit of training is the distinct normalised text
(:func:`motlens.embedder.normalise_text`) with its majority section and severity, its row count and
its context aggregated (mean age, geometric-mean odometer, most frequent fuel, make and model).
The held-out split (:func:`assign_split`) is a seeded hash of each text's :func:`split_key`
(casefolded, leading location words removed), so the same text never sits on both sides, neither do
its case or location variants; or, with ``split_by="defect"``, of its defect group
(:func:`split_groups`: the DVSA defect, ``rfr_id`` and advisory flag, that each bulk row carries as
``split_group``), so its tester-comment variants do not either. It does not depend on input order or
chunking. Rows stream through in
chunks (constant memory apart from the distinct-text table); a seeded row-level sample of all
labelled rows (both sides, uniform over rows, as traffic is) keeps real per-row context for the
drift reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from motlens.embedder import normalise_text
from motlens.labels import FAILING_SEVERITIES, SEVERITIES

CONTEXT_COLUMNS: tuple[str, ...] = ("make", "model", "fuel_type", "vehicle_age_years", "odometer_miles")
# The words a defect text's location is made of: ``_defect_text`` (training/dvsa_lookups.py) puts the
# location lookup's ``lateral longitudinal vertical horizontal`` first, whose values are these
# (as `training/synth.py`'s ``_LOCATIONS`` generates them: Nearside/Offside/Central ×
# Front/Rear × Inner/Outer/Upper/Lower); the MOT History API's text starts the same way.
LOCATION_WORDS = frozenset({"nearside", "offside", "central", "front", "rear", "inner", "outer", "upper", "lower"})
#: the ``split.scheme`` param (:func:`assign_split`): by split key (``split_by="text"``, the default),
#: or by defect group (``"defect"``; when no row carries a defect that is the split by key again)
SPLIT_SCHEME_TEXT = "group-casefold-nolocation-v1"
SPLIT_SCHEME_DEFECT = "group-rfr-v2"
SPLIT_BY = ("text", "defect")
_COMBINE_EVERY = 8
#: context sums in fixed point (units of 1e-7 years of age, 1e-8 of log odometer): exact int64 sums, so
#: the means do not depend on row order or chunking; no overflow below ~9e9 rows of one text
_FIXED_POINT = {"vehicle_age_years": 10**7, "log_odo": 10**8}
log = logging.getLogger(__name__)


class DataError(ValueError):
    """Training data that cannot be used; the message names the problem."""


@dataclass
class TrainingSet:
    """Distinct texts with labels, counts, aggregated context and the held-out flag."""

    texts: pd.DataFrame  # key order; columns in docs/training.md
    reference_rows: pd.DataFrame  # labelled rows of both sides: ``text_index`` + per-row context
    fingerprint: dict[str, Any] = field(default_factory=dict)
    split_seed: int | None = None  # the seed of :func:`group_holdout` (None: unknown, e.g. a hand-made set)
    split_scheme: str = SPLIT_SCHEME_TEXT  # as :func:`assign_split` says

    @property
    def train(self) -> pd.DataFrame:
        return self.texts[~self.texts["holdout"]]

    @property
    def holdout(self) -> pd.DataFrame:
        return self.texts[self.texts["holdout"]]


def split_key(text: str) -> str:
    """The text's own split label (:func:`split_groups`): the text casefolded, its leading
    run of :data:`LOCATION_WORDS` removed, so "Nearside Front Brake pipe corroded" and "offside rear
    brake pipe corroded" share one key (MiniLM lowercases: case variants embed identically, and
    location variants of one defect are near-duplicates). A text of location words only keeps them."""
    words = text.casefold().split()
    i = 0
    while i < len(words) and words[i] in LOCATION_WORDS:
        i += 1
    return " ".join(words[i:] if i < len(words) else words)


def split_groups(keys: Iterable[str], pairs: pd.DataFrame | None = None) -> pd.Series:
    """The split group of each (normalised) text in ``keys``: its connected component's smallest row
    group, or its smallest split key when it has none (so a new comment variant of a defect, a new
    split key, does not rename, and so move, the defect's group), where a text is linked to its
    :func:`split_key` and to each row group in ``pairs``
    (columns ``key``, ``group``: the ``split_group`` of its rows, from
    :func:`training.dvsa_lookups.defect_groups`; DVSA bulk rows carry one, other sources none). Two
    texts of one defect (a location or comment variant) or with one split key are in one group, also
    through a chain of such links. Without row groups a text's group is its split key (scheme v1's).
    Deterministic and independent of row order; index = ``keys``."""
    index = pd.Index(keys)
    edges = [pd.DataFrame({"key": index, "group": [split_key(k) for k in index]})]
    if pairs is not None and len(pairs):
        edges.append(pairs.loc[pairs["key"].isin(index) & pairs["group"].notna(), ["key", "group"]])
    e = pd.concat(edges, ignore_index=True).drop_duplicates()
    e["row_group"] = np.arange(len(e)) >= len(edges[0])
    # labels ordered row groups first, each kind sorted: the smallest index is the component's name
    named = e.groupby("group", sort=False)["row_group"].any()
    order = pd.DataFrame({"label": named.index.astype(str), "key": ~named.to_numpy()})
    order = order.sort_values(["key", "label"], kind="stable")
    labels = order["label"].to_numpy()
    label_idx = pd.Index(labels).get_indexer(e["group"].astype(str))
    text_idx = index.get_indexer(e["key"])
    label_comp = np.arange(len(labels))
    while True:  # min-label propagation over the text-label graph, to a fixed point (a few rounds)
        text_comp = np.full(len(index), len(labels))
        np.minimum.at(text_comp, text_idx, label_comp[label_idx])
        new = label_comp.copy()
        np.minimum.at(new, label_idx, text_comp[text_idx])
        if np.array_equal(new, label_comp):
            return pd.Series(labels[text_comp], index=index, dtype=object)
        label_comp = new


def assign_split(
    texts: pd.DataFrame, pairs: pd.DataFrame | None, seed: int, fraction: float, by: str = "text"
) -> tuple[pd.DataFrame, str]:
    """``texts`` (index: normalised text) with its ``split_group`` (:func:`split_groups`, what the
    paired gate resamples whole) and ``holdout`` columns, and the scheme that split them. ``by``:
    ``"text"`` hashes each text's :func:`split_key` (:data:`SPLIT_SCHEME_TEXT`: held-out texts are new
    wordings, e.g. another tester comment, of defects seen in training, as MOT traffic is);
    ``"defect"`` hashes the split group (:data:`SPLIT_SCHEME_DEFECT`: held-out texts are defects the
    head has not seen; the split by key when no kept text's rows carried a defect)."""
    if by not in SPLIT_BY:
        raise DataError(f"split_by must be one of {SPLIT_BY}, got {by!r}")
    if pairs is not None:
        pairs = pairs[pairs["key"].isin(texts.index) & pairs["group"].notna()]
    texts["split_group"] = split_groups(texts.index, pairs)
    if by == "defect" and pairs is not None and len(pairs):
        texts["holdout"] = group_holdout(texts["split_group"], seed, fraction)
        return texts, SPLIT_SCHEME_DEFECT
    texts["holdout"] = group_holdout((split_key(k) for k in texts.index), seed, fraction)
    return texts, SPLIT_SCHEME_TEXT


def group_holdout(groups: Iterable[str], seed: int, fraction: float) -> np.ndarray:
    """Seeded side of each split group: ``True`` where it goes to the held-out side; ``fraction`` is
    the share of groups held out."""
    salt = f"{seed}:".encode()
    cut = int(fraction * 2**32)
    return np.fromiter(
        (int.from_bytes(hashlib.sha256(salt + str(g).encode()).digest()[:4], "big") < cut for g in groups), dtype=bool
    )


def iter_source(data: Path | pd.DataFrame, chunk_rows: int = 200_000) -> Iterator[pd.DataFrame]:
    """Tidy chunks from a DataFrame, a tidy table (its directory, read as its manifest lists, or one
    Parquet file), or a directory of raw DVSA bulk files (its read's counts logged once read through,
    a warning when it had bad rows; a damaged file raises ``BulkFormatError`` as in a load)."""
    if isinstance(data, pd.DataFrame):
        for start in range(0, len(data), chunk_rows):
            yield data.iloc[start : start + chunk_rows]
        return
    path = Path(data)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    from training.tidy import MANIFEST, TIDY_SCHEMA, TidyError, tidy_files

    if path.suffix == ".parquet" or (path / MANIFEST).exists() or any(path.glob("*.parquet")):
        import pyarrow.parquet as pq

        try:
            parquet = tidy_files(path)
        except TidyError as e:
            raise DataError(str(e)) from e
        for f in parquet:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=chunk_rows):
                yield batch.to_pandas().reindex(columns=TIDY_SCHEMA.names)
        return
    from training.dvsa_files import discover
    from training.dvsa_reader import read_bulk
    from training.dvsa_report import BulkReport
    from training.history_api import read_jsonl

    sources, api = discover([path])  # as `motlens data load`: bulk tables and API JSON alike
    report = BulkReport()
    if sources or not api:
        yield from read_bulk([path], chunk_rows=chunk_rows, report=report)
    if api:
        yield from read_jsonl(api, chunk_rows, report)
    # what `motlens data load` prints: the files' bad rows, duplicates, orphans, unlabelled rows
    log.log(logging.WARNING if report.bad_rows else logging.INFO, "read %s: %s", path, report.summary())


def build_training_set(
    data: Path | pd.DataFrame | Iterable[pd.DataFrame],
    *,
    seed: int = 0,
    holdout_fraction: float = 0.2,
    max_rows: int | None = None,
    max_texts: int | None = None,
    reference_rows: int = 2000,
    chunk_rows: int = 200_000,
    split_by: str = "text",
) -> TrainingSet:
    """Aggregate tidy rows (streamed) into a :class:`TrainingSet`.

    ``seed``: the split seed (``TrainSettings.split_seed``, not the head's initialisation seed); it
    also seeds the drift reference sample. ``split_by``: ``"text"`` or ``"defect"`` (:func:`assign_split`).

    ``max_rows``: read only the first N input rows (of raw bulk files: the first N joined rows, which
    come in hash-partition order, after the whole input has been read and partitioned).
    ``max_texts``: keep the N distinct texts with the most rows (ties: text order), as
    :func:`training_set_from_distinct` does; the fingerprint's row counts are those of the kept texts,
    ``rows_read`` stays what was read.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise DataError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}")
    source = Path(data) if isinstance(data, str) else data if isinstance(data, Path | pd.DataFrame) else None
    chunks = iter_source(source, chunk_rows) if source is not None else iter(data)  # type: ignore[arg-type]
    agg = _Aggregator(seed, holdout_fraction, reference_rows, split_by)
    total = _rows_in(data)
    if max_rows is not None:
        total = max_rows if total is None else min(total, max_rows)
    with tqdm(total=total, unit="row", unit_scale=True, desc="build training set",
              disable=total is not None and total < 1_000_000, delay=2) as bar:  # fmt: skip
        for chunk in _capped(chunks, max_rows):
            agg.add(chunk)
            bar.update(len(chunk))

    def again(src: Path | pd.DataFrame) -> Callable[[], Iterator[pd.DataFrame]]:
        return lambda: _capped(iter_source(src, chunk_rows), max_rows)  # the same rows once more

    return agg.finish(max_texts, again(source) if source is not None else None)


def _capped(chunks: Iterable[pd.DataFrame], max_rows: int | None) -> Iterator[pd.DataFrame]:
    """The non-empty chunks of the first ``max_rows`` rows (all rows when None). The source is closed
    as soon as this stops, so a raw bulk reader's partition files go then (not when collected: a
    second read would otherwise need twice the temporary disk)."""
    read = 0
    try:
        for chunk in chunks:
            if max_rows is not None and read + len(chunk) > max_rows:
                chunk = chunk.iloc[: max(0, max_rows - read)]
            if len(chunk):
                read += len(chunk)
                yield chunk
            if max_rows is not None and read >= max_rows:
                break
    finally:
        if (close := getattr(chunks, "close", None)) is not None:
            close()


def _rows_in(data: object) -> int | None:
    """Rows ``data`` holds when that is known without reading it (a DataFrame, a tidy table's manifest)."""
    if isinstance(data, pd.DataFrame):
        return len(data)
    if isinstance(data, Path | str):
        from training.tidy import MANIFEST

        try:
            return int(json.loads((Path(data) / MANIFEST).read_text())["rows"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


def _most_frequent(counts: pd.Series, n: int) -> pd.Index:
    """The keys of the ``n`` largest counts (ties: key order)."""
    frame = counts.rename("n").rename_axis("key").reset_index()
    return pd.Index(frame.sort_values(["n", "key"], ascending=[False, True], kind="stable")["key"].head(n))


class _Aggregator:
    """Partial per-chunk group-bys, combined now and then, finished into a :class:`TrainingSet`."""

    def __init__(self, seed: int, fraction: float, reference_rows: int, split_by: str = "text") -> None:
        self.seed = seed
        self.fraction = fraction
        self.split_by = split_by
        self.reference_rows = reference_rows
        self.rng = np.random.default_rng(seed)
        self.rows_read = 0
        self.rows_unlabelled = 0
        self.labels: list[pd.DataFrame] = []
        self.numeric: list[pd.DataFrame] = []
        self.categorical: dict[str, list[pd.DataFrame]] = {c: [] for c in ("fuel_type", "make", "model")}
        self.reference = pd.DataFrame()
        self.groups: list[pd.DataFrame] = []  # distinct (key, group) pairs of rows that carry a split_group

    @staticmethod
    def _labelled(chunk: pd.DataFrame) -> tuple[pd.DataFrame, int]:
        """The labelled rows of ``chunk`` with their normalised ``key``, and how many were unlabelled."""
        missing = {"text", "section", "severity"} - set(chunk.columns)
        if missing:
            raise DataError(f"tidy data lacks column(s) {sorted(missing)}")
        df = pd.DataFrame(
            {
                c: chunk[c] if c in chunk.columns else None
                for c in ("text", "section", "severity", "split_group", *CONTEXT_COLUMNS)
            }
        )
        section = pd.to_numeric(df["section"], errors="coerce")
        ok = df["text"].notna() & section.between(0, 8) & df["severity"].isin(SEVERITIES)
        unlabelled = int((~ok).sum())
        df = df[ok].copy()
        if df.empty:
            return df, unlabelled
        uniq = pd.unique(df["text"].astype(str))
        keys = pd.Series([normalise_text(t) for t in uniq], index=uniq)
        df["key"] = df["text"].astype(str).map(keys)
        blank = df["key"] == ""  # whitespace only: no text to learn from, counted with the unlabelled
        unlabelled += int(blank.sum())
        df = df[~blank]
        df["section"] = section[df.index].astype("int8")
        df["vehicle_age_years"] = pd.to_numeric(df["vehicle_age_years"], errors="coerce")
        odo = pd.to_numeric(df["odometer_miles"], errors="coerce")
        df["log_odo"] = np.log1p(odo.where((odo >= 0) & np.isfinite(odo)))
        return df, unlabelled

    def add(self, chunk: pd.DataFrame) -> None:
        df, unlabelled = self._labelled(chunk)
        self.rows_read += len(chunk)
        self.rows_unlabelled += unlabelled
        if df.empty:
            return
        self.labels.append(df.groupby(["key", "section", "severity"], observed=True).size().rename("n").reset_index())
        keys = pd.Index(pd.unique(df["key"]), name="key")
        age, odo = (_fixed_point(df[c], _FIXED_POINT[c]).groupby(df["key"]) for c in ("vehicle_age_years", "log_odo"))
        sums = {"age_sum": age.sum(), "age_n": age.count(), "odo_sum": odo.sum(), "odo_n": odo.count()}
        self.numeric.append(  # exact int64 sums: the same means whatever the row order or chunking
            pd.DataFrame({k: v.reindex(keys, fill_value=0).astype(np.int64) for k, v in sums.items()}).reset_index()
        )
        for c, parts in self.categorical.items():
            parts.append(df.dropna(subset=[c]).groupby(["key", c]).size().rename("n").reset_index())
        self.groups.append(df.loc[df["split_group"].notna(), ["key", "split_group"]].drop_duplicates())
        self._keep_sample(df)  # every labelled row, both sides: the reference stands for traffic
        if len(self.labels) >= _COMBINE_EVERY:
            self._combine()

    def _keep_sample(self, rows: pd.DataFrame) -> None:
        """Bottom-k by a random key: a uniform sample of ``reference_rows`` of all the rows offered."""
        if rows.empty or self.reference_rows <= 0:
            return
        rows = rows[["key", *CONTEXT_COLUMNS]].assign(_p=self.rng.random(len(rows)))
        self.reference = pd.concat([self.reference, rows]).nsmallest(self.reference_rows, "_p")

    def _resample_reference(self, chunks: Iterable[pd.DataFrame], keys: set[str]) -> None:
        """Draw the reference afresh from the rows (both sides) of ``keys`` only (a second read of the input)."""
        self.reference = pd.DataFrame()
        for chunk in chunks:
            df, _ = self._labelled(chunk)
            if not df.empty:
                self._keep_sample(df[df["key"].isin(keys)])

    def _combine(self) -> None:
        self.labels = [pd.concat(self.labels).groupby(["key", "section", "severity"]).n.sum().reset_index()]
        self.numeric = [pd.concat(self.numeric).groupby("key").sum().reset_index()]
        for c, parts in self.categorical.items():
            self.categorical[c] = [pd.concat(parts).groupby(["key", c]).n.sum().reset_index()]
        self.groups = [pd.concat(self.groups).drop_duplicates()]

    def finish(
        self, max_texts: int | None = None, again: Callable[[], Iterable[pd.DataFrame]] | None = None
    ) -> TrainingSet:
        """``again``: the input's chunks once more, to redraw the drift reference from the texts that
        ``max_texts`` keeps when the sample drawn while streaming (from every text) holds too few."""
        if not self.labels:
            raise DataError(f"no labelled defect rows (read {self.rows_read}, unlabelled {self.rows_unlabelled})")
        self._combine()
        lab = self.labels[0]
        if max_texts is not None:
            per_key = lab.groupby("key").n.sum()
            if len(per_key) > max_texts:
                keep = _most_frequent(per_key, max_texts)
                lab = lab[lab["key"].isin(keep)]
                self.reference = self.reference[self.reference["key"].isin(keep)]
                wanted = min(self.reference_rows, int(lab["n"].sum()))
                if len(self.reference) < wanted and again is not None:
                    log.info("drift reference: %d of %d rows left after --max-texts; reading the input again "
                             "for rows of the kept texts", len(self.reference), wanted)  # fmt: skip
                    self._resample_reference(again(), set(lab["key"]))
                elif len(self.reference) < wanted:
                    log.warning("drift reference: %d rows (of %d wanted) after --max-texts: the input cannot "
                                "be read twice", len(self.reference), wanted)  # fmt: skip
        count = lab.groupby("key").n.sum().rename("count")
        sec = _majority(lab.groupby(["key", "section"]).n.sum().reset_index(), "section")
        sev_counts = lab.groupby(["key", "severity"]).n.sum().reset_index()
        sev_counts["order"] = sev_counts["severity"].map({s: i for i, s in enumerate(SEVERITIES)})
        sev = _majority(sev_counts, "order")
        failing = lab[lab["severity"].isin(FAILING_SEVERITIES)].groupby("key").n.sum()
        texts = pd.DataFrame({"count": count}).sort_index()
        texts["section"] = sec["section"].astype("int8")
        texts["severity"] = sev["order"].map(dict(enumerate(SEVERITIES)))
        texts["section_purity"] = (sec["n"] / texts["count"]).astype("float32")
        texts["severity_purity"] = (sev["n"] / texts["count"]).astype("float32")
        texts["fail_fraction"] = (failing.reindex(texts.index).fillna(0) / texts["count"]).astype("float32")
        num = self.numeric[0].set_index("key").reindex(texts.index)
        age_mean = num["age_sum"] / _FIXED_POINT["vehicle_age_years"] / num["age_n"].replace(0, np.nan)
        texts["vehicle_age_years"] = age_mean.astype("float32")
        odo_mean = num["odo_sum"] / _FIXED_POINT["log_odo"] / num["odo_n"].replace(0, np.nan)
        texts["odometer_miles"] = np.expm1(odo_mean).astype("float32")
        for c, parts in self.categorical.items():
            texts[c] = _majority(parts[0], c)[c].reindex(texts.index) if len(parts[0]) else None
        pairs = self.groups[0].rename(columns={"split_group": "group"})
        texts, scheme = assign_split(texts, pairs, self.seed, self.fraction, self.split_by)
        texts = texts.rename_axis("text").reset_index()
        if texts["holdout"].all() or not texts["holdout"].any():
            raise DataError(f"{len(texts)} distinct texts are too few for a train/held-out split")
        index = pd.Series(np.arange(len(texts)), index=texts["text"])
        ref = self.reference.sort_values("_p").drop(columns="_p")
        ref.insert(0, "text_index", ref.pop("key").map(index).to_numpy())
        return TrainingSet(texts, ref.reset_index(drop=True), self._fingerprint(lab, texts), self.seed, scheme)

    def _fingerprint(self, lab: pd.DataFrame, texts: pd.DataFrame) -> dict[str, Any]:
        keys = texts["text"]
        sec = lab.groupby(["key", "section"]).n.sum().unstack(fill_value=0)
        sev = lab.groupby(["key", "severity"]).n.sum().unstack(fill_value=0)
        return _fingerprint_of(
            sec.reindex(index=keys, columns=range(9), fill_value=0).to_numpy(),
            sev.reindex(index=keys, columns=list(SEVERITIES), fill_value=0).to_numpy(),
            texts,
            rows_read=self.rows_read,
            rows_unlabelled=self.rows_unlabelled,
            rows_section=lab.groupby("section").n.sum(),
            rows_severity=lab.groupby("severity").n.sum(),
        )


def _canonical_table(sec_counts: np.ndarray, sev_counts: np.ndarray, texts: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct (normalised) text, sorted by it, with fixed column types: the per-section
    and per-severity row counts and the aggregated context the head is fitted on (the float32 age and
    odometer exactly, as text; missing → empty). Both input paths build it the same way, so the
    same rows give the same table whatever their layout (tidy Parquet, raw files, a DataFrame,
    ClickHouse's distinct-text table)."""
    canon = pd.DataFrame({"key": texts["text"].astype(str).to_numpy()})
    for i in range(9):
        canon[f"n_section_{i}"] = sec_counts[:, i].astype(np.int64)
    for j, sev in enumerate(SEVERITIES):
        canon[f"n_{sev}"] = sev_counts[:, j].astype(np.int64)
    for c in ("vehicle_age_years", "odometer_miles"):  # float32 values, exactly (9 significant digits)
        v = texts[c].to_numpy(dtype=np.float32) if c in texts else np.full(len(texts), np.nan, np.float32)
        canon[c] = ["" if not np.isfinite(x) else f"{float(x) + 0.0:.9g}" for x in v]
    for c in ("fuel_type", "make", "model"):
        v = texts[c] if c in texts else pd.Series([None] * len(texts))
        canon[c] = ["" if x is None or (isinstance(x, float) and np.isnan(x)) else str(x) for x in v]
    return canon.sort_values("key", kind="stable").reset_index(drop=True)


def _sha256_of(frame: pd.DataFrame) -> str:
    return hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()).hexdigest()


def _fingerprint_of(
    sec_counts: np.ndarray,
    sev_counts: np.ndarray,
    texts: pd.DataFrame,
    *,
    rows_read: int,
    rows_unlabelled: int,
    rows_section: pd.Series,
    rows_severity: pd.Series,
) -> dict[str, Any]:
    """Content hashes of the canonical per-text table (:func:`_canonical_table`; ``sha256``: labels
    and context, ``labels_sha256``: the label counts alone), row counts, label distributions.
    ``sec_counts``/``sev_counts``: per-text (``texts`` order) rows per section and per severity."""
    canon = _canonical_table(sec_counts, sev_counts, texts)
    label_cols = ["key", *(c for c in canon.columns if c.startswith("n_"))]
    rows = int(texts["count"].sum())
    train, held = texts[~texts["holdout"]], texts[texts["holdout"]]
    return {
        "sha256": _sha256_of(canon),
        "labels_sha256": _sha256_of(canon[label_cols]),
        "rows_read": rows_read,
        "rows_unlabelled": rows_unlabelled,
        "rows_labelled": rows,
        "distinct_texts": len(texts),
        "train_texts": len(train),
        "holdout_texts": len(held),
        "train_rows": int(train["count"].sum()),
        "holdout_rows": int(held["count"].sum()),
        "rows_section": {str(i): int(rows_section.get(i, 0)) for i in range(9)},
        "rows_severity": {s: int(rows_severity.get(s, 0)) for s in SEVERITIES},
        "texts_section": {str(i): int((texts["section"] == i).sum()) for i in range(9)},
        "texts_severity": {s: int((texts["severity"] == s).sum()) for s in SEVERITIES},
        "label_purity_section": float((texts["section_purity"] * texts["count"]).sum() / rows),
        "label_purity_severity": float((texts["severity_purity"] * texts["count"]).sum() / rows),
    }


def training_set_from_distinct(
    distinct: pd.DataFrame,
    *,
    seed: int = 0,
    holdout_fraction: float = 0.2,
    reference_rows: int = 2000,
    max_texts: int | None = None,
    split_by: str = "text",
) -> TrainingSet:
    """A :class:`TrainingSet` from the ClickHouse path's distinct-text table
    (:func:`training.chload.distinct_texts`: ``text``, majority ``section``/``severity``, ``n`` and the
    per-label counts ``n_<severity>``, ``n_section_<i>``, and ``split_groups``: the row groups of each
    text, a sequence, see :func:`split_groups`; absent: none). That table carries no vehicle context, so
    context is missing (the head sees its missing flags) and the drift reference samples texts of
    both sides in proportion to their row counts (as rows of traffic come). ``max_texts``: keep the
    N (normalised) texts with the most rows, as :func:`build_training_set` does. ``seed``,
    ``split_by``: as there."""
    missing = {"text", "section", "severity", "n"} - set(distinct.columns)
    if missing:
        raise DataError(f"distinct-text table lacks column(s) {sorted(missing)}")
    d = distinct[distinct["n"] > 0].copy()
    d["key"] = [normalise_text(str(t)) for t in d["text"]]
    sev_cols = [f"n_{s}" for s in SEVERITIES]
    sec_cols = [f"n_section_{i}" for i in range(9)]
    if not set(sev_cols + sec_cols) <= set(d.columns):  # majority labels only
        for sev in SEVERITIES:
            d[f"n_{sev}"] = np.where(d["severity"] == sev, d["n"], 0)
        for i in range(9):
            d[f"n_section_{i}"] = np.where(d["section"] == i, d["n"], 0)
    agg = d.groupby("key")[["n", *sev_cols, *sec_cols]].sum().sort_index()
    if agg.empty:
        raise DataError("the distinct-text table holds no labelled texts")
    if max_texts is not None and len(agg) > max_texts:
        agg = agg.loc[_most_frequent(agg["n"], max_texts)].sort_index()
    texts = pd.DataFrame(index=agg.index)
    texts["count"] = agg["n"].astype("int64")
    sec_counts, sev_counts = agg[sec_cols].to_numpy(), agg[sev_cols].to_numpy()
    texts["section"] = sec_counts.argmax(axis=1).astype("int8")
    texts["severity"] = np.asarray(SEVERITIES, dtype=object)[sev_counts.argmax(axis=1)]
    texts["section_purity"] = (sec_counts.max(axis=1) / texts["count"]).astype("float32")
    texts["severity_purity"] = (sev_counts.max(axis=1) / texts["count"]).astype("float32")
    fail_cols = [f"n_{s}" for s in SEVERITIES if s in FAILING_SEVERITIES]
    texts["fail_fraction"] = (agg[fail_cols].sum(axis=1) / texts["count"]).astype("float32")
    for c in CONTEXT_COLUMNS:
        texts[c] = np.float32(np.nan) if c in ("vehicle_age_years", "odometer_miles") else None
    pairs = None
    if "split_groups" in d.columns:
        pairs = d[["key", "split_groups"]].explode("split_groups").rename(columns={"split_groups": "group"})
    texts, scheme = assign_split(texts, pairs, seed, holdout_fraction, split_by)
    texts = texts.rename_axis("text").reset_index()
    if texts["holdout"].all() or not texts["holdout"].any():
        raise DataError(f"{len(texts)} distinct texts are too few for a train/held-out split")
    rng = np.random.default_rng(seed)
    w = texts["count"].to_numpy().astype(np.float64)
    every = np.arange(len(texts))
    pick = rng.choice(every, size=min(reference_rows, int(w.sum())), p=w / w.sum()) if reference_rows else every[:0]
    ref = texts.loc[pick, list(CONTEXT_COLUMNS)].reset_index(drop=True)
    ref.insert(0, "text_index", pick)
    fp = _fingerprint_of(
        sec_counts,
        sev_counts,
        texts,
        rows_read=int(texts["count"].sum()),
        rows_unlabelled=0,
        rows_section=pd.Series(sec_counts.sum(axis=0), index=range(9)),
        rows_severity=pd.Series(sev_counts.sum(axis=0), index=list(SEVERITIES)),
    )
    return TrainingSet(texts, ref, fp, seed, scheme)


def _fixed_point(x: pd.Series, scale: int) -> pd.Series:
    """The finite values of ``x`` in int64 units of 1/``scale`` (missing and non-finite dropped), so
    per-text sums are exact and do not depend on the summation order."""
    v = x.to_numpy(dtype=np.float64)
    ok = np.isfinite(v)
    return pd.Series(np.round(v[ok] * scale).astype(np.int64), index=x.index[ok])


def _majority(counts: pd.DataFrame, col: str) -> pd.DataFrame:
    """Per key, the value of ``col`` with the most rows (ties: the smallest value); index = key."""
    best = counts.sort_values(["key", "n", col], ascending=[True, False, True], kind="stable")
    return best.drop_duplicates("key").set_index("key")[[col, "n"]]
