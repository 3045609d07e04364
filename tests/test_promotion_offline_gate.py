"""The offline gate on registered runs (real MLflow registry): quality floors from the candidate's own run
metrics, and the candidate-vs-production comparison only when both runs record the same held-out split."""

from __future__ import annotations

import numpy as np
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
    [offline] = promoter.evidence.offline_gates(version, production)
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


def test_a_split_by_defect_pairs_only_runs_on_the_same_data(registry, tiny_bundle):
    """By defect a text's side follows its group, which the whole data set decides: production trained
    on fewer rows held out a text the candidate trained on, and the paired gate scored production on
    texts it had seen."""
    from promotion.paired_check import DATA_DEPENDENT_SCHEMES, data_dependence
    from training.dataset import SPLIT_SCHEME_DEFECT, SPLIT_SCHEME_TEXT

    assert DATA_DEPENDENT_SCHEMES == {SPLIT_SCHEME_DEFECT} and SPLIT_SCHEME_TEXT not in DATA_DEPENDENT_SCHEMES
    by_defect = {**SPLIT, "split.scheme": SPLIT_SCHEME_DEFECT, "data.sha256": "a" * 64}
    assert data_dependence(by_defect, by_defect) is None
    assert data_dependence({**SPLIT, "data.sha256": "a"}, {**SPLIT, "data.sha256": "b"}) is None  # by key
    assert "differ in split.max_texts" in data_dependence(by_defect, {**by_defect, "split.max_texts": 500})
    details = {}
    for data in ("a" * 64, "b" * 64):
        prod = registry.register_bundle(tiny_bundle.root, metrics=REAL, params={**by_defect, "data.sha256": data},
                                        alias=None).version  # fmt: skip
        v = registry.register_bundle(tiny_bundle.root, metrics=REAL, params=by_defect, alias=None).version
        details[data[0]] = _gate(registry, v, prod).detail
    assert "stores no held-out set" in details["a"]  # the same data: the comparison was tried
    assert "differ in data.sha256, so production may have trained on some" in details["b"], details["b"]


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
    ok = promoter.evidence.offline_gates(good, None)[1]
    assert ok.name == "golden" and ok.status == "pass", ok.detail
    refused = promoter.evidence.offline_gates(bad, None)[1]
    assert refused.status == "fail" and "max |Δ probability|" in refused.detail, refused.detail


# ---- the paired comparison: production's head on the candidate's stored held-out texts ----------------


@pytest.fixture(scope="module")
def heldout_source(tmp_path_factory, embedder, tiny_bundle):
    """Held-out texts of a generated set, embedded once, labelled with the tiny head's own predictions
    (so production — the tiny head — is right on every one and any other head can only lose)."""
    from motlens.labels import SEVERITIES
    from training.dataset import build_training_set
    from training.synth import generate
    from training.train import context_of

    root = tmp_path_factory.mktemp("heldout-src")
    generate(root / "bulk", rows=1200, seed=3)
    ho = build_training_set(root / "bulk", reference_rows=50).holdout.reset_index(drop=True)
    emb = embedder.encode(ho["text"].tolist())
    out = tiny_bundle.head().predict(emb, context_of(ho))
    ho["section"] = out.section_index
    ho["severity"] = [SEVERITIES[i] for i in out.severity_scores.argmax(axis=1)]
    return ho, emb


def _register(registry, bundle_root, heldout_source, tmp_path, *, metrics=REAL, params=SPLIT, store=True):
    from motlens.bundle import Bundle
    from training.heldout import HELDOUT_DIR, embedder_files, write_heldout

    ho, emb = heldout_source
    art = tmp_path / f"art-{len(list(tmp_path.glob('art-*')))}"
    art.mkdir()
    if store:
        files = embedder_files(Bundle.open(bundle_root).manifest)
        write_heldout(art / HELDOUT_DIR, ho, emb, np.arange(len(ho)), embedder=files, max_texts=10_000, seed=0)
    return registry.register_bundle(bundle_root, metrics=metrics, params=params, alias=None, artifacts_dir=art)


