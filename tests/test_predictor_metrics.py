"""The predictor's request series: every refused request counted once, per model version, and a
retired version's series and an emptied slot's figures gone (scraped from the real server)."""

from __future__ import annotations

import gzip
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from prometheus_client import REGISTRY

MODEL = "mot-defects"
V1 = f"/v1/models/{MODEL}:predict"
V2 = f"/v2/models/{MODEL}/infer"
TEXT = "Nearside Front Brake pipe corroded (1.1.11 (c))"
V2_VERSION = "4242"  # no other test serves it: its series are this module's alone


def requests_total(protocol: str, outcome: str, version: str = "") -> float:
    labels = {"protocol": protocol, "outcome": outcome, "version": version}
    return REGISTRY.get_sample_value("motlens_requests_total", labels) or 0.0


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def v2_body(texts: list[str]) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}


@pytest.fixture(scope="module")
def bundle_v2(tiny_bundle, tmp_path_factory):
    from motlens.bundle import write_manifest

    root = tmp_path_factory.mktemp("metrics-v2") / MODEL
    shutil.copytree(tiny_bundle.root, root)
    write_manifest(root, version=V2_VERSION, run_id="tiny-metrics")
    return root


@pytest.fixture(scope="module")
def server(tiny_bundle, embedder):
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings

    settings = ServeSettings(
        model=str(tiny_bundle.root),
        http_port=free_port(),
        grpc_port=free_port(),
        enable_grpc=False,
        max_items_per_request=8,
        max_body_bytes=16 * 1024,
        admin_enabled=True,
        retired_series_grace_s=5.0,  # long enough to look at on a loaded box
    )
    srv = PredictorServer(settings, embedder=embedder, host="127.0.0.1")
    thread = ServerThread(srv).start().wait_ready()
    yield f"http://127.0.0.1:{settings.http_port}"
    thread.stop()


