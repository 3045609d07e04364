"""The offline gate on registered runs (real MLflow registry): quality floors from the candidate's own run
metrics, and the candidate-vs-production comparison only when both runs record the same held-out split."""

from __future__ import annotations

import pytest

from promotion.settings import PromoteSettings
from promotion.workflow import Promoter

SHUFFLED = {"section_macro_f1": 0.0903, "severity_macro_f1": 0.2469, "fail_auc": 0.5,
            "baseline_section_macro_f1": 0.049, "baseline_severity_macro_f1": 0.1372,
            "baseline_fail_auc": 0.5}  # fmt: skip
REAL = {"section_macro_f1": 0.9987, "severity_macro_f1": 0.8024, "fail_auc": 0.8127,
        "baseline_section_macro_f1": 0.049, "baseline_severity_macro_f1": 0.1372, "baseline_fail_auc": 0.5}  # fmt: skip
SPLIT = {"split.seed": 0, "split.scheme": "text-hash", "split.holdout_fraction": 0.2, "split.max_texts": None}


def _gate(registry, version, production):
    promoter = Promoter(PromoteSettings(golden_check=False), registry, target=None)
    [offline] = promoter.offline_gates(version, production)
    return offline


def test_shuffled_label_version_fails_without_production(registry, tiny_bundle):
    """Audit finding 3: with nothing to compare, the gate passed a model no better than chance."""
    v = registry.register_bundle(tiny_bundle.root, metrics=SHUFFLED, params=SPLIT, alias=None).version
    r = _gate(registry, v, None)
    assert r.status == "fail" and "below the quality floor" in r.detail and "floors only" in r.detail, r.detail


def test_shuffled_label_version_fails_against_a_production_without_metrics(registry, tiny_bundle):
    prod = registry.register_bundle(tiny_bundle.root, metrics={}, params=SPLIT, alias=None).version
    v = registry.register_bundle(tiny_bundle.root, metrics=SHUFFLED, params=SPLIT, alias=None).version
    r = _gate(registry, v, prod)
    assert r.status == "fail" and "production has none of" in r.detail, r.detail


@pytest.mark.parametrize(
    ("cand_params", "prod_params", "status"),
    [
        (SPLIT, SPLIT, "fail"),  # the same held-out split: the comparison stands
        ({**SPLIT, "split.seed": 1}, SPLIT, "pass"),  # another split: floors only
        ({"seed": 1}, SPLIT, "pass"),  # the candidate does not record its split
        (SPLIT, {"seed": 2}, "pass"),  # production trained by an older motlens
    ],
)
def test_comparison_needs_the_same_split_params(registry, tiny_bundle, cand_params, prod_params, status):
    """Audit finding 2: seed 1 vs seed 2 of the same recipe failed the gate on seed noise."""
    prod = registry.register_bundle(
        tiny_bundle.root, metrics={**REAL, "severity_macro_f1": 0.8091, "fail_auc": 0.8294}, params=prod_params,
        alias=None,
    ).version  # fmt: skip
    v = registry.register_bundle(
        tiny_bundle.root, metrics={**REAL, "severity_macro_f1": 0.7929, "fail_auc": 0.8138}, params=cand_params,
        alias=None,
    ).version  # fmt: skip
    r = _gate(registry, v, prod)
    assert r.status == status, r.detail
    if status == "fail":
        assert "worse than production" in r.detail
    else:
        assert "production's metrics come from another held-out split" in r.detail and "floors only" in r.detail


def test_golden_gate_refuses_a_bundle_whose_probabilities_moved(registry, tiny_bundle, embedder, tmp_path):
    """Audit finding 5 in promotion's golden check: same labels, a severity head biased towards failing."""
    from test_predictor_backend import _context_bundle, _same_labels, _with_head

    from motlens.head import DefectHead
    from motlens.labels import SEVERITIES

    bundle, head = _context_bundle(tiny_bundle, embedder, tmp_path)
    w = {k: v.copy() for k, v in head.weights.items()}
    w["severity.bias"][[SEVERITIES.index("major"), SEVERITIES.index("dangerous")]] += 0.5
    biased = DefectHead(w, head.features)
    assert _same_labels(bundle, biased, embedder)
    good = registry.register_bundle(bundle.root, metrics=REAL, params=SPLIT, alias=None).version
    bad = registry.register_bundle(_with_head(bundle, biased, tmp_path / "biased"), metrics=REAL, params=SPLIT,
                                   alias=None).version  # fmt: skip
    promoter = Promoter(PromoteSettings(), registry, target=None)
    ok = promoter.offline_gates(good, None)[1]
    assert ok.name == "golden" and ok.status == "pass", ok.detail
    refused = promoter.offline_gates(bad, None)[1]
    assert refused.status == "fail" and "max |Δ probability|" in refused.detail, refused.detail
