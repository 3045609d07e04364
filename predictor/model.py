"""The thin ``kserve.Model`` adapter: validate, pick a slot, predict, answer, count, log.

KServe decodes v1 JSON into a dict and v2 (REST JSON, REST binary, gRPC) into ``InferRequest``;
this class turns both into a :class:`~predictor.codec.PredictRequest`, runs it on the slot chosen by
the canary split, and answers in the caller's protocol with the served ``model_version``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np
from grpc_interceptor.exceptions import ResourceExhausted, Unavailable
from kserve import Model
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
from kserve.protocol.infer_type import InferRequest, InferResponse

from motlens import MODEL_NAME
from motlens.head import CONTEXT_FIELDS
from predictor import metrics
from predictor.batcher import Overloaded
from predictor.codec import (
    INPUT_METADATA,
    OUTPUT_METADATA,
    Limits,
    PredictRequest,
    PredictResult,
    build_v1,
    build_v2,
    parse_v1,
    parse_v2,
    short_message,
)
from predictor.pipeline import ServingUnit
from predictor.settings import ServeSettings
from predictor.slots import SlotManager

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Exception)


class MotlensModel(Model):
    """``mot-defects`` as KServe sees it; readiness is the production slot's readiness."""

    def __init__(
        self, slots: SlotManager, settings: ServeSettings, writer: Any | None = None, name: str = MODEL_NAME
    ) -> None:
        super().__init__(name)
        self.slots = slots
        self.limits = Limits(settings.max_items_per_request, settings.max_text_chars)
        self.writer = writer
        self.sample_rate = settings.log_embedding_sample_rate
        self._rng = random.Random()

    async def healthy(self) -> bool:
        return self.slots.ready

    def load(self) -> bool:
        """Loading is driven by the slot manager in the background; never block a request on it."""
        return self.slots.ready

    def start(self) -> None:
        """Nothing to do: slots load asynchronously after the server is up."""

    def get_input_types(self) -> list[dict[str, Any]]:
        return [dict(m) for m in INPUT_METADATA]

    def get_output_types(self) -> list[dict[str, Any]]:
        return [dict(m) for m in OUTPUT_METADATA]

    async def predict(
        self,
        payload: Any,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | InferResponse:
        t0 = time.perf_counter()
        is_v2 = isinstance(payload, InferRequest)
        protocol = ("v2-grpc" if payload.from_grpc else "v2-rest") if is_v2 else "v1"
        try:
            req = (
                parse_v2(payload, self.limits, (headers or {}).get("x-request-id"))
                if is_v2
                else parse_v1(payload, self.limits, (headers or {}).get("x-request-id", ""))
            )
        except InvalidInput as e:
            _count(protocol, "client_error")
            metrics.REJECTED.labels(reason="invalid_input").inc()
            raise counted(InvalidInput(short_message(e))) from e
        version = (payload.model_version or None) if is_v2 else None
        unit = self.slots.acquire(version)
        if unit is None and version and self.slots.serving:
            _count(protocol, "client_error")
            raise counted(ModelNotFound(f"{self.name} version {short_message(version, 40)}"))
        if unit is None:
            _count(protocol, "unavailable")
            reason = self.slots.not_ready_reason()
            if protocol == "v2-grpc":  # KServe's gRPC interceptor cannot map ModelNotReady (no .reason)
                log.debug("gRPC predict while not ready: %s", reason)
                raise Unavailable(f"model {self.name} is not ready")
            raise counted(ModelNotReady(self.name, reason[1] if reason else None))
        served, slot = unit.version, unit.slot  # the slot that took it: a promote may relabel the unit meanwhile
        metrics.note_served(served)
        try:
            result, hits = await unit.predict(req.texts, req.context)
        except Overloaded as e:
            _count(protocol, "overloaded", served)
            self._log_failure(req, unit, slot, protocol, time.perf_counter() - t0, "overloaded")
            if protocol == "v2-grpc":
                raise (ResourceExhausted if e.reason == "queue_full" else Unavailable)(str(e)) from e
            raise
        except asyncio.CancelledError:  # a gRPC deadline, an HTTP client gone: the handler is cancelled
            _count(protocol, "cancelled", served)
            self._log_failure(req, unit, slot, protocol, time.perf_counter() - t0, "cancelled")
            raise
        except Exception:
            _count(protocol, "server_error", served, len(req.texts))
            self._log_failure(req, unit, slot, protocol, time.perf_counter() - t0, "server_error")
            raise
        else:  # counted before release: a closed unit's last release removes its version's series
            latency = time.perf_counter() - t0
            n = len(req.texts)
            _count(protocol, "ok", served, n)
            metrics.by_version(metrics.REQUEST_LATENCY, protocol, served).observe(latency)
            metrics.ITEM_LATENCY.observe(latency / n)
        finally:
            unit.release()
        try:
            self._log_predictions(req, result, hits, protocol, latency, unit.backend.backend_name, unit.backend.device)
        except Exception:  # noqa: BLE001 - the rows are lost, the answer is not
            log.exception("cannot log the rows of request %s", req.request_id)
        return build_v2(result, req, payload) if is_v2 else build_v1(result, req)

    def _log_failure(
        self, req: PredictRequest, unit: ServingUnit, slot: str, protocol: str, latency: float, status: str
    ) -> None:
        """One row (item_index -1, ``status`` ``server_error``, ``overloaded`` or ``cancelled``) per
        failed request, so the canary gate sees failures. Never blocks (the writer only queues) and
        never raises: it runs in ``except`` blocks whose exception (a ``CancelledError`` too) must
        propagate unchanged."""
        if self.writer is None:
            return
        try:
            from predlog.records import PredictionRecord

            be = unit.backend
            record = PredictionRecord(
                request_id=req.request_id,
                item_index=-1,
                model_name=be.name,
                model_version=be.version,
                slot=slot,
                text="",
                latency_ms=latency * 1000.0,
                backend=be.backend_name,
                device=be.device,
                protocol=protocol,
                status=status,
            )
            self.writer.submit([record])
        except Exception:  # noqa: BLE001 - a log row must never replace the request's own outcome
            log.exception("cannot log the %s row of request %s", status, req.request_id)

    def _log_predictions(
        self,
        req: PredictRequest,
        result: PredictResult,
        hits: list[bool],
        protocol: str,
        latency: float,
        backend: str,
        device: str,
    ) -> None:
        if self.writer is None:
            return
        from predlog.records import PredictionRecord, text_hash

        # Columns first, then one record per item: this runs on the event loop for every item served
        # (per-item lookups and conversions cost ≈ 3× more, docs/benchmarks.md).
        texts, ctx = req.texts, req.context
        absent: Sequence[Any] = [None] * len(texts)
        make, model, fuel, age, odometer = (ctx.get(k, absent) for k in CONTEXT_FIELDS)
        section_score = np.asarray(result.section_score, dtype=np.float64).tolist()
        fail_probability = np.asarray(result.fail_probability, dtype=np.float64).tolist()
        rid, name, version, slot = req.request_id, result.model_name, result.model_version, result.slot
        latency_ms, ts, rate, draw = latency * 1000.0, datetime.now(UTC), self.sample_rate, self._rng.random
        # positional, in PredictionRecord's field order: a third of the keyword call's cost (every column
        # is checked against the request and its answer in tests/test_predictor_flow.py)
        rows = zip(texts, result.keys, result.section, section_score, result.severity, fail_probability, hits,
                   make, model, fuel, age, odometer, strict=True)  # fmt: skip
        # fmt: off
        records = [
            PredictionRecord(rid, i, name, version, slot, text, sec, score, sev, fail, latency_ms, hit, backend,
                             device, protocol, "ok", mk, md, fu, ag, od,
                             result.embeddings[i].tolist() if rate > 0 and draw() < rate else None,
                             text_hash(key), ts)
            for i, (text, key, sec, score, sev, fail, hit, mk, md, fu, ag, od) in enumerate(rows)
        ]
        # fmt: on
        self.writer.submit(records)


def counted(exc: E) -> E:
    """Mark a refusal already counted in ``motlens_requests_total`` (the REST handlers count the rest)."""
    exc.motlens_counted = True  # type: ignore[attr-defined]
    return exc


def _count(protocol: str, outcome: str, version: str = "", items: int = 0) -> None:
    metrics.by_version(metrics.REQUESTS, protocol, outcome, version).inc()
    if items:
        metrics.by_version(metrics.ITEMS, protocol, outcome, version).inc(items)
