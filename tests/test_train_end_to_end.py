"""Training end to end on a small generated set: real MiniLM, real MLflow on sqlite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from motlens import EMBEDDING_DIM
from motlens.bundle import check_golden
from motlens.state import StateSettings
from training.registry import Registry
from training.train import TrainSettings, train

pytestmark = pytest.mark.slow

SETTINGS = {"seed": 11, "epochs": 25, "golden_size": 48, "reference_rows": 300}


class SharedEmbeddings:
    """The session MiniLM with a per-text memo, so a retrain reuses the first run's embeddings."""

    def __init__(self, inner) -> None:
        self.inner, self.memo = inner, {}
        self.backend, self.device, self.dim = inner.backend, inner.device, inner.dim

    def encode(self, texts, batch_size: int = 64) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        self.memo.update(zip(todo, self.inner.encode(todo, batch_size=batch_size), strict=True))
        return np.stack([self.memo[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, embedder, _mlflow_template_db):
    from training.synth import generate

    root = tmp_path_factory.mktemp("train")
    generate(root / "bulk", rows=1500, seed=7)
    state = StateSettings(home=root / "motlens").ensure()
    shutil.copy(_mlflow_template_db, state.home / "mlflow.db")
    registry = Registry(state.mlflow_uri, state=state)
    shared = SharedEmbeddings(embedder)
    with pytest.MonkeyPatch.context() as env:  # the aliases' audit rows go to this state's log, not ./.motlens
        env.setenv("MOTLENS_HOME", str(state.home))
        env.delenv("MOTLENS_CLICKHOUSE_URL", raising=False)
        first = train(root / "bulk", TrainSettings(work_dir=root / "work", **SETTINGS), embedder=shared,
                      registry=registry)  # fmt: skip
        yield root, registry, shared, first


def test_version_registered_with_alias_metrics_and_artifacts(setup):
    root, registry, _, result = setup
    v = result.version
    assert v.version == "1" and v.aliases == ["candidate"]
    assert registry.resolve("models:/mot-defects@candidate").run_id == v.run_id
    for name in ("section_macro_f1", "severity_macro_f1", "fail_auc", "fail_brier", "fail_ece"):
        assert 0.0 <= v.metrics[name] <= 1.0, name
    # the manual reference ends every synthetic text: the section head must be clearly right
    assert v.metrics["section_macro_f1"] > 0.8
    assert v.metrics["severity_macro_f1"] > 0.4
    run = registry.client.get_run(v.run_id)
    p = run.data.params
    assert p["seed"] == "11" and len(p["data.sha256"]) == 64 and p["pkg.torch"].startswith("2.")
    assert int(p["data.rows_labelled"]) == result.fingerprint["rows_labelled"] > 1000
    assert json.loads(p["data.rows_severity"]).keys() == {"advisory", "minor", "major", "dangerous"}
    assert p["git_commit"] == run.data.tags["mlflow.source.git.commit"]
    # lineage: where the data came from, and the data hash as the run's dataset input
    assert p["data.source.kind"] == "data" and p["data.source.path"] == str((root / "bulk").absolute())
    assert run.data.tags["motlens.data_source"] == "data"
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == p["data.sha256"][:36] and inp.dataset.source_type == "local"
    assert json.loads(inp.dataset.source) == {"uri": p["data.source.path"]}
    assert json.loads(inp.dataset.profile)["sha256"] == p["data.sha256"]
    for name in ("fail_brier_rows", "fail_ece_rows", "fail_auc_rows"):  # calibration against the rows
        assert 0.0 <= v.metrics[name] <= 1.0, name
    assert 1 <= v.metrics["section_classes_present"] <= 9
    arts = {a.path for a in registry.client.list_artifacts(v.run_id, "reports")}
    assert {
        "reports/confusion_section.png",
        "reports/confusion_severity.png",
        "reports/calibration_fail_probability.png",
        "reports/classification_report.json",
    } <= arts
    model = {a.path for a in registry.client.list_artifacts(v.run_id, "model")}
    assert {"model/bundle.json", "model/head", "model/embedder", "model/golden", "model/reference"} <= model
    report = json.loads((root / "work" / "artifacts" / "reports" / "classification_report.json").read_text())
    assert report["section"]["1 Brakes"]["support"] > 0 and report["calibration"]["bins"]
    local = json.loads((root / "work" / "bundle" / "bundle.json").read_text())
    assert local["version"] == "1" and local["run_id"] == v.run_id


def test_fetched_bundle_reproduces_golden(setup, embedder):
    _, registry, _, result = setup
    b = registry.fetch("models:/mot-defects@candidate")
    assert b.version == "1" and b.run_id == result.version.run_id
    golden = b.golden()
    assert len(golden.texts) == SETTINGS["golden_size"]
    emb = embedder.encode(golden.texts)  # fresh embeddings, not the training memo
    res = check_golden(golden, emb, b.head())
    assert res.passed and res.max_score_delta is not None, res.detail
    ref = pd.read_parquet(b.reference_path)
    emb_cols = [f"emb_{i:03d}" for i in range(EMBEDDING_DIM)]
    assert len(ref) == min(SETTINGS["reference_rows"], result.fingerprint["rows_labelled"])  # rows of both sides
    assert set(emb_cols) <= set(ref.columns)
    for col in (
        "text",
        "make",
        "model",
        "fuel_type",
        "vehicle_age_years",
        "odometer_miles",
        "text_length",
        "section",
        "section_score",
        "severity",
        "fail_probability",
        "label_section",
        "label_severity",
    ):
        assert col in ref.columns, col
    norms = np.linalg.norm(ref[emb_cols].to_numpy(), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-4)
    # predictions stored in the reference are the head's on those embeddings and contexts
    ctx = {c: ref[c].tolist() for c in ("fuel_type", "vehicle_age_years", "odometer_miles")}
    again = b.head().predict(ref[emb_cols].to_numpy(np.float32), ctx)
    assert again.section == ref["section"].tolist()
    assert np.allclose(again.fail_probability, ref["fail_probability"], atol=1e-6)


def test_same_data_and_seed_same_metrics(setup):
    root, registry, shared, first = setup
    again = train(root / "bulk", TrainSettings(**{**SETTINGS, "alias": "rerun"}), embedder=shared, registry=registry)
    assert again.version.version == "2" and again.version.aliases == ["rerun"]
    assert again.metrics == first.metrics
    assert again.fingerprint == first.fingerprint
    b1, b2 = registry.fetch("1"), registry.fetch("rerun")
    assert b1.manifest["files"]["head/weights.safetensors"] == b2.manifest["files"]["head/weights.safetensors"]
    assert Path(b2.root).name == "2"


def test_another_init_seed_keeps_the_split_and_logs_it(setup):
    """``--seed`` once seeded the split too: a retrain with another seed was evaluated on other texts
    (and trained on some of the first run's held-out ones), so its metrics were not comparable."""
    root, registry, shared, first = setup
    other = train(root / "bulk", TrainSettings(**{**SETTINGS, "seed": 12, "alias": None}), embedder=shared,
                  registry=registry)  # fmt: skip
    assert other.fingerprint == first.fingerprint  # the same texts on each side
    assert other.metrics != first.metrics  # a different initialisation all the same
    from training.dataset import SPLIT_SCHEME_TEXT

    for v in (first.version, other.version):
        p = registry.client.get_run(v.run_id).data.params
        assert p["split.seed"] == "0" and p["split.scheme"] == SPLIT_SCHEME_TEXT == "group-casefold-nolocation-v1"
    moved = train(root / "bulk", TrainSettings(**{**SETTINGS, "split_seed": 3, "alias": None}), embedder=shared,
                  registry=registry)  # fmt: skip
    assert moved.fingerprint["holdout_texts"] != first.fingerprint["holdout_texts"]
    assert registry.client.get_run(moved.version.run_id).data.params["split.seed"] == "3"
    from training.dataset import SPLIT_SCHEME_DEFECT

    by_defect = train(root / "bulk", TrainSettings(**{**SETTINGS, "split_by": "defect", "alias": None}),
                      embedder=shared, registry=registry)  # fmt: skip
    assert by_defect.fingerprint["sha256"] == first.fingerprint["sha256"]  # the same texts, held out otherwise
    assert by_defect.fingerprint["holdout_texts"] != first.fingerprint["holdout_texts"]
    assert registry.client.get_run(by_defect.version.run_id).data.params["split.scheme"] == SPLIT_SCHEME_DEFECT


def test_clickhouse_distinct_texts_train_and_register(setup):
    from training.chload import distinct_texts_from_tidy
    from training.dataset import training_set_from_distinct
    from training.dvsa_reader import read_bulk

    root, registry, shared, first = setup
    tidy = pd.concat(list(read_bulk([root / "bulk"])), ignore_index=True)
    ts = training_set_from_distinct(distinct_texts_from_tidy(tidy), seed=5, reference_rows=200)
    assert ts.fingerprint["rows_labelled"] == first.fingerprint["rows_labelled"]
    source = {"kind": "clickhouse", "engine": "chdb", "path": str(root / "ch"), "database": "motlens_data"}
    result = train(
        ts, TrainSettings(**{**SETTINGS, "alias": "chpath"}), embedder=shared, registry=registry, source=source
    )
    assert result.version.aliases == ["chpath"]
    run = registry.client.get_run(result.version.run_id)
    assert run.data.params["data.source.kind"] == "clickhouse" and run.data.params["data.source.engine"] == "chdb"
    assert run.inputs.dataset_inputs[0].dataset.source_type == "clickhouse"
    assert run.data.params["split.seed"] == "5"  # the set's own
    assert result.metrics["section_macro_f1"] > 0.8
    ref = pd.read_parquet(registry.fetch("chpath").reference_path)
    assert len(ref) == 200 and ref["vehicle_age_years"].isna().all() and ref["make"].isna().all()


def test_shuffled_labels_are_registered_without_the_candidate_alias(setup, caplog):
    """Audit finding 3: a model trained on shuffled labels got `candidate` ("passed offline evaluation")."""
    import logging

    from training.dataset import build_training_set

    root, registry, shared, first = setup
    ts = build_training_set(root / "bulk", seed=SETTINGS["seed"], reference_rows=SETTINGS["reference_rows"])
    rng = np.random.default_rng(0)
    train_rows = ~ts.texts["holdout"]
    for col in ("section", "severity"):
        ts.texts.loc[train_rows, col] = rng.permutation(ts.texts.loc[train_rows, col].to_numpy())
    ts.split_seed = None  # a set changed by hand does not say which split it holds
    with caplog.at_level(logging.WARNING, logger="training.train"):
        shuffled = train(ts, TrainSettings(**SETTINGS), embedder=shared, registry=registry,
                         source={"uri": "s3://bucket/mot/2026-11"})  # no "kind": once a KeyError after the fit
    assert shuffled.version.aliases == [] and shuffled.alias_withheld == "candidate"
    run = registry.client.get_run(shuffled.version.run_id)
    assert run.data.tags["motlens.data_source"] == "unknown" and run.data.params["data.source.uri"] == "s3://bucket/mot/2026-11"
    assert not any(k.startswith("split.") for k in run.data.params)  # claims no split it may not have used
    assert registry.resolve("candidate").version == first.version.version  # still the real model
    assert f"version {shuffled.version.version} registered WITHOUT alias 'candidate'" in caplog.text
    assert "below the quality floor" in caplog.text and not shuffled.floors.passed
    # the real model: its baselines logged beside its metrics, above every floor
    assert first.floors.passed and first.alias_withheld is None
    for m in ("section_macro_f1", "severity_macro_f1", "fail_auc"):
        assert m in first.floors.checked
        assert first.version.metrics[f"baseline_{m}"] < first.version.metrics[m]
    assert first.version.metrics["baseline_fail_auc"] == 0.5
    tags = registry.client.get_run(first.version.run_id).data.tags
    assert tags["motlens.quality_floors"] == "pass"


def test_held_out_set_is_kept_and_the_gate_scores_both_heads_on_it(setup, tmp_path):
    """The run keeps its held-out texts and their embeddings (run artifact heldout/); the promotion gate
    scores production's head on them beside the candidate's, and unsampled the candidate's scores there
    are its logged run metrics, production's its own run's (same split, same texts)."""
    from promotion.settings import PromoteSettings
    from promotion.workflow import Promoter
    from training.heldout import HELDOUT_DIR, embedder_files, read_heldout

    root, registry, shared, first = setup
    held = read_heldout(registry.fetch_run_dir(first.version.version, HELDOUT_DIR, tmp_path / "h1"))
    assert len(held.texts) == first.fingerprint["holdout_texts"] and held.meta["sample_seed"] is None
    assert held.embedder_files == embedder_files(registry.fetch("1").manifest)
    assert len(set(held.groups())) < len(held.texts)  # the paired gate resamples a defect's texts together
    retrain = train(root / "bulk", TrainSettings(**{**SETTINGS, "seed": 13, "alias": None}), embedder=shared,
                    registry=registry)  # fmt: skip
    [offline] = Promoter(PromoteSettings(golden_check=False), registry, None).evidence.offline_gates(
        retrain.version.version, first.version.version
    )
    assert offline.values["paired"]["n_texts"] == len(held.texts), offline.detail
    for m in ("section_macro_f1", "severity_macro_f1", "fail_auc"):
        v = offline.values[m]
        assert v["paired"] and v["low"] <= v["difference"] <= v["high"], (m, v)
        assert v["candidate"] == pytest.approx(retrain.metrics[m], abs=1e-6), m
        assert v["production"] == pytest.approx(first.metrics[m], abs=1e-6), m
    # a cap samples the held-out texts; 0 keeps none (the gate then compares the runs' metrics)
    capped = train(root / "bulk", TrainSettings(**{**SETTINGS, "heldout_max_texts": 40, "alias": None}),
                   embedder=shared, registry=registry)  # fmt: skip
    sample = read_heldout(registry.fetch_run_dir(capped.version.version, HELDOUT_DIR, tmp_path / "h2"))
    assert len(sample.texts) == 40 and set(sample.texts["text"]) <= set(held.texts["text"])
    none = train(root / "bulk", TrainSettings(**{**SETTINGS, "heldout_max_texts": 0, "alias": None}),
                 embedder=shared, registry=registry)  # fmt: skip
    assert registry.fetch_run_dir(none.version.version, HELDOUT_DIR, tmp_path / "h3") is None


def test_an_alias_set_by_train_is_audited_with_who_why_and_what_it_replaced(setup, monkeypatch, tmp_path, capsys):
    """`motlens train --alias production` moves what a following server serves with no gate: the audit
    trail says who moved the alias, why, and from which version (version tags, a promotion_events row)."""
    import predlog
    from promotion.frames import records
    from training.train_cli import say_audit_gaps

    root, registry, shared, first = setup
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path / "home"))  # the prediction log the row goes to
    monkeypatch.delenv("MOTLENS_CLICKHOUSE_URL", raising=False)
    monkeypatch.setenv("USER", "bob")
    hotfix = train(root / "bulk", TrainSettings(**{**SETTINGS, "alias": "production", "actor": "alice@box",
                                                   "reason": "brake texts hotfix"}),
                   embedder=shared, registry=registry)  # fmt: skip
    plain = train(root / "bulk", TrainSettings(**{**SETTINGS, "alias": "production"}), embedder=shared,
                  registry=registry)  # fmt: skip
    assert hotfix.audit_gaps == [] and plain.audit_gaps == []
    v1, v2 = hotfix.version.version, plain.version.version
    assert registry.alias_version("production") == v2
    rows = [r for r in records(predlog.open_reader().promotion_events(limit=10)) if r["action"] == "alias_set"]
    assert [(r["from_version"], r["to_version"], r["actor"], r["reason"], r["target"], r["success"]) for r in rows] == [
        (v1, v2, f"bob@{__import__('socket').gethostname()}", "motlens train --alias production", "registry", True),
        ("", v1, "alice@box", "brake texts hotfix", "registry", True),
    ]  # newest first
    assert json.loads(rows[0]["details"]) == {"from": f"alias production → v{v1}", "to": f"alias production → v{v2}",
                                              "alias": "production", "run_id": plain.version.run_id}  # fmt: skip
    tags = registry.resolve(v1).tags
    assert (tags["promotion.last_action"], tags["promotion.last_actor"], tags["promotion.last_reason"]) == (
        "alias_set", "alice@box", "brake texts hotfix")  # fmt: skip
    assert json.loads(tags["promotion.event.0001"])["to"] == f"alias production → v{v1}"
    assert "promotion.status" not in tags  # no promotion state: nothing was deployed or gated

    # a prediction log that cannot take the row: the alias stands, the gap is named, the tags are written
    monkeypatch.setenv("MOTLENS_CLICKHOUSE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("MOTLENS_CLICKHOUSE_PASSWORD", "s3cret")
    gap = train(root / "bulk", TrainSettings(**{**SETTINGS, "alias": "production"}), embedder=shared,
                registry=registry)  # fmt: skip
    assert registry.alias_version("production") == gap.version.version
    assert len(gap.audit_gaps) == 1 and gap.audit_gaps[0].startswith("promotion_events row: cannot reach ClickHouse")
    assert "s3cret" not in gap.audit_gaps[0]  # one line, no credentials
    assert registry.resolve(gap.version.version).tags["promotion.last_action"] == "alias_set"
    say_audit_gaps(gap.version.version, gap.audit_gaps)
    assert capsys.readouterr().err == (
        f"motlens train: version {gap.version.version} has its alias, but its audit record is incomplete: "
        f"{gap.audit_gaps[0]}\n"
    )  # one line: nothing is logged besides it
