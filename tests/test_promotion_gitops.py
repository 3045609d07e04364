"""GitOps target: a full rollout and a rollback against a real MLflow registry; every intermediate
manifest builds with `kubectl kustomize`, validates against the KServe CRD, and equals what the k8s
target's merge patch gives through `kubectl patch --local`."""

from __future__ import annotations

import copy
import shutil

import pytest
import yaml
from promotion_support import (
    HEALTHY,
    drift_report,
    kubectl_patch_local,
    log_traffic,
    make_env,
    render,
    validate_isvc,
)

from promotion.rollout import ANN_CANARY_VERSION, ANN_PROD_SHA, ANN_PROD_URI, ANN_PROD_VERSION, DIGEST_ENV
from promotion.status import read_status
from promotion.tags import PREVIOUS_TAG
from promotion.targets import GitOpsTarget
from promotion.workflow import Promoter, PromotionError, Refused
from training.registry import DIGEST_TAG

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


class RecordingGitOps(GitOpsTarget):
    """The real GitOps target, also keeping the rendered InferenceService before and after each write."""

    def __init__(self, settings):
        super().__init__(settings)
        self.steps: list[tuple[dict, dict, dict]] = []

    def apply(self, desired):
        before = self.render()
        patch = super().apply(desired)
        self.steps.append((before, patch, self.render()))
        return patch


def _env0(isvc):
    return isvc["spec"]["predictor"]["containers"][0]["env"][0]["value"]


def _pin(isvc):
    """env[1]: the bundle digest the revision's predictor checks ``/mnt/models`` against."""
    entry = isvc["spec"]["predictor"]["containers"][0]["env"][1]
    assert entry["name"] == DIGEST_ENV
    return entry["value"]


@pytest.fixture
def env(registry, tiny_bundle, tmp_path, monkeypatch):
    return make_env(registry, tiny_bundle.root, tmp_path, monkeypatch, [0.60, 0.61, 0.62])


def _check_steps(target, tmp_path):
    for before, patch, after in target.steps:
        validate_isvc(before)
        validate_isvc(after)
        assert kubectl_patch_local(before, patch, tmp_path) == after
    n = len(target.steps)
    target.steps.clear()
    return n


def test_crd_validator_rejects_a_broken_isvc(env):
    isvc = render(env.manifests / "overlays" / "cpu")
    validate_isvc(isvc)
    isvc["spec"]["predictor"]["canaryTrafficPercent"] = "ten"
    with pytest.raises(AssertionError, match="canaryTrafficPercent"):
        validate_isvc(isvc)
    misspelled = render(env.manifests / "overlays" / "cpu")
    misspelled["spec"]["predictor"]["canaryTraficPercent"] = 10  # KServe would ignore it: the strict server refuses
    with pytest.raises(AssertionError, match="canaryTraficPercent"):
        validate_isvc(misspelled)
    typo = render(env.manifests / "overlays" / "cpu")
    typo["spec"]["predictor"]["containers"][0]["imagee"] = "motlens:typo"
    with pytest.raises(AssertionError, match="imagee"):
        validate_isvc(typo)


