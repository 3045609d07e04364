"""The drift job: read both sides, run the checks, publish the verdict, return the exit code."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from drift import publish
from drift.canary import agreement, embedding_consistency, score_shift
from drift.checks import EXIT_ERROR, Check, verdict
from drift.columns import DRIFT_COLUMNS, INPUT_COLUMNS, MODEL_OUTPUTS, collapse_rare, drift_frame
from drift.evaluate import data_drift, embedding_drift
from drift.settings import DriftSettings
from drift.sources import Side, read_reference_file, read_window
from drift.windows import ReferenceSpec, Window, current_window, reference_spec
from motlens.atomic import remove_stale_temps
from motlens.errors import describe

log = logging.getLogger(__name__)
REPORT_HTML = "report.html"
EMBEDDINGS_HTML = "embeddings.html"


@dataclass
class JobResult:
    summary: dict[str, Any]
    exit_code: int
    messages: list[str] = field(default_factory=list)


class Stages:
    """A rich progress bar over the job's stages (off when ``progress`` is false)."""

    def __init__(self, enabled: bool, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn("drift: {task.description}"), BarColumn(), TimeElapsedColumn(),
                           console=Console(stderr=True), disable=not enabled, transient=False)  # fmt: skip
        self._task = self._p.add_task("starting", total=total)
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        self._p.update(self._task, description=name)
        t0 = time.perf_counter()
        yield
        self.seconds[name.split(" (")[0]] = round(time.perf_counter() - t0, 3)
        self._p.advance(self._task)

    def __enter__(self) -> Stages:
        self._p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._p.update(self._task, description="done")
        self._p.stop()


def _short(reference: Side, current: Side, n_ref: int, n_cur: int, need: int, what: str) -> str:
    parts = [f"{side.label} has {n} {what}" for side, n in ((current, n_cur), (reference, n_ref)) if n < need]
    if not parts:
        return ""
    return f"insufficient data: {' and '.join(parts)}; need at least {need} on each side"


def compare(
    reference: Side,
    current: Side,
    s: DriftSettings,
    stages: Stages | None = None,
    drift_columns: tuple[str, ...] = DRIFT_COLUMNS,
) -> tuple[list[Check], dict[str, Any]]:
    """Column drift over ``drift_columns`` and embedding drift of ``current`` against ``reference`` (HTML into
    ``s.output`` when ``s.html``); a side short of rows gives an ``insufficient`` check, never a pass."""
    stages = stages or Stages(False, 2)
    detail: dict[str, Any] = {"rows": {
        "current": len(current.frame), "reference": len(reference.frame),
        "current_in_source": current.rows_in_source, "reference_in_source": reference.rows_in_source,
        "current_embeddings": len(current.embeddings), "reference_embeddings": len(reference.embeddings),
    }}  # fmt: skip
    checks: list[Check] = []
    with stages.stage("column drift (DataDriftPreset)"):
        short = _short(reference, current, len(reference.frame), len(current.frame), s.min_rows, "rows")
        if short:
            checks.append(Check("data_drift", "insufficient", short, None, s.drift_share))
        else:
            ref, cur = collapse_rare(drift_frame(reference.frame), drift_frame(current.frame),
                                     min_share=s.rare_category_share)  # fmt: skip
            dd = data_drift(ref, cur, s, html=s.output / REPORT_HTML if s.html else None, drift_columns=drift_columns)
            drifted = [f"{c.column} ({c.method} {c.score:.4g})" for c in dd.columns if c.drifted]
            msg = f"{dd.drifted_count} of {len(dd.columns)} columns drifted" + (
                f": {', '.join(drifted)}" if drifted else ""
            )
            checks.append(Check("data_drift", "drift" if dd.detected else "pass", msg,
                                dd.drifted_share, s.drift_share))  # fmt: skip
            detail["data_drift"] = dd.to_dict()
    with stages.stage(f"embedding drift (EmbeddingsDrift, {s.embedding_method})"):
        short = _short(reference, current, len(reference.embeddings), len(current.embeddings),
                       s.min_embedding_rows, "rows with embeddings")  # fmt: skip
        if short:
            checks.append(Check("embedding_drift", "insufficient", short))
        else:
            html = s.output / EMBEDDINGS_HTML if s.html else None
            ed = embedding_drift(reference.embeddings, current.embeddings, s, html=html)
            msg = (f"{ed.method} method score {ed.score:.4g} vs threshold {ed.threshold:.4g} "
                   f"({ed.rows_reference} reference / {ed.rows_current} current rows)")  # fmt: skip
            checks.append(Check("embedding_drift", "drift" if ed.detected else "pass", msg,
                                ed.score, ed.threshold))  # fmt: skip
            detail["embedding_drift"] = ed.to_dict()
    return checks, detail


