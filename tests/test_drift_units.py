"""Small pieces of the drift job: windows, frames, canary comparisons, verdicts, Prometheus output."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import numpy as np
import pandas as pd
import pytest

from drift.canary import agreement, embedding_consistency, score_shift
from drift.checks import Check, verdict
from drift.columns import DataError, as_logged, collapse_rare, drift_frame
from drift.evaluate import random_auc_quantile
from drift.publish import metrics_registry, push_metrics
from drift.settings import DriftSettings
from drift.simulate import traffic
from drift.sources import Side
from drift.windows import current_window, parse_duration, reference_spec

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def test_durations_and_windows():
    assert parse_duration("24h") == timedelta(hours=24)
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration("90s") == timedelta(seconds=90)
    for bad in ("", "24", "h", "-1h", "0m", "3 parsecs"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    w = current_window("2h", "2026-11-28T12:00:00")
    assert (w.start, w.end) == (NOW - timedelta(hours=2), NOW)
    assert current_window("1h", now=NOW).end == NOW
    # times pandas and the log can hold (year 1 was an OverflowError traceback)
    for bad in ("0001-01-01T00:00:00", "1969-12-31T23:00:00", "9999-01-01"):
        with pytest.raises(ValueError, match="time out of range"):
            current_window("1d", bad)
    with pytest.raises(ValueError, match="starts before 1970"):
        current_window("7d", "1970-01-02T00:00:00")
    with pytest.raises(ValueError, match="starts before 1970"):
        reference_spec("30d", current_window("1d", "1970-01-03T00:00:00"))


def test_reference_specs(tmp_path):
    cur = current_window("24h", now=NOW)
    assert reference_spec("bundle", cur).kind == "bundle"
    before = reference_spec("7d", cur)
    assert before.window is not None
    assert before.window.end == cur.start and before.window.start == cur.start - timedelta(days=7)
    iso = reference_spec("2026-11-01T00:00/2026-11-08T00:00", cur)
    assert iso.window is not None
    assert iso.window.start == datetime(2026, 11, 1, tzinfo=UTC) and iso.describe().startswith("window:")
    assert reference_spec(str(tmp_path), cur).kind == "path"
    with pytest.raises(ValueError, match="ends before it starts"):
        reference_spec("2026-11-08T00:00/2026-11-01T00:00", cur)
    with pytest.raises(ValueError, match="cannot read reference 'yesterday'"):
        reference_spec("yesterday", cur)
    missing = str(tmp_path / "gone" / "reference.parquet")  # was "not an ISO-8601 time: ''"
    with pytest.raises(ValueError, match=f"reference '{missing}' is neither a path that exists nor a window"):
        reference_spec(missing, cur)


def test_drift_frame_derives_length_and_names_missing_columns():
    df = traffic(20, 0)
    frame = drift_frame(df)
    assert list(frame.columns) == ["section", "severity", "make", "fuel_type", "fail_probability", "section_score",
                                   "text_length", "vehicle_age_years", "odometer_miles"]  # fmt: skip
    assert (frame["text_length"] == df["text"].str.len()).all()
    df.loc[0, "make"], df.loc[1, "fuel_type"] = None, " "
    frame = drift_frame(df)
    assert frame.loc[0, "make"] is None and frame.loc[1, "fuel_type"] is None  # compared on present values
    assert frame.loc[1, "make"] == df.loc[1, "make"].upper()
    with pytest.raises(DataError, match="lacks drift column.*odometer_miles"):
        drift_frame(df.drop(columns=["odometer_miles"]))


def test_rare_makes_are_pooled_on_both_sides():
    ref = pd.DataFrame({"make": ["FORD"] * 99 + ["LADA"], "fuel_type": ["PE"] * 100})
    cur = pd.DataFrame({"make": ["FORD", "TESLA", "LADA"], "fuel_type": ["PE", "EL", "PE"]})
    r, c = collapse_rare(ref, cur, min_share=0.05)
    assert r["make"].value_counts().to_dict() == {"FORD": 99, "(other)": 1}
    assert c["make"].tolist() == ["FORD", "(other)", "(other)"] and c["fuel_type"].tolist()[1] == "(other)"
    # shares of the reference's values: a make on 10 % of the requests that name one is kept; missing stays missing
    ref = pd.DataFrame({"make": [None] * 90 + ["FORD"] * 9 + ["LADA"], "fuel_type": ["PE"] * 100})
    r, c = collapse_rare(ref, pd.DataFrame({"make": ["LADA", None], "fuel_type": ["PE", None]}), min_share=0.05)
    assert r["make"].value_counts(dropna=False).to_dict() == {None: 90, "FORD": 9, "LADA": 1}
    assert c["make"].tolist() == ["LADA", None] and c["fuel_type"].tolist() == ["PE", None]


def test_reference_embeddings_get_the_logs_int8_round_trip():
    m = np.random.default_rng(0).normal(size=(5, 384)).astype(np.float32)
    q = as_logged(m)
    assert q.shape == m.shape and not np.array_equal(q, m)
    assert np.abs(q - m).max() <= np.abs(m).max() / 127
    np.testing.assert_array_equal(as_logged(q), q)  # idempotent: logged rows stay as they are


def _sides(canary_df: pd.DataFrame) -> tuple[Side, Side]:
    prod = traffic(300, 1)
    vec = {t: np.random.default_rng(abs(hash(t)) % 2**32).normal(size=8) for t in set(prod.text) | set(canary_df.text)}
    with_emb = [df.assign(embedding=[vec[t] for t in df.text]) for df in (prod, canary_df)]
    return Side.from_frame("production", with_emb[0]), Side.from_frame("canary", with_emb[1])


def test_canary_agreement_and_consistency_pass_on_same_predictions():
    prod, can = _sides(traffic(200, 2, model_version="2", slot="canary"))
    s = DriftSettings()
    a, detail = agreement(prod, can, s)
    c, cdetail = embedding_consistency(prod, can, s)
    sh, _ = score_shift(prod, can, s)
    assert (a.status, a.score) == ("pass", 1.0) and detail["shared_texts"] >= 20
    assert sh.status == "pass" and sh.score is not None and sh.score < 1e-12
    assert c.status == "pass" and cdetail["cosine_min"] == pytest.approx(1.0)


def test_canary_disagreement_and_inconsistent_embeddings_fail():
    cdf = traffic(200, 2, model_version="2", slot="canary")
    cdf["section"] = cdf["section"].map(lambda v: "1 Brakes" if v != "1 Brakes" else "2 Steering")
    prod, can = _sides(cdf)
    can.embeddings = can.embeddings + np.random.default_rng(3).normal(scale=2.0, size=can.embeddings.shape)
    s = DriftSettings()
    a, detail = agreement(prod, can, s)
    c, _ = embedding_consistency(prod, can, s)
    assert a.status == "drift" and a.score == 0.0 and detail["section_agreement"] == 0.0
    assert detail["severity_agreement"] == 1.0
    assert c.status == "drift" and c.score is not None and c.score < s.canary_min_cosine


def test_embedding_consistency_counts_distinct_texts_not_rows():
    """One text the canary logged 25 times is one shared text: it passed `min_shared_texts` (20) as 25."""
    rng = np.random.default_rng(4)
    vec = rng.normal(size=(1, 8)).astype(np.float32)
    prod = Side("production", pd.DataFrame(), vec, 1, 1, embedding_hashes=np.array([7], np.uint64))
    can = Side("canary", pd.DataFrame(), np.repeat(vec, 25, axis=0), 25, 25, embedding_hashes=np.full(25, 7, np.uint64))
    c, detail = embedding_consistency(prod, can, DriftSettings())
    assert (c.status, detail["shared_embedded_texts"]) == ("insufficient", 1)
    # 30 distinct texts, the first one repeated: 30 pairs, each text weighted once
    hashes = np.arange(30, dtype=np.uint64)
    emb = rng.normal(size=(30, 8)).astype(np.float32)
    prod = Side("production", pd.DataFrame(), emb, 30, 30, embedding_hashes=hashes)
    can = Side("canary", pd.DataFrame(), np.vstack([emb, np.repeat(emb[:1], 50, axis=0)]), 80, 80,
               embedding_hashes=np.concatenate([hashes, np.zeros(50, np.uint64)]))  # fmt: skip
    c, detail = embedding_consistency(prod, can, DriftSettings())
    assert (c.status, detail["shared_embedded_texts"]) == ("pass", 30)


def _labelled(texts: int, disagree: int) -> tuple[Side, Side]:
    """One row per text and side; the canary gives another section on the first ``disagree`` texts."""
    prod = pd.DataFrame({"text_hash": np.arange(texts, dtype=np.uint64), "section": "1 Brakes", "severity": "major"})
    can = prod.assign(section=["2 Steering"] * disagree + ["1 Brakes"] * (texts - disagree))
    return Side.from_frame("production", prod), Side.from_frame("canary", can)


@pytest.mark.parametrize(
    ("texts", "disagree", "status"),
    [
        (24, 5, "insufficient"),  # 79 %: the audit's retrain 10 s into its canary; upper 95 % bound 91 %
        (331, 29, "pass"),  # 91.2 %: a retrain with another seed
        (1000, 120, "pass"),  # 88 %: still within a seed's spread (the limit is 85 %)
        (135, 54, "drift"),  # 60 %: a broken candidate (upper bound 67 %)
        (1000, 200, "drift"),  # 80 % of many texts: below 85 % with confidence
    ],
)
def test_canary_disagreement_is_drift_only_when_the_shared_texts_show_it_with_confidence(texts, disagree, status):
    prod, can = _labelled(texts, disagree)
    a, detail = agreement(prod, can, DriftSettings())
    assert a.status == status, a.message
    assert detail["agreement"] == pytest.approx(1 - disagree / texts)
    if status == "insufficient":
        assert "more shared texts are needed" in a.message and detail["agreement_upper_bound"] >= 0.85
    if status == "drift":
        assert detail["agreement_upper_bound"] < 0.85


def test_canary_with_no_shared_texts_is_insufficient():
    prod, can = _sides(traffic(200, 2, paraphrase=1.0))
    a, detail = agreement(prod, can, DriftSettings())
    sh, _ = score_shift(prod, can, DriftSettings())
    assert a.status == "insufficient" and "only 0 texts" in a.message
    assert sh.status == "insufficient" and "only 0 texts" in sh.message
    assert verdict([Check("data_drift", "pass", ""), a]) == ("insufficient_data", 2)


def test_verdict_order():
    p, d, i = Check("a", "pass", ""), Check("b", "drift", ""), Check("c", "insufficient", "")
    assert verdict([p]) == ("no_drift", 0)
    assert verdict([p, i]) == ("insufficient_data", 2)
    assert verdict([i, d]) == ("drift", 1)
    assert verdict([]) == ("insufficient_data", 2)


def test_random_auc_quantile_shrinks_with_rows():
    small, large = random_auc_quantile(200, 200, 0.99), random_auc_quantile(20_000, 20_000, 0.99)
    assert small == pytest.approx(0.5 + 2.3263 * (201 / (12 * 100 * 100)) ** 0.5, abs=1e-4)  # held-out halves
    assert 0.5 < large < 0.51


def _summary(status: str, version: str = "7", scores: dict | None = None) -> dict:
    scores = {"embedding_drift": 0.71, "drifted_share": 0.25} if scores is None else scores
    return {"model_version": version, "slot": "canary", "drift_detected": status == "drift", "scores": scores,
            "details": {"status": status}}  # fmt: skip


def _line(name: str, labels: dict[str, str], value: float) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" + f" {value}"


class _Gateway(BaseHTTPRequestHandler):
    """A Pushgateway stand-in with its semantics: PUT replaces the whole group, POST only the metric
    names it carries (families without samples carry none); GET /metrics shows every group's samples
    with the group's labels, as Prometheus scrapes them."""

    groups: dict[str, dict[str, list[str]]]
    requests: list[tuple[str, str]]

    def _push(self, replace: bool) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        self.requests.append((self.command, self.path))
        parts = self.path.removeprefix("/metrics/").split("/")
        grouping = dict(zip(parts[::2], parts[1::2], strict=True))
        pushed = {}
        for fam in text_string_to_metric_families(body):
            if fam.samples:
                pushed[fam.name] = [_line(s.name, {**s.labels, **grouping}, s.value) for s in fam.samples]
        if replace:
            self.groups[self.path] = pushed
        else:
            self.groups.setdefault(self.path, {}).update(pushed)
        self.send_response(200)
        self.end_headers()

    def do_PUT(self):  # noqa: N802 - http.server API
        self._push(replace=True)

    def do_POST(self):  # noqa: N802
        self._push(replace=False)

    def do_GET(self):  # noqa: N802
        body = "".join(line + "\n" for group in self.groups.values() for lines in group.values() for line in lines)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *a):
        pass


