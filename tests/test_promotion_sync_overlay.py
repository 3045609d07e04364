"""``motlens promote sync-overlay``: the live InferenceService's rollout copied into the overlay, so
re-applying the overlay keeps what the k8s target deployed. Against the in-memory API server of
test_promotion_k8s_api (merge patches, resourceVersions, Leases), the overlay rendered by kubectl."""

from __future__ import annotations

import pytest
import yaml
from promotion_support import render, validate_isvc
from test_promotion_k8s_api import NS
from test_promotion_k8s_api import k8s as k8s  # the fixture

from promotion.rollout import state_from_isvc


def _canary_live(env, settings, target):
    """Production v1 (adopted over the base's placeholder), canary v2 at 10 %, through the Promoter."""
    from promotion.workflow import Promoter

    p = Promoter(settings, env.registry, target, force=True)
    p.promote("1")
    p.force = False
    p.canary_start("2", 10)
    return p


def test_sync_overlay_makes_a_reapply_keep_the_live_rollout(k8s, capsys):
    from motlens.cli import main
    from promotion import cli
    from promotion.overlay_sync import sync_overlay

    env, api, settings, target = k8s
    _canary_live(env, settings, target)
    overlay = env.manifests / "overlays" / "cpu"
    rollout = overlay / "rollout.yaml"
    live = state_from_isvc(api.isvc())
    assert (live.canary_version, live.percent, live.production_version) == ("2", 10, "1")
    original = rollout.read_bytes()
    # what `kubectl apply -k` would send now: the first apply's placeholder, no canary
    stale = state_from_isvc(render(overlay))
    assert stale != live and stale.canary_version is None

    args = ["promote", "sync-overlay", "--manifests-dir", str(env.manifests), "--namespace", NS]
    lease_before = api.lease()
    assert main([*args, "--check"]) == cli.EXIT_AUDIT
    assert "OUT OF SYNC" in capsys.readouterr().out
    assert rollout.read_bytes() == original  # --check writes nothing, not even the Lease
    assert api.lease() == lease_before

    assert main(args) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "now holds the live rollout" in out and "canary v2 at 10%" in out
    rendered = render(overlay)
    validate_isvc(rendered)  # the CRD schema still holds
    assert state_from_isvc(rendered) == live  # a re-apply now keeps production v1 and the canary at 10 %
    live_env = api.isvc()["spec"]["predictor"]["containers"][0]["env"]
    assert rendered["spec"]["predictor"]["containers"][0]["env"][:2] == live_env[:2]
    assert rollout.read_text().startswith("# Rollout state of mot-defects (JSON6902), copied from the live")
    assert api.lease() is not None and api.lease() != lease_before  # it held the promotion Lease

    synced = rollout.read_bytes()
    assert main([*args, "--check"]) == cli.EXIT_OK
    assert "in sync" in capsys.readouterr().out
    again = sync_overlay(settings)
    assert again.in_sync and not again.written and rollout.read_bytes() == synced  # no rewrite when in sync

    # a promotion step later, the overlay is stale again and the copy follows it
    api.edit({"spec": {"predictor": {"canaryTrafficPercent": 30}}})  # `kubectl edit`
    assert not sync_overlay(settings, check_only=True).in_sync
    assert sync_overlay(settings).written
    assert state_from_isvc(render(overlay)).percent == 30


def test_sync_overlay_after_promotion_removes_the_canary_fields(k8s):
    from promotion.overlay_sync import sync_overlay

    env, api, settings, target = k8s
    p = _canary_live(env, settings, target)
    assert sync_overlay(settings).written
    p.force = True  # no live traffic logged: the promotion's gates are not what this tests
    p.promote()
    live = state_from_isvc(api.isvc())
    assert (live.canary_version, live.percent, live.production_version) == (None, None, "2")
    assert sync_overlay(settings).written
    rendered = render(env.manifests / "overlays" / "cpu")
    assert "canaryTrafficPercent" not in rendered["spec"]["predictor"]
    assert "motlens.io/canary-version" not in rendered["metadata"]["annotations"]
    assert state_from_isvc(rendered) == live


