"""``motlens drift`` end to end: an embedded prediction log written by the real writer, a real MLflow
registry holding a bundle with a drift reference sample, outputs checked field by field."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from drift.simulate import records, texts, traffic, with_embeddings

NOW = datetime.now(UTC)
V3_END = NOW - timedelta(hours=5)
FLAT_END = NOW - timedelta(hours=9)  # v6 and v7: every current embedding one vector (see env)
END = NOW + timedelta(seconds=1)  # the logged traffic ends at NOW: the windows end here, not when a test runs
RUN = ["--window", "2h", "--end", END.isoformat(), "--embedding-max-rows", "150", "--no-progress"]


def _wide_reference(df: pd.DataFrame) -> pd.DataFrame:
    """The bundle's reference layout (docs/training.md): context, predictions, text_length, emb_000…"""
    emb = pd.DataFrame(np.stack(df["embedding"]), columns=[f"emb_{i:03d}" for i in range(384)])
    cols = ["text", "make", "fuel_type", "vehicle_age_years", "odometer_miles", "section", "section_score",
            "severity", "fail_probability"]  # fmt: skip
    return pd.concat([df[cols].assign(text_length=df["text"].str.len()).reset_index(drop=True), emb], axis=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory, embedder, tiny_bundle, _mlflow_template_db):
    """MOTLENS_HOME with a registry (v1 production and v2 canary: bundles with a reference sample)
    and a prediction log: v1 production and v2 canary in the last hour, v3 (older vehicles) 6 h ago;
    v6 and v7 (older vehicles, every embedding one vector) in the hour before FLAT_END, with the hour
    before that as their reference: v6's of that vector but for one text, v7's of that vector only."""
    import predlog
    from motlens.bundle import assemble
    from motlens.state import StateSettings
    from predlog import PredlogSettings
    from training.registry import Registry

    home = tmp_path_factory.mktemp("drift-home")
    state = StateSettings(home=home).ensure()
    shutil.copy(_mlflow_template_db, home / "mlflow.db")
    vectors = dict(zip(texts(), embedder.encode(texts()), strict=True))

    def encode(ts: list[str]) -> np.ndarray:
        return np.stack([vectors[t] for t in ts])

    def one_vector(ts: list[str]) -> np.ndarray:
        return encode([texts()[0]] * len(ts))

    def all_but_one(ts: list[str]) -> np.ndarray:
        return np.concatenate([encode(ts[:1]), one_vector(ts[1:])])

    ref = _wide_reference(with_embeddings(traffic(400, 1, end=NOW - timedelta(days=3)), encode))
    bundle = assemble(home / "bundle", tiny_bundle.embedder_dir, tiny_bundle.head(), tiny_bundle.golden(),
                      reference=ref, version="1", run_id="tiny")  # fmt: skip
    registry = Registry(state.mlflow_uri, state=state)
    registry.register_bundle(bundle.root, metrics={"f1": 0.5}, params={}, alias="production")
    registry.register_bundle(bundle.root, metrics={"f1": 0.5}, params={}, alias="canary")

    logged = [
        with_embeddings(traffic(400, 2, end=NOW), encode, share=0.6, seed=2),
        # v2's rows say slot "production", as a KServe canary revision's pods log them: the canary
        # comparison goes by version (v2 = the canary alias, v1 = production), not by the slot column
        with_embeddings(traffic(300, 3, model_version="2", slot="production", end=NOW), encode, share=0.6, seed=3),
        with_embeddings(traffic(400, 4, model_version="3", end=V3_END, age_shift=5, odometer_shift=40_000), encode),
    ]
    span = timedelta(minutes=50)  # inside the hour windows
    for seed, version, reference_encode in ((5, "6", all_but_one), (7, "7", one_vector)):
        current = traffic(300, seed, model_version=version, end=FLAT_END, span=span, age_shift=5, odometer_shift=40_000)
        reference = traffic(300, seed + 1, model_version=version, end=FLAT_END - timedelta(hours=1), span=span)
        logged += [with_embeddings(current, one_vector), with_embeddings(reference, reference_encode)]
    writer = predlog.open_writer(PredlogSettings(dir=home / "predlog", batch_rows=500, flush_interval_s=0.05))
    for df in logged:
        writer.submit(records(df))
    assert writer.flush(30)
    writer.close(30)
    return home, registry


