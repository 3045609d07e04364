"""A running server under load: health during model work, 429 back-pressure, cancellation, slot swaps
without a failed request, and every prediction in the prediction log."""

from __future__ import annotations

import itertools
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pandas as pd
import pytest

from motlens.bundle import write_manifest

MODEL = "mot-defects"
_counter = itertools.count()


def unique_texts(n: int) -> list[str]:
    """Texts the cache has never seen."""
    return [f"Nearside Front Brake pipe corroded, record {next(_counter)} (1.1.11 (c))" for _ in range(n)]


_VARIED = (
    "Nearside Front Brake pipe corroded, record {} (1.1.11 (c))",
    "Parking brake efficiency below requirements, record {} (1.4.2 (a))",
    "Horn not working, record {} (7.5 (a))",
    "Nearside Front Tyre worn close to legal limit, record {} (5.2.3 (e))",
    "Windscreen damage in zone A, record {} (3.2 (a))",
    "Oil leak from engine, slight, record {} (8.4.1 (a))",
)


def varied_texts(n: int) -> list[str]:
    """Texts the cache has never seen, of different sections and severities."""
    return [_VARIED[i % len(_VARIED)].format(next(_counter)) for i in range(n)]


def wait_until(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


async def async_wait_until(condition, timeout: float = 60.0) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def sample(name: str, **labels: str) -> float:
    """A series' current value in this process's registry (the served /metrics), 0 when absent."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatedEncode:
    """The real encoder behind a gate, so a test controls when model work finishes."""

    def __init__(self, encode) -> None:
        self._encode = encode
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.calls: list[list[list[int]]] = []

    def __call__(self, ids):
        self.calls.append([list(x) for x in ids])
        self.entered.set()
        assert self.gate.wait(60)
        return self._encode(ids)


def token_ids(batcher, text: str) -> list[int]:
    """The ids the served batcher gives ``text`` (as a request sends it: normalised first)."""
    from motlens.embedder import normalise_text

    return batcher._tokenize([normalise_text(text)])[0]


@pytest.fixture(scope="module")
def bundle_v2(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("v2") / "mot-defects"
    shutil.copytree(tiny_bundle.root, root)
    write_manifest(root, version="2", run_id="tiny-2")
    return root


@pytest.fixture(scope="module")
def served(tiny_bundle, embedder, tmp_path_factory):
    import predlog
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings
    from predlog.settings import PredlogSettings

    log_settings = PredlogSettings(dir=tmp_path_factory.mktemp("predlog"), flush_interval_s=0.2)
    writer = predlog.open_writer(log_settings)
    settings = ServeSettings(
        model=str(tiny_bundle.root),
        http_port=_port(),
        grpc_port=_port(),
        log_embedding_sample_rate=0.5,
        grace_period_s=20,
        admin_enabled=True,
    )
    server = PredictorServer(settings, embedder=embedder, writer=writer, host="127.0.0.1")
    thread = ServerThread(server).start().wait_ready()
    yield server, f"http://127.0.0.1:{settings.http_port}", log_settings
    thread.stop()


def production_batcher(server):
    return server.slots.slots["production"].unit.batcher


def test_health_answers_while_a_large_predict_computes(served, monkeypatch):
    server, base, _ = served
    batcher = production_batcher(server)
    spy = GatedEncode(batcher._encode_tokens)
    monkeypatch.setattr(batcher, "_encode_tokens", spy)
    with ThreadPoolExecutor(1) as pool:
        big = pool.submit(
            httpx.post, f"{base}/v1/models/{MODEL}:predict", json={"instances": unique_texts(200)}, timeout=120
        )
        assert spy.entered.wait(60)  # the model is working on the big request (and held there)
        assert httpx.get(f"{base}/v2/health/live").status_code == 200
        assert httpx.get(f"{base}/v2/models/{MODEL}/ready").json()["ready"] is True
        assert "motlens_queue_depth" in httpx.get(f"{base}/metrics").text
        assert not big.done()
        spy.gate.set()
        r = big.result()
    assert r.status_code == 200 and len(r.json()["predictions"]) == 200


async def test_full_queue_gives_429_with_retry_after_and_grpc_resource_exhausted(served, monkeypatch):
    import asyncio

    import grpc
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    import predlog

    server, base, log_settings = served
    batcher = production_batcher(server)
    spy = GatedEncode(batcher._encode_tokens)
    monkeypatch.setattr(batcher, "_encode_tokens", spy)
    monkeypatch.setattr(batcher, "capacity", 2)
    rejected = sample("motlens_rejected_total", reason="queue_full")
    overloaded = {p: sample("motlens_requests_total", protocol=p, outcome="overloaded", version="1")
                  for p in ("v1", "v2-grpc")}  # fmt: skip
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        url = f"/v1/models/{MODEL}:predict"
        first = asyncio.ensure_future(client.post(url, json={"instances": unique_texts(2)}))
        assert await asyncio.to_thread(spy.entered.wait, 60)
        second = asyncio.ensure_future(client.post(url, json={"instances": unique_texts(2)}))
        await async_wait_until(lambda: batcher.pending_items >= 2)
        refused = await client.post(url, json={"instances": unique_texts(1)}, headers={"x-request-id": "req-429"})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert "queue_full" in refused.json()["error"]

        grpc_client = InferenceGRPCClient(f"127.0.0.1:{server.settings.grpc_port}", retries=0)
        try:
            inp = InferInput("text", [1], "BYTES")
            inp.set_data_from_numpy(np.array([t.encode() for t in unique_texts(1)], dtype=np.object_))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await grpc_client.infer(InferRequest(MODEL, [inp]))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await grpc_client.close()

        spy.gate.set()
        assert (await first).status_code == 200 and (await second).status_code == 200
    assert sample("motlens_rejected_total", reason="queue_full") - rejected == 2  # the REST 429 and the gRPC one
    for p, before in overloaded.items():
        assert sample("motlens_requests_total", protocol=p, outcome="overloaded", version="1") - before == 1, p
    assert server.writer.flush(30)
    reader = predlog.open_reader(log_settings)
    try:
        rows = reader.query("SELECT item_index, status FROM predictions WHERE request_id = 'req-429'", {})
    finally:
        reader.close()
    assert list(rows["item_index"]) == [-1] and list(rows["status"]) == ["overloaded"]  # not a server error


async def test_grpc_deadline_drops_queued_work(served, monkeypatch):
    """The expired RPC's queued work is dropped, the request is logged as a ``cancelled`` failure row
    (the canary gate counts it), and the server goes on serving."""
    import asyncio

    import grpc
    from kserve import InferenceGRPCClient, InferInput, InferRequest

    server, base, log_settings = served
    batcher = production_batcher(server)
    spy = GatedEncode(batcher._encode_tokens)
    monkeypatch.setattr(batcher, "_encode_tokens", spy)
    dropped_before = batcher.stats.dropped_requests
    cancelled = {"protocol": "v2-grpc", "outcome": "cancelled", "version": "1"}
    cancelled_before = sample("motlens_requests_total", **cancelled)
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        first = asyncio.ensure_future(client.post(f"/v1/models/{MODEL}:predict", json={"instances": unique_texts(1)}))
        assert await asyncio.to_thread(spy.entered.wait, 60)
        abandoned = unique_texts(1)
        grpc_client = InferenceGRPCClient(f"127.0.0.1:{server.settings.grpc_port}", retries=0)
        try:
            inp = InferInput("text", [1], "BYTES")
            inp.set_data_from_numpy(np.array([abandoned[0].encode()], dtype=np.object_))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await grpc_client.infer(InferRequest(MODEL, [inp], request_id="req-deadline"), timeout=0.5)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # the server notices the cancelled RPC and drops its queued work
            await async_wait_until(lambda: batcher.stats.dropped_requests > dropped_before)
            spy.gate.set()
            assert (await first).status_code == 200
            inp = InferInput("text", [1], "BYTES")  # and it goes on serving gRPC
            inp.set_data_from_numpy(np.array([t.encode() for t in unique_texts(1)], dtype=np.object_))
            assert (await grpc_client.infer(InferRequest(MODEL, [inp]), timeout=60)).model_version == "1"
        finally:
            await grpc_client.close()
    assert all(token_ids(batcher, abandoned[0]) not in call for call in spy.calls)
    assert sample("motlens_requests_total", **cancelled) - cancelled_before == 1
    rows = _logged_soon(server, log_settings, "req-deadline")
    assert [{k: r[k] for k in ("item_index", "status", "protocol", "model_version", "slot")} for r in rows] == [
        {"item_index": -1, "status": "cancelled", "protocol": "v2-grpc", "model_version": "1", "slot": "production"}
    ]
    assert 400 <= rows[0]["latency_ms"] < 30_000  # the time until the deadline cancelled it


def test_http_client_disconnect_drops_queued_work(served, monkeypatch):
    """A client that hangs up cancels its handler: queued work dropped, a ``cancelled`` failure row logged."""
    server, base, log_settings = served
    batcher = production_batcher(server)
    spy = GatedEncode(batcher._encode_tokens)
    monkeypatch.setattr(batcher, "_encode_tokens", spy)
    dropped_before = batcher.stats.dropped_requests
    gone_before = sample("motlens_rejected_total", reason="client_disconnected")
    abandoned = unique_texts(1)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(
            httpx.post, f"{base}/v1/models/{MODEL}:predict", json={"instances": unique_texts(1)}, timeout=120
        )
        assert spy.entered.wait(60)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(
                f"{base}/v1/models/{MODEL}:predict",
                json={"instances": abandoned},
                headers={"x-request-id": "req-hung-up"},
                timeout=0.5,
            )
        wait_until(lambda: batcher.stats.dropped_requests > dropped_before)
        spy.gate.set()
        assert first.result().status_code == 200
    assert all(token_ids(batcher, abandoned[0]) not in call for call in spy.calls)
    assert sample("motlens_rejected_total", reason="client_disconnected") - gone_before == 1
    rows = _logged_soon(server, log_settings, "req-hung-up")
    assert [{k: r[k] for k in ("item_index", "status", "protocol", "model_version", "slot")} for r in rows] == [
        {"item_index": -1, "status": "cancelled", "protocol": "v1", "model_version": "1", "slot": "production"}
    ]


def test_slot_operations_under_load_fail_no_request(served, bundle_v2, tiny_bundle, tmp_path):
    _, base, _ = served
    admin = f"{base}/motlens/admin"
    stop = threading.Event()
    outcomes: list[tuple[int, str | None]] = []

    def load() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": unique_texts(2)})
                    outcomes.append((r.status_code, r.json().get("model_version")))
                except Exception as e:  # noqa: BLE001 - a transport failure is a failed request too
                    outcomes.append((-1, repr(e)))

    def versions_seen(since: int) -> set[str | None]:
        return {v for _, v in outcomes[since:]}

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        r = httpx.post(f"{admin}/slots/canary/load", json={"ref": str(bundle_v2)}, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["slots"]["canary"]["version"] == "2"
        assert httpx.post(f"{admin}/canary/percent", json={"percent": 50}).status_code == 200
        mark = len(outcomes)
        wait_until(lambda: versions_seen(mark) == {"1", "2"})
        r = httpx.post(f"{admin}/promote", timeout=300)
        assert r.status_code == 200 and r.json()["slots"]["production"]["version"] == "2"
        assert r.json()["slots"]["canary"]["version"] is None and r.json()["canary_percent"] == 0
        mark = len(outcomes)
        wait_until(lambda: len(outcomes) >= mark + 10)
        assert versions_seen(mark + 3) == {"2"}  # a few requests may have been routed before the swap
        # swap production back to version 1 in place, then canary 100% and roll it back
        r = httpx.post(f"{admin}/slots/production/load", json={"ref": str(tiny_bundle.root)}, timeout=300)
        assert r.status_code == 200 and r.json()["slots"]["production"]["version"] == "1"
        assert httpx.post(f"{admin}/slots/canary/load", json={"ref": str(bundle_v2)}, timeout=300).status_code == 200
        assert httpx.post(f"{admin}/canary/percent", json={"percent": 100}).status_code == 200
        mark = len(outcomes)
        wait_until(lambda: "2" in versions_seen(mark))
        r = httpx.post(f"{admin}/rollback", timeout=300)
        assert r.status_code == 200 and r.json()["slots"]["canary"]["version"] is None
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert outcomes and all(status == 200 for status, _ in outcomes), [o for o in outcomes if o[0] != 200][:5]


def test_admin_refuses_bad_operations_and_keeps_serving(served, tiny_bundle, tmp_path):
    _, base, _ = served
    admin = f"{base}/motlens/admin"
    assert httpx.post(f"{admin}/promote").status_code == 409  # no canary loaded
    assert httpx.post(f"{admin}/canary/percent", json={"percent": 150}).status_code == 409
    assert httpx.post(f"{admin}/slots/blue/load", json={"ref": str(tiny_bundle.root)}).status_code == 404
    missing = httpx.post(f"{admin}/slots/canary/load", json={"ref": str(tmp_path / "nope")}, timeout=60)
    assert missing.status_code == 422 and "does not exist" in missing.json()["error"]
    assert httpx.get(f"{admin}/slots").json()["slots"]["canary"]["error"]
    httpx.post(f"{admin}/rollback")  # the failed load is history now: the status no longer shows it
    assert httpx.get(f"{admin}/slots").json()["slots"]["canary"]["error"] is None

    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundle.root, tampered)
    (tampered / "head" / "config.json").write_text((tampered / "head" / "config.json").read_text() + " ")
    r = httpx.post(f"{admin}/slots/production/load", json={"ref": str(tampered)}, timeout=60)
    assert r.status_code == 422 and "sha256 mismatch for head/config.json" in r.json()["error"]
    assert r.json()["ready"] is True  # the old production model keeps serving
    ok = httpx.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": unique_texts(1)})
    assert ok.status_code == 200 and ok.json()["model_version"] == "1"


@pytest.mark.parametrize(
    "header", [("X-Forwarded-For", "127.0.0.1"), ("Forwarded", "for=127.0.0.1"), ("X-Real-IP", "127.0.0.1")]
)
def test_admin_without_a_token_refuses_proxied_requests_from_loopback(served, header):
    """Without a token only loopback clients may use the admin API; a request through a local proxy
    arrives from loopback too, so one carrying a forwarding header is refused whatever it claims."""
    _, base, _ = served
    url = f"{base}/motlens/admin/slots"
    assert httpx.get(url).status_code == 200  # the test client is on loopback
    r = httpx.get(url, headers=dict([header]))
    assert r.status_code == 403 and "never proxied requests" in r.json()["error"]


def test_admin_token_is_required_when_set(served, monkeypatch):
    from pydantic import SecretStr

    server, base, _ = served
    monkeypatch.setattr(server.settings, "admin_token", SecretStr("s3cret"))
    url = f"{base}/motlens/admin/slots"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = httpx.get(url, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["ready"] is True
    # the token is checked before the body is read: no 422 (and no echo of it) for a stranger
    load = f"{base}/motlens/admin/slots/canary/load"
    assert httpx.post(load, content=b"x" * (1 << 20)).status_code == 401
    assert httpx.post(f"{base}/motlens/admin/canary/percent", json={"percent": "nope"}).status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    big = httpx.post(load, content=b"x" * (1 << 20), headers=auth)
    assert big.status_code == 413 and "x" * 100 not in big.text
    for body in ({"percent": "nope"}, {"percent": float("nan")}, {}, {"percent": True}, {"percent": "25"}):
        bad = httpx.post(f"{base}/motlens/admin/canary/percent", content=_json_bytes(body), headers=auth)
        assert bad.status_code == 422 and "bad admin request" in bad.json()["error"], bad.text
    assert httpx.post(load, json={"ref": ""}, headers=auth).status_code == 422


def _json_bytes(doc) -> bytes:
    import json

    return json.dumps(doc).encode()  # NaN as the bare token NaN, which JSON has not


CONTEXT = ("make", "model", "fuel_type", "vehicle_age_years", "odometer_miles")


def _logged(log_settings, request_id: str):
    """Every column of ``request_id``'s rows (embeddings decoded), by item."""
    import predlog
    from predlog.queries import EMBEDDING, ROW_COLUMNS

    reader = predlog.open_reader(log_settings)
    try:
        return reader.query(
            f"SELECT {ROW_COLUMNS}, {EMBEDDING} FROM predictions WHERE request_id = {{rid:String}} ORDER BY item_index",
            {"rid": request_id},
        )
    finally:
        reader.close()


def _logged_soon(server, log_settings, request_id: str) -> list[dict]:
    """``request_id``'s rows once there are any (a cancelled handler logs after its client has heard)."""
    rows: list[dict] = []

    def found() -> bool:
        assert server.writer.flush(30)
        rows[:] = _logged(log_settings, request_id).to_dict("records")
        return bool(rows)

    wait_until(found, timeout=30)
    return rows


def _served_model_info(server) -> tuple[str, str]:
    """(backend, device) of the production slot, as the slot and motlens_model_info both say."""
    from prometheus_client import REGISTRY

    be = server.slots.slots["production"].unit.backend
    info = {
        (s.labels["backend"], s.labels["device"])
        for metric in REGISTRY.collect()
        if metric.name == "motlens_model_info"
        for s in metric.samples
        if s.value == 1 and s.labels["slot"] == "production" and s.labels["run_id"] == be.run_id
    }
    assert info == {(be.backend_name, be.device)}, info
    return be.backend_name, be.device


def _predict(base: str, instances: list, request_id: str) -> list[dict]:
    r = httpx.post(
        f"{base}/v1/models/{MODEL}:predict",
        json={"instances": instances, "parameters": {"return_embedding": True}},
        headers={"x-request-id": request_id},
    )
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def _missing(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v))