@pytest.fixture
def gateway():
    """(URL, the stand-in's request log) of a running Pushgateway stand-in."""

    class Gateway(_Gateway):
        groups = {}
        requests = []

    server = HTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", Gateway.requests
    finally:
        server.shutdown()
        server.server_close()


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Exposition text → {sample name: [(labels without job, value)]}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(({k: v for k, v in s.labels.items() if k != "job"}, s.value))
    return out


def test_textfile_metrics_format(tmp_path):
    path = tmp_path / "drift.prom"
    push_metrics(metrics_registry(_summary("drift"), 1_700_000_000.0), pushgateway=None, textfile=path,
                 job="j", grouping={})  # fmt: skip
    text = path.read_text()
    assert 'motlens_drift_detected{model_version="7",slot="canary"} 1.0' in text
    assert 'motlens_drift_score{metric="embedding_drift",model_version="7",slot="canary"} 0.71' in text
    assert 'motlens_drift_last_status{model_version="7",slot="canary",status="drift"} 1.0' in text
    assert 'motlens_drift_last_run_timestamp_seconds{model_version="7",slot="canary"} 1.7e+09' in text
    assert "motlens_drift_last_error_timestamp_seconds" not in text
    assert [f.name for f in tmp_path.iterdir()] == ["drift.prom"]  # written through a renamed temporary file


