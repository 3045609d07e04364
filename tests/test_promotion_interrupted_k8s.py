"""Interrupted changes on the Kubernetes target (the API stand-in of test_promotion_k8s_api): a run killed
while tagging is finished by the next command for every verb; a rollback killed between its two patches
(canary at 0 %, canary still in the spec) is finished, not resumed by `advance`; a settle has nothing
for the registry to follow and leaves no intent to "finish" before its patch."""

from __future__ import annotations

import pytest
from promotion_support import HEALTHY, drift_report, log_traffic
from test_promotion_k8s_api import _live, _revisions, _successful_rows
from test_promotion_k8s_api import k8s as k8s  # the fixture

import promotion.workflow as wf
from promotion.audit import tag_version
from promotion.status import read_status
from promotion.targets import K8sTarget
from promotion.workflow import Promoter, PromotionError


class Killed(BaseException):
    """What SIGKILL leaves (no ``except Exception`` runs)."""


def test_a_rollback_killed_between_its_two_patches_is_finished_not_rolled_out_again(k8s, monkeypatch):
    env, api, settings, target = k8s
    p = Promoter(settings, env.registry, target, force=True)
    p.promote("1")
    p.force = False
    p.canary_start("2", 10)
    real, calls = K8sTarget.apply, []

    def apply(self, desired):  # noqa: ANN001, ANN202
        calls.append(desired)
        if len(calls) == 2:
            raise Killed
        return real(self, desired)

    monkeypatch.setattr(K8sTarget, "apply", apply)
    with pytest.raises(Killed):
        Promoter(settings, env.registry, target).rollback(reason="p99 too high")
    monkeypatch.setattr(K8sTarget, "apply", real)
    assert _live(api)[0] == "2"  # the canary at 0 %, still in the spec
    assert read_status(Promoter(settings, env.registry, target))["interrupted"]["next"] == "finish"
    out = Promoter(settings, env.registry, target).auto()
    assert "finished the interrupted rollback" in out.message, out.message
    log_traffic("2", "canary", HEALTHY)
    log_traffic("1", "production", HEALTHY)
    drift_report("2", detected=False)
    with pytest.raises(PromotionError, match="no canary is running"):
        Promoter(settings, env.registry, target).advance()
    assert _live(api)[0] is None


def test_a_settle_killed_before_its_patch_is_settled_by_the_next_run(k8s, monkeypatch):
    env, api, settings, target = k8s
    p = Promoter(settings, env.registry, target, force=True)
    p.promote("1")
    p.canary_start("2", 10)
    api.edit(_revisions("00002", "00002"))
    p.rollback(reason="bad")
    api.edit(_revisions("00003", "00003"))
    real = K8sTarget.apply

    def killed(self, desired):  # noqa: ANN001, ANN202
        raise Killed

    monkeypatch.setattr(K8sTarget, "apply", killed)
    with pytest.raises(Killed):
        Promoter(settings, env.registry, target).auto()
    monkeypatch.setattr(K8sTarget, "apply", real)
    assert Promoter(settings, env.registry, target).auto().action == "settle"
    assert "canaryTrafficPercent" not in api.isvc()["spec"]["predictor"]
    assert Promoter(settings, env.registry, target).auto().action != "settle"
    assert len(_successful_rows(p, "settle")) == 1


def test_every_verb_killed_while_tagging_is_finished_by_the_next_command(k8s, monkeypatch):
    env, api, settings, target = k8s
    Promoter(settings, env.registry, target, force=True).promote("1")

    def killed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise Killed

    for run in (
        lambda: Promoter(settings, env.registry, target).canary_start("2", 10),
        lambda: Promoter(settings, env.registry, target).canary_set(30),
        lambda: Promoter(settings, env.registry, target, force=True).promote(),
        lambda: Promoter(settings, env.registry, target, force=True).canary_start("3", 10),
        lambda: Promoter(settings, env.registry, target).rollback(reason="x"),
    ):
        monkeypatch.setattr(wf, "tag_version", killed)
        with pytest.raises(Killed):
            run()
        monkeypatch.setattr(wf, "tag_version", tag_version)
        try:
            message = Promoter(settings, env.registry, target).canary_set(55).message
        except PromotionError as e:
            message = str(e)
        assert "finished the interrupted" in message, message
        assert not [k for k in env.registry.model_tags() if k.startswith("promotion.intent.")]