@pytest.mark.slow
def test_full_rollout_then_rollback(env, tmp_path):
    reg = env.registry
    target = RecordingGitOps(env.settings())
    p = Promoter(env.settings(), reg, target, force=True)
    p.promote("1")  # adopt: the base names a placeholder production; --force replaces it
    assert _check_steps(target, tmp_path) == 1
    p.force = False
    uri = {v: reg.resolve(v).artifact_uri for v in ("1", "2", "3")}
    pin = {v: reg.resolve(v).tags[DIGEST_TAG] for v in ("1", "2", "3")}
    assert len(set(pin.values())) == 3
    baseline = render(target.overlay)
    assert _env0(baseline) == uri["1"] and "canaryTrafficPercent" not in baseline["spec"]["predictor"]
    assert _pin(baseline) == pin["1"] == baseline["metadata"]["annotations"][ANN_PROD_SHA]
    assert baseline["metadata"]["annotations"][ANN_PROD_VERSION] == "1"

    out = p.canary_start("2", 10)
    assert {r.name: r.status for r in out.gates} == {"offline": "pass", "golden": "pass"}
    assert _check_steps(target, tmp_path) == 1
    percents = [10]
    while True:
        isvc = render(target.overlay)
        assert _env0(isvc) == uri["2"] and _pin(isvc) == pin["2"]
        assert isvc["metadata"]["annotations"][ANN_PROD_URI] == uri["1"]
        assert isvc["metadata"]["annotations"][ANN_PROD_SHA] == pin["1"]  # what a rollback restores
        assert isvc["metadata"]["annotations"][ANN_CANARY_VERSION] == "2"
        assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == percents[-1]
        if percents[-1] < 100:
            with pytest.raises(Refused, match="live: wait"):  # no canary traffic since the step yet
                p.advance()
        # what a KServe canary revision's pods log: their own slot, "production"; the gates go by version
        log_traffic("2", "production", HEALTHY)
        log_traffic("1", "production", HEALTHY)
        drift_report("2", detected=False)
        if percents[-1] == 100:
            break
        out = p.advance()
        assert all(r.passed for r in out.gates)
        assert _check_steps(target, tmp_path) == 1
        percents.append(render(target.overlay)["spec"]["predictor"]["canaryTrafficPercent"])
    assert percents == [10, 25, 50, 100]
    with pytest.raises(PromotionError, match="last step"):
        p.advance()
    p.promote()
    assert _check_steps(target, tmp_path) == 1
    promoted = render(target.overlay)
    assert _env0(promoted) == uri["2"] and "canaryTrafficPercent" not in promoted["spec"]["predictor"]
    ann = promoted["metadata"]["annotations"]
    assert (ann[ANN_PROD_VERSION], ann[ANN_PROD_URI], ANN_CANARY_VERSION in ann) == ("2", uri["2"], False)
    assert _pin(promoted) == pin["2"] == ann[ANN_PROD_SHA]
    assert reg.aliases() == {"production": "2"}
    assert reg.resolve("2").tags["promotion.status"] == "production"
    assert reg.resolve("1").tags["promotion.status"] == "retired"

    # a canary of version 3, then a rollback: the manifest returns to the promoted one, with
    # canaryTrafficPercent 0 (removed, KServe would route all traffic to the latest ready revision: 3's)
    p.canary_start("3", 25)
    assert render(target.overlay)["spec"]["predictor"]["canaryTrafficPercent"] == 25
    assert _pin(render(target.overlay)) == pin["3"]
    p.rollback(reason="test rollback")
    assert _check_steps(target, tmp_path) == 3  # canary start, then 0%, then the previous spec restored
    pinned = copy.deepcopy(promoted)
    pinned["spec"]["predictor"]["canaryTrafficPercent"] = 0
    assert render(target.overlay) == pinned
    assert reg.aliases() == {"production": "2"}
    tags3 = reg.resolve("3").tags
    assert (tags3["promotion.status"], tags3["promotion.rejected_reason"]) == ("rejected", "test rollback")
    assert tags3["promotion.last_action"] == "rollback" and tags3["promotion.events"] == "2"

    ops = yaml.safe_load((target.overlay / "rollout.yaml").read_text())
    assert {op["op"] for op in ops} <= {"test", "replace", "add", "remove"}
    assert all(op["path"].startswith(("/spec/predictor/c", "/metadata/annotations/motlens.io")) for op in ops)
    events = p.reader().promotion_events(limit=50)
    actions = list(reversed(events[~events["dry_run"] & events["success"]]["action"].tolist()))
    assert actions == ["deploy", "canary_start", "advance", "advance", "advance", "promote", "canary_start",
                       "rollback"]
    status = read_status(p)
    assert status["disagreements"] == [] and status["live"]["canary_version"] is None