def _scrambled(tiny_bundle, tmp_path):
    """The tiny bundle with its section rows rolled: each section's weights answer for the next one."""
    from test_predictor_backend import _with_head

    from motlens.head import DefectHead

    head = tiny_bundle.head()
    w = {k: v.copy() for k, v in head.weights.items()}
    w["section.weight"], w["section.bias"] = np.roll(w["section.weight"], 1, axis=0), np.roll(w["section.bias"], 1)
    return _with_head(tiny_bundle, DefectHead(w, head.features), tmp_path / "scrambled")


def test_paired_passes_the_same_head_that_its_run_metrics_would_refuse(registry, tiny_bundle, heldout_source,
                                                                       tmp_path):  # fmt: skip
    """The seed-noise leftover: two runs' logged metrics differ by more than the tolerance while the two
    heads score the same on the same texts. Paired, the difference is measured on those texts."""
    prod = _register(registry, tiny_bundle.root, heldout_source, tmp_path).version
    lower = {**REAL, "severity_macro_f1": REAL["severity_macro_f1"] - 0.03}
    cand = _register(registry, tiny_bundle.root, heldout_source, tmp_path, metrics=lower).version
    runs_only = Promoter(PromoteSettings(golden_check=False, paired=False), registry, None)
    runs = runs_only.evidence.offline_gates(cand, prod)[0]
    assert runs.status == "fail" and "worse than production: severity_macro_f1" in runs.detail
    r = _gate(registry, cand, prod)
    n = len(heldout_source[0])
    assert r.status == "pass", r.detail
    assert f"paired on {n} held-out texts of the candidate's run, both heads on the stored embeddings" in r.detail
    for m in ("section_macro_f1", "severity_macro_f1", "fail_auc"):
        v = r.values[m]
        assert v["paired"] and v["candidate"] == v["production"] and v["low"] == v["high"] == 0.0, (m, v)
    assert r.values["paired"] == {"n_texts": n, "embeddings": "both heads on the stored embeddings (same embedder)"}


def test_paired_refuses_a_head_that_is_worse_on_the_same_texts(registry, tiny_bundle, heldout_source, tmp_path):
    prod = _register(registry, tiny_bundle.root, heldout_source, tmp_path).version
    cand = _register(registry, _scrambled(tiny_bundle, tmp_path), heldout_source, tmp_path).version
    r = _gate(registry, cand, prod)
    assert r.status == "fail" and "worse than production on" in r.detail and "interval below −0.01" in r.detail
    sec = r.values["section_macro_f1"]
    assert sec["production"] == 1.0 and sec["high"] < -0.01 and sec["low"] <= sec["difference"] <= sec["high"]
    # the severity head is untouched: not named among the failures
    assert r.values["severity_macro_f1"]["difference"] == 0.0
    failing = r.detail.split(": interval below")[0]
    assert "section_macro_f1" in failing and "severity_macro_f1" not in failing