@pytest.fixture
def motlens(env, monkeypatch):
    home, _ = env
    monkeypatch.setenv("MOTLENS_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MOTLENS_CLICKHOUSE_URL", raising=False)
    for var in [v for v in __import__("os").environ if v.startswith(("MOTLENS_DRIFT_", "MOTLENS_PREDLOG_"))]:
        monkeypatch.delenv(var)
    from motlens.cli import main

    return main


def _reader(env):
    import predlog
    from predlog import PredlogSettings

    return predlog.open_reader(PredlogSettings(dir=env[0] / "predlog"))


def _stored_row(env, summary: dict) -> dict:
    rows = _reader(env).drift_reports(model_version=summary["model_version"], slot=summary["slot"], limit=50)
    rows = rows[rows["ts"] == pd.Timestamp(summary["ts"])]
    assert len(rows) == 1
    return rows.iloc[0].to_dict()


def _assert_row_equals_summary(row: dict, summary: dict) -> None:
    assert set(row) == set(summary)
    for key in ("ts", "window_start", "window_end"):
        assert pd.Timestamp(row[key]) == pd.Timestamp(summary[key]), key
    assert json.loads(row["details"]) == summary["details"]
    assert dict(row["scores"]) == pytest.approx(summary["scores"])
    for key in set(summary) - {"ts", "window_start", "window_end", "details", "scores"}:
        value = row[key]
        assert (value.item() if hasattr(value, "item") else value) == summary[key], key


@pytest.mark.slow
def test_cli_no_drift_writes_every_output(env, motlens, tmp_path, capsys):
    out = tmp_path / "out"
    prom = tmp_path / "metrics" / "drift.prom"
    rc = motlens(["drift", "--slot", "production", *RUN, "--output", str(out), "--textfile", str(prom)])
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0, summary["details"]["messages"]
    assert summary["model_version"] == "1" and summary["reference"] == "bundle"
    assert summary["n_current"] == 400 and summary["n_reference"] == 400
    assert pd.Timestamp(summary["window_end"]) == pd.Timestamp(END).floor("ms")
    assert summary["drift_detected"] is False and summary["details"]["status"] == "no_drift"
    assert {c["name"]: c["status"] for c in summary["details"]["checks"]} == {
        "data_drift": "pass", "embedding_drift": "pass",
    }  # fmt: skip
    for page in ("report.html", "embeddings.html"):
        html = (out / page).read_text()
        assert html.lstrip().lower().startswith("<!doctype html") or "<html" in html[:500].lower()
    assert "Drift in embeddings" in (out / "embeddings.html").read_text()
    _assert_row_equals_summary(_stored_row(env, summary), summary)

    registry = env[1]
    run_id = registry.resolve("1").run_id
    assert summary["run_id"] == run_id
    folder = summary["details"]["outputs"]["mlflow_artifacts"].rsplit("/", 1)[-1]
    logged = {a.path for a in registry.client.list_artifacts(run_id, f"drift/{folder}")}
    assert {f"drift/{folder}/{f}" for f in ("summary.json", "report.html", "embeddings.html")} <= logged
    assert summary["report_path"].endswith(f"drift/{folder}/report.html")

    text = prom.read_text()
    assert 'motlens_drift_detected{model_version="1",slot="production"} 0.0' in text
    assert 'motlens_drift_score{metric="embedding_drift",model_version="1",slot="production"}' in text
    assert "motlens_drift_last_run_timestamp_seconds " in text
    assert "verdict: no_drift (exit 0)" in capsys.readouterr().out


def test_cli_context_shift_exits_1_against_a_bundle_directory(env, motlens, tmp_path):
    out = tmp_path / "out"
    rc = motlens(["drift", "--version", "3", "--reference", str(env[0] / "bundle"), *RUN, "--no-html",
                  "--end", V3_END.isoformat(), "--output", str(out), "--no-artifact"])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 1
    assert summary["drift_detected"] is True and summary["details"]["status"] == "drift"
    drifted = {c["column"] for c in summary["details"]["data_drift"]["columns"] if c["drifted"]}
    assert {"vehicle_age_years", "odometer_miles"} <= drifted
    assert not (out / "report.html").exists() and summary["report_path"] == ""
    _assert_row_equals_summary(_stored_row(env, summary), summary)