def test_manual_edit_is_respected_and_guarded(env, tmp_path):
    reg = env.registry
    target = GitOpsTarget(env.settings())
    p = Promoter(env.settings(golden_check=False), reg, target, force=True)
    p.promote("1")
    p.force = False
    p.canary_start("2", 10)
    rollout = target.overlay / "rollout.yaml"
    ops = yaml.safe_load(rollout.read_text())

    # `kubectl edit` of the percentage: read live, step from there (40 → 50)
    for op in ops:
        if op["path"] == "/spec/predictor/canaryTrafficPercent":
            op["value"] = 40
    rollout.write_text(yaml.safe_dump(ops))
    assert read_status(p)["live"]["percent"] == 40
    log_traffic("2", "production", HEALTHY)
    drift_report("2", detected=False)
    p.advance()
    assert render(target.overlay)["spec"]["predictor"]["canaryTrafficPercent"] == 50

    # a hand-edited bundle digest disagrees with the version's registry tag: refused, nothing written
    unedited = rollout.read_text()
    ops = yaml.safe_load(unedited)
    for op in ops:
        if op["path"] == "/spec/predictor/containers/0/env/1/value":
            op["value"] = "c" * 64
    rollout.write_text(yaml.safe_dump(ops))
    edited = rollout.read_text()
    problems = read_status(p)["disagreements"]
    assert problems == [
        f"live canary pins bundle digest {'c' * 64}, not the {reg.resolve('2').tags[DIGEST_TAG]} "
        "registered for version 2"
    ]
    with pytest.raises(Refused, match="pins bundle digest c{64}"):
        p.canary_set(60)
    assert rollout.read_text() == edited
    rollout.write_text(unedited)

    # a hand-edited storage URI disagrees with the registry: refused, nothing written, --force proceeds
    ops = yaml.safe_load(rollout.read_text())
    for op in ops:
        if op["path"] == "/spec/predictor/containers/0/env/0/value":
            op["value"] = "s3://somewhere/else"
    rollout.write_text(yaml.safe_dump(ops))
    edited = rollout.read_text()
    assert any("s3://somewhere/else" in d for d in read_status(p)["disagreements"])
    with pytest.raises(Refused, match="s3://somewhere/else"):
        p.canary_set(60)
    assert rollout.read_text() == edited
    p.force = True
    p.canary_set(60)
    assert render(target.overlay)["spec"]["predictor"]["canaryTrafficPercent"] == 60


def test_interrupted_change_is_repaired_by_a_rerun(env):
    reg = env.registry
    target = GitOpsTarget(env.settings())
    p = Promoter(env.settings(golden_check=False), reg, target, force=True)
    p.promote("1")
    p.force = False
    # the process died right after writing the manifest, before moving the alias
    live = target.read()
    info = reg.resolve("2")
    target.apply(live.with_canary("2", info.artifact_uri, 10, info.tags[DIGEST_TAG]))
    written = (target.overlay / "rollout.yaml").read_text()
    problems = read_status(p)["disagreements"]
    assert problems and "canary" in problems[0]
    with pytest.raises(Refused):
        p.canary_set(20)  # another change is refused while the state is inconsistent
    p.canary_start("2", 10)  # the same command again finishes it
    assert (target.overlay / "rollout.yaml").read_text() == written
    assert reg.aliases() == {"production": "1", "canary": "2"}
    assert read_status(p)["disagreements"] == []


def test_an_edit_made_while_the_gates_ran_is_not_overwritten(env):
    """`advance` decided on the state read before its gates; a `kubectl edit` in between (the canary
    paused at 0 %, a hot-fixed URI) was overwritten with the planned step. Now the state is read again
    before the change: the edit stands, nothing is changed and the refusal is in the audit."""
    import predlog

    reg = env.registry
    target = GitOpsTarget(env.settings())
    p = Promoter(env.settings(golden_check=False), reg, target, force=True)
    p.promote("1")
    p.force = False
    p.canary_start("2", 10)
    log_traffic("2", "production", HEALTHY)
    log_traffic("1", "production", HEALTHY)
    drift_report("2", detected=False)
    rollout = target.overlay / "rollout.yaml"
    real = p.evidence.health_gates

    def gates_then_an_edit(*args, **kw):
        out = real(*args, **kw)
        ops = yaml.safe_load(rollout.read_text())
        for op in ops:
            if op["path"] == "/spec/predictor/canaryTrafficPercent":
                op["value"] = 0  # the documented pause
        rollout.write_text(yaml.safe_dump(ops))
        return out

    p.evidence.health_gates = gates_then_an_edit
    edited = None
    with pytest.raises(PromotionError, match=r"advance not done, nothing was changed: the live state changed while"):
        try:
            p.advance()
        finally:
            edited = rollout.read_text()
    assert render(target.overlay)["spec"]["predictor"]["canaryTrafficPercent"] == 0 and rollout.read_text() == edited
    assert reg.aliases() == {"production": "1", "canary": "2"}
    row = predlog.open_reader().promotion_events(limit=1).iloc[0]
    assert (row["action"], bool(row["success"])) == ("advance", False)
    assert "changed while the gates ran" in row["reason"]
    p.evidence.health_gates = real
    out = p.auto()  # the scheduled run after it sees the pause and holds
    assert out.action == "hold" and "paused at 0%" in out.message, (out.action, out.message)
    assert render(target.overlay)["spec"]["predictor"]["canaryTrafficPercent"] == 0


