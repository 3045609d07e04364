"""Model threads follow the container's cgroup v2 CPU quota (``cpu.max``), else the affinity mask."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import predictor.settings as serve_settings
from predictor.settings import ServeSettings, cgroup_cpu_count

CPU_MAX = "/sys/fs/cgroup/cpu.max"


@pytest.fixture
def cpu_max(tmp_path, monkeypatch):
    """Point the cgroup file cgroup_cpu_count reads at a tmp file; returns a writer for its content."""
    fake = tmp_path / "cpu.max"
    monkeypatch.setattr(serve_settings, "Path", lambda p: fake if str(p) == CPU_MAX else Path(p))

    def write(content: str | None) -> None:
        if content is None:
            fake.unlink(missing_ok=True)
        else:
            fake.write_text(content)

    return write


AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("200000 100000\n", 2),  # a 2-CPU limit
        ("350000 100000\n", 3),  # fractional limits round down
        ("50000 100000\n", 1),  # never below one thread
        ("max 100000\n", AFFINITY),  # no quota: the CPUs the scheduler lets us run on
        (None, AFFINITY),  # no cgroup v2 file
        ("garbage\n", AFFINITY),
    ],
)
def test_cgroup_cpu_count(cpu_max, content, expected):
    cpu_max(content)
    assert cgroup_cpu_count() == expected


def test_model_threads_split_the_quota_between_workers(cpu_max):
    cpu_max("400000 100000\n")
    assert ServeSettings().resolved_threads() == 4
    assert ServeSettings(model_workers=2).resolved_threads() == 2
    assert ServeSettings(model_workers=8).resolved_threads() == 1
    assert ServeSettings(threads=6, model_workers=2).resolved_threads() == 3  # set explicitly: no cgroup


def test_the_model_pin_is_a_sha256_or_empty(monkeypatch):
    """The InferenceService's env[1] is "" while a version has no registry digest: that means no pin."""
    monkeypatch.setenv("MOTLENS_SERVE_MODEL_SHA256", "")
    assert ServeSettings().model_sha256 is None
    monkeypatch.setenv("MOTLENS_SERVE_MODEL_SHA256", "ab" * 32)
    assert ServeSettings().model_sha256 == "ab" * 32
    for bad in ("AB" * 32, "ab" * 31, "sha256:" + "ab" * 32):
        monkeypatch.setenv("MOTLENS_SERVE_MODEL_SHA256", bad)
        with pytest.raises(ValueError, match="model_sha256"):
            ServeSettings()
    monkeypatch.setenv("MOTLENS_SERVE_MODEL_SHA256", "ab" * 32)
    with pytest.raises(ValueError, match="cannot also follow an alias"):
        ServeSettings(follow_alias="production")