def test_sync_overlay_refuses_another_namespace_and_writes_nothing(k8s):
    from promotion.overlay_sync import sync_overlay
    from promotion.targets import TargetError

    env, api, settings, target = k8s
    _canary_live(env, settings, target)
    rollout = env.manifests / "overlays" / "cpu" / "rollout.yaml"
    original = rollout.read_bytes()
    other = settings.model_copy(update={"namespace": "default"})
    with pytest.raises(TargetError, match="renders mot-defects in namespace 'motlens', but the live one read is in "
                                          "'default': pass --namespace motlens"):  # fmt: skip
        sync_overlay(other)
    assert rollout.read_bytes() == original
    assert not [k for k in api.objects if k[2] == "default"]  # no Lease taken in the namespace named


def test_sync_overlay_puts_the_file_back_when_another_patch_overrides_it(k8s):
    """A patch listed after rollout.yaml that sets the storage URI: the copy cannot take effect, so the
    overlay is left as it was and the error says why."""
    from promotion.overlay_sync import sync_overlay
    from promotion.targets import TargetError

    env, api, settings, target = k8s
    _canary_live(env, settings, target)
    overlay = env.manifests / "overlays" / "cpu"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    pin = [{"op": "replace", "path": "/spec/predictor/containers/0/env/0/value", "value": "s3://pinned/model"}]
    (overlay / "pin.yaml").write_text(yaml.safe_dump(pin))
    kustomization["patches"].append({"path": "pin.yaml", "target": {"kind": "InferenceService", "name": "mot-defects"}})
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    original = (overlay / "rollout.yaml").read_bytes()
    expected = r"after the copy \(rendered → live: STORAGE_URI: s3://pinned/model → .*rollout.yaml is left as it was"
    with pytest.raises(TargetError, match=expected):
        sync_overlay(settings)
    assert (overlay / "rollout.yaml").read_bytes() == original
    assert not [p for p in overlay.iterdir() if p.name.endswith(".tmp")]


def test_sync_overlay_refuses_a_live_object_off_the_contract(k8s):
    from promotion.overlay_sync import sync_overlay
    from promotion.targets import TargetError

    env, api, settings, target = k8s
    containers = api.isvc()["spec"]["predictor"]["containers"]
    containers[0]["env"][0]["name"] = "MODEL_URI"
    api.edit({"spec": {"predictor": {"containers": containers}}})
    rollout = env.manifests / "overlays" / "cpu" / "rollout.yaml"
    original = rollout.read_bytes()
    with pytest.raises(TargetError, match=f"k8s inferenceservice {NS}/mot-defects: .*env\\[0\\] must be STORAGE_URI"):
        sync_overlay(settings)
    assert rollout.read_bytes() == original


def test_status_shows_whether_the_local_overlay_would_keep_the_live_rollout(k8s, capsys, monkeypatch):
    from motlens.cli import main
    from promotion.overlay_sync import sync_overlay
    from promotion.status import read_status
    from promotion.targets import GitOpsTarget
    from promotion.workflow import Promoter

    env, api, settings, target = k8s
    p = _canary_live(env, settings, target)
    overlay = read_status(p)["overlay"]
    live_uri = state_from_isvc(api.isvc()).storage_uri
    # the base's placeholder: v1, but not the URI the adoption deployed
    assert (overlay["in_sync"], overlay["renders"]) == (False, "production v1 at 100%")
    assert overlay["storage_uri"] != live_uri
    monkeypatch.setenv("MOTLENS_PROMOTE_MANIFESTS_DIR", str(env.manifests))
    monkeypatch.setenv("MOTLENS_PROMOTE_NAMESPACE", NS)
    assert main(["promote", "status", "--target", "k8s"]) == 0
    assert "OUT OF SYNC" in capsys.readouterr().out
    sync_overlay(settings)
    assert read_status(p)["overlay"] == {
        "dir": str(env.manifests / "overlays" / "cpu"),
        "in_sync": True,
        "renders": "production v1 at 90%, canary v2 at 10%",
        "storage_uri": live_uri,
        "differences": [],
    }
    # no overlay checkout where status runs (the auto CronJob): nothing shown, nothing rendered
    elsewhere = settings.model_copy(update={"manifests_dir": env.manifests / "absent"})
    assert read_status(Promoter(elsewhere, env.registry, target))["overlay"] is None
    # an overlay that cannot be rendered: said so, the rest of the status stands
    (env.manifests / "overlays" / "cpu" / "rollout.yaml").write_text("- op: test\n  path: /nowhere\n  value: 1\n")
    broken = read_status(p)
    assert "error" in broken["overlay"] and broken["live"]["canary_version"] == "2"
    # another target: no overlay row
    gitops = settings.model_copy(update={"target": "gitops"})
    assert "overlay" not in read_status(Promoter(gitops, env.registry, GitOpsTarget(gitops)))


