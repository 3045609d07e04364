"""Parameterized SQL: injection strings stay values; ad-hoc queries are single read-only statements."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from conftest import migrated_reader

import predlog
from predlog import PredictionRecord, PredlogSettings
from predlog.queries import ReadOnlyViolation, check_read_only
from predlog.schema import DRIFT_REPORTS, PREDICTIONS

NASTY = [
    "1' OR '1'='1",
    "x'; DROP TABLE predictions; --",
    "canary\\' OR 1=1 --",
    "{model_name:String}",
    "prod`uction",
    'v"2',
    "é🚗\x00",
]


@pytest.fixture(scope="module", params=["embedded", "table"])
def reader(request, tmp_path_factory):
    kwargs = {"dir": tmp_path_factory.mktemp("predlog"), "flush_interval_s": 0.02}
    if request.param == "table":
        kwargs.update(clickhouse_url="chdb://memory", database=f"s_{uuid.uuid4().hex[:10]}")
    settings = PredlogSettings(**kwargs)
    r = migrated_reader(settings)  # opened first: it keeps the in-process chdb engine (and tables) alive
    writer = predlog.open_writer(settings)
    recs = [
        PredictionRecord(request_id=f"r{i}", item_index=0, model_name="mot-defects", model_version=v, slot=v, text=v)
        for i, v in enumerate(["1", "2", *NASTY])
    ]
    writer.submit(recs)
    writer.close(30)
    yield r
    if request.param == "table":
        r.client.command(f"DROP DATABASE IF EXISTS {settings.database}")
    r.close()


@pytest.mark.parametrize("value", NASTY)
def test_injection_strings_are_plain_values(reader, value):
    df = reader.window(model_version=value, slot=value)
    assert df["text"].tolist() == [value]
    assert reader.window(model_version=value + "'", slot=value).empty
    assert reader.drift_reports(model_version=value, slot=value).empty
    q = reader.query("SELECT count() AS n FROM predictions WHERE model_version = {v:String}", {"v": value})
    assert q["n"].tolist() == [1]
    assert len(reader.window()) == 2 + len(NASTY)  # nothing dropped or altered
    assert reader.live_stats(since=datetime.now(UTC) - timedelta(hours=1), model_name=value).empty


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE predictions",
        "INSERT INTO predictions SELECT * FROM predictions",
        "SELECT 1; DROP TABLE predictions",
        "SELECT 1;; SELECT 2",
        "ALTER TABLE predictions DELETE WHERE 1",
        "TRUNCATE predictions",
        "SELECT * FROM predictions INTO OUTFILE '/tmp/x.csv'",
        "WITH 1 AS x INSERT INTO predictions SELECT * FROM predictions",
        "SET readonly = 0",
        "SYSTEM FLUSH LOGS",
        "  ",
        "/* SELECT */ OPTIMIZE TABLE predictions",
        "CREATE TABLE x (a Int8) ENGINE = Memory",
    ],
)
def test_write_or_multi_statement_sql_is_refused(reader, sql):
    with pytest.raises(ReadOnlyViolation):
        reader.query(sql)
    assert len(reader.window()) == 2 + len(NASTY)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count() FROM predictions;",
        "select 'DROP TABLE x; --' AS s",
        "WITH v AS (SELECT model_version FROM predictions) SELECT count() FROM v",
        "DESCRIBE TABLE predictions",
        "-- comment\nSELECT slot FROM predictions LIMIT 1",
        "SELECT * FROM drift_reports LIMIT 3",
    ],
)
def test_read_only_sql_runs_on_both_backends(reader, sql):
    assert check_read_only(sql)
    reader.query(sql)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("EXISTS TABLE predictions", [1]),
        ("exists drift_reports", [1]),
        ("EXISTS TABLE default.promotion_events", [1]),
        ("EXISTS TABLE no_such_table", [0]),
    ],
)
def test_exists_answers_for_the_log_tables_on_both_backends(reader, sql, expected):
    """`EXISTS TABLE predictions` was a syntax error on the embedded backend (its table became a
    `file(…)` call, which EXISTS cannot take)."""
    assert reader.query(sql)["result"].tolist() == expected


def test_show_and_describe_see_the_log_tables_on_both_backends(reader):
    """`SHOW TABLES` listed nothing on the embedded backend and `SHOW COLUMNS FROM predictions` was a
    syntax error there; on both backends they now describe the log's own tables."""
    tables = set(reader.query("SHOW TABLES")["name"])
    assert {"predictions", "drift_reports", "promotion_events"} <= tables
    assert set(reader.query("SHOW TABLES LIKE 'pred%'")["name"]) == {"predictions"}
    columns = [c.name for c in PREDICTIONS]
    assert sorted(reader.query("SHOW COLUMNS FROM predictions")["field"]) == sorted(columns)
    assert reader.query("DESCRIBE predictions")["name"].tolist() == columns
    assert reader.query("DESC TABLE drift_reports")["name"].tolist() == [c.name for c in DRIFT_REPORTS]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM file('/etc/passwd', LineAsString)",
        "SELECT * FROM predictions, file('/etc/passwd', LineAsString)",
        "SELECT file('/etc/passwd')",
        "SELECT * FROM url('http://169.254.169.254/latest/meta-data/', LineAsString)",
        "SELECT * FROM remote('other:9000', system.users)",
        "SELECT * FROM s3('https://bucket.s3.amazonaws.com/x.csv')",
        "SELECT * FROM predictions JOIN executable('cat /etc/passwd', TSV, 'x String') USING (x)",
        "SELECT * FROM `file`('/etc/passwd', LineAsString)",
        "SELECT * FROM numbers(10)",
        "SELECT * FROM predictions SETTINGS readonly = 0",
        "SELECT * FROM predictions FORMAT Native",
        # past the lexical check (a comma join, names not on its list): the parser's AST catches them
        "SELECT name FROM (SELECT 1) AS a, filesystem('/etc') AS f",
        "SELECT * FROM predictions AS p, merge('system', '^one$') AS m",
        "DESCRIBE TABLE filesystem('/etc')",
        "SELECT count() FROM predictions WHERE model_version IN (SELECT name FROM (SELECT 1) AS a, filesystem('/'))",
    ],
)
def test_table_functions_and_settings_are_refused(reader, sql):
    with pytest.raises(ReadOnlyViolation, match="not allowed|may not use"):
        reader.query(sql)