class _UploadFails:
    """The real MLflow client, except that uploading fails (an unreachable artifact store)."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        return getattr(self._client, name)

    def log_artifacts(self, *args, **kwargs):
        raise ConnectionError("S3 unreachable")


def test_a_failed_upload_leaves_the_local_report_in_the_row_and_summary(env, tmp_path):
    """report_path and outputs.mlflow_artifacts named the MLflow location, and the drift_reports row was
    inserted, before the upload ran: a failed upload left them naming a report that was never written."""
    from drift.job import DriftJob
    from drift.settings import DriftSettings

    registry = SimpleNamespace(resolve=env[1].resolve, fetch=env[1].fetch, client=_UploadFails(env[1].client))
    out = tmp_path / "out"
    settings = DriftSettings(version="1", window="2h", end=END.isoformat(), reference=str(env[0] / "bundle"),
                             output=out, embedding_max_rows=150, progress=False)  # fmt: skip
    reader = _reader(env)
    try:
        result = DriftJob(settings, reader=reader, registry=registry).run()
    finally:
        reader.close()
    summary = result.summary
    assert result.exit_code == 0 and summary["details"]["status"] == "no_drift", summary["details"]["messages"]
    assert summary["run_id"] == env[1].resolve("1").run_id
    assert "could not publish mlflow_artifacts: ConnectionError: S3 unreachable" in summary["details"]["messages"]
    assert summary["report_path"] == str((out / "report.html").resolve()) and (out / "report.html").is_file()
    assert "mlflow_artifacts" not in summary["details"]["outputs"]
    on_disk = json.loads((out / "summary.json").read_text())  # the returned one also times its outputs
    assert on_disk["report_path"] == summary["report_path"]
    assert on_disk["details"]["outputs"] == summary["details"]["outputs"]
    _assert_row_equals_summary(_stored_row(env, on_disk), on_disk)


class _RowFails:
    """A log reader whose drift_reports insert fails (ClickHouse down after the windows were read)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def insert_drift_report(self, row) -> None:
        raise ConnectionError("clickhouse down")


def test_a_failed_row_after_the_upload_is_in_the_mlflow_copy_of_the_summary(env, tmp_path):
    """The upload moved before the row: the MLflow copy of summary.json no longer said the row failed."""
    import mlflow.artifacts

    from drift.job import DriftJob
    from drift.settings import DriftSettings

    out = tmp_path / "out"
    settings = DriftSettings(version="1", window="2h", end=END.isoformat(), reference=str(env[0] / "bundle"),
                             output=out, embedding_max_rows=150, progress=False)  # fmt: skip
    reader = _reader(env)
    try:
        result = DriftJob(settings, reader=_RowFails(reader), registry=env[1]).run()
    finally:
        reader.close()
    message = "could not publish drift_reports row: ConnectionError: clickhouse down"
    assert message in result.summary["details"]["messages"]
    uri = result.summary["details"]["outputs"]["mlflow_artifacts"]
    copy = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/summary.json", dst_path=str(tmp_path / "dl"))
    assert message in json.loads(Path(copy).read_text())["details"]["messages"]


