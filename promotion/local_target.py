"""The local target: a single box without Kubernetes, driving ``motlens serve``'s admin API.

``motlens serve`` hosts a ``production`` and a ``canary`` slot and splits traffic by the canary
percent (docs/predictor.md); this target moves it exactly as the others move the InferenceService:
load a version into the canary slot, set the percent, promote (canary → production) or roll back
(canary unloaded). Slot swaps are drained by the server, so no request fails during a step.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from contextlib import AbstractContextManager
from typing import Any

from motlens import MODEL_NAME
from motlens.credentials import redact
from motlens.state import StateSettings
from promotion.locking import file_lock
from promotion.rollout import RolloutState
from promotion.settings import PromoteSettings
from promotion.targets import TargetError, TargetUnavailable

ADMIN = "/motlens/admin"
#: what a 404 from a route of the admin API means: the server runs without it (predictor.settings.admin_enabled)
ADMIN_OFF = (
    "the predictor's admin API is off; start it with `motlens serve --admin` (or MOTLENS_SERVE_ADMIN_ENABLED=true)"
)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: urllib would send the admin token to whatever host one names (a
    login page, a plain-http downgrade); the 3xx comes back as an :class:`urllib.error.HTTPError`."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


class LocalTarget:
    name = "local"
    pins_digest = False  # the server fetches models:/ references through the registry, which checks them

    def __init__(self, settings: PromoteSettings, state: StateSettings | None = None) -> None:
        self.settings = settings
        self.base = settings.local_url.rstrip("/")
        self.lock_path = (state or StateSettings()).home / "promotion.lock"  # created by the first lock

    def describe(self) -> str:
        return f"local motlens serve at {redact(self.base)}"

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.settings.local_token is not None:
            req.add_unredirected_header("Authorization", f"Bearer {self.settings.local_token.get_secret_value()}")
        try:
            # a status read answers at once: a server that accepts and stays silent is not ready, and
            # `promote status` should say so in seconds, not after a canary load's allowance
            timeout = self.settings.read_timeout_s if method == "GET" else self.settings.http_timeout_s
            with _OPENER.open(req, timeout=timeout) as resp:
                answer = json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read()).get("error", "")
            except ValueError:
                detail = ""
            message = f"{method} {path} on {self.describe()}: HTTP {e.code} {detail}".rstrip()
            if e.code == 404 and detail in ("", "Not Found"):  # no such route, not an admin route's own 404
                message += f": {ADMIN_OFF}"
            elif 300 <= e.code < 400:
                message += (
                    f" (a redirect to {redact(e.headers.get('Location') or '?')}, not followed: set "
                    "MOTLENS_PROMOTE_LOCAL_URL to the server's own address)"
                )
            elif e.code == 401:
                message += (
                    " (MOTLENS_PROMOTE_LOCAL_TOKEN is not the server's MOTLENS_SERVE_ADMIN_TOKEN)"
                    if self.settings.local_token is not None
                    else " (set MOTLENS_PROMOTE_LOCAL_TOKEN to the server's MOTLENS_SERVE_ADMIN_TOKEN)"
                )
            raise TargetError(message) from e
        except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out: down or (re)starting
            raise TargetUnavailable(f"cannot reach {self.describe()} ({method} {path}): {e}") from e
        except ValueError as e:  # http.client refuses a header it cannot send; its message quotes the token
            raise TargetError(
                f"{method} {path} on {self.describe()}: the request could not be sent ({type(e).__name__}; "
                "a control character in MOTLENS_PROMOTE_LOCAL_TOKEN?)"
            ) from None
        if not isinstance(answer, dict):
            raise TargetError(f"{method} {path} on {self.describe()}: the answer is not a motlens admin API's")
        return answer

    def slots(self) -> dict[str, Any]:
        st = self._request("GET", f"{ADMIN}/slots")
        slots = st.get("slots")
        if not (isinstance(slots, dict) and all(isinstance(slots.get(k), dict) for k in ("production", "canary"))):
            raise TargetError(
                f"GET {ADMIN}/slots on {self.describe()}: the answer names no production and canary slots "
                "(is MOTLENS_PROMOTE_LOCAL_URL a motlens serve?)"
            )
        return st

    def read(self) -> RolloutState:
        return self._state(self.slots())

    def _state(self, st: dict[str, Any]) -> RolloutState:
        prod, canary = st["slots"]["production"], st["slots"]["canary"]
        active = canary.get("version") is not None
        pct = float(st.get("canary_percent") or 0.0)
        loading = [f"{slot} loading {s['loading']}" for slot, s in st["slots"].items() if s.get("loading")]
        not_ready = "" if st.get("ready") else str(st.get("reason") or "no reason given")
        traffic = f"production {100 - pct:g}%" + (f", canary {pct:g}%" if active else "")
        prod_ref, canary_ref = self._pinned(prod), self._pinned(canary)
        return RolloutState(
            storage_uri=canary_ref if active else prod_ref,
            production_version=prod.get("version"),
            production_uri=prod_ref,
            canary_version=canary.get("version") if active else None,
            percent=round(pct) if active else None,
            traffic=", ".join([traffic, *loading, f"not ready: {not_ready}" if not_ready else "ready"]),
            not_ready=not_ready,
            loading=", ".join(loading),
        )

    def _pinned(self, slot: dict[str, Any]) -> str | None:
        """A registry ref as the version it loaded (``models:/mot-defects@production`` serving
        version 1 → ``models:/mot-defects/1``), so an alias ref agrees with the version it resolved to."""
        ref, version = slot.get("ref"), slot.get("version")
        if ref and version is not None and str(ref).startswith(f"models:/{MODEL_NAME}"):
            return self.uri_for(str(version), "")
        return ref

    def plan(self, desired: RolloutState) -> list[dict[str, Any]]:
        """Admin calls, in order, that take the server from its live state to ``desired``."""
        st = self.slots()
        live = self._state(st)
        raw_percent = float(st.get("canary_percent") or 0.0)  # set by hand it may be 12.5: ``live`` says 12
        ops: list[dict[str, Any]] = []
        if live.canary_active and not desired.canary_active:
            if desired.production_version == live.canary_version:
                ops.append({"method": "POST", "path": f"{ADMIN}/promote"})
                live = live.promoted()
            else:
                ops.append({"method": "POST", "path": f"{ADMIN}/rollback"})
                live = RolloutState(
                    storage_uri=live.production_uri,
                    production_version=live.production_version,
                    production_uri=live.production_uri,
                )
        if desired.production_uri and desired.production_uri != live.production_uri:
            ops.append(
                {
                    "method": "POST",
                    "path": f"{ADMIN}/slots/production/load",
                    "body": {"ref": desired.production_uri},
                }
            )
        if desired.canary_active:
            if desired.canary_version != live.canary_version or desired.storage_uri != live.storage_uri:
                ops.append(
                    {
                        "method": "POST",
                        "path": f"{ADMIN}/slots/canary/load",
                        "body": {"ref": desired.storage_uri},
                    }
                )
                live = RolloutState(storage_uri=None, percent=0, canary_version=desired.canary_version)
            if desired.percent != live.percent or float(desired.percent or 0) != raw_percent:
                ops.append(
                    {
                        "method": "POST",
                        "path": f"{ADMIN}/canary/percent",
                        "body": {"percent": desired.percent},
                    }
                )
        return ops

    def apply(self, desired: RolloutState) -> list[dict[str, Any]]:
        ops = self.plan(desired)
        for op in ops:
            self._request(op["method"], op["path"], op.get("body"))
        return ops

    def lock(self, *, blocking: bool) -> AbstractContextManager[None]:
        return file_lock(self.lock_path, blocking=blocking)

    def check_lock(self) -> None:
        """A file lock is held until released: nothing to check."""

    def uri_for(self, version: str, artifact_uri: str) -> str:
        return f"models:/{MODEL_NAME}/{version}"
