"""Reading the two sides of a comparison: prediction-log windows (row-capped) and reference samples."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from drift.columns import as_logged, embedding_matrix
from drift.windows import Window
from motlens import EMBEDDING_DIM


@dataclass
class Side:
    """One side of a comparison: rows for the column drift, embeddings for the embedding drift."""

    label: str
    frame: pd.DataFrame
    embeddings: np.ndarray
    rows_in_source: int
    embedding_rows_in_source: int
    versions: list[str] = field(default_factory=list)
    embedding_hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    first_row: datetime | None = None  # ts of the window's first row (a log window with rows only)

    @classmethod
    def from_frame(cls, label: str, df: pd.DataFrame) -> Side:
        """A side from an in-memory frame (log rows with an optional ``embedding`` column)."""
        emb = embedding_matrix(df, dim=None)
        hashes = np.zeros(0, np.uint64)
        if "text_hash" in df.columns and "embedding" in df.columns:
            has = df["embedding"].map(lambda v: v is not None and len(v) > 0).to_numpy(bool)
            hashes = df.loc[has, "text_hash"].to_numpy(np.uint64)
        return cls(label, df, emb, len(df), len(emb), sorted({str(v) for v in df.get("model_version", [])}), hashes)


def _fraction(cap: int, total: int) -> float | None:
    """Hash-sampling fraction that leaves a little over ``cap`` of ``total`` rows; the window query's
    LIMIT then keeps the ``cap`` smallest hashes (a uniform subset, not the oldest rows)."""
    if total <= cap:
        return None
    return min(1.0, round(cap * 1.1 / total, 6) or 1e-6)


def _capped(reader: Any, common: dict[str, Any], cap: int, total: int, **kw: Any) -> pd.DataFrame:
    """``min(cap, total)`` rows of the window: the hash sample, or, when it falls short of the cap (it
    leaves ≈ 1.1 × cap, fewer by chance), the window's ``cap`` smallest hashes read unsampled; a window
    with enough rows is then never judged too small."""
    sample = _fraction(cap, total)
    frame = reader.window(**common, limit=cap, sample=sample, **kw)
    if sample is not None and len(frame) < cap:
        frame = reader.window(**common, limit=cap, **kw)
    return frame


def read_window(
    reader: Any,
    *,
    label: str,
    model_name: str,
    model_version: str | None,
    slot: str | None,
    window: Window,
    max_rows: int,
    embedding_max_rows: int,
) -> Side:
    """The ok rows of one version/slot in ``window``: a uniform hash sample of at most ``max_rows``
    rows (with embeddings: at most ``embedding_max_rows``) over the whole window, never the whole
    window in memory; ``rows_in_source`` counts the window's ok rows (embedded log: its days only),
    ``first_row`` is the ts of the first of them."""
    common = {"model_name": model_name, "model_version": model_version, "slot": slot, "status": "ok",
              "start": window.start, "end": window.end}  # fmt: skip
    counts = reader.window_counts(**common)
    n, n_emb = counts["n"], counts["n_emb"]
    frame = pd.DataFrame()
    if n:
        frame = _capped(reader, common, max_rows, n)
    emb = np.zeros((0, EMBEDDING_DIM), np.float32)
    hashes = np.zeros(0, np.uint64)
    if n_emb:
        emb_frame = _capped(reader, common, embedding_max_rows, n_emb, with_embeddings=True)
        emb = embedding_matrix(emb_frame)
        hashes = emb_frame["text_hash"].to_numpy(np.uint64)
    return Side(label, frame, emb, n, n_emb, counts["versions"], hashes, counts["first"])


def read_reference_file(path: Path, label: str) -> Side:
    """A reference sample: a Parquet file or a bundle directory (its ``reference/sample.parquet``)."""
    from motlens.bundle import Bundle
    from motlens.errors import describe

    path = Path(path)
    if path.is_dir():
        ref = Bundle.open(path).reference_path
        if not ref.is_file():
            raise FileNotFoundError(f"bundle {path} has no drift reference sample ({ref.name})")
        path = ref
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError; it names a buffer, not the file
        raise ValueError(f"reference {path} is not a readable Parquet file ({describe(e)[:160]})") from e
    emb = as_logged(embedding_matrix(df))
    return Side(label, df, emb, len(df), len(emb))
