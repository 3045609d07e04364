"""Faults injected into a running predictor: ClickHouse down, the spool limit reached while it is down,
MLflow down at start, a corrupted or tampered bundle. Requests keep being answered; nothing is lost
silently (rows are spilled and replayed, or dropped by the documented policy and counted)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import free_port, migrated_reader
from prometheus_client import REGISTRY

MODEL = "mot-defects"
_ids = itertools.count()


def wait_until(condition, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def metric(base: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def not_ready_with(base: str, label: str, detail: str, headers: dict[str, str] | None = None) -> bool:
    """/motlens/ready says 503 with ``detail`` and the gauge shows ``label`` (not between two retries)."""
    try:
        ready = httpx.get(f"{base}/motlens/ready", headers=headers, timeout=10)
    except httpx.TransportError:
        return False  # not listening yet
    return (
        ready.status_code == 503
        and detail in ready.json()["reason"]
        and metric(base, "motlens_model_not_ready", reason=label) == 1
    )


def start_server(model: str, embedder, writer=None, **overrides):
    """A real predictor in a thread (not waited for); returns (thread, base URL)."""
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings

    settings = ServeSettings(
        model=model,
        http_port=free_port(),
        grpc_port=free_port(),
        **{"enable_grpc": False, "grace_period_s": 20, **overrides},
    )
    thread = ServerThread(PredictorServer(settings, embedder=embedder, writer=writer, host="127.0.0.1")).start()
    return thread, f"http://127.0.0.1:{settings.http_port}"


def predict_sequentially(base: str, n: int) -> list[tuple[str, int]]:
    """``n`` requests of 2 texts one after another; returns (request_id, status) in order."""
    out = []
    with httpx.Client(timeout=120) as client:
        for _ in range(n):
            rid = f"fault-{next(_ids)}-{uuid.uuid4().hex[:8]}"
            texts = [f"Offside Front Coil spring fractured, case {rid} (5.3.1 (b))", "Horn not working"]
            r = client.post(
                f"{base}/v1/models/{MODEL}:predict", json={"instances": texts}, headers={"x-request-id": rid}
            )
            out.append((rid, r.status_code))
    return out


def replay_into_chdb(spool_root: Path, audit: list[str] | None = None) -> list[tuple[str, int]]:
    """Replay a writer's spool into a fresh chdb database (a sink that is up); the stored (request_id, item).
    ``audit`` gets the actions of the stored ``promotion_events`` rows, in ``ts`` order."""
    import predlog
    from predlog.settings import PredlogSettings
    from predlog.spool import EVENTS_SPOOL, SINK_FILE

    settings = PredlogSettings(
        clickhouse_url="chdb://memory", database=f"replay_{uuid.uuid4().hex[:10]}", dir=spool_root,
        flush_interval_s=0.05,
    )  # fmt: skip
    reader = migrated_reader(settings)  # creates the tables, keeps the in-process engine open
    # chdb stands in for the server that was down: bind the spools to it (docs/predlog.md)
    for folder in (settings.spool_dir, settings.spool_dir / EVENTS_SPOOL):
        (folder / SINK_FILE).write_text(settings.sink.to_json())
    try:
        writer = predlog.open_writer(settings)
        writer.close(30)  # close drains the spool into the sink
        assert writer.stats()["spool_rows"] == 0 and writer.stats()["events"]["spool_rows"] == 0
        got = reader.client.query(
            f"SELECT request_id, item_index FROM {settings.database}.predictions ORDER BY request_id, item_index"
        ).result_rows
        if audit is not None:
            audit += [a for (a,) in reader.client.query(
                f"SELECT action FROM {settings.database}.promotion_events ORDER BY ts"
            ).result_rows]  # fmt: skip
        reader.client.command(f"DROP DATABASE {settings.database}")
    finally:
        reader.close()
    return [(r, int(i)) for r, i in got]


def clickhouse_down_writer(monkeypatch, tmp_path: Path, **overrides):
    """The prediction-log writer pointed (``MOTLENS_CLICKHOUSE_URL``) at a closed localhost port."""
    import predlog
    from predlog.settings import PredlogSettings

    monkeypatch.setenv("MOTLENS_CLICKHOUSE_URL", f"http://default@127.0.0.1:{free_port()}/default")
    settings = PredlogSettings(
        dir=tmp_path / "predlog", batch_rows=4, flush_interval_s=0.05, retry_initial_s=0.05, retry_max_s=0.2,
        connect_timeout_s=1, **overrides,
    )  # fmt: skip
    assert not settings.embedded
    return predlog.open_writer(settings), settings


@pytest.mark.slow
def test_clickhouse_down_while_serving_no_request_error_rows_spilled_then_replayed(
    tiny_bundle, embedder, tmp_path, monkeypatch
):
    writer, settings = clickhouse_down_writer(monkeypatch, tmp_path)
    spilled_before = REGISTRY.get_sample_value("motlens_predlog_rows_spilled_total") or 0.0
    thread, base = start_server(str(tiny_bundle.root), embedder, writer)
    try:
        thread.wait_ready()
        sent = predict_sequentially(base, 15)
        assert writer.flush(30)
        down = writer.stats()
    finally:
        thread.stop()  # closes the writer: what the sink did not take stays in the spool
    assert [s for _, s in sent] == [200] * 15
    assert not down["sink_ok"] and down["written"] == 0 and down["dropped"] == 0
    assert down["spool_rows"] == 30
    assert (REGISTRY.get_sample_value("motlens_predlog_rows_spilled_total") or 0.0) - spilled_before == 30
    segments = sorted((settings.spool_dir).glob("*.arrow"))
    assert segments and sum(int(p.name.split("-")[1]) for p in segments) == 30

    stored = replay_into_chdb(settings.root)  # the sink is back
    assert stored == sorted((rid, i) for rid, _ in sent for i in range(2))  # every row once, none lost


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
def test_spool_limit_reached_applies_the_policy_and_counts_drops(tiny_bundle, embedder, tmp_path, monkeypatch, policy):
    max_bytes = 60_000
    writer, settings = clickhouse_down_writer(
        monkeypatch, tmp_path, spool_max_bytes=max_bytes, spool_full_policy=policy
    )
    dropped_before = REGISTRY.get_sample_value("motlens_predlog_rows_dropped_total", {"reason": "spool_full"}) or 0.0
    thread, base = start_server(str(tiny_bundle.root), embedder, writer)
    try:
        thread.wait_ready()
        sent = predict_sequentially(base, 40)
        assert writer.flush(30)
        stats = writer.stats()
    finally:
        thread.stop()
    assert [s for _, s in sent] == [200] * 40  # a full spool never fails a request
    dropped = stats["dropped_by_reason"].get("spool_full", 0)
    assert dropped > 0 and stats["dropped"] == dropped and stats["spool_bytes"] <= max_bytes
    metric_delta = REGISTRY.get_sample_value("motlens_predlog_rows_dropped_total", {"reason": "spool_full"})
    assert metric_delta - dropped_before == dropped

    order = [(rid, i) for rid, _ in sent for i in range(2)]  # submission order
    kept = set(replay_into_chdb(settings.root))
    assert len(kept) + dropped == len(order)  # every row is either kept or counted as dropped
    kept_positions = sorted(order.index(row) for row in kept)
    if policy == "drop_oldest":  # whole oldest segments deleted: the newest rows survive, without a gap
        assert kept_positions == list(range(len(order) - len(kept), len(order)))
    else:  # a batch that does not fit is refused (a later, smaller one may still fit): the oldest survive
        assert kept_positions[0] == 0
    print(f"\nspool full ({policy}): {len(order)} served, {len(kept)} kept, replayed; {dropped} counted dropped")


def _mlflow_server(db: Path, port: int, log_path: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("mlflow")
    with log_path.open("w") as log_file:
        return subprocess.Popen(
            [str(exe), "server", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip


@pytest.mark.slow
def test_mlflow_down_at_start_live_not_ready_then_ready_once_reachable(
    registry, tiny_bundle, embedder, tmp_path, monkeypatch, caplog
):
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path / "server-home"))  # its own bundle cache
    caplog.set_level("ERROR", logger="predictor.slots")
    thread, base = start_server(f"models:/{MODEL}@production", embedder)
    mlflow_proc = None
    try:
        reason = f"from the registry: model registry http://127.0.0.1:{port} unreachable"  # not "alias not set"
        wait_until(lambda: not_ready_with(base, "load_failed", reason))
        assert httpx.get(f"{base}/v2/health/live", timeout=10).status_code == 200
        assert httpx.get(f"{base}/v2/models/{MODEL}/ready", timeout=10).status_code != 200
        r = httpx.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": ["Horn not working"]}, timeout=30)
        assert r.status_code == 503  # not ready: refused, not crashed

        mlflow_proc = _mlflow_server(registry.state.home / "mlflow.db", port, tmp_path / "mlflow.log")
        thread.wait_ready(timeout=300)  # the backoff loop finds the registry once it is up
        failures = [r for r in caplog.records if "cannot serve" in r.getMessage()]
        print(f"\nmlflow down: {len(failures)} failed load attempts (backoff) before ready")
        assert len(failures) >= 2  # retried (1 s, 2 s, 4 s … backoff) before it worked
        r = httpx.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": ["Horn not working"]}, timeout=60)
        assert r.status_code == 200 and r.json()["model_version"] == "1"
        assert metric(base, "motlens_model_not_ready", reason="load_failed") == 0
    finally:
        thread.stop()
        if mlflow_proc is not None:
            mlflow_proc.terminate()
            mlflow_proc.wait(60)


def test_a_load_errors_text_is_for_admin_clients_only(tmp_path, embedder):
    """/motlens/ready gives a load error's text (here a path on the server) to whoever may use the admin
    API: the bearer token when one is set, else a loopback client not behind a proxy. Anyone else
    (under KServe every request comes through the queue-proxy) gets the reason's label."""
    place = tmp_path / "private-place-7f3a"
    place.mkdir()
    (place / "weights.bin").write_bytes(b"not a bundle")
    token = "t" * 32
    thread, base = start_server(str(place), embedder, admin_token=token)
    try:
        admin = {"Authorization": f"Bearer {token}"}
        wait_until(lambda: not_ready_with(base, "load_failed", "private-place-7f3a", headers=admin))
        for headers in ({}, {"Authorization": "Bearer wrong"}, {**admin, "X-Forwarded-For": "203.0.113.9"}):
            r = httpx.get(f"{base}/motlens/ready", headers=headers, timeout=10)
            ok = headers.get("Authorization") == admin["Authorization"]  # a proxied admin still holds the token
            assert r.status_code == 503 and r.json()["ready"] is False, headers
            assert ("private-place-7f3a" in r.json()["reason"]) is ok, (headers, r.json())
            if not ok:
                assert r.json()["reason"].startswith("load_failed (the detail is in the server log"), r.json()
    finally:
        thread.stop()
    thread, base = start_server(str(place), embedder)  # no token: loopback clients see it, proxied ones not
    try:
        wait_until(lambda: not_ready_with(base, "load_failed", "private-place-7f3a"))
        proxied = httpx.get(f"{base}/motlens/ready", headers={"X-Forwarded-For": "127.0.0.1"}, timeout=10)
        assert proxied.status_code == 503 and "private-place" not in proxied.text
    finally:
        thread.stop()


