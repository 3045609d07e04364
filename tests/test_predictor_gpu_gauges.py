"""The GPU memory gauges read the device the model serves on, and a scrape never starts CUDA."""

from __future__ import annotations

import torch

from predictor import metrics


def _read(gauge) -> float:  # noqa: ANN001 - a prometheus_client Gauge
    return gauge.collect()[0].samples[0].value


def test_gauges_read_the_served_device_and_never_initialise_cuda(monkeypatch):
    asked: list[int | None] = []

    def allocated(device=None) -> int:  # noqa: ANN001
        asked.append(device)
        return 1000 + int(device or 0)

    monkeypatch.setattr(metrics, "_cuda_device", [0])
    monkeypatch.setattr(torch.cuda, "memory_allocated", allocated)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert _read(metrics.GPU_ALLOCATED) == 0.0 and asked == []  # no CUDA context made for a scrape

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    metrics.watch_cuda_device("cuda:1")
    assert _read(metrics.GPU_ALLOCATED) == 1001.0 and asked == [1]  # cuda:1's figure, not device 0's
    metrics.watch_cuda_device("cuda")
    assert _read(metrics.GPU_ALLOCATED) == 1000.0