def assert_rows_match(rows, instances: list[dict], preds: list[dict], hits: list[bool], backend: tuple[str, str]):
    """Every logged column against what was sent and answered; returns the rows' embeddings (or None)."""
    from motlens.embedder import normalise_text
    from predlog.records import text_hash

    assert list(rows["item_index"]) == list(range(len(instances)))
    assert set(rows["model_name"]) == {MODEL} and set(rows["model_version"]) == {"1"}
    assert set(rows["slot"]) == {"production"} and set(rows["protocol"]) == {"v1"} and set(rows["status"]) == {"ok"}
    assert set(zip(rows["backend"], rows["device"], strict=True)) == {backend}
    assert len(set(rows["latency_ms"])) == 1 and rows["latency_ms"].iloc[0] > 0  # the request's latency, per item
    assert rows["ts"].nunique() == 1  # and its time
    assert [bool(h) for h in rows["cache_hit"]] == hits
    assert list(rows["text"]) == [i["text"] for i in instances]
    assert [int(h) for h in rows["text_hash"]] == [text_hash(normalise_text(i["text"])) for i in instances]
    assert list(rows["section"]) == [p["section"] for p in preds]
    assert list(rows["severity"]) == [p["severity"] for p in preds]
    np.testing.assert_allclose(rows["section_score"], [p["section_score"] for p in preds], rtol=1e-6)
    np.testing.assert_allclose(rows["fail_probability"], [p["fail_probability"] for p in preds], rtol=1e-6)
    for name in CONTEXT:
        for i, (got, inst) in enumerate(zip(rows[name], instances, strict=True)):
            want = inst.get(name)
            if want is None:
                assert _missing(got), (name, i, got)
            elif isinstance(want, str):
                assert not _missing(got) and got == want, (name, i, got)
            else:
                assert not _missing(got) and float(got) == pytest.approx(want, rel=1e-6), (name, i, got)
    out = []
    for emb, p in zip(rows["embedding"], preds, strict=True):
        if len(emb) == 0:
            out.append(None)
            continue
        served = np.asarray(p["embedding"], np.float32)
        cos = float(np.dot(emb, served) / np.linalg.norm(emb) / np.linalg.norm(served))
        assert cos >= 0.999, cos
        out.append(cos)
    return out