def _ms(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="milliseconds")


def _trunc_ms(ts: datetime) -> datetime:
    return ts.replace(microsecond=ts.microsecond // 1000 * 1000)


class DriftJob:
    """One run of ``motlens drift``; ``reader`` and ``registry`` are opened from settings when absent."""

    def __init__(self, settings: DriftSettings, *, reader: Any = None, registry: Any = None,
                 now: datetime | None = None):  # fmt: skip
        self.s = settings
        self._reader = reader
        self._own_reader = reader is None
        self._registry = registry
        self.now = _trunc_ms(now or datetime.now(UTC))
        self.messages: list[str] = []

    @property
    def reader(self) -> Any:
        if self._reader is None:
            import predlog

            self._reader = predlog.open_reader()
        return self._reader

    @property
    def registry(self) -> Any:
        if self._registry is None:
            from training.registry import Registry

            self._registry = Registry(model_name=self.s.model_name)
        return self._registry

    def say(self, msg: str) -> None:
        self.messages.append(msg)
        log.info(msg)

    # ---- the run -----------------------------------------------------------------------------------
    def run(self) -> JobResult:
        s = self.s
        s.output.mkdir(parents=True, exist_ok=True)
        for stale in (REPORT_HTML, EMBEDDINGS_HTML):  # an earlier run's report must not pass for this one's
            (s.output / stale).unlink(missing_ok=True)
        for name in (REPORT_HTML, EMBEDDINGS_HTML, publish.SUMMARY_FILE):  # what a killed run's writes left
            remove_stale_temps(s.output / name)
        if s.canary and s.skip_without_canary and s.version is None and not self._canary_alias_set():
            self.say("no 'canary' alias: no rollout to compare; nothing published")
            path = s.output / publish.SUMMARY_FILE
            summary = {"details": {"status": "no_canary", "checks": [], "messages": list(self.messages),
                                   "outputs": {"summary": str(path.resolve())}}}  # fmt: skip
            publish.write_summary(s.output, summary)
            return JobResult(summary, 0, list(self.messages))
        window = current_window(s.window, s.end, self.now)
        window = Window(_trunc_ms(window.start), _trunc_ms(window.end))
        slot = "canary" if s.canary else s.slot
        base: dict[str, Any] = {"version": s.version, "slot": slot, "window": window, "run_id": None,
                                "reference": "slot:production" if s.canary else s.reference}  # fmt: skip
        with Stages(s.progress, 7 if s.canary else 6) as stages:
            try:
                checks, detail = (self._canary(window, stages, base) if s.canary
                                  else self._version(window, stages, base))  # fmt: skip
                status, code = verdict(checks)
                if not s.verdict_exit_codes:
                    code = 0
            except Exception as e:  # noqa: BLE001 - the job reports every failure as exit 2
                log.debug("drift job failed", exc_info=True)
                self.say(f"error: {describe(e)}")
                checks, detail, status, code = [], {}, "error", EXIT_ERROR
            detail["timings_s"] = stages.seconds
            with stages.stage("outputs"):
                summary = self._summary(base, checks, detail, status, code)
                self._publish(summary, base)
        if self._own_reader and self._reader is not None:
            self._reader.close()
        return JobResult(summary, code, list(self.messages))

    def _canary_alias_set(self) -> bool:
        """False only when the registry answers without a ``canary`` alias; a registry that cannot
        answer counts as set, so the run goes on and reports the failure as an error."""
        try:
            return "canary" in self.registry.aliases()
        except Exception as e:  # noqa: BLE001 - reported by the run itself
            log.debug("registry aliases: %s", e)
            return True

    def _version(self, window: Window, stages: Stages, base: dict[str, Any]) -> tuple[list[Check], dict]:
        s = self.s
        with stages.stage("resolve version"):
            version = s.version or self._alias_version(s.slot)
            base["version"] = version
            base["run_id"] = self._run_id(version)
            spec = reference_spec(s.reference, window)
            base["reference"] = spec.describe()
        with stages.stage(f"read current window ({s.window})"):
            current = self._read("current", version, None, window)  # by version: see _canary
        with stages.stage(f"read reference ({spec.describe()})"):
            reference = self._reference(spec, version)
        checks, detail = self._compare(reference, current, stages)
        return checks, detail

    def _canary(self, window: Window, stages: Stages, base: dict[str, Any]) -> tuple[list[Check], dict]:
        s = self.s
        with stages.stage("resolve versions"):
            version = s.version or self._alias_version("canary")
            base["version"] = version
            base["run_id"] = self._run_id(version)
            production_version = self._alias_version("production")
            if production_version == version:
                raise ValueError(f"version {version} is both the canary and production: nothing to compare")
        # Rows are told apart by version, not by their slot column: on Kubernetes each revision's pods
        # serve one model and log slot "production", the canary revision's included.
        with stages.stage("read canary window"):
            canary = self._read("canary", version, None, window)
        # The split is uniform only while both serve: production's rows from before the canary's first
        # one would compare another span's traffic (a mix change there would read as drift).
        if canary.first_row is not None and canary.first_row > window.start:
            window = Window(canary.first_row, window.end)
            base["window"] = window
            self.say(f"compared from the canary's first row in the window, {_ms(window.start)}, to "
                     f"{_ms(window.end)}: production's rows before it are left out (no canary then)")  # fmt: skip
        with stages.stage("read production window"):
            production = self._read("production", production_version, None, window)
        self.say(f"canary mode: column drift over the inputs ({', '.join(INPUT_COLUMNS)}); the model outputs "
                 f"({', '.join(MODEL_OUTPUTS)}) are compared on shared texts")  # fmt: skip
        checks, detail = self._compare(production, canary, stages, INPUT_COLUMNS)
        with stages.stage("canary: agreement on shared texts"):
            a_check, a_detail = agreement(production, canary, s)
            s_check, s_detail = score_shift(production, canary, s)
            c_check, c_detail = embedding_consistency(production, canary, s)
        detail["canary"] = {**a_detail, **s_detail, **c_detail, "production_versions": production.versions,
                            "canary_versions": canary.versions}  # fmt: skip
        return checks + [a_check, s_check, c_check], detail

    def _compare(
        self, reference: Side, current: Side, stages: Stages, drift_columns: tuple[str, ...] = DRIFT_COLUMNS
    ) -> tuple[list[Check], dict]:
        checks, detail = compare(reference, current, self.s, stages, drift_columns)
        for c in checks:
            self.say(f"{c.name}: {c.status}: {c.message}")
        if problem := detail.get("embedding_drift", {}).get("plot_problem"):
            self.say(f"could not write {EMBEDDINGS_HTML} (the verdict stands): {problem}")
        return checks, detail

    # ---- sources -------------------------------------------------------------------------------------
    def _read(self, label: str, version: str | None, slot: str | None, window: Window) -> Side:
        s = self.s
        side = read_window(self.reader, label=f"{label} window", model_name=s.model_name, model_version=version,
                           slot=slot, window=window, max_rows=s.max_rows,
                           embedding_max_rows=s.embedding_max_rows)  # fmt: skip
        self.say(f"{label}: {side.rows_in_source} rows ({side.embedding_rows_in_source} with embeddings) of "
                 f"{s.model_name} version {version or 'any'} slot {slot} in {window}; "
                 f"using {len(side.frame)} / {len(side.embeddings)}")  # fmt: skip
        return side

    def _reference(self, spec: ReferenceSpec, version: str) -> Side:
        if spec.kind == "window":
            assert spec.window is not None
            return self._read("reference", version, None, spec.window)
        if spec.kind == "path":
            assert spec.path is not None
            return read_reference_file(spec.path, f"reference sample {spec.path}")
        bundle = self.registry.fetch(version)
        return read_reference_file(bundle.root, f"reference sample of version {version}")

    def _alias_version(self, alias: str) -> str:
        info = self.registry.resolve(alias)
        self.say(f"alias {alias} → version {info.version}")
        return info.version

    def _run_id(self, version: str) -> str | None:
        try:
            return self.registry.resolve(version).run_id
        except Exception as e:  # noqa: BLE001 - artifacts are optional; the reason is reported
            self.say(f"version {version} not resolved in the MLflow registry ({e}); no run artifact")
            return None

    # ---- outputs -------------------------------------------------------------------------------------
    def _summary(self, base: dict, checks: list[Check], detail: dict, status: str, code: int) -> dict[str, Any]:
        dd = detail.get("data_drift") or {}
        scores: dict[str, float] = {}
        if dd:
            scores["drifted_share"] = float(dd["drifted_share"])
            scores |= {f"column.{c['column']}": float(c["score"]) for c in dd["columns"]}
        for c in checks:
            if c.name != "data_drift" and c.score is not None:
                scores[c.name] = float(c.score)
        rows = detail.get("rows", {})
        window: Window = base["window"]
        return {
            "ts": _ms(self.now),
            "model_name": self.s.model_name,
            "model_version": str(base["version"] or ""),
            "slot": base["slot"],
            "reference": str(base["reference"]),
            "window_start": _ms(window.start),
            "window_end": _ms(window.end),
            "n_current": int(rows.get("current", 0)),
            "n_reference": int(rows.get("reference", 0)),
            "drift_detected": status == "drift",
            "drift_share": float(dd.get("drifted_share", 0.0)),
            "scores": scores,
            "report_path": str((self.s.output / REPORT_HTML).resolve()),
            "run_id": str(base["run_id"] or ""),
            "details": {
                "status": status,
                "exit_code": code,
                "mode": "canary" if self.s.canary else "version",
                "checks": [c.to_dict() for c in checks],
                "messages": list(self.messages),
                **{k: v for k, v in detail.items()},
                "settings": self.s.model_dump(mode="json", exclude={"pushgateway"}),
            },
        }

    def _publish(self, summary: dict[str, Any], base: dict[str, Any]) -> None:
        """summary.json first, so a run that cannot write its outputs fails (exit 2) before anything
        is published; then metrics, the outputs directory as an artifact of the version's MLflow run,
        the ``drift_reports`` row and summary.json again. The upload comes before the row, so the row
        and the summary name the MLflow copy only once it is there, and the local files otherwise."""
        s = self.s
        run_id = base["run_id"] if s.log_artifact else None
        outputs = summary["details"].setdefault("outputs", {})
        html = s.output / REPORT_HTML
        local_report = str(html.resolve()) if html.is_file() else ""
        summary["report_path"] = local_report
        outputs["summary"] = str((s.output / publish.SUMMARY_FILE).resolve())
        publish.write_summary(s.output, summary)
        if s.pushgateway or s.textfile:
            try:
                reg = publish.metrics_registry(summary, self.now.timestamp())
                outputs["metrics"] = publish.push_metrics(
                    reg,
                    pushgateway=s.pushgateway,
                    textfile=s.textfile,
                    job=s.pushgateway_job,
                    grouping={"model_version": summary["model_version"], "slot": summary["slot"]},
                )
            except Exception as e:  # noqa: BLE001
                self._fail_output(summary, "metrics", e)
        uploaded = self._upload(summary, run_id, local_report) if run_id else None
        try:
            publish.insert_row(self.reader, summary)
        except Exception as e:  # noqa: BLE001
            self._fail_output(summary, "drift_reports row", e)
            if uploaded:  # the MLflow copy says so too
                publish.write_summary(s.output, summary)
                try:
                    self.registry.client.log_artifact(run_id, str(s.output / publish.SUMMARY_FILE), uploaded)
                except Exception as e2:  # noqa: BLE001 - the local summary has it
                    log.warning("could not upload summary.json again: %s", describe(e2))
        publish.write_summary(s.output, summary)

    def _upload(self, summary: dict[str, Any], run_id: str, local_report: str) -> str | None:
        """The outputs directory to the run, its summary.json naming where it went; on a failure the
        summary goes back to the local paths (a reported failure: the verdict still stands). Returns
        the artifact path when uploaded."""
        s = self.s
        outputs = summary["details"]["outputs"]
        artifact_path = f"drift/{summary['slot']}-{self.now.strftime('%Y%m%dT%H%M%S')}"
        try:
            uri = publish.artifact_uri(self.registry.client, run_id, artifact_path)
            outputs["mlflow_artifacts"] = uri
            if local_report:
                summary["report_path"] = f"{uri}/{REPORT_HTML}"
            publish.write_summary(s.output, summary)  # the copy uploaded says where it lives
            self.registry.client.log_artifacts(run_id, str(s.output), artifact_path)
        except Exception as e:  # noqa: BLE001 - reported, the verdict still stands
            outputs.pop("mlflow_artifacts", None)
            summary["report_path"] = local_report
            self._fail_output(summary, "mlflow_artifacts", e)
            return None
        return artifact_path

    def _fail_output(self, summary: dict[str, Any], what: str, e: Exception) -> None:
        msg = f"could not publish {what}: {describe(e)}"
        self.say(msg)
        summary["details"]["messages"].append(msg)
