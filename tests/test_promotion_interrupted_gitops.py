"""Two GitOps overlays (one registry): each has its own intent, and a killed rollback on one is not
taken for the other's (review: one key per target kind let the gpu overlay drop the cpu one's intent,
and the cpu re-run then rolled production back)."""

from __future__ import annotations

import shutil

import pytest
from promotion_support import make_env

import promotion.workflow as wf
from promotion.audit import tag_version
from promotion.status import read_status
from promotion.targets import GitOpsTarget
from promotion.workflow import Promoter

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


class Killed(BaseException):
    """What SIGKILL leaves (no ``except Exception`` runs)."""


def test_two_overlays_keep_their_own_interrupted_change(registry, tiny_bundle, tmp_path, monkeypatch):
    env = make_env(registry, tiny_bundle.root, tmp_path, monkeypatch, [0.60, 0.61, 0.62])
    cpu_s, gpu_s = env.settings(overlay="cpu", golden_check=False), env.settings(overlay="gpu", golden_check=False)
    cpu, gpu = GitOpsTarget(cpu_s), GitOpsTarget(gpu_s)
    for step in (
        lambda p: p.promote("1"),
        lambda p: p.canary_start("2", 100),
        lambda p: p.promote(),
        lambda p: p.canary_start("3", 10),
    ):
        for s, t in ((cpu_s, cpu), (gpu_s, gpu)):
            step(Promoter(s, env.registry, t, force=True))

    def killed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise Killed

    monkeypatch.setattr(wf, "tag_version", killed)
    with pytest.raises(Killed):
        Promoter(cpu_s, env.registry, cpu).rollback(reason="p99")
    monkeypatch.setattr(wf, "tag_version", tag_version)
    assert "interrupted" not in read_status(Promoter(gpu_s, env.registry, gpu))
    assert read_status(Promoter(cpu_s, env.registry, cpu))["interrupted"]["action"] == "rollback"
    Promoter(gpu_s, env.registry, gpu).rollback(reason="p99")
    out = Promoter(cpu_s, env.registry, cpu).rollback(reason="p99")
    assert "was complete but for its record" in out.message, out.message  # gpu's rollback wrote the same tags
    assert cpu.read().production_version == "2" and gpu.read().production_version == "2"
