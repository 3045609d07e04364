"""Held-out metrics: macro-F1 over the held-out classes, calibration against what the rows show."""

from __future__ import annotations

import numpy as np
import pytest

from motlens.head import HeadOutput
from training.evaluate import evaluate, expected_calibration_error


def _out(sec_pred: np.ndarray, fail_p: np.ndarray) -> HeadOutput:
    n = len(sec_pred)
    sev = np.zeros((n, 4), np.float32)
    sev[:, 2], sev[:, 0] = fail_p, 1 - fail_p
    return HeadOutput(sec_pred, np.eye(9, dtype=np.float32)[sec_pred], sev, fail_p.astype(np.float32))


def test_macro_f1_averages_over_the_held_out_classes_only():
    """A held-out side without section 8: a prediction of 8 is an error against the text's true class,
    not a new class scoring 0, so the metric does not jump when the model first predicts 8; a perfect
    model scores 1 whatever classes are absent."""
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 8, n)  # no section 8 among the held-out texts
    p = y.copy()
    flip = rng.random(n) < 0.2
    p[flip] = rng.integers(0, 8, flip.sum())
    sev = np.zeros(n, int)
    sev[: n // 2] = 2
    prob = (sev == 2).astype(np.float32)
    a = evaluate(_out(p, prob), y, sev, np.ones(n))
    present = [str(c) for c in range(8)]
    f1s = [v["f1-score"] for k, v in a.report["section"].items() if k.split()[0] in present]
    assert len(f1s) == 8 and a.metrics["section_macro_f1"] == pytest.approx(np.mean(f1s))
    assert a.metrics["section_classes_present"] == 8 and a.metrics["severity_classes_present"] == 2
    p2 = p.copy()
    p2[:3] = 8
    b = evaluate(_out(p2, prob), y, sev, np.ones(n))
    assert abs(a.metrics["section_macro_f1"] - b.metrics["section_macro_f1"]) < 0.01
    # severity: two of four severities present, both predicted perfectly
    assert a.metrics["severity_macro_f1"] == pytest.approx(1.0)


def test_row_weighted_calibration_against_each_texts_observed_fail_fraction():
    """Ambiguous texts (half their rows fail) predicted at p=0 or 1 look calibrated against their
    majority label but not against their rows."""
    n = 200
    frac = np.where(np.arange(n) % 2 == 0, 0.5, 0.0)  # even texts: half the rows fail
    majority_fail = (np.arange(n) % 4 == 0).astype(float)  # ties broken either way
    counts = np.full(n, 10.0)
    sev = np.where(majority_fail == 1, 2, 0)
    confident = majority_fail.astype(np.float32)  # p = majority label: 0 or 1
    ev = evaluate(_out(np.zeros(n, int), confident), np.zeros(n, int), sev, counts, fail_fraction=frac)
    assert ev.metrics["fail_ece"] == pytest.approx(0.0) and ev.metrics["fail_brier"] == pytest.approx(0.0)
    # rows: the p=1 texts' rows fail half the time, the p=0 ambiguous texts' rows too
    # p=1 bin: a quarter of the rows, half fail (|1 - 0.5|); p=0 bin: the rest, a sixth fail
    assert ev.metrics["fail_ece_rows"] == pytest.approx(0.25 * 0.5 + 0.75 * (1 / 6))
    # Brier over rows: (p - f)² + f(1 - f) per text, row-weighted
    assert ev.metrics["fail_brier_rows"] == pytest.approx(0.25 * 0.5 + 0.25 * 0.5)
    # the honest p=fail_fraction is perfect on rows (ECE 0) and its Brier is the irreducible f(1-f)
    honest_out = _out(np.zeros(n, int), frac.astype(np.float32))
    honest = evaluate(honest_out, np.zeros(n, int), sev, counts, fail_fraction=frac)
    assert honest.metrics["fail_ece_rows"] == pytest.approx(0.0, abs=1e-6)
    assert honest.metrics["fail_brier_rows"] == pytest.approx(0.5 * 0.25, abs=1e-6)
    assert honest.metrics["fail_brier_rows"] < ev.metrics["fail_brier_rows"]
    assert honest.report["calibration_rows"]["ece"] == pytest.approx(0.0, abs=1e-6)
    # AUC over rows: the 500 failing rows sit at p=0.5; of the 1500 passing rows 500 there too (ties), 1000 at 0
    assert honest.metrics["fail_auc_rows"] == pytest.approx(2 / 3 + 1 / 3 * 0.5)
    # without fail_fraction: no row metrics (the old signature still works)
    assert "fail_ece_rows" not in evaluate(_out(np.zeros(n, int), confident), np.zeros(n, int), sev, counts).metrics


def test_weighted_ece_equals_ece_of_the_expanded_rows():
    rng = np.random.default_rng(1)
    p, y, w = rng.random(50), (rng.random(50) < 0.5).astype(float), rng.integers(1, 5, 50)
    expanded, _ = expected_calibration_error(np.repeat(p, w), np.repeat(y, w))
    weighted, _ = expected_calibration_error(p, y, weights=w.astype(float))
    assert weighted == pytest.approx(expanded)