def test_cli_insufficient_rows_exit_2_says_so(env, motlens, tmp_path, capsys):
    out = tmp_path / "out"
    rc = motlens(["drift", "--version", "99", "--reference", "1d", *RUN, "--output", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    printed = capsys.readouterr().out
    assert rc == 2
    assert summary["details"]["status"] == "insufficient_data" and summary["drift_detected"] is False
    assert "insufficient data: current window has 0 rows and reference window has 0 rows" in printed
    assert "verdict: insufficient_data (exit 2)" in printed
    _assert_row_equals_summary(_stored_row(env, summary), summary)


def test_cli_canary_agrees_with_production(env, motlens, tmp_path):
    out = tmp_path / "out"
    rc = motlens(["drift", "--canary", *RUN, "--no-html", "--output", str(out), "--no-artifact"])
    summary = json.loads((out / "summary.json").read_text())
    canary = summary["details"]["canary"]
    assert summary["slot"] == "canary" and summary["model_version"] == "2"
    assert canary["production_versions"] == ["1"] and canary["canary_versions"] == ["2"]
    assert canary["shared_texts"] >= 20 and canary["agreement"] == 1.0
    assert canary["cosine_mean"] > 0.999 and max(canary["score_shift"].values()) < 1e-6
    assert {c["name"]: c["status"] for c in summary["details"]["checks"]} == {
        "data_drift": "pass", "embedding_drift": "pass", "canary_agreement": "pass", "canary_score_shift": "pass",
        "canary_embedding_cosine": "pass",
    }  # fmt: skip
    first = _reader(env).window(model_version="2", start=END - timedelta(hours=2), end=END)["ts"].min()
    assert pd.Timestamp(summary["window_start"]) == first  # both sides from the canary's first row
    assert rc == 0


def test_bad_setting_is_a_clear_error(motlens, tmp_path, capsys):
    rc = motlens(["drift", "--max-rows", "0", "--output", str(tmp_path)])
    assert rc == 2
    assert "bad setting: --max-rows" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "variables", "message"),
    [
        (["--reference", "7x"], {}, "--reference: cannot read reference '7x'"),
        (["--max-rows", "6000000"], {}, "--max-rows: at most 5000000"),
        (["--embedding-max-rows", "6000000"], {}, "--embedding-max-rows: at most 5000000"),
        ([], {"MOTLENS_DRIFT_SEED": "-1"}, "MOTLENS_DRIFT_SEED: Input should be greater than or equal to 0"),
        ([], {"MOTLENS_DRIFT_CAT_METHOD": "foo"}, "MOTLENS_DRIFT_CAT_METHOD: no categorical stat test 'foo'"),
        ([], {"MOTLENS_DRIFT_NUM_METHOD": "chi2_two_sample"}, "MOTLENS_DRIFT_NUM_METHOD: no numerical stat test"),
        (["--end", "1970-01-01T12:00:00", "--window", "2d"], {}, "--end: a window of 2 days, 0:00:00 ending 1970"),
        ([], {"MOTLENS_PREDLOG_TTL_DAYS": "0"}, "MOTLENS_PREDLOG_TTL_DAYS: Input should be greater than or equal to 1"),
        ([], {"MOTLENS_CLICKHOUSE_URL": "http://u:pw@ch/db"}, "MOTLENS_CLICKHOUSE_URL: put the ClickHouse password"),
    ],
)
def test_a_bad_setting_is_refused_before_the_run_and_publishes_nothing(
    env, motlens, tmp_path, capsys, monkeypatch, args, variables, message
):
    """These were found only mid-run: an `error` row in drift_reports, exit 2, a message not naming them."""
    rows_before = _drift_report_count(env)
    with monkeypatch.context() as m:
        for name, value in variables.items():
            m.setenv(name, value)
        rc = motlens(["drift", "--version", "1", *RUN, "--no-html", "--no-artifact", "--output",
                      str(tmp_path / "out"), *args])  # fmt: skip
    assert rc == 2
    assert f"motlens drift: bad setting: {message}" in capsys.readouterr().err
    assert _drift_report_count(env) == rows_before and not (tmp_path / "out").exists()


def test_an_embedding_plot_that_fails_keeps_the_verdict(env, motlens, tmp_path, monkeypatch):
    """The t-SNE plot's density estimate raised LinAlgError on degenerate embeddings (one side a single
    repeated vector): the run became an `error` (exit 2), throwing away the column drift it had found."""
    from evidently.legacy.metrics.data_drift import embeddings_drift

    def singular(*args):
        raise np.linalg.LinAlgError("singular matrix")

    monkeypatch.setattr(embeddings_drift, "get_gaussian_kde", singular)
    out = tmp_path / "out"
    rc = motlens(["drift", "--version", "3", "--reference", str(env[0] / "bundle"), *RUN, "--end", V3_END.isoformat(),
                  "--output", str(out), "--no-artifact"])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    checks = {c["name"]: c["status"] for c in summary["details"]["checks"]}
    assert rc == 1 and summary["details"]["status"] == "drift", summary["details"]["messages"]
    assert checks["data_drift"] == "drift" and "embedding_drift" in summary["scores"]
    message = "could not write embeddings.html (the verdict stands): LinAlgError: singular matrix"
    assert message in summary["details"]["messages"]
    assert (out / "report.html").is_file() and not (out / "embeddings.html").exists()
    _assert_row_equals_summary(_stored_row(env, summary), summary)


