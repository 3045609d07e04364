"""Two models scored on the same held-out texts, with a bootstrap interval of each metric's difference.

Each resample draws the texts (or groups of them) with replacement and scores *both* models on that
draw, so what the two share (hard texts, a rare class's few texts) moves both alike and cancels in
the difference: the interval reflects how the two models disagree, not how lucky one held-out set
was. The metrics are
the ones :func:`training.evaluate.evaluate` logs, computed the same way (macro-F1 over the classes
the drawn texts hold, ``*_rows`` weighted by each text's row count, AUC with ties counted half), so a
point estimate equals the run metric on the same texts. Resamples are evaluated in blocks as matrix
products (confusion counts and tie-grouped AUC sums), ≈ 1 s for 1,000 resamples of 20,000 texts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from motlens.head import HeadOutput
from motlens.labels import FAILING_SEVERITIES, SECTIONS, SEVERITIES

_BLOCK = 200  # resamples scored at once (a block × texts float64 matrix)


@dataclass(frozen=True)
class HeldoutLabels:
    """The held-out texts' true labels: section and severity indices, row counts, fail fractions."""

    section: np.ndarray
    severity: np.ndarray
    counts: np.ndarray
    fail_fraction: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.section)
        if (
            len(self.severity) != n
            or len(self.counts) != n
            or (self.fail_fraction is not None and len(self.fail_fraction) != n)
        ):
            raise ValueError("held-out labels of different lengths")


@dataclass(frozen=True)
class PairedMetric:
    """One metric for both models on the same texts; ``low``/``high`` bound candidate − production."""

    candidate: float
    production: float
    low: float
    high: float

    @property
    def difference(self) -> float:
        return self.candidate - self.production

    def to_json(self) -> dict[str, float]:
        return {**asdict(self), "difference": self.difference}


_Scorer = Callable[[HeadOutput, np.ndarray], np.ndarray]  # (outputs, weights [B, n]) -> [B]


def _scorers(labels: HeldoutLabels) -> dict[str, _Scorer]:
    counts = labels.counts.astype(np.float64)
    failing = np.isin(labels.severity, [SEVERITIES.index(s) for s in FAILING_SEVERITIES]).astype(np.float64)
    found: dict[str, _Scorer] = {}
    for name, y, k, pred in (
        ("section", labels.section, len(SECTIONS), lambda o: o.section_index),
        ("severity", labels.severity, len(SEVERITIES), lambda o: o.severity_scores.argmax(axis=1)),
    ):
        found[f"{name}_macro_f1"] = _f1(y, k, pred, None)
        found[f"{name}_macro_f1_rows"] = _f1(y, k, pred, counts)
        found[f"{name}_accuracy"] = _accuracy(y, pred)
    found["fail_auc"] = _auc(failing, 1.0 - failing)
    if labels.fail_fraction is not None:
        f = labels.fail_fraction.astype(np.float64)
        found["fail_auc_rows"] = _auc(counts * f, counts * (1.0 - f))
    return found


def supported_metrics(labels: HeldoutLabels) -> frozenset[str]:
    """The metric names :func:`compare` can score on these labels."""
    return frozenset(_scorers(labels))


def _f1(y: np.ndarray, k: int, pred: Callable[[HeadOutput], np.ndarray], row_weight: np.ndarray | None) -> _Scorer:
    y = np.asarray(y, dtype=np.int64)

    def score(out: HeadOutput, w: np.ndarray) -> np.ndarray:
        cells = y * k + np.asarray(pred(out), dtype=np.int64)
        ww = w if row_weight is None else w * row_weight
        conf = np.stack([np.bincount(cells, weights=row, minlength=k * k) for row in ww]).reshape(-1, k, k)
        tp = np.diagonal(conf, axis1=1, axis2=2)
        true, predicted = conf.sum(axis=2), conf.sum(axis=1)
        present = true > 0
        f1 = np.divide(2 * tp, true + predicted, out=np.zeros_like(tp), where=present)
        return (f1 * present).sum(axis=1) / np.maximum(present.sum(axis=1), 1)

    return score


def _accuracy(y: np.ndarray, pred: Callable[[HeadOutput], np.ndarray]) -> _Scorer:
    def score(out: HeadOutput, w: np.ndarray) -> np.ndarray:
        right = (np.asarray(pred(out)) == y).astype(np.float64)
        return (w @ right) / w.sum(axis=1)

    return score


def _auc(pos: np.ndarray, neg: np.ndarray) -> _Scorer:
    """Weighted ROC AUC of ``fail_probability``: each text counts ``pos`` failing and ``neg`` passing."""

    def score(out: HeadOutput, w: np.ndarray) -> np.ndarray:
        _, group = np.unique(out.fail_probability.astype(np.float64), return_inverse=True)
        ng = int(group.max()) + 1 if len(group) else 0
        a = np.stack([np.bincount(group, weights=row * pos, minlength=ng) for row in w])
        b = np.stack([np.bincount(group, weights=row * neg, minlength=ng) for row in w])
        below = np.cumsum(b, axis=1) - b  # passing weight scored strictly lower, per score group
        den = a.sum(axis=1) * b.sum(axis=1)
        num = (a * (below + 0.5 * b)).sum(axis=1)
        return np.divide(num, den, out=np.full(len(w), np.nan), where=den > 0)

    return score


def compare(
    candidate: HeadOutput,
    production: HeadOutput,
    labels: HeldoutLabels,
    metrics: Sequence[str],
    *,
    resamples: int = 1000,
    confidence: float = 0.9,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, PairedMetric]:
    """Each of ``metrics`` this module scores (:func:`supported_metrics`) for both models, with the
    percentile bootstrap interval (two-sided ``confidence``) of candidate − production over
    ``resamples`` draws. ``groups`` (an index per text) draws whole groups — texts that differ only
    in case or location words are not independent evidence — else single texts. A metric undefined on
    the texts (AUC without a failing text) is left out, like one the module does not know; the caller
    names both."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), not {confidence}")
    scorers = _scorers(labels)
    wanted = [m for m in dict.fromkeys(metrics) if m in scorers]
    n = len(labels.section)
    if n == 0 or not wanted:
        return {}
    ones = np.ones((1, n))
    points = {m: (float(scorers[m](candidate, ones)[0]), float(scorers[m](production, ones)[0])) for m in wanted}
    wanted = [m for m in wanted if all(math.isfinite(v) for v in points[m])]
    rng = np.random.default_rng(seed)
    member = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    if len(member) != n:
        raise ValueError(f"{len(member)} group indices for {n} texts")
    ng = int(member.max()) + 1
    diffs: dict[str, list[np.ndarray]] = {m: [] for m in wanted}
    for start in range(0, resamples, _BLOCK):
        block = min(_BLOCK, resamples - start)
        draws = np.stack([np.bincount(rng.integers(0, ng, ng), minlength=ng) for _ in range(block)])
        w = draws[:, member].astype(np.float64)
        for m in wanted:
            diffs[m].append(scorers[m](candidate, w) - scorers[m](production, w))
    tail = (1.0 - confidence) / 2.0
    found = {}
    for m in wanted:
        d = np.concatenate(diffs[m]) if diffs[m] else np.array([points[m][0] - points[m][1]])
        d = d[np.isfinite(d)]  # a draw without a failing (or passing) text has no AUC
        low, high = np.quantile(d, [tail, 1.0 - tail]) if len(d) else (math.nan, math.nan)
        found[m] = PairedMetric(points[m][0], points[m][1], float(low), float(high))
    return found