@pytest.mark.parametrize(
    ("protocol", "path", "send", "status", "reason"),
    [
        ("v2-rest", V2, {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
         "invalid_input"),
        ("v1", V1, {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "invalid_input"),
        ("v2-rest", V2, {"json": v2_body([""])}, 400, "invalid_input"),  # refused inside predict
        ("v1", V1, {"json": {"instances": [TEXT] * 9}}, 400, "invalid_input"),  # over the item limit
        ("v2-rest", V2, {"content": gzip.compress(b"{}"), "headers": {"content-encoding": "gzip"}}, 415,
         "unsupported_media"),
        ("v1", V1, {"json": {"instances": ["z" * 90] * 400}}, 413, "body_too_large"),
        ("v2-rest", f"/v2/models/{MODEL}/versions/7/infer", {"json": v2_body([TEXT])}, 404, None),
    ],
)  # fmt: skip
def test_a_refused_request_is_counted_once(server, protocol, path, send, status, reason):
    before = requests_total(protocol, "client_error")
    rejected = (sample("motlens_rejected_total", reason=reason) or 0.0) if reason else 0.0
    r = httpx.post(server + path, **send)
    assert r.status_code == status, r.text
    assert requests_total(protocol, "client_error") == before + 1
    if reason:
        assert sample("motlens_rejected_total", reason=reason) == rejected + 1


def test_a_refused_grpc_infer_is_counted_once(tiny_server):
    """REST counted its refusals before predict; gRPC counted only those inside predict."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    server, _ = tiny_server
    stub = GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.settings.grpc_port}"))
    text = pb.InferTensorContents(bytes_contents=[TEXT.encode()])
    for name, code in [("other", grpc.StatusCode.NOT_FOUND), (MODEL, grpc.StatusCode.INVALID_ARGUMENT)]:
        tensor = pb.ModelInferRequest.InferInputTensor(name="txt", datatype="BYTES", shape=[1], contents=text)
        before = requests_total("v2-grpc", "client_error")
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(pb.ModelInferRequest(model_name=name, inputs=[tensor]), timeout=30)
        assert info.value.code() == code
        assert requests_total("v2-grpc", "client_error") == before + 1, name


def test_a_long_bad_value_is_not_echoed_whole(server):
    body = v2_body([TEXT])
    body["inputs"].append({"name": "odometer_miles", "datatype": "FP32", "shape": [1], "data": ["x" * 10_000]})
    r = httpx.post(server + V2, json=body)
    assert r.status_code == 400
    message = r.json()["error"]
    assert message.startswith("input 'odometer_miles' (FP32) must hold numbers, got 'xxx")
    assert len(message) <= 300


def test_requests_are_counted_by_the_version_that_answered(server, bundle_v2):
    admin = f"{server}/motlens/admin"
    ok1, ok2 = requests_total("v2-rest", "ok", "1"), requests_total("v2-rest", "ok", V2_VERSION)
    latency1 = sample("motlens_request_latency_seconds_count", protocol="v2-rest", version="1") or 0.0
    assert httpx.post(f"{admin}/slots/canary/load", json={"ref": str(bundle_v2)}, timeout=300).status_code == 200
    assert sample("motlens_golden_passed", slot="canary") == 1.0
    for version, n in (("1", 3), (V2_VERSION, 2)):
        for _ in range(n):
            r = httpx.post(f"{server}/v2/models/{MODEL}/versions/{version}/infer", json=v2_body([TEXT]))
            assert r.status_code == 200 and r.json()["model_version"] == version
    assert requests_total("v2-rest", "ok", "1") == ok1 + 3
    assert requests_total("v2-rest", "ok", V2_VERSION) == ok2 + 2
    assert sample("motlens_request_latency_seconds_count", protocol="v2-rest", version="1") == latency1 + 3
    assert sample("motlens_request_latency_seconds_count", protocol="v2-rest", version=V2_VERSION) == 2
    assert sample("motlens_items_total", protocol="v2-rest", outcome="ok", version=V2_VERSION) == 2

    # the HTTP layer's own histogram, labelled with the version that answered
    http2 = {"protocol": "v2-rest", "code": "2xx", "version": V2_VERSION}
    assert sample("motlens_http_request_duration_seconds_count", **http2) == 2
    assert (sample("motlens_http_request_duration_seconds_count", protocol="v2-rest", code="2xx", version="1")
            or 0) >= 3  # fmt: skip
    assert httpx.post(f"{server}{V2}", content=b"{not json").status_code == 400  # no version answered
    assert (sample("motlens_http_request_duration_seconds_count", protocol="v2-rest", code="4xx", version="")
            or 0) >= 1  # fmt: skip

    r = httpx.post(f"{admin}/rollback", timeout=120)
    retired_at = time.monotonic()
    assert r.status_code == 200 and r.json()["slots"]["canary"]["version"] is None
    # the retired version's series stay for the grace period (its last requests are scraped) …
    assert sample("motlens_requests_total", protocol="v2-rest", outcome="ok", version=V2_VERSION) == ok2 + 2
    assert sample("motlens_http_request_duration_seconds_count", **http2) == 2
    assert time.monotonic() - retired_at < 5.0, "too slow to see the grace period"
    # … then go, and the emptied canary slot shows no figures of it
    deadline = time.monotonic() + 30
    while sample("motlens_requests_total", protocol="v2-rest", outcome="ok", version=V2_VERSION) is not None:
        assert time.monotonic() < deadline, "the retired version's series outlived the grace period"
        time.sleep(0.1)
    assert sample("motlens_request_latency_seconds_count", protocol="v2-rest", version=V2_VERSION) is None
    assert sample("motlens_http_request_duration_seconds_count", **http2) is None
    for gauge in ("motlens_golden_passed", "motlens_golden_min_cosine", "motlens_model_load_seconds"):
        assert sample(gauge, slot="canary") is None, gauge
        assert sample(gauge, slot="production") is not None, gauge
    assert sample("motlens_model_ready", slot="canary") == 0.0
    assert requests_total("v2-rest", "ok", "1") == ok1 + 3  # the serving version keeps its counts


def test_a_refused_load_is_counted(server, bad_golden_bundle, tmp_path):
    admin = f"{server}/motlens/admin"
    golden = sample("motlens_model_load_failures_total", slot="canary", reason="golden_failed") or 0.0
    failed = sample("motlens_model_load_failures_total", slot="canary", reason="load_failed") or 0.0
    r = httpx.post(f"{admin}/slots/canary/load", json={"ref": str(bad_golden_bundle)}, timeout=300)
    assert r.status_code == 422
    r = httpx.post(f"{admin}/slots/canary/load", json={"ref": str(tmp_path / "nope")}, timeout=60)
    assert r.status_code == 422
    assert sample("motlens_model_load_failures_total", slot="canary", reason="golden_failed") == golden + 1
    assert sample("motlens_model_load_failures_total", slot="canary", reason="load_failed") == failed + 1


def test_rest_requests_while_nothing_is_loaded_count_as_unavailable(tmp_path, embedder):
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings

    settings = ServeSettings(
        model=str(tmp_path / "missing"), http_port=free_port(), grpc_port=free_port(), enable_grpc=False
    )
    srv = PredictorServer(settings, embedder=embedder, host="127.0.0.1")
    thread = ServerThread(srv).start()
    try:
        base = f"http://127.0.0.1:{settings.http_port}"
        for _ in range(600):
            try:
                httpx.get(f"{base}/v2/health/live")
                break
            except httpx.TransportError:
                time.sleep(0.05)
        v1, v2 = requests_total("v1", "unavailable"), requests_total("v2-rest", "unavailable")
        assert httpx.post(base + V1, json={"instances": [TEXT]}).status_code == 503
        assert httpx.post(base + V2, json=v2_body([TEXT])).status_code == 503
        assert requests_total("v1", "unavailable") == v1 + 1
        assert requests_total("v2-rest", "unavailable") == v2 + 1
    finally:
        thread.stop()


def test_a_version_loaded_again_within_its_grace_period_keeps_its_series():
    from predictor import metrics

    version = "grace-unit-test"
    labels = ("v1", "ok", version)
    metrics.hold_version(version)
    metrics.by_version(metrics.REQUESTS, *labels).inc()
    metrics.release_version(version, grace_s=2.0)
    assert requests_total(*labels) == 1.0 and metrics.version_known(version)  # kept while in grace
    metrics.hold_version(version)  # loaded again: the pending removal is cancelled
    time.sleep(2.5)
    assert requests_total(*labels) == 1.0
    metrics.release_version(version, grace_s=0.1)
    deadline = time.monotonic() + 5
    while sample("motlens_requests_total", protocol="v1", outcome="ok", version=version) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not metrics.version_known(version)


def test_an_http_observation_racing_the_grace_expiry_leaves_no_series(monkeypatch):
    """observe_http checked the version and registered its series outside the lock: a grace timer
    expiring in between dropped the series, then the observation created it again, never removed."""
    from predictor import metrics

    version = "race-9"
    metrics.hold_version(version)
    metrics.release_version(version, grace_s=0.2)
    real = metrics.HTTP_LATENCY.labels

    def slow_labels(*labels):  # noqa: ANN002, ANN202 - the request thread preempted before the child exists
        time.sleep(0.5)
        return real(*labels)

    monkeypatch.setattr(metrics.HTTP_LATENCY, "labels", slow_labels)
    metrics.observe_http("v2-rest", 200, version, 0.01)
    monkeypatch.undo()
    deadline = time.monotonic() + 5
    while metrics.version_known(version) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)
    left = [s for m in REGISTRY.collect() for s in m.samples if s.labels.get("version") == version]
    assert left == [], left


def test_request_counters_exist_at_zero_before_their_first_request():
    """A child first scraped already holding a burst adds nothing to rate() (MotlensErrorRateHigh):
    the refusals (version '') exist at 0 from import, a version's outcomes while a unit holds it."""
    import subprocess
    import sys

    from predictor import metrics

    script = (
        "from prometheus_client import REGISTRY\n"
        "from predictor import metrics as m\n"
        "labels = [{'protocol': p, 'outcome': o, 'version': ''} for p in m.PROTOCOLS for o in m.REFUSED_OUTCOMES]\n"
        "print(sorted({REGISTRY.get_sample_value('motlens_requests_total', x) for x in labels}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert out.stdout.strip() == "[0.0]"
    version = "preinit-unit-test"
    metrics.hold_version(version)
    for protocol in metrics.PROTOCOLS:
        for outcome in metrics.SERVED_OUTCOMES:
            assert sample("motlens_requests_total", protocol=protocol, outcome=outcome, version=version) == 0.0
    metrics.release_version(version)  # and they go with the version's other series
    assert not [s for m in REGISTRY.collect() for s in m.samples if s.labels.get("version") == version]


def test_a_full_gpu_sized_batch_lands_in_a_finite_batch_size_bucket():
    """The batch-size histogram stopped at 512 while the GPU check serves batches of up to 1,024 (and
    settings allow more): a full batch was only in +Inf, so the dashboard's p95 could not show it."""
    import re
    from pathlib import Path

    from predictor import metrics

    script = (Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh").read_text()
    gpu_items = int(re.search(r"--batch-max-items (\d+)", script).group(1))  # type: ignore[union-attr]
    assert metrics.BATCH_SIZE._upper_bounds[-2] >= 4 * gpu_items