def _add_patch(overlay, ops) -> None:
    """A patch listed after rollout.yaml in the overlay's kustomization."""
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    (overlay / "later.yaml").write_text(yaml.safe_dump(ops))
    target = {"kind": "InferenceService", "name": "mot-defects"}
    kustomization["patches"].append({"path": "later.yaml", "target": target})
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))


def test_an_overlay_that_fails_to_render_after_the_copy_gets_its_file_back(k8s, capsys):
    """A later patch that works on the old rollout.yaml but not on the copy (it removes canaryTrafficPercent,
    which a promotion removed): the render fails, the file is put back and the overlay renders as before."""
    from motlens.cli import main

    env, api, settings, target = k8s
    p = _canary_live(env, settings, target)
    p.force = True
    p.promote()
    overlay = env.manifests / "overlays" / "cpu"
    _add_patch(overlay, [{"op": "remove", "path": "/spec/predictor/canaryTrafficPercent"}])
    render(overlay)  # renders now
    original = (overlay / "rollout.yaml").read_bytes()
    assert main(["promote", "sync-overlay", "--manifests-dir", str(env.manifests), "--namespace", NS]) == 2
    err = capsys.readouterr().err
    assert "Unable to remove nonexistent key" in err and "after the copy, so" in err and "is left as it was" in err
    assert (overlay / "rollout.yaml").read_bytes() == original
    render(overlay)  # and still renders


def test_a_lease_lost_before_the_write_writes_nothing(k8s, monkeypatch, capsys):
    """Another run takes the promotion Lease over after the live object is read: nothing is written."""
    import time

    from motlens.cli import main
    from promotion.targets import K8sTarget

    env, api, settings, target = k8s
    _canary_live(env, settings, target)
    rollout = env.manifests / "overlays" / "cpu" / "rollout.yaml"
    original = rollout.read_bytes()
    monkeypatch.setenv("MOTLENS_PROMOTE_LEASE_SECONDS", "10")  # renewed every 3.3 s
    real_read = K8sTarget.read

    def read_then_lose_the_lease(self):  # noqa: ANN001, ANN202
        state = real_read(self)
        lease = api.lease()
        lease["spec"]["holderIdentity"] = "cronjob-pod:1"
        api.replace_namespaced_custom_object("coordination.k8s.io", "v1", NS, "leases", "mot-defects-promotion", lease)
        deadline = time.monotonic() + 30
        while not self._lease.lost and time.monotonic() < deadline:  # a renewal finds it someone else's
            time.sleep(0.05)
        return state

    monkeypatch.setattr(K8sTarget, "read", read_then_lose_the_lease)
    assert main(["promote", "sync-overlay", "--manifests-dir", str(env.manifests), "--namespace", NS]) == 2
    assert "lost the Lease motlens/mot-defects-promotion to cronjob-pod:1" in capsys.readouterr().err
    assert rollout.read_bytes() == original


def test_check_and_status_need_only_read_access(k8s, monkeypatch, capsys):
    """Credentials that may read the InferenceService but not create a Lease: `--check` compares, as
    `status` does."""
    from kubernetes.client.exceptions import ApiException

    from motlens.cli import main

    env, api, settings, target = k8s
    _canary_live(env, settings, target)
    api.objects = {k: v for k, v in api.objects.items() if k[3] != "leases"}
    create = api.create_namespaced_custom_object

    def no_leases(group, version, namespace, plural, body, **kw):  # noqa: ANN001, ANN003, ANN202
        if plural == "leases":
            raise ApiException(status=403, reason="Forbidden")
        return create(group, version, namespace, plural, body, **kw)

    monkeypatch.setattr(api, "create_namespaced_custom_object", no_leases)
    args = ["--manifests-dir", str(env.manifests), "--namespace", NS]
    assert main(["promote", "sync-overlay", "--check", *args]) == 1
    assert "OUT OF SYNC" in capsys.readouterr().out
    assert main(["promote", "sync-overlay", *args]) == 2  # the write needs the Lease
    assert "cannot take the Lease motlens/mot-defects-promotion: not allowed (403 Forbidden)" in capsys.readouterr().err