def test_every_prediction_reaches_the_prediction_log(served):
    """Each item's row holds its text, context, labels, scores, cache hit, latency, backend and device."""
    server, base, log_settings = served
    backend = _served_model_info(server)
    texts = varied_texts(4)
    first = [
        {"text": texts[0], "make": "FORD", "model": "FOCUS", "fuel_type": "PE",
         "vehicle_age_years": 9.5, "odometer_miles": 81000},
        {"text": texts[1], "make": "VAUXHALL", "fuel_type": "DI", "vehicle_age_years": 3},  # no model, no odometer
        {"text": texts[2]},  # no context at all
    ]  # fmt: skip
    second = [
        {"text": texts[0], "make": "TOYOTA", "model": "YARIS", "fuel_type": "HY",
         "vehicle_age_years": 12.25, "odometer_miles": 120500.5},  # seen before: a cache hit
        {"text": texts[3], "odometer_miles": 5},
    ]  # fmt: skip
    preds = {"req-42": _predict(base, first, "req-42"), "req-43": _predict(base, second, "req-43")}
    assert len({p["severity"] for p in preds["req-42"]}) > 1  # varied labels: a swapped or constant column shows
    assert server.writer.flush(30)
    assert_rows_match(_logged(log_settings, "req-42"), first, preds["req-42"], [False] * 3, backend)
    assert_rows_match(_logged(log_settings, "req-43"), second, preds["req-43"], [True, False], backend)
    assert server.model.sample_rate == server.settings.log_embedding_sample_rate == 0.5