# A quote inside a comment, or a comment marker inside a string or heredoc, must not hide the rest
# of the statement from the check (it once did: strings were blanked before comments were removed).
SMUGGLED = [
    "SELECT * -- it's\nFROM file('{outside}', LineAsString) -- '",
    "SELECT * # it's\nFROM file('{outside}', LineAsString) # '",
    "SELECT * /* it's */ FROM file('{outside}', LineAsString) /* ' */",
    "SELECT $$ -- $$, * FROM file('{outside}', LineAsString)",
    "SELECT $x$ it's $x$ AS a FROM file('{outside}', LineAsString)",
    "SHOW DATABASES -- it's\nINTO OUTFILE '{victim}' TRUNCATE -- '",
    "SHOW TABLES -- it's\n; DROP TABLE predictions; SELECT '' -- '",
    "SELECT 1 -- it's\n; INSERT INTO FUNCTION file('{victim}', 'CSV', 'a String') SELECT 'x' -- '",
]


@pytest.mark.parametrize("template", SMUGGLED)
def test_comments_and_strings_cannot_smuggle_a_statement(reader, tmp_path, template):
    outside, victim = tmp_path / "outside.txt", tmp_path / "victim.txt"
    outside.write_text("SECRET-LINE\n")
    victim.write_text("precious\n")
    sql = template.format(outside=outside, victim=victim)
    with pytest.raises(ReadOnlyViolation, match="not allowed|may not use|single"):
        check_read_only(sql)  # the lexical check alone, on the raw text
    with pytest.raises(ReadOnlyViolation, match="not allowed|may not use|single"):
        reader.query(sql)  # ClickHouse's rendering of it, checked again
    assert victim.read_text() == "precious\n"
    assert len(reader.window()) == 2 + len(NASTY)


@pytest.mark.parametrize(
    ("sql", "match"),
    [
        ("SELEC 1", "not a single valid statement: .*Syntax error"),
        ("SELECT 'unclosed FROM predictions", "unterminated|Syntax error"),
        ("SELECT 1 /* unclosed", "unterminated|Syntax error"),
        (";", "empty query"),
    ],
)
def test_malformed_sql_is_refused_with_the_reason(reader, sql, match):
    with pytest.raises(ReadOnlyViolation, match=match):
        reader.query(sql)


def test_what_runs_is_clickhouses_rendering(reader):
    assert reader.canonical("select  slot -- why\nfrom predictions /* c */ where slot = {s:String};") == (
        "SELECT slot FROM predictions WHERE slot = {s:String}"
    )
    df = reader.query("SELECT 'a -- b' AS x, $$it's$$ AS y FROM predictions -- it's\nLIMIT 1")
    assert df.iloc[0].tolist() == ["a -- b", "it's"]


def test_ad_hoc_selects_are_capped(reader):
    capped = reader.settings.model_copy(update={"max_query_rows": 3})
    r = type(reader)(reader.client, reader.source, capped)
    assert len(r.query("SELECT * FROM predictions")) == 3
    assert len(r.query("-- all of them\nSELECT * FROM predictions -- trailing comment")) == 3
    assert len(r.query("WITH 1 AS x SELECT x FROM predictions LIMIT 2")) == 2


def test_bad_arguments_name_the_problem(reader):
    with pytest.raises(ValueError, match="limit"):
        reader.window(limit=0)
    with pytest.raises(ValueError, match="sample"):
        reader.window(sample=1.5)
    with pytest.raises(ValueError, match="n must be"):
        reader.tail(0)
    # a value with no {name:Type} in the statement: clickhouse-connect %-formatted the SQL instead, and
    # LIKE '%brake%' failed with "unsupported format character 'b'"
    with pytest.raises(ValueError, match=r"parameter v is not used in the query: put \{v:Type\}"):
        reader.query("SELECT count() FROM predictions WHERE text LIKE '%brake%'", {"v": "1"})
    assert reader.query("SELECT count() AS n FROM predictions WHERE text LIKE {v:String}", {"v": "%brake%"}) is not None


def test_another_logs_views_in_the_same_process_are_out_of_reach(tmp_path):
    """Embedded readers of two log directories share one chdb engine, each with its database of views:
    a table after a comma (not rewritten, and not a table function) read the other log's rows."""
    a = predlog.open_reader(PredlogSettings(dir=tmp_path / "a"))
    b = predlog.open_reader(PredlogSettings(dir=tmp_path / "b"))
    try:
        b.insert_promotion_event({"action": "secret-b", "to_version": "2", "success": True})
        other = b.source.catalog(b.client)
        assert b.query("SELECT action FROM promotion_events")["action"].tolist() == ["secret-b"]
        for sql in (
            f"SELECT y.action FROM (SELECT 1 AS one) AS z, {other}.promotion_events AS y",
            f"SELECT action FROM {other}.promotion_events",
            f"SHOW TABLES FROM `{other}`",
        ):
            with pytest.raises(ReadOnlyViolation, match="name the log's tables as predictions"):
                a.query(sql)
    finally:
        a.close()
        b.close()