def test_dry_run_changes_nothing(env):
    reg = env.registry
    target = GitOpsTarget(env.settings())
    p = Promoter(env.settings(golden_check=False), reg, target, force=True)
    p.promote("1")
    before = (target.overlay / "rollout.yaml").read_text()
    dry = Promoter(env.settings(golden_check=False), reg, target, dry_run=True)
    out = dry.canary_start("2", 10)
    assert (target.overlay / "rollout.yaml").read_text() == before
    assert reg.aliases() == {"production": "1"}
    plan = out.patches[0]
    assert plan["merge_patch"]["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert "canary-version" in plan["content"]


def test_a_version_without_a_digest_tag_is_written_unpinned_with_a_warning_naming_the_fix(env, caplog):
    """A version registered before digests were tagged: the deploy writes `""`, `status` shows it
    unpinned (no disagreement), and the warning names `motlens train pin`."""
    reg = env.registry
    reg.client.delete_model_version_tag("mot-defects", "1", DIGEST_TAG)
    target = GitOpsTarget(env.settings())
    with caplog.at_level("WARNING", logger="promotion.workflow"):
        p = Promoter(env.settings(golden_check=False), reg, target, force=True)
        p.promote("1")
        status = read_status(p)
    assert _pin(render(target.overlay)) == "" and status["live"]["bundle_sha256"] is None
    assert status["disagreements"] == []
    warned = [r.getMessage() for r in caplog.records if "has no motlens.bundle_sha256 tag" in r.getMessage()]
    assert warned == [
        "version 1 has no motlens.bundle_sha256 tag: the target does not pin its bundle (`motlens train pin 1` "
        "records it)"
    ]


def test_an_unpinned_production_is_shown_and_pinned_by_a_deploy_of_its_version(env):
    """An InferenceService written before bundle digests were pinned: `status` shows it unpinned
    (not a disagreement), and `promote promote V` of the version it serves pins it instead of
    answering 'already production', keeping what a production rollback restores. A hand edit of the
    served digest is a disagreement."""
    reg = env.registry
    target = GitOpsTarget(env.settings())
    p = Promoter(env.settings(golden_check=False), reg, target, force=True)
    p.promote("1")
    p.promote("2")  # forced direct deploy: version 2 replaced version 1
    assert reg.resolve("2").tags[PREVIOUS_TAG] == "1"
    target.apply(target.read().deployed("2", reg.resolve("2").artifact_uri))  # no digest, as older releases wrote
    status = read_status(p)
    assert status["pins_digest"] and status["live"]["bundle_sha256"] is None and status["disagreements"] == []
    p.force = False
    p.promote("2")
    pinned = render(target.overlay)
    assert _pin(pinned) == reg.resolve("2").tags[DIGEST_TAG] == pinned["metadata"]["annotations"][ANN_PROD_SHA]
    tags = reg.resolve("2").tags
    assert tags[PREVIOUS_TAG] == "1" and tags["promotion.status"] == "production"  # the record stands
    with pytest.raises(PromotionError, match="already production"):
        p.promote("2")

    rollout = target.overlay / "rollout.yaml"
    unedited = rollout.read_text()
    for index, value, problem in (  # what serves is the spec: the annotations (kept for a rollback) stay
        (1, "c" * 64, f"pins bundle digest {'c' * 64}, not the {reg.resolve('2').tags[DIGEST_TAG]} registered for"),
        (0, "s3://somewhere/else", "storage URI s3://somewhere/else is not the artifact URI of"),
    ):
        ops = yaml.safe_load(unedited)
        for op in ops:
            if op["path"] == f"/spec/predictor/containers/0/env/{index}/value":
                op["value"] = value
        rollout.write_text(yaml.safe_dump(ops))
        assert [d[: d.index(" version 2")] for d in read_status(p)["disagreements"]] == [f"live production {problem}"]
    rollout.write_text(unedited)
    p.rollback(reason="back to 1")  # no canary: production goes back to what version 2 replaced
    back = render(target.overlay)
    assert _env0(back) == reg.resolve("1").artifact_uri and _pin(back) == reg.resolve("1").tags[DIGEST_TAG]
    assert reg.aliases() == {"production": "1"}
