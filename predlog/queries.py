"""The reader's SQL: one text per query, run unchanged on the ClickHouse table and on the Parquet
segments; only ``{source}`` differs (table name vs ``file(…)``), plus how sampling is pushed down.
Every value is a bound parameter (``{name:Type}``); only fixed fragments are concatenated.
"""

from __future__ import annotations

import re

from predlog.schema import PREDICTIONS

TS_PARAM = "DateTime64(3, 'UTC')"
ROW_COLUMNS = ", ".join(c.name for c in PREDICTIONS if not c.name.startswith("embedding_"))
EMBEDDING = "arrayMap(x -> toFloat32(x * embedding_scale), embedding_q) AS embedding"
SAMPLE_KEY = "cityHash64(request_id, item_index)"

FILTERS = {
    "model_version": "model_version = {model_version:String}",
    "slot": "slot = {slot:String}",
    "status": "status = {status:String}",
    "start": f"ts >= {{start:{TS_PARAM}}}",
    "end": f"ts < {{end:{TS_PARAM}}}",
    "sample_bound": f"{SAMPLE_KEY} < {{sample_bound:UInt64}}",
}

# At most ``limit`` rows, oldest first. When more rows match, the LIMIT keeps those with the smallest
# sampling hash, not the oldest: a hash-uniform subset of the whole range (on top of ``sample``, which
# keeps ``hash < k·2⁶⁴``, it is the ``limit`` smallest hashes: the same rows on both backends). Cutting
# after ``ORDER BY ts`` dropped the newest rows of a drift window, where a shift shows first.
WINDOW = (
    "SELECT * FROM (SELECT {columns} FROM {source} WHERE model_name = {model_name:String}{filters} "
    f"ORDER BY {SAMPLE_KEY} LIMIT {{limit:UInt64}}) ORDER BY ts, {SAMPLE_KEY}"
)

# What ``WINDOW`` would read without its LIMIT: rows, rows with an embedding, versions, the first ts.
WINDOW_COUNTS = (
    "SELECT count() AS n, countIf(length(embedding_q) > 0) AS n_emb, groupUniqArray(model_version) AS versions, "
    "min(ts) AS first FROM {source} WHERE model_name = {model_name:String}{filters}"
)

# Per model_version (× slot): rows, failed rows, latency quantiles of every row; the cache columns and
# the predictions' columns over the ok items only (a failed request's one row answered from no cache).
LIVE_STATS = f"""
SELECT
    model_version,
    {{slot}},
    count() AS n,
    countIf(status != 'ok') AS errors,
    errors / n AS error_rate,
    quantiles(0.5, 0.95, 0.99)(latency_ms) AS latency_q,
    latency_q[1] AS latency_p50_ms,
    latency_q[2] AS latency_p95_ms,
    latency_q[3] AS latency_p99_ms,
    countIf(status = 'ok' AND NOT cache_hit) AS misses,
    quantileIf(0.99)(latency_ms, status = 'ok' AND NOT cache_hit) AS latency_miss_p99_ms,
    avgIf(fail_probability, status = 'ok') AS mean_fail_probability,
    avgIf(cache_hit, status = 'ok') AS cache_hit_rate,
    sumMapIf(map(section, toUInt64(1)), status = 'ok') AS section_counts,
    sumMapIf(map(severity, toUInt64(1)), status = 'ok') AS severity_counts,
    min(ts) AS first_ts,
    max(ts) AS last_ts
FROM {{source}}
WHERE model_name = {{model_name:String}} AND ts >= {{since:{TS_PARAM}}}{{until}}
GROUP BY model_version{{by_slot}}
ORDER BY model_version{{by_slot}}
"""
# LIVE_STATS per version × slot, or per version with its slots listed (``slots``, comma-separated).
LIVE_STATS_SLOT = {
    True: ("slot", ", slot"),
    False: ("arrayStringConcat(arraySort(groupUniqArray(slot)), ',') AS slots", ""),
}