@pytest.mark.parametrize("rate", [1.0, 0.0])
def test_logged_embeddings_follow_the_sample_rate(served, monkeypatch, rate):
    """Rate 1: every row carries the served embedding (cosine >= 0.999); rate 0: none does."""
    server, base, log_settings = served
    monkeypatch.setattr(server.model, "sample_rate", rate)  # what --log-embedding-sample-rate sets
    instances = [{"text": t} for t in varied_texts(6)]
    rid = f"req-rate-{rate}"
    preds = _predict(base, instances, rid)
    assert server.writer.flush(30)
    cosines = assert_rows_match(_logged(log_settings, rid), instances, preds, [False] * 6, _served_model_info(server))
    assert all(c is not None for c in cosines) if rate == 1.0 else cosines == [None] * 6


def test_a_server_error_is_logged_as_an_error_row(served, monkeypatch):
    import predlog

    server, base, log_settings = served

    def broken(ids):
        raise RuntimeError("backend exploded")

    monkeypatch.setattr(production_batcher(server), "_encode_tokens", broken)
    r = httpx.post(
        f"{base}/v1/models/{MODEL}:predict", json={"instances": unique_texts(3)}, headers={"x-request-id": "req-500"}
    )
    assert r.status_code == 500
    assert r.json() == {"error": "internal server error", "request_id": "req-500"}  # the detail stays in the log
    texts = unique_texts(2)
    r2 = httpx.post(
        f"{base}/v2/models/{MODEL}/infer",
        json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": texts}]},
    )
    assert r2.status_code == 500 and r2.json()["error"] == "internal server error"
    generated = r2.json()["request_id"]  # no id sent: the generated one, as in the log row
    assert generated == r2.headers["x-request-id"]
    assert server.writer.flush(30)
    reader = predlog.open_reader(log_settings)
    try:
        rows = reader.query(
            "SELECT item_index, slot, model_version, protocol, status, latency_ms "
            "FROM predictions WHERE request_id = {rid:String}",
            {"rid": "req-500"},
        )
        v2_rows = reader.query(
            "SELECT protocol, status FROM predictions WHERE request_id = {rid:String}", {"rid": generated}
        )
    finally:
        reader.close()
    assert list(v2_rows["protocol"]) == ["v2-rest"] and list(v2_rows["status"]) == ["server_error"]
    assert list(rows["item_index"]) == [-1] and list(rows["status"]) == ["server_error"]
    assert list(rows["slot"]) == ["production"] and list(rows["model_version"]) == ["1"]
    assert list(rows["protocol"]) == ["v1"] and rows["latency_ms"].iloc[0] > 0