@pytest.mark.parametrize("sink", ["pushgateway", "textfile"])
def test_a_run_without_a_verdict_keeps_the_last_verdict_and_timestamps(sink, gateway, tmp_path):
    """drift → insufficient data → error: the last verdict (detected=1, its scores) and the last run's
    timestamp survive the runs that have none; only the status says what the newest run did."""
    url, requests = gateway
    path = tmp_path / "drift.prom"

    def run(status: str, now_s: float, scores: dict | None = None) -> dict[str, list[tuple[dict[str, str], float]]]:
        push_metrics(metrics_registry(_summary(status, scores=scores), now_s),
                     pushgateway=url if sink == "pushgateway" else None,
                     textfile=path if sink == "textfile" else None,
                     job="motlens-drift", grouping={"model_version": "7", "slot": "canary"})  # fmt: skip
        return _samples(httpx.get(f"{url}/metrics").text if sink == "pushgateway" else path.read_text())

    group = {"model_version": "7", "slot": "canary"}
    got = run("drift", 100.0)
    assert got["motlens_drift_detected"] == [(group, 1.0)]
    verdict_scores = sorted(got["motlens_drift_score"], key=str)
    for status, now_s, scores in (("insufficient_data", 200.0, {"drifted_share": 0.0}), ("error", 300.0, {})):
        got = run(status, now_s, scores)
        assert got["motlens_drift_detected"] == [(group, 1.0)], status
        assert sorted(got["motlens_drift_score"], key=str) == verdict_scores, status
        assert [(labels["status"], v) for labels, v in got["motlens_drift_last_status"]] == [(status, 1.0)]
        assert [v for _, v in got["motlens_drift_last_run_timestamp_seconds"]] == [200.0], status
    assert [v for _, v in got["motlens_drift_last_error_timestamp_seconds"]] == [300.0]
    got = run("no_drift", 400.0)  # the next verdict replaces the last one
    assert got["motlens_drift_detected"] == [(group, 0.0)]
    assert [v for _, v in got["motlens_drift_last_run_timestamp_seconds"]] == [400.0]
    assert [v for _, v in got["motlens_drift_last_error_timestamp_seconds"]] == [300.0]
    if sink == "pushgateway":
        assert requests == [("POST", "/metrics/job/motlens-drift/model_version/7/slot/canary")] * 4