# Per model_version, per REQUEST (rows sharing request_id and latency: every row of a request carries its
# latency, a failed request has one row): requests, failed requests (any row not ``ok``), requests with a
# cache miss and their missed texts, and a uniform sample (at most ``cap``) of the latencies of the ok
# requests, of the ok requests with a miss, of those that missed exactly one text, and of (latency, missed
# texts) of the ok requests with a miss (one sample of pairs, split into two arrays of equal length: the
# gate matches the canary's and production's requests by missed texts). The canary gate tests these (an
# item-weighted error rate shrank a failed 32-item request 32-fold against the ok ones; items of one
# request are not independent latencies). ``{requests}`` optionally keeps a hash range of request ids
# (``REQUESTS_SAMPLE``), which bounds the GROUP BY's memory on a long window.
LIVE_REQUESTS = f"""
SELECT
    model_version,
    sum(rows) AS items,
    count() AS requests,
    countIf(failed) AS failed_requests,
    countIf(missed > 0) AS miss_requests,
    sum(missed) AS missed_items,
    groupArraySampleIf({{cap:UInt64}}, 1)(latency_ms, NOT failed) AS latencies,
    groupArraySampleIf({{cap:UInt64}}, 2)(latency_ms, NOT failed AND missed > 0) AS miss_latencies,
    groupArraySampleIf({{cap:UInt64}}, 3)(latency_ms, NOT failed AND missed = 1) AS one_miss_latencies,
    arrayMap(p -> p.1, groupArraySampleIf({{cap:UInt64}}, 4)((latency_ms, missed), NOT failed AND missed > 0)
        AS miss_pairs) AS miss_pair_latencies,
    arrayMap(p -> p.2, miss_pairs) AS miss_pair_texts,
    {{cap:UInt64}} AS latency_cap
FROM (
    SELECT model_version, request_id, latency_ms, count() AS rows, countIf(status != 'ok') > 0 AS failed,
           countIf(status = 'ok' AND NOT cache_hit) AS missed
    FROM {{source}}
    WHERE model_name = {{model_name:String}} AND ts >= {{since:{TS_PARAM}}}{{until}}{{requests}}
    GROUP BY model_version, request_id, latency_ms
)
GROUP BY model_version
ORDER BY model_version
"""
# One row per request carries item_index 0 (its first item) or -1 (a failed request): the window's requests
# without grouping, to size ``REQUESTS_SAMPLE``.
LIVE_REQUEST_COUNT = f"""
SELECT countIf(item_index IN (0, -1)) AS requests FROM {{source}}
WHERE model_name = {{model_name:String}} AND ts >= {{since:{TS_PARAM}}}{{until}}
"""
REQUESTS_SAMPLE = " AND cityHash64(request_id, latency_ms) < {request_bound:UInt64}"  # the grouping key

# On a server table this is answered from the aggregate projection ``p_counts`` (migration 004: a few rows
# per part, not every row), which it matches as written. Both say ``embedding_q != []``: ClickHouse
# rewrites ``length``/``notEmpty`` of an array in a query to its ``size0`` subcolumn, which then no longer
# matches the projection (a SETTINGS clause to stop it is refused to a ``readonly=1`` user), and a
# projection naming the subcolumn itself fails every insert (NOT_FOUND_COLUMN_IN_BLOCK).
COUNTS = """
SELECT model_name, model_version, slot, count() AS n, countIf(embedding_q != []) AS with_embedding,
       min(ts) AS first_ts, max(ts) AS last_ts
FROM {source}
GROUP BY model_name, model_version, slot
ORDER BY model_name, model_version, slot
"""

# ``ts`` is not a prefix of the sort key, so without a lower bound on it ``ORDER BY ts DESC LIMIT n`` reads
# the whole table; the reader bounds it by TAIL_SPANS in turn (the newest rows lie in the first span that
# holds n of them) and drops the bound only when none does.
TAIL = f"SELECT {ROW_COLUMNS} FROM {{source}}{{since}} ORDER BY ts DESC LIMIT {{n:UInt64}}"
TAIL_SINCE = f" WHERE ts >= {{since:{TS_PARAM}}}"

