"""The writer's Prometheus series carry exactly the names in docs/architecture.md "Metrics"."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from prometheus_client import REGISTRY, generate_latest

import predlog
from predlog import PredictionRecord, PredlogSettings
from predlog.metrics import DROP_REASONS

REPO = Path(__file__).resolve().parents[1]

NAMES = [
    "motlens_predlog_rows_written_total",
    "motlens_predlog_rows_spilled_total",
    "motlens_predlog_rows_replayed_total",
    'motlens_predlog_rows_dropped_total{reason="queue_full"}',
    "motlens_predlog_queue_depth",
    "motlens_predlog_spool_bytes",
    "motlens_predlog_spool_held_rows",
    "motlens_predlog_insert_seconds_bucket",
]


def test_metric_names_and_counts(tmp_path):
    before = REGISTRY.get_sample_value("motlens_predlog_rows_written_total") or 0.0
    inserts = REGISTRY.get_sample_value("motlens_predlog_insert_seconds_count") or 0.0
    writer = predlog.open_writer(PredlogSettings(dir=tmp_path, queue_rows=30, flush_interval_s=30, batch_rows=1000))
    rows = [
        PredictionRecord(
            request_id=f"r{i}", item_index=0, model_name="mot-defects", model_version="1", slot="canary", text="x"
        )
        for i in range(40)
    ]
    writer.submit(rows)
    assert REGISTRY.get_sample_value("motlens_predlog_queue_depth") == 30
    writer.close(10)
    assert REGISTRY.get_sample_value("motlens_predlog_rows_written_total") - before == 30
    assert REGISTRY.get_sample_value("motlens_predlog_insert_seconds_count") - inserts == 1
    text = generate_latest(REGISTRY).decode()
    for name in NAMES:
        assert name in text, name


def test_every_drop_reason_is_exported_at_zero_before_any_drop():
    """A reason's series exists at 0 before its first drop: one first scraped already holding the
    burst gives increase() nothing, and MotlensPredlogDropping missed the first drops."""
    script = (  # a fresh process: nothing dropped yet
        "from prometheus_client import REGISTRY, generate_latest\n"
        "import predlog.metrics as m\n"
        "name = 'motlens_predlog_rows_dropped_total'\n"
        "print([REGISTRY.get_sample_value(name, {'reason': r}) for r in m.DROP_REASONS])\n"
        "print(generate_latest(REGISTRY).decode())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    values, text = out.stdout.split("\n", 1)
    assert values == str([0.0] * len(DROP_REASONS))
    for reason in DROP_REASONS:
        assert f'motlens_predlog_rows_dropped_total{{reason="{reason}"}} 0.0' in text, reason


#: the writer's methods that count dropped rows (``PredictionLogWriter._drop``, ``_Lane.drop``)
DROPS = ("_drop", "drop")


def _drop_reasons_in(tree: ast.AST) -> set[str]:
    """String constants passed as ``_drop``'s (or a lane's ``drop``'s) reason, directly or through a variable
    assigned in the same function (``reason = "x"``, ``a, reason = 0, "x"``)."""
    found: set[str] = set()
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
        assigned: dict[str, set[str]] = {}
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    pairs = (
                        zip(target.elts, node.value.elts, strict=False)
                        if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                        else [(target, node.value)]
                    )
                    for name, value in pairs:
                        if isinstance(name, ast.Name) and isinstance(value, ast.Constant):
                            assigned.setdefault(name.id, set()).add(value.value)
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in DROPS and len(node.args) == 2:
                arg = node.args[1]
                if isinstance(arg, ast.Constant):
                    found.add(arg.value)
                elif isinstance(arg, ast.Name):
                    found |= assigned.get(arg.id, set())
    return found


def test_drop_reasons_cover_every_reason_the_writer_drops_for():
    """Every reason the writer passes to ``_drop`` is one of DROP_REASONS (so exported from import)."""
    used = set()
    for path in (REPO / "predlog").glob("*.py"):
        used |= _drop_reasons_in(ast.parse(path.read_text()))
    assert {"queue_full", "spool_full", "spool_error", "closed"} <= used  # the scan still finds the calls
    assert used <= set(DROP_REASONS), used - set(DROP_REASONS)
