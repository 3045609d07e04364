"""The columns the drift job compares, and turning log/reference frames into them."""

from __future__ import annotations

import numpy as np
import pandas as pd

from motlens import EMBEDDING_DIM
from motlens.embedder import normalise_text
from motlens.labels import fuel_key

CATEGORICAL: tuple[str, ...] = ("section", "severity", "make", "fuel_type")
NUMERICAL: tuple[str, ...] = (
    "fail_probability", "section_score", "text_length", "vehicle_age_years", "odometer_miles",
)  # fmt: skip
DRIFT_COLUMNS: tuple[str, ...] = CATEGORICAL + NUMERICAL
SCORES: tuple[str, ...] = ("fail_probability", "section_score")
MODEL_OUTPUTS: tuple[str, ...] = ("section", "severity", *SCORES)
INPUT_COLUMNS: tuple[str, ...] = tuple(c for c in DRIFT_COLUMNS if c not in MODEL_OUTPUTS)
CONTEXT_CATEGORIES: tuple[str, ...] = ("make", "fuel_type")  # free text from clients, read case-blind
SCORE_RESOLUTION = 1e-3
MISSING = "(missing)"
OTHER = "(other)"
EMBEDDING = "embedding"


class DataError(ValueError):
    """A frame that lacks what the drift job needs; the message names it."""


def drift_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The nine drift columns of a prediction-log window or a reference sample.

    What the model sees is compared, not how a client spelt it: ``text_length`` (characters) is taken
    as is (a reference sample stores it) or derived from the normalised ``text`` (the log stores the
    raw text: whitespace alone was drift), ``make`` compared stripped and upper-cased and ``fuel_type``
    as its DVSA code (``Petrol`` is ``PE``), as the head reads them. Missing context (blank or absent
    ``make``/``fuel_type``, missing numbers) stays
    missing: Evidently drops it per column, so context is compared on the rows that carry it; a missing
    ``section`` or ``severity`` becomes ``"(missing)"``.
    """
    out = pd.DataFrame(index=pd.RangeIndex(len(df)))
    if "text_length" not in df.columns:
        if "text" not in df.columns:
            raise DataError("frame has neither 'text_length' nor 'text'")
        df = df.assign(text_length=[len(normalise_text(str(t))) for t in df["text"]])
    missing = [c for c in DRIFT_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"frame lacks drift column(s): {', '.join(missing)}")
    for c in CATEGORICAL:
        values = df[c].astype("object")
        if c in CONTEXT_CATEGORIES:
            key = fuel_key if c == "fuel_type" else (lambda v: v.strip().upper())
            values = values.where(values.isna(), values.astype(str).map(key)).replace("", None)
            out[c] = values.where(values.notna(), None).to_numpy()
        else:
            out[c] = values.where(values.notna(), MISSING).astype(str).to_numpy()
    for c in NUMERICAL:
        out[c] = pd.to_numeric(df[c], errors="coerce").astype("float64").to_numpy()
    return out


def dither_scores(df: pd.DataFrame, seed: int, resolution: float = SCORE_RESOLUTION) -> pd.DataFrame:
    """The model scores plus uniform noise of width ``resolution`` (seeded), before the distribution tests.

    MOT texts repeat, so a score column is a few point masses, and the same text scored in another
    batch differs by ~1e-7: a KS test sees a CDF step of that text's whole share between the two
    values. Spread over ``resolution``, two values ``d`` apart differ by ``d / resolution`` of that
    share instead, with no rounding edge to fall on either side of; differences above
    ``resolution`` are tested as before.
    """
    rng = np.random.default_rng((seed, 0xD17))
    return df.assign(**{c: df[c] + rng.uniform(-resolution / 2, resolution / 2, len(df)) for c in SCORES})


def embedding_matrix(df: pd.DataFrame, dim: int | None = EMBEDDING_DIM) -> np.ndarray:
    """float32 [N, dim] of the rows that carry an embedding.

    Accepts an ``embedding`` column of arrays/lists (a prediction-log window; rows without one
    are skipped) or wide columns ``emb_000 … emb_383`` (a bundle's reference sample). ``dim=None``
    accepts any width (reduced embeddings in tests).
    """
    wide = [f"emb_{i:03d}" for i in range(dim or EMBEDDING_DIM)]
    if EMBEDDING in df.columns:
        vals = [v for v in df[EMBEDDING].to_numpy() if v is not None and len(v) > 0]
        if not vals:
            return np.zeros((0, dim or EMBEDDING_DIM), np.float32)
        m = np.asarray(np.stack([np.asarray(v, np.float32) for v in vals]), np.float32)
    elif all(c in df.columns for c in wide):
        m = df[wide].to_numpy(np.float32)
    else:
        return np.zeros((0, dim or EMBEDDING_DIM), np.float32)
    if dim is not None and m.shape[1] != dim:
        raise DataError(f"embeddings have {m.shape[1]} dimensions, expected {dim}")
    return m[np.isfinite(m).all(axis=1)]


def embedding_frame(matrix: np.ndarray) -> tuple[pd.DataFrame, list[str]]:
    """Wide numeric columns for Evidently's ``DataDefinition(embeddings=...)``."""
    names = [f"e{i:03d}" for i in range(matrix.shape[1])]
    return pd.DataFrame(matrix.astype(np.float64), columns=names), names


def collapse_rare(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    columns: tuple[str, ...] = ("make", "fuel_type"),
    min_share: float = 0.01,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Values rarer than ``min_share`` of the reference's values (or absent from it) become ``"(other)"``;
    missing values stay missing.

    Open-vocabulary context columns (hundreds of makes) otherwise drift on rare values alone.
    """
    reference, current = reference.copy(), current.copy()
    for c in columns:
        share = reference[c].value_counts(normalize=True)
        keep = set(share[share >= min_share].index)
        reference[c] = reference[c].where(reference[c].isin(keep) | reference[c].isna(), OTHER)
        current[c] = current[c].where(current[c].isin(keep) | current[c].isna(), OTHER)
    return reference, current


def as_logged(matrix: np.ndarray) -> np.ndarray:
    """Embeddings through the prediction log's int8 round trip (``predlog.schema.quantize``).

    A bundle's reference embeddings are exact float32 while logged ones are quantized; MOT texts
    repeat, so a classifier with more dimensions than rows learns exact-vs-quantized copies of the
    same texts and reports drift that is only the storage format. Quantizing the reference the same
    way removes that difference.
    """
    from predlog.schema import quantize

    if len(matrix) == 0:
        return matrix
    q, scales = quantize(list(matrix))
    ints = np.stack([v for v in q if v is not None])  # every row has a vector here
    return (ints.astype(np.float32) * scales[:, None]).astype(np.float32)