def test_textfile_replaces_the_families_a_run_writes(tmp_path):
    """A verdict for a new version replaces the old version's verdict and scores in the textfile."""
    path = tmp_path / "drift.prom"
    push_metrics(metrics_registry(_summary("drift", version="7"), 1.0), pushgateway=None, textfile=path,
                 job="j", grouping={})  # fmt: skip
    push_metrics(metrics_registry(_summary("insufficient_data", version="8", scores={}), 2.0),
                 pushgateway=None, textfile=path, job="j", grouping={})  # fmt: skip
    assert "motlens_drift_detected" not in _samples(path.read_text())  # version 7's verdict left with it
    push_metrics(metrics_registry(_summary("no_drift", version="8", scores={"drifted_share": 0.0}), 3.0),
                 pushgateway=None, textfile=path, job="j", grouping={})  # fmt: skip
    got = _samples(path.read_text())
    assert got["motlens_drift_detected"] == [({"model_version": "8", "slot": "canary"}, 0.0)]
    assert got["motlens_drift_score"] == [({"metric": "drifted_share", "model_version": "8", "slot": "canary"}, 0.0)]
    assert got["motlens_drift_last_run_timestamp_seconds"] == [({"model_version": "8", "slot": "canary"}, 3.0)]


def test_production_and_canary_jobs_share_a_textfile(tmp_path):
    """Each slot's run replaces only its own series: one node-exporter textfile serves both CronJobs."""
    path = tmp_path / "drift.prom"

    def run(status: str, slot: str, version: str, now_s: float) -> None:
        summary = _summary(status, version=version) | {"slot": slot}
        push_metrics(metrics_registry(summary, now_s), pushgateway=None, textfile=path, job="j", grouping={})

    run("drift", "production", "3", 1.0)
    run("no_drift", "canary", "4", 2.0)
    run("error", "production", "3", 3.0)
    got = _samples(path.read_text())
    assert sorted(got["motlens_drift_detected"], key=str) == [
        ({"model_version": "3", "slot": "production"}, 1.0),
        ({"model_version": "4", "slot": "canary"}, 0.0),
    ]
    assert sorted(got["motlens_drift_last_run_timestamp_seconds"], key=str) == [
        ({"model_version": "3", "slot": "production"}, 1.0),
        ({"model_version": "4", "slot": "canary"}, 2.0),
    ]
    assert got["motlens_drift_last_error_timestamp_seconds"] == [({"model_version": "3", "slot": "production"}, 3.0)]
    assert sorted((labels["slot"], labels["status"]) for labels, _ in got["motlens_drift_last_status"]) == [
        ("canary", "no_drift"),
        ("production", "error"),
    ]