def test_paired_result_is_kept_per_production_and_settings(registry, tiny_bundle, heldout_source, tmp_path,
                                                           monkeypatch):  # fmt: skip
    import json

    from promotion import paired_check as pc

    prod = _register(registry, tiny_bundle.root, heldout_source, tmp_path).version
    cand = _register(registry, _scrambled(tiny_bundle, tmp_path), heldout_source, tmp_path).version
    dry = Promoter(PromoteSettings(golden_check=False), registry, target=None, dry_run=True)
    assert dry.evidence.offline_gates(cand, prod)[0].status == "fail"
    assert pc.PAIRED_TAG not in registry.resolve(cand).tags  # a dry run writes nothing
    first = _gate(registry, cand, prod)
    stored = json.loads(registry.resolve(cand).tags[pc.PAIRED_TAG])
    assert stored["result"]["production"] == prod and stored["settings"]["resamples"] == 1000
    calls = []
    real_run = pc.run
    monkeypatch.setattr(pc, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    again = _gate(registry, cand, prod)
    assert calls == [] and again.detail == first.detail and again.values == first.values
    other = Promoter(PromoteSettings(golden_check=False, paired_resamples=200), registry, None)
    assert other.evidence.offline_gates(cand, prod)[0].status == "fail" and len(calls) == 1  # other settings: anew
    assert json.loads(registry.resolve(cand).tags[pc.PAIRED_TAG])["settings"]["resamples"] == 200


@pytest.mark.parametrize("case", ["another split", "nothing stored", "tampered"])
def test_without_a_usable_paired_set_the_gate_falls_back_and_says_why(registry, tiny_bundle, heldout_source,
                                                                      tmp_path, case):  # fmt: skip
    from pathlib import Path
    from urllib.parse import urlparse

    prod = _register(registry, tiny_bundle.root, heldout_source, tmp_path).version
    params = {**SPLIT, "split.seed": 1} if case == "another split" else SPLIT
    lower = {**REAL, "severity_macro_f1": REAL["severity_macro_f1"] - 0.03}
    info = _register(registry, _scrambled(tiny_bundle, tmp_path), heldout_source, tmp_path, metrics=lower,
                     params=params, store=case != "nothing stored")  # fmt: skip
    if case == "tampered":
        run = registry.client.get_run(info.run_id)
        texts = Path(urlparse(run.info.artifact_uri).path) / "heldout" / "texts.parquet"
        texts.write_bytes(texts.read_bytes() + b"\0")
    r = _gate(registry, info.version, prod)
    assert "paired" not in r.values
    if case == "another split":  # production may have trained on the candidate's held-out texts
        assert r.status == "pass" and "another held-out split" in r.detail and "floors only" in r.detail
    else:  # the runs' metrics, as before, and the reason the paired comparison did not run
        assert r.status == "fail" and "worse than production: severity_macro_f1" in r.detail, r.detail
        why = {
            "nothing stored": "(no paired comparison: the candidate's run stores no held-out set",
            "tampered": "(no paired comparison: held-out set or bundle refused: ",
        }[case]
        assert why in r.detail, r.detail
        assert case != "tampered" or "texts.parquet: sha256" in r.detail


def test_a_held_out_set_rewritten_with_its_own_hashes_is_refused(registry, tiny_bundle, heldout_source, tmp_path):
    """heldout.json listed its files' hashes but nothing pinned heldout.json: whoever could write the
    artifact store could relabel the texts, re-hash them, and the paired gate scored the candidate on them."""
    import json
    from pathlib import Path
    from urllib.parse import urlparse

    import pandas as pd

    from motlens.bundle import sha256_file
    from training.heldout import META, TEXTS
    from training.registry import HELDOUT_DIGEST_TAG, HELDOUT_MANIFEST

    assert HELDOUT_MANIFEST == f"heldout/{META}"
    prod = _register(registry, tiny_bundle.root, heldout_source, tmp_path).version
    info = _register(registry, _scrambled(tiny_bundle, tmp_path), heldout_source, tmp_path)
    assert len(info.tags[HELDOUT_DIGEST_TAG]) == 64
    held = Path(urlparse(registry.client.get_run(info.run_id).info.artifact_uri).path) / "heldout"
    texts = pd.read_parquet(held / TEXTS)
    texts.assign(section=(texts["section"] + 1) % 9).to_parquet(held / TEXTS)  # relabelled to suit the candidate
    meta = json.loads((held / META).read_text())
    meta["files"][TEXTS] = sha256_file(held / TEXTS)
    (held / META).write_text(json.dumps(meta))
    r = _gate(registry, info.version, prod)
    assert "paired" not in r.values
    assert "held-out set or bundle refused: " in r.detail and "the stored held-out set was changed" in r.detail


class EndpointConnectionError(Exception):
    """What botocore raises when the S3 artifact store does not answer (not an MLflow or HTTP error)."""


@pytest.mark.parametrize("error", ["registry", "s3"])
def test_paired_waits_when_the_artifact_store_does_not_answer(registry, tiny_bundle, heldout_source, tmp_path,
                                                              monkeypatch, error):  # fmt: skip
    """Review: an S3 client error escaped the gate and `promote auto` exited 2 without a verdict."""
    from promotion import paired_check as pc
    from training.registry import RegistryUnreachable

    prod = _register(registry, tiny_bundle.root, heldout_source, tmp_path).version
    cand = _register(registry, tiny_bundle.root, heldout_source, tmp_path).version

    def down(*_a, **_k):
        if error == "registry":
            raise RegistryUnreachable("model registry http://mlflow:5000 unreachable or failing: connection refused")
        raise EndpointConnectionError('Could not connect to the endpoint URL: "https://s3.example:9000"')

    monkeypatch.setattr(registry, "fetch_run_dir" if error == "registry" else "fetch", down)
    r = _gate(registry, cand, prod)
    assert r.status == "wait" and "paired comparison could not run" in r.detail, r.detail
    assert ("connection refused" if error == "registry" else "EndpointConnectionError: Could not connect") in r.detail
    assert pc.PAIRED_TAG not in registry.resolve(cand).tags  # no verdict stored: the next run tries again


@pytest.mark.parametrize("fault", ["download refused", "head fails"])
def test_a_passing_fault_is_not_kept_as_the_answer(registry, tiny_bundle, heldout_source, tmp_path, monkeypatch,
                                                   fault):  # fmt: skip
    """Review: one truncated download (or a head that failed once) was stored in the tag, and the pair never
    had a paired comparison again."""
    from motlens.bundle import BundleError
    from motlens.head import DefectHead
    from promotion import paired_check as pc

    prod = _register(registry, tiny_bundle.root, heldout_source, tmp_path).version
    cand = _register(registry, tiny_bundle.root, heldout_source, tmp_path).version
    with monkeypatch.context() as m:
        if fault == "download refused":
            m.setattr(registry, "fetch", lambda *_a, **_k: (_ for _ in ()).throw(BundleError("truncated download")))
        else:
            m.setattr(DefectHead, "predict", lambda *_a, **_k: (_ for _ in ()).throw(ValueError("bad weights")))
        first = _gate(registry, cand, prod)
    assert first.status == "pass" and "paired" not in first.values, first.detail
    assert ("held-out set or bundle refused: truncated download" if fault == "download refused"
            else "could not score the heads: ValueError: bad weights") in first.detail  # fmt: skip
    assert pc.PAIRED_TAG not in registry.resolve(cand).tags
    again = _gate(registry, cand, prod)  # the store and head are fine now: compared, and kept
    assert again.values["paired"]["n_texts"] == len(heldout_source[0])
    assert pc.PAIRED_TAG in registry.resolve(cand).tags


def test_production_with_another_embedder_scores_the_texts_embedded_anew(registry, tiny_bundle, heldout_source,
                                                                         tmp_path, monkeypatch):  # fmt: skip
    """Production's embedder files differ (here: a changed README, same weights): its head gets the texts
    embedded by its own embedder, not the candidate's stored embeddings."""
    import shutil

    from motlens.bundle import write_manifest

    other = tmp_path / "other-embedder"
    shutil.copytree(tiny_bundle.root, other)
    readme = next(p for p in (other / "embedder").iterdir() if p.suffix == ".md" or p.name.endswith(".json"))
    readme.write_text(readme.read_text() + "\n")
    write_manifest(other, version="7", run_id="other")
    prod = _register(registry, other, heldout_source, tmp_path).version
    cand = _register(registry, tiny_bundle.root, heldout_source, tmp_path).version
    from promotion import paired_check as pc

    n = len(heldout_source[0])
    r = _gate(registry, cand, prod)
    assert r.status == "pass", r.detail
    assert r.values["paired"]["embeddings"] == f"production's embedder differs: {n} of {n} texts embedded anew with it"
    for m in ("section_macro_f1", "severity_macro_f1"):  # the same weights run anew: float noise only
        assert abs(r.values[m]["difference"]) <= 0.02, (m, r.values[m])
    # a bounded sample is embedded anew (a second MiniLM in the promotion pod), named in the detail
    cand2 = _register(registry, tiny_bundle.root, heldout_source, tmp_path).version
    monkeypatch.setattr(pc, "REEMBED_MAX_TEXTS", 50)
    capped = _gate(registry, cand2, prod)
    assert capped.values["paired"] == {"n_texts": 50, "embeddings": f"production's embedder differs: 50 of {n} texts "
                                       "embedded anew with it"}  # fmt: skip