@pytest.mark.parametrize(("version", "vectors"), [("6", 2), ("7", 1)])
def test_embeddings_of_one_or_two_vectors_are_not_plotted(env, tmp_path, version, vectors):
    """Every embedding one vector (v7): sklearn's t-SNE segfaulted (exit 139) and left no summary, row or
    metrics; one side one vector and the other one more (v6) raised LinAlgError (exit 2). Run in a child,
    so that a crash fails this test and not the session. Both windows' vehicles are older: drift."""
    out = tmp_path / "out"
    proc = _drift_in_a_child(env, ["drift", "--version", version, "--reference", "1h", "--window", "1h", "--end",
                                   (FLAT_END + timedelta(seconds=1)).isoformat(), "--embedding-max-rows", "300",
                                   "--no-progress", "--no-artifact", "--output", str(out)])  # fmt: skip
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    summary = json.loads((out / "summary.json").read_text())
    checks = {c["name"]: c["status"] for c in summary["details"]["checks"]}
    assert summary["details"]["status"] == "drift" and checks["data_drift"] == "drift", checks
    assert (f"could not write embeddings.html (the verdict stands): {vectors} distinct embedding vector(s) in both "
            "windows: t-SNE cannot plot them") in summary["details"]["messages"]  # fmt: skip
    assert (out / "report.html").is_file() and not (out / "embeddings.html").exists()
    _assert_row_equals_summary(_stored_row(env, summary), summary)


def test_unknown_alias_is_exit_2_with_the_registry_message(env, motlens, tmp_path, monkeypatch):
    env[1].delete_alias("canary")
    try:
        rc = motlens(["drift", "--canary", *RUN, "--output", str(tmp_path), "--no-html"])
    finally:
        env[1].set_alias("canary", "2")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 2 and summary["details"]["status"] == "error"
    assert any("alias 'canary' is not set" in m for m in summary["details"]["messages"])


def test_cronjob_settings_exit_0_on_verdicts_and_skip_without_a_canary(env, motlens, tmp_path, monkeypatch, capsys):
    """The CronJobs' settings: a drift verdict exits 0 (a failed Job would run again and alert as
    KubeJobFailed); the canary job without a rollout exits 0 and publishes nothing."""
    monkeypatch.setenv("MOTLENS_DRIFT_VERDICT_EXIT_CODES", "false")
    out = tmp_path / "shift"
    rc = motlens(["drift", "--version", "3", "--reference", str(env[0] / "bundle"), *RUN, "--no-html",
                  "--end", V3_END.isoformat(), "--output", str(out), "--no-artifact"])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0 and summary["details"]["status"] == "drift" and summary["details"]["exit_code"] == 0

    monkeypatch.setenv("MOTLENS_DRIFT_SKIP_WITHOUT_CANARY", "true")
    prom = tmp_path / "canary.prom"
    rows_before = _drift_report_count(env)
    env[1].delete_alias("canary")
    try:
        rc = motlens(["drift", "--canary", *RUN, "--output", str(tmp_path / "none"), "--no-html",
                      "--textfile", str(prom)])  # fmt: skip
    finally:
        env[1].set_alias("canary", "2")
    summary = json.loads((tmp_path / "none" / "summary.json").read_text())
    assert rc == 0 and summary["details"]["status"] == "no_canary" and not prom.exists()
    assert "verdict: no_canary (exit 0)" in capsys.readouterr().out
    assert _drift_report_count(env) == rows_before