def test_a_failed_run_that_never_learnt_its_version_keeps_the_slots_verdict(tmp_path):
    """An error run before the alias resolved publishes model_version "": the slot's last verdict, its
    scores and last-run time stay in the textfile (the Pushgateway keeps them in their own group)."""
    path = tmp_path / "drift.prom"
    push_metrics(metrics_registry(_summary("drift", version="3"), 1.0), pushgateway=None, textfile=path,
                 job="j", grouping={})  # fmt: skip
    push_metrics(metrics_registry(_summary("error", version="", scores={}), 2.0), pushgateway=None,
                 textfile=path, job="j", grouping={})  # fmt: skip
    got = _samples(path.read_text())
    assert got["motlens_drift_detected"] == [({"model_version": "3", "slot": "canary"}, 1.0)]
    assert got["motlens_drift_last_run_timestamp_seconds"] == [({"model_version": "3", "slot": "canary"}, 1.0)]
    assert got["motlens_drift_last_error_timestamp_seconds"] == [({"model_version": "", "slot": "canary"}, 2.0)]
    assert [labels["status"] for labels, _ in got["motlens_drift_last_status"]] == ["error"]


def test_the_textfile_keeps_other_metrics_and_survives_a_damaged_file(tmp_path):
    path = tmp_path / "drift.prom"
    path.write_text('# TYPE node_custom gauge\nnode_custom 5\n# TYPE other_job_ts gauge\nother_job_ts{job="x"} 7\n')
    push_metrics(metrics_registry(_summary("drift"), 1.0), pushgateway=None, textfile=path, job="j", grouping={})
    got = _samples(path.read_text())
    assert got["node_custom"] == [({}, 5.0)] and got["other_job_ts"] == [({}, 7.0)]  # _samples drops job
    path.write_text("garbage line here\n")  # a file the parser refuses is rewritten, not a publishing failure
    push_metrics(metrics_registry(_summary("no_drift"), 2.0), pushgateway=None, textfile=path, job="j", grouping={})
    assert _samples(path.read_text())["motlens_drift_detected"] == [({"model_version": "7", "slot": "canary"}, 0.0)]