def test_status_refuses_to_compare_the_overlay_with_another_namespace(k8s, capsys):
    """`status --namespace staging` beside an overlay that renders into `motlens` (where a canary runs):
    not "in sync" because the staging copy matches, but the namespace named, as `sync-overlay` says."""
    import copy
    import json

    from motlens.cli import main
    from promotion.rollout import API_GROUP, API_VERSION, PLURAL

    env, api, settings, target = k8s
    staging = copy.deepcopy(api.isvc())  # the first apply's copy, in namespace "staging"
    staging["metadata"].pop("resourceVersion")
    api.create_namespaced_custom_object(API_GROUP, API_VERSION, "staging", PLURAL, staging)
    _canary_live(env, settings, target)
    args = ["--manifests-dir", str(env.manifests), "--namespace", "staging"]
    assert main(["promote", "status", "--target", "k8s", *args, "--json"]) == 0
    overlay = json.loads(capsys.readouterr().out)["overlay"]
    assert "in_sync" not in overlay and "renders mot-defects in namespace 'motlens'" in overlay["error"]
    assert main(["promote", "sync-overlay", "--check", *args]) == 2
    assert "pass --namespace motlens" in capsys.readouterr().err


def test_live_values_are_copied_as_data_never_as_yaml(k8s):
    """Annotation values that would be YAML if written raw (a newline and ops in the summary comment;
    `0o17` and `1e5`, which kustomize's YAML 1.2 reads as numbers) are copied as the strings they are:
    the overlay renders the live rollout and nothing else (the image stays the overlay's)."""
    from promotion.overlay_sync import sync_overlay
    from promotion.rollout import json6902_ops
    from promotion.targets import GitOpsTarget

    env, api, settings, target = k8s
    _canary_live(env, settings, target)
    overlay = env.manifests / "overlays" / "cpu"
    image = render(overlay)["spec"]["predictor"]["containers"][0]["image"]
    evil = "1\n- op: replace\n  path: /spec/predictor/containers/0/image\n  value: attacker/img:latest #"
    for value in (evil, "1\n", "0o17", "1e5"):
        api.edit({"metadata": {"annotations": {"motlens.io/production-version": value,
                                               "motlens.io/canary-version": "0o17"}}})  # fmt: skip
        assert sync_overlay(settings).written, value
        rendered = render(overlay)
        assert state_from_isvc(rendered) == state_from_isvc(api.isvc()), value
        assert rendered["spec"]["predictor"]["containers"][0]["image"] == image, value
    # the gitops target writes its file the same way: its summary comment cannot carry ops either
    gitops = GitOpsTarget(settings)
    state = state_from_isvc(api.isvc())
    written = yaml.safe_load(gitops.content(state.with_percent(20)))
    assert written == json6902_ops(state.with_percent(20)) and "attacker" not in str(written)


def test_out_of_sync_names_the_fields_that_differ(k8s, capsys):
    """After a rollback (canaryTrafficPercent 0 kept) and its settling (removed), both sides describe as
    "production v1 at 100%": the message names the field."""
    from motlens.cli import main

    env, api, settings, target = k8s
    p = _canary_live(env, settings, target)
    p.rollback(reason="test")
    args = ["promote", "sync-overlay", "--manifests-dir", str(env.manifests), "--namespace", NS]
    assert main(args) == 0
    capsys.readouterr()
    api.edit({"spec": {"predictor": {"canaryTrafficPercent": None}}})  # what `auto` does once settled
    assert main([*args, "--check"]) == 1
    assert "(overlay → live: canaryTrafficPercent: 0 → absent)" in capsys.readouterr().out
    assert main(args) == 0
    assert "(canaryTrafficPercent: 0 → absent)" in capsys.readouterr().out