DRIFT_REPORTS = "SELECT * FROM {source} WHERE 1{filters} ORDER BY ts DESC LIMIT {limit:UInt64}"
PROMOTION_EVENTS = "SELECT * FROM {source} ORDER BY ts DESC LIMIT {limit:UInt64}"
# The newest applied change that put ``version`` in production (however many holds came after it). A
# canary's rollback names the production it kept as its to_version: its state before (``details.from``,
# "production vN at …") already had that production, so it changed nothing there and does not count.
LAST_PRODUCTION_CHANGE = (
    "SELECT * FROM {source} WHERE to_version = {version:String} AND success AND NOT dry_run "
    "AND (action IN ('promote', 'deploy', 'follow') OR (action = 'rollback' AND NOT startsWith("
    "JSONExtractString(details, 'from'), concat('production v', to_version, ' ')))) ORDER BY ts DESC LIMIT 1"
)

# A target's newest change: a successful row that is no hold, or one the target took while the registry
# write failed (``details.partial``); dry runs, holds, refusals and failures that changed nothing pass.
# The re-run that finishes a partly done change is stamped with its time: the finished row comes first.
LAST_CHANGE = (
    "SELECT * FROM {source} WHERE target = {target:String} AND model_name = {model:String} AND NOT dry_run "
    "AND ((success AND action != 'hold') OR JSONExtractBool(details, 'partial')) "
    "ORDER BY ts DESC, success DESC LIMIT 1"
)

# When a server last loaded ``version`` into a slot (its own ``serve_load`` rows: a start, a restored
# canary, an admin load); NULL when none did.
LAST_SERVE_LOAD = (
    "SELECT maxOrNull(ts) AS ts FROM {source} WHERE target = 'serve' AND action = 'serve_load' "
    "AND to_version = {version:String} AND success"
)

# -- read-only check for ad-hoc SQL -------------------------------------------------------------
# String literals (incl. heredocs), quoted names and comments, matched in ONE left-to-right pass so
# that whichever starts first wins: a quote inside a comment or a comment marker inside a string
# cannot hide the rest of the statement from the checks below.
_LEXEMES = re.compile(
    r"(?P<quoted>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`(?:[^`\\]|\\.)*`|\$(?P<tag>\w*)\$.*?\$(?P=tag)\$)"
    r"|--[^\n]*|#[^\n]*|/\*.*?\*/",
    re.S,
)
_UNTERMINATED = re.compile(r"['\"`]|/\*")
_FIRST_WORDS = ("SELECT", "WITH", "SHOW", "DESCRIBE", "EXPLAIN", "EXISTS")
_FIRST = {w.lower() for w in _FIRST_WORDS} | {"desc"}
_WRITE_WORDS = re.compile(
    r"\b(insert|alter|drop|create|truncate|rename|attach|detach|optimize|system|kill|grant|revoke|set|use|"
    r"delete|update|exchange|undrop|backup|restore|outfile)\b",
    re.I,
)
# Table functions that read or write outside the log (files, URLs, other servers, processes).
_OUTSIDE = (
    "file|fileCluster|url|urlCluster|remote|remoteSecure|s3|s3Cluster|gcs|azureBlobStorage|"
    "azureBlobStorageCluster|hdfs|hdfsCluster|executable|mysql|postgresql|jdbc|odbc|input|cluster|"
    "clusterAllReplicas|iceberg|deltaLake|hudi|sqlite|mongodb|redis|dictionary"
)
_OUTSIDE_CALL = re.compile(rf"(?i)\b({_OUTSIDE})\s*\(")
_TABLE_FUNCTION = re.compile(r"(?i)\b(?:from|join)\s+([A-Za-z_][\w.]*)\s*\(")
_QUOTED_CALL = re.compile(r"''\s*\(")
_SETTINGS = re.compile(r"(?i)\b(settings|format)\b")
TABLE_REF = re.compile(
    r"(?i)\b(from|join|table|describe|desc)(\s+)(?:`?\w+`?\.)?`?(predictions|drift_reports|promotion_events)`?(?![\w.(])"
)
_HIDDEN = re.compile(r"\x00(\d+)\x00")
#: a bound parameter's name, ``{name:Type}``
PLACEHOLDER = re.compile(r"\{\s*([A-Za-z_]\w*)\s*:")


