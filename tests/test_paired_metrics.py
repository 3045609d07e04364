"""The paired comparison's statistics (training.paired): the metrics equal training.evaluate's on the same
texts, and the bootstrap interval of the difference behaves as an interval should."""

from __future__ import annotations

import numpy as np
import pytest

from motlens.head import HeadOutput
from training.evaluate import evaluate
from training.paired import HeldoutLabels, compare, supported_metrics

METRICS = [
    "section_macro_f1",
    "severity_macro_f1",
    "section_macro_f1_rows",
    "severity_macro_f1_rows",
    "section_accuracy",
    "severity_accuracy",
    "fail_auc",
    "fail_auc_rows",
]


def _labels(n: int, seed: int = 1, sections: int = 9) -> HeldoutLabels:
    rng = np.random.default_rng(seed)
    return HeldoutLabels(
        section=rng.integers(0, sections, n),
        severity=rng.integers(0, 4, n),
        counts=rng.integers(1, 40, n).astype(float),
        fail_fraction=rng.random(n).round(2),
    )


def _model(labels: HeldoutLabels, skill: float, seed: int) -> HeadOutput:
    """Scores leaning towards the true class by ``skill``; fail probabilities rounded (ties)."""
    rng = np.random.default_rng(seed)
    n = len(labels.section)
    sec = rng.random((n, 9))
    sec[np.arange(n), labels.section] += skill
    sev = rng.random((n, 4))
    sev[np.arange(n), labels.severity] += skill
    sec, sev = sec / sec.sum(1, keepdims=True), sev / sev.sum(1, keepdims=True)
    return HeadOutput(sec.argmax(1), sec, sev, (sev[:, 2] + sev[:, 3]).round(2))


@pytest.mark.parametrize("sections", [9, 4])  # 4: classes absent from the texts, predicted all the same
def test_point_estimates_equal_the_logged_metrics(sections):
    labels = _labels(3000, sections=sections)
    a, b = _model(labels, 0.5, 2), _model(labels, 0.3, 3)
    found = compare(a, b, labels, METRICS, resamples=100)
    assert set(found) == set(METRICS) == supported_metrics(labels)
    for out, side in ((a, "candidate"), (b, "production")):
        logged = evaluate(out, labels.section, labels.severity, labels.counts, fail_fraction=labels.fail_fraction)
        for m in METRICS:
            assert getattr(found[m], side) == pytest.approx(logged.metrics[m], abs=1e-12), (m, side)


def test_identical_models_differ_by_nothing():
    labels = _labels(500)
    a = _model(labels, 0.4, 2)
    for p in compare(a, a, labels, METRICS, resamples=200).values():
        assert p.difference == p.low == p.high == 0.0


def test_interval_separates_a_worse_model_and_is_reproducible():
    labels = _labels(2000)
    good, bad = _model(labels, 0.6, 2), _model(labels, 0.2, 3)
    found = compare(bad, good, labels, ["section_macro_f1", "fail_auc"], seed=7)
    for p in found.values():
        assert p.low <= p.difference <= p.high < 0
    assert compare(bad, good, labels, ["section_macro_f1", "fail_auc"], seed=7) == found
    swapped = compare(good, bad, labels, ["section_macro_f1"], seed=7)["section_macro_f1"]
    assert swapped.difference == pytest.approx(-found["section_macro_f1"].difference)
    assert swapped.low == pytest.approx(-found["section_macro_f1"].high)


def test_interval_of_equally_good_models_holds_zero_at_about_its_level():
    """Two models of the same skill (independent noise): over 40 held-out sets the 90 % interval of
    their difference holds 0 in most of them (a percentile bootstrap is roughly calibrated here)."""
    held = 0
    for seed in range(40):
        labels = _labels(400, seed=100 + seed)
        p = compare(_model(labels, 0.4, seed), _model(labels, 0.4, 1000 + seed), labels, ["severity_macro_f1"],
                    resamples=300, seed=seed)["severity_macro_f1"]  # fmt: skip
        held += p.low <= 0 <= p.high
    assert 30 <= held <= 40, held


def test_groups_are_drawn_whole_and_widen_the_interval():
    """Texts that share a group (case or location variants) are one piece of evidence: drawing groups
    gives a wider interval than pretending each copy is independent."""
    base = _labels(300, seed=4)
    copies = 6  # every text six times, as its variants would be
    labels = HeldoutLabels(*(np.repeat(x, copies) for x in (base.section, base.severity, base.counts,
                                                             base.fail_fraction)))  # fmt: skip
    a, b = (HeadOutput(*(np.repeat(x, copies, axis=0) for x in (o.section_index, o.section_scores,
                                                               o.severity_scores, o.fail_probability)))
            for o in (_model(base, 0.5, 2), _model(base, 0.5, 3)))  # fmt: skip
    groups = np.repeat(np.arange(300), copies)
    texts = compare(a, b, labels, ["section_macro_f1"], seed=1)["section_macro_f1"]
    grouped = compare(a, b, labels, ["section_macro_f1"], seed=1, groups=groups)["section_macro_f1"]
    assert grouped.difference == texts.difference
    assert grouped.high - grouped.low > 2 * (texts.high - texts.low)  # ≈ √6 in theory
    with pytest.raises(ValueError, match="group indices"):
        compare(a, b, labels, ["section_macro_f1"], groups=groups[:-1])


def test_undefined_and_unknown_metrics_are_left_out():
    labels = _labels(200)
    passing = HeldoutLabels(labels.section, np.zeros(200, int), labels.counts, np.zeros(200))  # no failing text
    a = _model(passing, 0.4, 1)
    found = compare(a, a, passing, ["fail_auc", "fail_auc_rows", "severity_macro_f1", "fail_brier"])
    assert set(found) == {"severity_macro_f1"}
    assert "fail_auc_rows" not in supported_metrics(HeldoutLabels(labels.section, labels.severity, labels.counts))
    with pytest.raises(ValueError, match="confidence"):
        compare(a, a, passing, ["severity_macro_f1"], confidence=1.0)