def test_rows_that_cannot_be_built_cost_the_log_not_the_answer(served, monkeypatch, caplog):
    """A failure building the request's rows (here: the text hash) is logged; the client still gets
    its 200 and its predictions, not a 500 for a prediction that was made."""
    import predlog.records

    server, base, log_settings = served

    def broken(key: str) -> int:
        raise RuntimeError("hash exploded")

    monkeypatch.setattr(predlog.records, "text_hash", broken)
    with caplog.at_level("ERROR", logger="predictor.model"):
        preds = _predict(base, [{"text": t} for t in unique_texts(2)], "req-unlogged")
    assert len(preds) == 2 and all(p["section"] for p in preds)
    assert "cannot log the rows of request req-unlogged" in caplog.text and "hash exploded" in caplog.text
    assert server.writer.flush(30)
    assert len(_logged(log_settings, "req-unlogged")) == 0


def test_v2_and_grpc_log_rows_carry_the_resolved_request_id(served, monkeypatch):
    """Body id, else x-request-id (REST header, gRPC metadata): the id a client can join the log on,
    also from a 500's body and header."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    import predlog

    server, base, log_settings = served

    def v2(n: int, **extra) -> dict:
        return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [n], "data": unique_texts(n)}], **extra}

    infer = f"{base}/v2/models/{MODEL}/infer"
    assert httpx.post(infer, json=v2(2), headers={"x-request-id": "v2-header"}).status_code == 200
    assert httpx.post(infer, json=v2(1, id="v2-body"), headers={"x-request-id": "ignored"}).status_code == 200
    stub = GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.settings.grpc_port}"))
    text = pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"Horn not working"])
    )
    g = stub.ModelInfer(pb.ModelInferRequest(model_name=MODEL, inputs=[text]), metadata=[("x-request-id", "grpc-md")])
    assert g.id == "grpc-md"

    def broken(ids):
        raise RuntimeError("backend exploded")

    monkeypatch.setattr(production_batcher(server), "_encode_tokens", broken)
    failed = httpx.post(infer, json=v2(1, id="v2-500"))
    assert failed.status_code == 500
    assert failed.json() == {"error": "internal server error", "request_id": "v2-500"}
    assert failed.headers["x-request-id"] == "v2-500"
    assert server.writer.flush(30)
    reader = predlog.open_reader(log_settings)
    try:
        rows = reader.query(
            "SELECT request_id, protocol, status FROM predictions WHERE request_id IN "
            "('v2-header', 'v2-body', 'grpc-md', 'v2-500', 'ignored') ORDER BY request_id, item_index",
            {},
        )
    finally:
        reader.close()
    assert list(zip(rows["request_id"], rows["protocol"], rows["status"], strict=True)) == [
        ("grpc-md", "v2-grpc", "ok"),
        ("v2-500", "v2-rest", "server_error"),
        ("v2-body", "v2-rest", "ok"),
        ("v2-header", "v2-rest", "ok"),
        ("v2-header", "v2-rest", "ok"),
    ]


def test_an_unexpected_warm_up_failure_is_a_load_error(served, bundle_v2, monkeypatch):
    from predictor.backend import Backend

    _, base, _ = served

    def oom(self):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(Backend, "warm_up", oom)
    r = httpx.post(f"{base}/motlens/admin/slots/canary/load", json={"ref": str(bundle_v2)}, timeout=120)
    assert r.status_code == 422 and "CUDA out of memory" in r.json()["error"], r.text
    ok = httpx.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": unique_texts(1)})
    assert ok.status_code == 200 and ok.json()["model_version"] == "1"


def test_bucket_bound_follows_the_device_unless_set():
    from predictor.settings import ServeSettings

    assert ServeSettings().resolved_batch_max_tokens("cpu") == 768
    assert ServeSettings().resolved_batch_max_tokens("cpu", packs=True) == 4096
    assert ServeSettings().resolved_batch_max_tokens("cuda:0") == 65536
    assert ServeSettings(batch_max_tokens=4096).resolved_batch_max_tokens("cpu") == 4096
    with pytest.raises(ValueError):
        ServeSettings(batch_max_tokens=0)


def test_served_batcher_uses_the_device_bound(served):
    server, _, _ = served
    assert production_batcher(server).max_tokens == 768  # the test server runs on CPU


def test_a_rejected_candidate_does_not_overwrite_the_serving_slots_golden_figures(served, tiny_bundle, tmp_path):
    import json

    import numpy as np
    from prometheus_client import REGISTRY
    from safetensors.numpy import load_file, save_file

    from motlens.bundle import MANIFEST, write_manifest

    _, base, _ = served
    before = REGISTRY.get_sample_value("motlens_golden_passed", {"slot": "production"})
    assert before == 1
    bad = tmp_path / "resigned"
    shutil.copytree(tiny_bundle.root, bad)
    weights = bad / "head" / "weights.safetensors"
    tensors = load_file(weights)
    tensors["section.weight"] = np.roll(tensors["section.weight"], 1, axis=0)  # every label changes
    tensors["section.bias"] = np.roll(tensors["section.bias"], 1, axis=0)
    weights.unlink()
    save_file(tensors, weights)
    fields = {k: v for k, v in json.loads((bad / MANIFEST).read_text()).items() if k != "files"}
    (bad / MANIFEST).unlink()
    write_manifest(bad, **fields)  # hashes match: only the golden check can tell
    r = httpx.post(f"{base}/motlens/admin/slots/production/load", json={"ref": str(bad)}, timeout=120)
    assert r.status_code == 422 and "golden set not reproduced" in r.json()["error"]
    assert REGISTRY.get_sample_value("motlens_golden_passed", {"slot": "production"}) == 1  # v1 still serves