def _linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a bundle whose files are hard links (cheap); replace a file before changing it."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def _tamper_head(root: Path) -> None:
    """Rotate the section rows of the head: the weights still load, the labels all change."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    path = root / "head" / "weights.safetensors"
    tensors = load_file(path)
    tensors["section.weight"] = np.roll(tensors["section.weight"], 1, axis=0)
    tensors["section.bias"] = np.roll(tensors["section.bias"], 1, axis=0)
    path.unlink()
    save_file(tensors, path)


def _corrupt(root: Path) -> tuple[str, str]:
    path = root / "head" / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.unlink()
    path.write_bytes(bytes(data))
    return "load_failed", "sha256 mismatch for head/weights.safetensors"


def _tamper_and_resign(root: Path) -> tuple[str, str]:
    from motlens.bundle import MANIFEST, write_manifest

    _tamper_head(root)
    fields = {k: v for k, v in json.loads((root / MANIFEST).read_text()).items() if k != "files"}
    (root / MANIFEST).unlink()
    write_manifest(root, **fields)  # hashes match again: only the golden check can tell
    return "golden_failed", "golden set not reproduced"


@pytest.mark.parametrize("damage", [_corrupt, _tamper_and_resign], ids=["corrupted", "tampered-resigned"])
def test_damaged_bundle_is_refused_with_its_reason(tiny_bundle, embedder, tmp_path, damage):
    root = _linked_copy(tiny_bundle.root, tmp_path / "mot-defects")
    label, detail = damage(root)
    thread, base = start_server(str(root), embedder)
    try:
        wait_until(lambda: not_ready_with(base, label, detail))  # fails if the reason is never this one
        assert httpx.get(f"{base}/v2/health/live", timeout=10).status_code == 200
        assert thread.server.slots.slots["production"].unit is None  # never served
        r = httpx.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": ["Horn not working"]}, timeout=30)
        assert r.status_code == 503
        assert r.json() == {"error": f"model {MODEL} is not ready"}  # the reason: /motlens/ready and the log
    finally:
        thread.stop()


async def test_grpc_predict_while_not_ready_is_unavailable(embedder, tmp_path):
    """Not UNKNOWN from KServe's interceptor (ModelNotReady has no .reason); the reason stays server-side."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    missing = tmp_path / "no-such-bundle"
    thread, base = start_server(str(missing), embedder, enable_grpc=True)
    try:
        wait_until(lambda: not_ready_with(base, "load_failed", "does not exist"))
        port = thread.server.settings.grpc_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            req = pb.ModelInferRequest(
                model_name=MODEL,
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(
                        name="text", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"x"])
                    )
                ],
            )
            stub = GRPCInferenceServiceStub(channel)
            error: grpc.aio.AioRpcError | None = None
            deadline = time.monotonic() + 60  # the gRPC server starts with the REST one: wait for its answer
            while time.monotonic() < deadline:
                try:
                    await stub.ModelInfer(req, timeout=10)
                except grpc.aio.AioRpcError as e:
                    error = e
                    if e.code() != grpc.StatusCode.UNAVAILABLE or "not ready" in (e.details() or ""):
                        break
                await asyncio.sleep(0.1)
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, error and error.details()
        assert error.details() == f"model {MODEL} is not ready" and str(missing) not in error.details()
    finally:
        thread.stop()