def _drift_report_count(env) -> int:
    import predlog
    from predlog import PredlogSettings

    reader = predlog.open_reader(PredlogSettings(dir=env[0] / "predlog"))
    try:
        return len(reader.drift_reports(limit=1000))
    finally:
        reader.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--window", "abc"], "window: not a duration"),
        (["--window", "0h"], "duration must be positive"),
        (["--window", "99999999d"], "duration too long"),
        (["--end", "yesterday"], "end: not an ISO-8601 time"),
    ],
)
def test_bad_window_or_end_is_exit_2_not_a_traceback(motlens, tmp_path, capsys, args, message):
    """Exit 1 means drift: a bad argument once crashed with a traceback and exit 1."""
    assert motlens(["drift", *args, "--output", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_unwritable_output_is_exit_2(motlens, capsys):
    assert motlens(["drift", "--output", "/proc/no-such-dir/out"]) == 2
    assert "cannot write the outputs" in capsys.readouterr().err


def test_an_earlier_report_is_not_passed_off_as_this_runs(env, motlens, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("<html>report of an EARLIER run</html>")
    rc = motlens(["drift", "--version", "1", "--reference", "1h", "--window", "1h", "--end", V3_END.isoformat(),
                  "--no-progress", "--output", str(out), "--no-artifact"])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 2 and summary["details"]["status"] in ("insufficient_data", "error")
    assert not (out / "report.html").exists() and summary["report_path"] == ""


def _drift_in_a_child(env, argv: list[str], preexec_fn=None):
    """``motlens drift ARGV`` in a child process (one that may crash without taking the tests along)."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("MOTLENS_", "MLFLOW_"))}
    child_env.update(MOTLENS_HOME=str(env[0]), PYTHONPATH=str(Path(__file__).resolve().parents[1]),
                     PYTHONDONTWRITEBYTECODE="1")  # fmt: skip
    code = "import sys; from motlens.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], env=child_env, capture_output=True, text=True,
                          timeout=600, preexec_fn=preexec_fn)  # fmt: skip


def _drift_with_file_size_limit(env, limit: int, argv: list[str]):
    """``motlens drift ARGV`` in a child whose writes past ``limit`` bytes fail (EFBIG), as on a full disk."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the child
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return _drift_in_a_child(env, argv, limit_file_size)


def test_a_summary_that_cannot_be_written_keeps_the_last_one_and_publishes_nothing(env, tmp_path):
    """summary.json was written in place after the textfile and the drift_reports row: a full disk left
    a truncated file (not JSON) beside outputs already published for a run that then exited 2."""
    out = tmp_path / "out"
    out.mkdir()
    previous = json.dumps({"details": {"status": "no_drift"}, "ts": "an earlier run"})
    (out / "summary.json").write_text(previous)
    prom = tmp_path / "drift.prom"
    rows_before = _drift_report_count(env)
    argv = ["drift", "--version", "99", "--reference", "1d", *RUN, "--no-artifact", "--output", str(out),
            "--textfile", str(prom)]  # fmt: skip
    proc = _drift_with_file_size_limit(env, 1000, argv)
    assert proc.returncode == 2, proc.stderr
    assert f"motlens drift: cannot write the outputs to {out}: [Errno 27] File too large" in proc.stderr
    assert (out / "summary.json").read_text() == previous
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]  # no temporary file left behind
    assert not prom.exists() and _drift_report_count(env) == rows_before


def test_a_report_that_cannot_be_written_leaves_no_partial_html(env, tmp_path):
    """report.html was Evidently's save_html in place: a full disk left a truncated page that the
    summary then named as the run's report."""
    out = tmp_path / "out"
    argv = ["drift", "--version", "1", "--reference", str(env[0] / "bundle"), *RUN, "--no-artifact",
            "--output", str(out)]  # fmt: skip
    proc = _drift_with_file_size_limit(env, 64 * 1024, argv)
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 2 and summary["details"]["status"] == "error", proc.stderr
    assert any("File too large" in m for m in summary["details"]["messages"])
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"] and summary["report_path"] == ""


def test_temp_files_a_killed_run_left_are_removed(env, motlens, tmp_path):
    """A run killed before its rename leaves ``.summary.json.XXXXXXXX.tmp``: it would be logged to MLflow
    with the next run's outputs. Only that exact pattern goes."""
    out = tmp_path / "out"
    out.mkdir()
    for name in (".summary.json.k3j4h5g6.tmp", ".report.html.a_b0c1d2.tmp", ".summary.json.original"):
        (out / name).write_text("left over")
    rc = motlens(["drift", "--version", "99", "--reference", "1d", *RUN, "--no-html", "--no-artifact",
                  "--output", str(out)])  # fmt: skip
    assert rc == 2  # insufficient data
    assert sorted(p.name for p in out.iterdir()) == [".summary.json.original", "summary.json"]