def test_a_file_put_back_is_byte_for_byte_the_old_one(k8s):
    """CRLF line ends (a checkout with core.autocrlf) survive a copy that is put back."""
    from promotion.overlay_sync import sync_overlay
    from promotion.targets import TargetError

    env, api, settings, target = k8s
    _canary_live(env, settings, target)
    overlay = env.manifests / "overlays" / "cpu"
    rollout = overlay / "rollout.yaml"
    rollout.write_bytes(rollout.read_bytes().replace(b"\n", b"\r\n"))
    _add_patch(overlay, [{"op": "replace", "path": "/spec/predictor/containers/0/env/0/value", "value": "s3://p/m"}])
    original = rollout.read_bytes()
    with pytest.raises(TargetError, match="is left as it was"):
        sync_overlay(settings)
    assert rollout.read_bytes() == original


def test_an_overlay_that_does_not_parse_is_an_error_not_a_crash(k8s, capsys, monkeypatch):
    """A percent that is no integer, and a live value kubectl prints as YAML that does not load (`=`):
    `status` shows "cannot render" beside the rest, `sync-overlay` exits 2 with one line."""
    from motlens.cli import main

    env, api, settings, target = k8s
    _canary_live(env, settings, target)
    overlay = env.manifests / "overlays" / "cpu"
    _add_patch(overlay, [{"op": "replace", "path": "/spec/predictor/canaryTrafficPercent", "value": "10%"}])
    monkeypatch.setenv("MOTLENS_PROMOTE_MANIFESTS_DIR", str(env.manifests))
    monkeypatch.setenv("MOTLENS_PROMOTE_NAMESPACE", NS)
    monkeypatch.setenv("COLUMNS", "400")  # the table's rows on one line each
    assert main(["promote", "status", "--target", "k8s"]) == 0
    out = capsys.readouterr().out
    assert "cannot render" in out and "canaryTrafficPercent must be an integer" in out and "canary v2" in out
    assert main(["promote", "sync-overlay", "--check"]) == 2
    err = capsys.readouterr().err
    assert "canaryTrafficPercent must be an integer, got '10%'" in err and len(err.splitlines()) == 1
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    kustomization["patches"] = [x for x in kustomization["patches"] if x["path"] != "later.yaml"]  # dropped
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    rollout = overlay / "rollout.yaml"
    original = rollout.read_bytes()
    api.edit({"metadata": {"annotations": {"motlens.io/production-version": "="}}})
    assert main(["promote", "sync-overlay"]) == 2
    err = capsys.readouterr().err
    assert "its output does not parse" in err and "is left as it was" in err and len(err.splitlines()) == 1
    assert rollout.read_bytes() == original


def test_status_prints_the_overlay_row_as_text(k8s, capsys, monkeypatch, tmp_path):
    """A checkout path with brackets, a URI and an event's reason that read as markup, are shown as they
    are (a reason `see [/] log` stopped `status` with a MarkupError)."""
    import shutil

    import predlog
    from motlens.cli import main
    from promotion.audit import Event

    env, api, settings, target = k8s
    _canary_live(env, settings, target)
    reader = predlog.open_reader()
    try:
        reader.insert_promotion_event(Event("alias_set", "ops[bot]", "registry", reason="see [/] log").row())
    finally:
        reader.close()
    manifests = tmp_path / "deploy[prod]" / "manifests"
    shutil.copytree(env.manifests, manifests)
    api.edit({"metadata": {"annotations": {"motlens.io/production-storage-uri": "s3://b/[red]/model"}}})
    monkeypatch.setenv("MOTLENS_PROMOTE_MANIFESTS_DIR", str(manifests))
    monkeypatch.setenv("MOTLENS_PROMOTE_NAMESPACE", NS)
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["promote", "status", "--target", "k8s"]) == 0
    out = capsys.readouterr().out
    assert "deploy[prod]" in out and "production-storage-uri:" in out and "→ s3://b/[red]/model" in out
    assert "alias_set → by ops[bot] see [/] log" in out