def qualify_tables(sql: str, database: str) -> str:
    """``sql`` with every reference to the log's tables (``FROM predictions``, ``JOIN `drift_reports```)
    naming ``database``; string literals are left as they are (``WHERE reason = 'from predictions'``
    was rewritten too) and comments dropped (a comment between FROM and the name hid the name).
    ``sql`` is as ClickHouse renders it (``PredictionLogReader.canonical``): NUL characters escaped, so
    the literals' placeholders cannot be forged."""
    literals: list[str] = []

    def hide(m: re.Match[str]) -> str:
        text = m.group(0)
        if not m.group("quoted"):
            return " "  # a comment
        if text[0] in '`"':
            return text  # a quoted name: a table reference may be one
        literals.append(text)
        return f"\x00{len(literals) - 1}\x00"

    masked = TABLE_REF.sub(lambda m: f"{m.group(1)}{m.group(2)}{database}.{m.group(3)}", _LEXEMES.sub(hide, sql))
    return _HIDDEN.sub(lambda m: literals[int(m.group(1))], masked)


#: ``SHOW [FULL] TABLES`` naming no database (in ClickHouse's rendering): it is given the log's database.
SHOW_TABLES = re.compile(r"^(SHOW (?:FULL )?TABLES)(?! FROM )")


class ReadOnlyViolation(ValueError):
    """Ad-hoc SQL that is not a single read-only statement."""


def _bare(sql: str) -> str:
    """``sql`` with string literals and quoted names blanked to ``''`` and comments removed."""
    return _LEXEMES.sub(lambda m: "''" if m.group("quoted") else " ", sql)


def first_keyword(sql: str) -> str:
    """The statement's first keyword, lower case (``select``, ``with``, ``show`` …)."""
    words = _bare(sql).split(None, 1)
    return words[0].lower().lstrip("(") if words else ""


def table_functions(ast: list[str]) -> list[str]:
    """Names of the table functions in ``EXPLAIN AST`` output: each ``TableExpression`` whose child is
    a ``Function`` (``FROM a, filesystem(…)``, ``DESCRIBE TABLE merge(…)``, in any subquery)."""
    found = []
    for line, child in zip(ast, ast[1:], strict=False):
        if line.strip().startswith("TableExpression") and child.strip().startswith("Function "):
            if len(child) - len(child.lstrip()) > len(line) - len(line.lstrip()):
                found.append(child.split()[1])
    return found


#: the embedded readers' databases of views (:meth:`predlog.reader.ParquetSource.catalog`)
_CATALOG = re.compile(r"\bmotlens_log_", re.IGNORECASE)


def check_read_only(sql: str) -> str:
    """Return the statement (trailing ``;`` removed) or raise ReadOnlyViolation naming the problem.

    Checked before the log's tables are substituted, so table functions (``file(…)``, ``url(…)``,
    ``remote(…)`` …) and SETTINGS/FORMAT clauses in the user's SQL are refused; the embedded backend's
    own ``file(…)`` source is added afterwards.
    """
    text = sql.strip().rstrip(";").strip()
    bare = _bare(text)
    if not bare.strip():
        raise ReadOnlyViolation("empty query")
    if _UNTERMINATED.search(_LEXEMES.sub(" ", text)):
        raise ReadOnlyViolation("unterminated string, quoted name or comment")
    if ";" in bare:
        raise ReadOnlyViolation("only a single statement is allowed")
    first = first_keyword(text)
    if first not in _FIRST:
        raise ReadOnlyViolation(f"only {'/'.join(_FIRST_WORDS)} are allowed, not {first.upper()!r}")
    m = _WRITE_WORDS.search(bare)
    if m:
        raise ReadOnlyViolation(f"read-only queries may not use {m.group(1).upper()!r}")
    m = _OUTSIDE_CALL.search(bare) or _TABLE_FUNCTION.search(bare)
    if m:
        raise ReadOnlyViolation(
            f"table function {m.group(1)}() is not allowed; query predictions, drift_reports or promotion_events"
        )
    if _QUOTED_CALL.search(bare):
        raise ReadOnlyViolation("quoted function names are not allowed")
    if _CATALOG.search(bare):  # another reader's views in the same process: another log's rows
        raise ReadOnlyViolation("name the log's tables as predictions, drift_reports or promotion_events")
    m = _SETTINGS.search(bare)
    if m:
        raise ReadOnlyViolation(f"read-only queries may not use {m.group(1).upper()!r}")
    return text
