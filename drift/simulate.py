"""Generated prediction-log traffic with controllable shifts (tests and the drift benchmark).

Rows look like what the predictor logs (``predlog.records.PredictionRecord`` fields). Each defect
has a catalogue wording and a paraphrase of about the same length in different words, so a
vocabulary shift changes the embeddings while section, severity, length and context stay put.
As a model would, each text gets one severity and one pair of scores, whichever row it is in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import numpy as np
import pandas as pd

from motlens.embedder import normalise_text
from motlens.labels import SECTIONS, SEVERITIES

# (section, catalogue wording, paraphrase, severity weights advisory/minor/major/dangerous)
CATALOGUE: tuple[tuple[int, str, str, tuple[float, float, float, float]], ...] = (
    (0, "Registration plate missing (0.1 (a))", "Number plate not fitted (0.1 (a))", (0, 0, 1, 0)),
    (0, "Registration plate deteriorated (0.1 (b))", "Number plate faded and cracking (0.1 (b))", (1, 0, 0, 0)),
    (0, "VIN not legible (0.2 (a))", "Chassis number unreadable (0.2 (a))", (0, 0, 1, 0)),
    (1, "Brake pipe corroded (1.1.11 (c))", "Brake line rusted through (1.1.11 (c))", (0.3, 0, 0.6, 0.1)),
    (
        1,
        "Brake disc worn, pitted or scored (1.1.14 (a))",
        "Rotor grooved with heavy lip (1.1.14 (a))",
        (0.7, 0, 0.3, 0),
    ),
    (
        1,
        "Brake pad less than 1.5 mm thick (1.1.13 (a))",
        "Friction material nearly gone (1.1.13 (a))",
        (0, 0, 0.8, 0.2),
    ),
    (
        1,
        "Parking brake efficiency below requirements (1.4.2 (a))",
        "Handbrake barely holds the car (1.4.2 (a))",
        (0, 0, 0.8, 0.2),
    ),
    (2, "Steering rack gaiter split (2.2.1 (c))", "Rack boot torn open (2.2.1 (c))", (0.2, 0.6, 0.2, 0)),
    (2, "Steering ball joint excessive play (2.2.2 (a))", "Track rod end knocking loose (2.2.2 (a))", (0, 0, 0.8, 0.2)),
    (3, "Windscreen damage in zone A (3.2 (a))", "Chip in driver's line of sight (3.2 (a))", (0.4, 0, 0.6, 0)),
    (3, "Wiper blade deteriorated (3.4 (b))", "Squeegee rubber perished (3.4 (b))", (0.3, 0.7, 0, 0)),
    (4, "Headlamp aim too high (4.1.2 (a))", "Dipped beam dazzles others (4.1.2 (a))", (0, 0.3, 0.7, 0)),
    (4, "Stop lamp not working (4.3.1 (a))", "Brake light dead (4.3.1 (a))", (0, 0, 1, 0)),
    (4, "Number plate lamp inoperative (4.7.1 (b))", "Rear plate bulb out (4.7.1 (b))", (0, 1, 0, 0)),
    (5, "Tyre worn close to legal limit (5.2.3 (e))", "Tread almost bald now (5.2.3 (e))", (1, 0, 0, 0)),
    (
        5,
        "Tyre tread depth below requirements (5.2.3 (e))",
        "Rubber worn past the wear bars (5.2.3 (e))",
        (0, 0, 0.7, 0.3),
    ),
    (5, "Coil spring fractured (5.3.1 (b))", "Suspension spring snapped (5.3.1 (b))", (0, 0, 0.8, 0.2)),
    (5, "Shock absorber leaking (5.3.2 (b))", "Damper weeping fluid (5.3.2 (b))", (0.5, 0.5, 0, 0)),
    (6, "Sill corroded (6.1.1 (c))", "Rocker panel rotten (6.1.1 (c))", (0.4, 0, 0.5, 0.1)),
    (6, "Door does not open from inside (6.2.3 (a))", "Interior handle won't release door (6.2.3 (a))", (0, 0, 1, 0)),
    (7, "Seat belt buckle not working (7.1.1 (b))", "Belt clasp fails to latch (7.1.1 (b))", (0, 0, 1, 0)),
    (7, "Horn not working (7.5 (a))", "Hooter silent (7.5 (a))", (0, 1, 0, 0)),
    (8, "Exhaust emits excessive smoke (8.2.1.2 (a))", "Tailpipe puffing thick fumes (8.2.1.2 (a))", (0, 0, 1, 0)),
    (8, "Oil leak from engine (8.4.1 (a))", "Motor dripping lubricant (8.4.1 (a))", (0.4, 0.6, 0, 0)),
)
LOCATIONS: tuple[str, ...] = ("", "Nearside Front ", "Offside Front ", "Nearside Rear ", "Offside Rear ")
MAKES: tuple[tuple[str, float], ...] = (
    ("FORD", 0.2), ("VAUXHALL", 0.15), ("VOLKSWAGEN", 0.12), ("BMW", 0.08), ("TOYOTA", 0.08),
    ("PEUGEOT", 0.07), ("AUDI", 0.07), ("NISSAN", 0.06), ("RENAULT", 0.06), ("HONDA", 0.05), ("KIA", 0.06),
)  # fmt: skip
FUELS: tuple[tuple[str, float], ...] = (("PE", 0.55), ("DI", 0.38), ("HY", 0.05), ("EL", 0.02))
BASE_SECTION_WEIGHTS: tuple[float, ...] = (0.03, 0.2, 0.06, 0.08, 0.18, 0.25, 0.08, 0.07, 0.05)


def texts(paraphrased: bool = False) -> list[str]:
    """Every text the generator can emit (location × defect), for pre-computing embeddings."""
    return [loc + (para if paraphrased else cat) for _, cat, para, _ in CATALOGUE for loc in LOCATIONS]


def traffic(
    n: int,
    seed: int,
    *,
    section_weights: Sequence[float] = BASE_SECTION_WEIGHTS,
    paraphrase: float = 0.0,
    age_shift: float = 0.0,
    odometer_shift: float = 0.0,
    model_version: str = "1",
    slot: str = "production",
    end: datetime | None = None,
    span: timedelta = timedelta(hours=1),
) -> pd.DataFrame:
    """``n`` logged predictions; ``paraphrase`` is the share of rows worded as paraphrases."""
    from predlog.records import text_hash

    rng = np.random.default_rng(seed)
    w = np.asarray(section_weights, np.float64)
    w = w / w.sum()
    by_section = [[i for i, item in enumerate(CATALOGUE) if item[0] == s] for s in range(len(SECTIONS))]
    sec = rng.choice(len(SECTIONS), n, p=w)
    item = np.array([by_section[s][rng.integers(len(by_section[s]))] for s in sec])
    loc = rng.integers(len(LOCATIONS), size=n)
    para = rng.random(n) < paraphrase
    text = [LOCATIONS[lo] + CATALOGUE[i][2 if p else 1] for i, lo, p in zip(item, loc, para, strict=True)]
    sev_idx = np.array([_severity(t, CATALOGUE[i][3]) for t, i in zip(text, item, strict=True)])
    scores = [_scores(t, s >= 2) for t, s in zip(text, sev_idx, strict=True)]
    section_score, fail = np.asarray(scores, np.float64).reshape(n, 2).T
    age = np.clip(rng.gamma(4.0, 2.2, n) + age_shift, 3.0, None)
    odo = np.clip(age * 7_500 + rng.normal(0, 9_000, n) + odometer_shift, 0, None)
    end = end or datetime.now(UTC)
    ts = [end - span * float(f) for f in rng.random(n)]
    return pd.DataFrame({
        "ts": pd.to_datetime(ts, utc=True),
        "request_id": [f"sim-{seed}-{k}" for k in range(n)],
        "item_index": np.zeros(n, np.int64),
        "model_name": "mot-defects",
        "model_version": model_version,
        "slot": slot,
        "text": text,
        "text_hash": [text_hash(normalise_text(t)) for t in text],
        "section": [SECTIONS[s] for s in sec],
        "section_score": section_score,
        "severity": [SEVERITIES[v] for v in sev_idx],
        "fail_probability": fail,
        "make": rng.choice([m for m, _ in MAKES], n, p=_norm([p for _, p in MAKES])),
        "fuel_type": rng.choice([f for f, _ in FUELS], n, p=_norm([p for _, p in FUELS])),
        "vehicle_age_years": age.astype(np.float32),
        "odometer_miles": odo.astype(np.float32),
    })  # fmt: skip


def _text_seed(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


@lru_cache(maxsize=4096)
def _severity(text: str, weights: tuple[float, ...]) -> int:
    """A model predicts the same severity for the same text: drawn once per text."""
    return int(np.random.default_rng(_text_seed(text)).choice(len(weights), p=_norm(weights)))


@lru_cache(maxsize=8192)
def _scores(text: str, severe: bool) -> tuple[float, float]:
    """(section_score, fail_probability) of a text, drawn once per text: high for a severe defect."""
    rng = np.random.default_rng((_text_seed(text), 1))
    return float(rng.beta(9, 2)), float(rng.beta(8, 2) if severe else rng.beta(2, 8))


def _norm(p: Sequence[float]) -> np.ndarray:
    a = np.asarray(p, np.float64)
    return a / a.sum()


def with_embeddings(
    df: pd.DataFrame, encode: Callable[[list[str]], np.ndarray], share: float = 1.0, seed: int = 0
) -> pd.DataFrame:
    """Add an ``embedding`` column (each distinct text encoded once); like the predictor's sampled
    embedding logging, only a ``share`` of rows carry one, the others hold None."""
    unique = sorted(set(df["text"]))
    vectors = dict(zip(unique, encode(unique), strict=True))
    keep = np.random.default_rng((seed, 0xE3B)).random(len(df)) < share  # a stream apart from traffic()'s
    return df.assign(embedding=[vectors[t] if k else None for t, k in zip(df["text"], keep, strict=True)])


def records(df: pd.DataFrame) -> list:
    """The frame as ``PredictionRecord`` rows for the real prediction-log writer."""
    from predlog.records import PredictionRecord

    out = []
    has_emb = "embedding" in df.columns
    for row in df.itertuples(index=False):
        out.append(PredictionRecord(
            request_id=row.request_id, item_index=int(row.item_index), model_name=row.model_name,
            model_version=str(row.model_version), slot=row.slot, text=row.text, section=row.section,
            section_score=float(row.section_score), severity=row.severity,
            fail_probability=float(row.fail_probability), make=row.make, fuel_type=row.fuel_type,
            vehicle_age_years=float(row.vehicle_age_years), odometer_miles=float(row.odometer_miles),
            embedding=[float(x) for x in row.embedding] if has_emb and row.embedding is not None else None,
            text_hash=int(row.text_hash), ts=row.ts.to_pydatetime(),
        ))  # fmt: skip
    return out