def test_a_row_cap_below_its_minimum_is_refused(tmp_path, capsys):
    """`--max-rows 150` (minimum 200) made every window `insufficient`, naming the cap as its size."""
    from motlens.cli import main

    assert main(["drift", "--max-rows", "150", "--output", str(tmp_path)]) == 2
    assert "max_rows (150) is below min_rows (200)" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"embedding_max_rows \(50\) is below min_embedding_rows \(100\)"):
        DriftSettings(embedding_max_rows=50)
    assert DriftSettings(max_rows=100, min_rows=100).max_rows == 100


def test_version_mode_is_never_recorded_as_the_canary_verdict(tmp_path, capsys, monkeypatch):
    """`--slot canary` without `--canary` wrote a version-mode report (the canary's version against its
    reference) as slot "canary", which promotion's drift gate takes for the canary-vs-production verdict."""
    from motlens.cli import main

    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path / "home"))  # were it run, nothing outside tmp_path
    for var in ("MLFLOW_TRACKING_URI", "MOTLENS_CLICKHOUSE_URL"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "out"
    assert main(["drift", "--slot", "canary", "--output", str(out)]) == 2
    assert "slot 'canary' outside canary mode" in capsys.readouterr().err and not out.exists()
    monkeypatch.setenv("MOTLENS_DRIFT_SLOT", "canary")
    with pytest.raises(ValueError, match="use --canary"):
        DriftSettings(version="2")
    assert DriftSettings(canary=True).slot == "canary"  # canary mode records slot canary anyway


def test_settings_come_from_env_and_flags_win(monkeypatch, tmp_path, capsys):
    from motlens.cli import main

    monkeypatch.setenv("MOTLENS_DRIFT_WINDOW", "7d")
    monkeypatch.setenv("MOTLENS_DRIFT_MAX_ROWS", "1234")
    monkeypatch.setenv("MOTLENS_DRIFT_CANARY", "true")
    s = DriftSettings(max_rows=999)
    assert (s.window, s.max_rows, s.canary) == ("7d", 999, True)
    monkeypatch.setenv("MOTLENS_DRIFT_EMBEDDING_METHOD", "psychic")
    assert main(["drift", "--output", str(tmp_path)]) == 2
    assert "bad setting: MOTLENS_DRIFT_EMBEDDING_METHOD: Input should be" in capsys.readouterr().err
