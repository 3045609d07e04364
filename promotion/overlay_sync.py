"""``motlens promote sync-overlay``: the live InferenceService's rollout copied into an overlay.

With ``--target k8s`` the promotion CLI patches the live object, so the overlay's ``rollout.yaml``
keeps the model of the first apply: a later ``kubectl apply -k`` (an image bump, say) would put that
model back at 100 % and end a canary in flight. This copies the live rollout fields (STORAGE_URI, the
bundle digest, ``canaryTrafficPercent``, the ``motlens.io/*`` annotations) into ``rollout.yaml``,
under the promotion Lease so no promotion changes them meanwhile, and checks that the overlay then
renders exactly the live rollout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from motlens.atomic import atomic_write, remove_stale_temps
from promotion.rollout import RolloutError, RolloutState, differences, rollout_yaml, state_from_isvc
from promotion.settings import PromoteSettings
from promotion.targets import GitOpsTarget, K8sTarget, TargetError

log = logging.getLogger(__name__)

SYNC_HEADER = """\
Rollout state of mot-defects (JSON6902), copied from the live InferenceService
{namespace}/{name} by `motlens promote sync-overlay` at {at}: {summary}.
With --target k8s the promotion CLI owns these fields on the live object: run sync-overlay again
right before every `kubectl apply -k` of this overlay (see docs/deploy.md)."""


@dataclass(frozen=True)
class SyncResult:
    """What the overlay rendered before, what is live, and whether the file was (or would be) rewritten."""

    file: str
    overlay_state: RolloutState
    live_state: RolloutState
    written: bool

    @property
    def in_sync(self) -> bool:
        return self.overlay_state == self.live_state


def sync_overlay(settings: PromoteSettings, *, check_only: bool = False) -> SyncResult:
    """Copy the live rollout into ``settings.overlay_dir() / "rollout.yaml"``; ``check_only``: compare only.

    Raises :class:`TargetError` when the cluster or the overlay cannot be read, the overlay renders the
    InferenceService in another namespace, the live object breaks the rollout contract, or the rewritten
    overlay does not render the live rollout (its file is then put back as it was); ``LockLost`` when
    another run takes the Lease over before the write (nothing written).
    """
    overlay = GitOpsTarget(settings)
    live_target = K8sTarget(settings)
    if check_only:  # a read: no Lease (and no permission to write one) needed
        return SyncResult(str(overlay.file), rendered_state(overlay, settings), _live(live_target), written=False)
    before = rendered_state(overlay, settings)  # first: for an overlay of another namespace, no Lease is taken
    with live_target.lock(blocking=True):
        live = _live(live_target)
        if before == live:
            return SyncResult(str(overlay.file), before, live, written=False)
        with overlay.lock(blocking=True):
            for stale in remove_stale_temps(overlay.file):
                log.info("removed %s, left by an interrupted write", stale)
            old = overlay.file.read_bytes()  # put back byte for byte (CRLF line ends included)
            live_target.check_lock()  # LockLost: another run took the Lease over, write nothing
            atomic_write(overlay.file, content(live, settings))
            try:
                after = rendered_state(overlay, settings)
            except BaseException as e:
                atomic_write(overlay.file, old)
                if isinstance(e, TargetError):
                    raise TargetError(f"{e}; after the copy, so {overlay.file} is left as it was") from e
                raise
            if after != live:
                atomic_write(overlay.file, old)
                raise TargetError(
                    f"overlay {overlay.overlay} does not render the live rollout after the copy (rendered → live: "
                    f"{'; '.join(differences(after, live))}): another patch of the overlay sets these fields; "
                    f"{overlay.file} is left as it was"
                )
    log.info("%s: copied the live rollout (%s) over %s", overlay.file, live.describe(), before.describe())
    return SyncResult(str(overlay.file), before, live, written=True)


def overlay_status(settings: PromoteSettings, live: RolloutState) -> dict[str, object] | None:
    """For ``status`` with ``--target k8s``: what re-applying the local overlay checkout would serve,
    against the live rollout; None when there is no checkout here (e.g. the ``auto`` CronJob)."""
    directory = settings.overlay_dir()
    if not (directory / "kustomization.yaml").is_file():
        return None
    try:
        rendered = rendered_state(GitOpsTarget(settings), settings)
    except TargetError as e:
        return {"dir": str(directory), "error": str(e)}
    return {
        "dir": str(directory),
        "in_sync": rendered == live,
        "renders": rendered.describe(),
        "storage_uri": rendered.storage_uri,
        "differences": differences(rendered, live),
    }


def rendered_state(overlay: GitOpsTarget, settings: PromoteSettings) -> RolloutState:
    """The rollout the overlay renders, refused (:class:`TargetError`) when it renders the InferenceService
    into another namespace than the live one read (``settings.namespace``)."""
    isvc = overlay.render()
    namespace = (isvc.get("metadata") or {}).get("namespace")
    if namespace and namespace != settings.namespace:
        raise TargetError(
            f"overlay {overlay.overlay} renders {settings.isvc_name} in namespace {namespace!r}, but the live "
            f"one read is in {settings.namespace!r}: pass --namespace {namespace} or set MOTLENS_PROMOTE_NAMESPACE "
            "(or the matching --overlay / MOTLENS_PROMOTE_OVERLAY)"
        )
    try:
        return state_from_isvc(isvc)
    except RolloutError as e:
        raise TargetError(f"{overlay.describe()}: {e}") from e


def content(state: RolloutState, settings: PromoteSettings) -> str:
    header = SYNC_HEADER.format(
        namespace=settings.namespace,
        name=settings.isvc_name,
        at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        summary=state.describe(),
    )
    return rollout_yaml(header, state)


def _live(target: K8sTarget) -> RolloutState:
    try:
        live = target.read()
    except RolloutError as e:
        raise TargetError(f"{target.describe()}: {e}") from e
    if not live.storage_uri:
        raise TargetError(f"{target.describe()}: its STORAGE_URI has no value to copy")
    return live
