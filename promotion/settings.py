"""Promotion settings (``MOTLENS_PROMOTE_*`` environment variables or ``motlens promote`` flags)."""

from __future__ import annotations

import getpass
import os
import socket
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from motlens.credentials import bearer_token, has_credentials, pushgateway_url
from motlens.envsource import EmptyIsUnsetSettings, SettingPath
from training.floors import DEFAULT_AUC_MARGIN, DEFAULT_MARGIN, GATEABLE_METRICS

TARGETS = ("k8s", "gitops", "local")
#: bounds of waits and timeouts: far below threading.TIMEOUT_MAX (Event.wait and socket timeouts overflow near it)
HOUR_S = 3600
DAY_S = 86_400
WEEK_S = 7 * DAY_S


class PromoteSettings(EmptyIsUnsetSettings):
    """Where the rollout lives, how it steps and what the gates tolerate."""

    # no NaN or infinity in any float; an empty variable is unset (EmptyIsUnsetSettings: not env_ignore_empty,
    # which would read an empty STEPS or OFFLINE_METRICS as the default list instead of refusing it)
    model_config = SettingsConfigDict(
        env_prefix="MOTLENS_PROMOTE_", extra="ignore", hide_input_in_errors=True, allow_inf_nan=False
    )
    #: STEPS= or OFFLINE_METRICS= stays an empty list, refused: it was meant to change them
    keep_empty = ("steps", "offline_metrics")

    target: str = Field("local", description="k8s | gitops | local")
    actor: str | None = Field(None, description="who is acting (default: user@host, see default_actor)")

    # Kubernetes API target
    namespace: str = "default"
    isvc_name: str = "mot-defects"
    kubeconfig: str | None = None
    kube_context: str | None = None
    lease_seconds: int = Field(300, ge=10, le=DAY_S, description="k8s Lease duration for mutating runs")
    clock_skew_s: float = Field(
        600.0,
        ge=0.0,
        le=DAY_S,
        description="how far another host's clock may run behind: a Lease is taken over by its renewTime "
        "only once older than its duration plus this (a blocking run also times it itself)",
    )

    # GitOps target
    manifests_dir: SettingPath = Path("manifests")
    overlay: str = "cpu"

    # local target (the admin API of `motlens serve`)
    local_url: str = "http://127.0.0.1:8080"
    local_token: SecretStr | None = Field(None, description="bearer token of the serve admin API")
    http_timeout_s: float = Field(300.0, gt=0, le=DAY_S, description="a canary load includes the golden check")
    read_timeout_s: float = Field(30.0, gt=0, le=HOUR_S, description="the local admin API's status reads (GET)")

    # stepping
    steps: Annotated[list[int], NoDecode] = Field(default_factory=lambda: [10, 25, 50, 100])
    min_step_interval_s: float = Field(600.0, ge=0.0, le=WEEK_S, description="dwell before `auto` steps")
    step_tolerance_s: float = Field(
        120.0,
        ge=0.0,
        le=WEEK_S,
        description="how much of the dwell a step may fall short by (at most half of it): the time a run "
        "takes to apply its step, so that runs every MIN_STEP_INTERVAL_S step at each run",
    )

    # gates
    offline_metrics: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["section_macro_f1", "severity_macro_f1", "fail_auc"],
        description="run metrics (higher is better) a canary may not lose beyond offline_tolerance",
    )
    offline_tolerance: float = Field(
        0.01, ge=0.0, lt=1.0, description="the metrics lie in [0, 1]: a tolerance of 1 passes every canary"
    )
    paired: bool = Field(
        True,
        description="compare on the candidate's stored held-out texts, production's head scored on them too "
        "(promotion.paired_check); false: the two runs' logged metrics",
    )
    paired_resamples: int = Field(1000, ge=100, le=100_000, description="bootstrap draws of the held-out texts")
    paired_confidence: float = Field(
        0.9, gt=0.5, lt=1.0, description="two-sided level of the difference's interval (0.9: 5 % in each tail)"
    )
    floors: bool = Field(
        True, description="the offline gate re-checks the candidate's quality floors (training.floors)"
    )
    floor_margin: float = Field(
        DEFAULT_MARGIN, ge=0.0, le=1.0, description="an offline metric's floor: its baseline + this"
    )
    floor_auc_margin: float = Field(DEFAULT_AUC_MARGIN, ge=0.0, le=0.5, description="an AUC's floor: 0.5 + this")
    golden_check: bool = True
    require_drift_report: bool = True
    min_samples: int = Field(200, ge=0, description="canary requests (and latencies a side) needed since the last step")
    live_confidence: float = Field(
        0.95, gt=0.5, lt=1.0, description="one-sided level of the live gate's bounds (fail above, pass below)"
    )
    max_error_rate: float = Field(0.01, ge=0.0, le=1.0)
    error_rate_margin: float = Field(0.005, ge=0.0, le=1.0, description="canary may exceed prod by this")
    max_p99_ratio: float = Field(1.5, gt=0.0, le=100.0, description="canary p99 latency / production p99 latency")
    p99_slack_ms: float = Field(
        20.0, ge=0.0, le=60_000.0, description="absolute p99 allowance on top of the ratio (at most a minute)"
    )

    # metrics export (as the drift job does: Pushgateway when set, else a textfile when set)
    pushgateway_url: str | None = None
    textfile: SettingPath | None = None

    @field_validator("target")
    @classmethod
    def _known_target(cls, v: str) -> str:
        if v not in TARGETS:
            raise ValueError(f"unknown target {v!r}: use one of {', '.join(TARGETS)}")
        return v

    @field_validator("local_token")
    @classmethod
    def _sendable_token(cls, v: SecretStr | None) -> SecretStr | None:
        return bearer_token(v, "the admin token")

    @field_validator("pushgateway_url")
    @classmethod
    def _no_pushgateway_credentials(cls, v: str | None) -> str | None:
        return pushgateway_url(v)

    @field_validator("local_url")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        """Printed in status, errors and audit events: the admin token has its own, secret, setting."""
        if has_credentials(v):
            raise ValueError("credentials in the URL are refused: put the admin token in MOTLENS_PROMOTE_LOCAL_TOKEN")
        if not v.lower().startswith(("http://", "https://")):
            raise ValueError("an http:// or https:// URL of a `motlens serve --admin`, e.g. http://127.0.0.1:8080")
        return v

    @field_validator("steps", "offline_metrics", mode="before")
    @classmethod
    def _comma_list(cls, v: object) -> object:
        if isinstance(v, str):
            v = [s for s in v.replace(" ", "").split(",") if s]
        return v

    @field_validator("offline_metrics")
    @classmethod
    def _known_metrics(cls, v: list[str]) -> list[str]:
        """An empty or misspelt list would pass every canary: nothing compared, no floor checked."""
        if not v:
            raise ValueError(f"name at least one of {', '.join(GATEABLE_METRICS)}")
        unknown = [m for m in v if m not in GATEABLE_METRICS]
        if unknown:
            raise ValueError(
                f"{', '.join(repr(m[:40]) for m in unknown[:3])} not among the metrics training logs "
                f"({', '.join(GATEABLE_METRICS)})"
            )
        return v

    @field_validator("steps")
    @classmethod
    def _valid_steps(cls, v: list[int]) -> list[int]:
        if not v or any(not 0 < s <= 100 for s in v) or sorted(set(v)) != v:
            raise ValueError(f"steps must rise strictly within 1..100, got {v}")
        return v

    @property
    def dwell_s(self) -> float:
        """Seconds after a step's applied time from which `auto` takes the next one."""
        return self.min_step_interval_s - min(self.step_tolerance_s, self.min_step_interval_s / 2)

    @property
    def who(self) -> str:
        return self.actor or default_actor()

    def overlay_dir(self) -> Path:
        return self.manifests_dir / "overlays" / self.overlay


def default_actor() -> str:
    """``user@host`` for the audit when ``MOTLENS_PROMOTE_ACTOR`` is unset: ``$USER``, ``$LOGNAME``, else
    the uid's passwd entry, else ``uid N`` (a container running as an id without one), at this host."""
    user = os.environ.get("USER") or os.environ.get("LOGNAME")
    if not user:
        try:
            user = getpass.getuser()  # LNAME / USERNAME, then the passwd entry of the uid
        except (KeyError, OSError, ImportError):  # no passwd entry (KeyError before Python 3.13)
            user = f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown user"
    return f"{user}@{socket.gethostname() or 'unknown host'}"
