"""On a CUDA host: the fp16 backend passes the golden gate, serves, and a slot swap returns GPU memory."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest
from conftest import free_port

from motlens.bundle import write_manifest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL = "mot-defects"


def test_fp16_backend_passes_golden_gate_and_frees_its_memory(tiny_bundle):
    from predictor.backend import load_backend

    # cuBLAS keeps a per-thread workspace in the caching allocator: create this thread's first
    (
        torch.ones(64, 64, device="cuda", dtype=torch.float16) @ torch.ones(64, 64, device="cuda", dtype=torch.float16)
    ).sum()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    backend = load_backend(str(tiny_bundle.root), device="cuda", dtype="float16")
    assert backend.golden is not None and backend.golden.passed, backend.golden
    assert backend.device.startswith("cuda")
    assert torch.cuda.memory_allocated() > before
    print(f"fp16 golden min cosine {backend.golden.min_cosine:.5f}")
    backend.close()
    assert torch.cuda.memory_allocated() <= before + (1 << 20)


def test_served_on_gpu_swap_returns_memory_without_failed_requests(tiny_bundle, tmp_path):
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings

    v2 = tmp_path / "v2"
    shutil.copytree(tiny_bundle.root, v2)
    write_manifest(v2, version="2", run_id="tiny-2")
    settings = ServeSettings(model=str(tiny_bundle.root), http_port=free_port(), grpc_port=free_port(),
                             device="cuda", dtype="float16", batch_max_items=256, admin_enabled=True)  # fmt: skip
    thread = ServerThread(PredictorServer(settings, host="127.0.0.1")).start().wait_ready()
    base = f"http://127.0.0.1:{settings.http_port}"
    try:
        one_model = torch.cuda.memory_allocated()
        texts = [f"Nearside Front Brake pipe corroded, record {i} (1.1.11 (c))" for i in range(256)]
        t0, n = time.perf_counter(), 0
        with httpx.Client(timeout=60) as client:
            for k in range(20):
                batch = [f"{t} #{k}" for t in texts]
                r = client.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": batch})
                assert r.status_code == 200
                n += len(batch)
        print(f"GPU fp16, one client, 256-item requests: {n / (time.perf_counter() - t0):.0f} items/s")

        failures: list[int] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    r = client.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": texts[:8]})
                    if r.status_code != 200:
                        failures.append(r.status_code)

        workers = [threading.Thread(target=load) for _ in range(4)]
        for w in workers:
            w.start()
        after: list[int] = []
        try:
            for ref, version in ((v2, "2"), (tiny_bundle.root, "1"), (v2, "2"), (tiny_bundle.root, "1")):
                r = httpx.post(f"{base}/motlens/admin/slots/production/load", json={"ref": str(ref)}, timeout=300)
                assert r.status_code == 200 and r.json()["slots"]["production"]["version"] == version
                after.append(torch.cuda.memory_allocated())
        finally:
            stop.set()
            for w in workers:
                w.join()
        assert failures == []
        print(
            "GPU memory allocated (MiB): one model",
            round(one_model / 2**20, 1),
            "after each swap",
            [round(a / 2**20, 1) for a in after],
        )
        assert after[-1] <= after[0] + (4 << 20)  # flat across swaps: each old model's memory returned
        assert "motlens_gpu_memory_allocated_bytes" in httpx.get(f"{base}/metrics").text
    finally:
        thread.stop()
