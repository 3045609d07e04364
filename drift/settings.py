"""Settings of the drift job (env prefix ``MOTLENS_DRIFT_``; a Kubernetes CronJob sets these as env)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from drift.windows import current_window, parse_duration, reference_spec
from motlens import MODEL_NAME
from motlens.credentials import pushgateway_url
from motlens.envsource import SettingPath
from motlens.times import parse_time

EmbeddingMethod = Literal["model", "mmd", "ratio", "distance"]


def _log_read_limit() -> int:
    """The most rows one prediction-log read returns (``PredlogSettings.max_window_rows``, as the job opens the
    log); its default when the log's own settings are bad (`motlens drift` refuses those at start)."""
    from pydantic import ValidationError

    from predlog.settings import PredlogSettings

    try:
        return PredlogSettings().max_window_rows
    except ValidationError:
        return int(PredlogSettings.model_fields["max_window_rows"].default)


class DriftSettings(BaseSettings):
    """Every knob of ``motlens drift``; CLI flags override these."""

    # an empty variable is unset (MOTLENS_DRIFT_OUTPUT= is the default, not the working directory); no NaN or
    # infinity in any float
    model_config = SettingsConfigDict(
        env_prefix="MOTLENS_DRIFT_", extra="ignore", protected_namespaces=(), env_ignore_empty=True, allow_inf_nan=False
    )

    model_name: str = MODEL_NAME
    version: str | None = Field(default=None, description="model version; default: the one the slot's alias names")
    slot: Literal["production", "canary"] = Field(
        default="production",
        description="the alias that names the version; 'canary' only in canary mode, whose verdict the slot names",
    )
    window: str = Field(default="24h", description="current window: a duration ending now (30m, 24h, 7d)")
    end: str | None = Field(default=None, description="end of the current window (ISO-8601, UTC); default now")
    reference: str = Field(
        default="bundle",
        description="'bundle' (the version's reference sample), a duration before the current window "
        "(7d), START/END (ISO-8601), or a path to a bundle directory or a Parquet file",
    )
    canary: bool = Field(default=False, description="compare the canary slot against production instead")
    skip_without_canary: bool = Field(
        default=False, description="canary mode with no 'canary' alias (no rollout on): exit 0, nothing published"
    )
    verdict_exit_codes: bool = Field(
        default=True,
        description="exit 1 on drift and 2 on insufficient data; off: exit 0 for every verdict and 2 only when "
        "the job failed (CronJobs: a non-zero exit marks the Job failed and runs it again)",
    )
    output: SettingPath = Path("drift-report")
    max_rows: int = Field(default=50_000, ge=1, description="row cap per window for the column drift")
    embedding_max_rows: int = Field(default=2_000, ge=1, description="row cap per window for embedding drift")
    min_rows: int = Field(default=200, ge=2, description="fewer rows than this in a window is insufficient data")
    min_embedding_rows: int = Field(default=100, ge=32, description="at least 32: t-SNE needs more than 30 points")
    drift_share: float = Field(
        default=0.1, gt=0, le=1, description="share of drifted columns that means drift (0.1: any one column)"
    )
    alpha: float = Field(
        default=0.01, gt=0, lt=1, description="small windows: family-wise significance over the columns (Bonferroni)"
    )
    large_window_rows: int = Field(
        default=5_000,
        ge=2,
        description="a column with at least this many values on both sides uses effect sizes, "
        "not p-values (missing values left out); the ratio embedding method's switch, by rows",
    )
    effect_threshold: float = Field(default=0.1, gt=0, description="large windows: normed Wasserstein (numerical)")
    cat_effect_threshold: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="large windows: the floor of the Jensen-Shannon distance threshold (categorical), raised "
        "per column above chance (drift.evaluate.js_threshold); 0.1 missed a section share moving from 20 % "
        "to 29 % that the p-value test flags far below 5,000 rows",
    )
    cat_method: str | None = Field(
        default=None, description="override the categorical stat test (an Evidently stat test name)"
    )
    num_method: str | None = Field(default=None, description="override the numerical stat test (an Evidently name)")
    column_threshold: float | None = Field(
        default=None, gt=0, description="override the per-column threshold (a p-value level or a distance)"
    )
    rare_category_share: float = Field(
        default=0.01, ge=0, lt=1, description="make/fuel values rarer than this in the reference become (other)"
    )
    embedding_method: EmbeddingMethod = "model"
    embedding_threshold: float | None = Field(
        default=None, ge=0, description="default: the method's own; below 1 for `model` (ROC AUC) and `ratio` (a share)"
    )
    embedding_quantile: float = Field(
        default=0.999, gt=0.5, lt=1, description="model method: quantile of a random classifier's ROC AUC"
    )
    canary_min_agreement: float = Field(default=0.85, ge=0, le=1)
    canary_confidence: float = Field(
        default=0.95, gt=0.5, lt=1, description="canary: agreement below the minimum is drift only at this confidence"
    )
    canary_min_cosine: float = Field(default=0.99, ge=-1, le=1)
    canary_max_score_shift: float = Field(
        default=0.1, ge=0, le=1, description="canary: mean |difference| of each model score on shared texts"
    )
    min_shared_texts: int = Field(default=20, ge=1)
    seed: int = Field(default=0, ge=0)
    pushgateway: str | None = None
    textfile: SettingPath | None = None
    pushgateway_job: str = "motlens-drift"
    log_artifact: bool = Field(default=True, description="log the outputs to the version's MLflow run")
    html: bool = Field(default=True, description="write the HTML reports (off: scores only, no t-SNE plot)")
    progress: bool = True

    @field_validator("pushgateway")
    @classmethod
    def _no_pushgateway_credentials(cls, v: str | None) -> str | None:
        return pushgateway_url(v)

    @field_validator("window")
    @classmethod
    def _duration(cls, v: str) -> str:
        parse_duration(v)  # ValueError naming the problem
        return v

    @field_validator("embedding_threshold")
    @classmethod
    def _threshold_the_score_can_cross(cls, v: float | None, info: ValidationInfo) -> float | None:
        """Drift is a score above the threshold: one the method's score never exceeds turns the check off."""
        scale = {"model": "ROC AUC", "ratio": "share of drifted components"}.get(info.data.get("embedding_method", ""))
        if v is not None and scale and v >= 1:
            method = info.data["embedding_method"]
            raise ValueError(f"the {method} method's {scale} never exceeds 1: a threshold of {v:g} turns the check off")
        return v

    @field_validator("end")
    @classmethod
    def _time(cls, v: str | None, info: ValidationInfo) -> str | None:
        """A time the log can hold, and a window ending there that starts after 1970 (checked together
        with a valid window: each passed alone, and the run stopped with an unexpected error)."""
        if v:
            parse_time(v)
            if "window" in info.data:
                current_window(info.data["window"], v)
        return v

    @field_validator("reference")
    @classmethod
    def _readable_reference(cls, v: str, info: ValidationInfo) -> str:
        """The run's own check (``reference_spec``) against the current window; a bad window or end is
        reported on its own."""
        try:
            window = current_window(info.data["window"], info.data.get("end"))
        except (KeyError, ValueError):
            return v
        reference_spec(v, window)
        return v

    @field_validator("cat_method", "num_method")
    @classmethod
    def _registered_stat_test(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:
            from drift.stattests import registered

            try:
                registered(v, categorical=info.field_name == "cat_method")  # imports Evidently
            except ImportError:  # the drift extra is missing: the CLI says so next
                pass
        return v

    @field_validator("max_rows", "embedding_max_rows")
    @classmethod
    def _one_log_read(cls, v: int) -> int:
        limit = _log_read_limit()
        if v > limit:
            raise ValueError(
                f"at most {limit}: the prediction log reads no more rows at once (MOTLENS_PREDLOG_MAX_WINDOW_ROWS)"
            )
        return v

    @model_validator(mode="after")
    def _caps_reach_the_minimums(self) -> DriftSettings:
        """A row cap below its minimum makes every window too small: refused, not a run that always
        answers `insufficient` naming the cap as the window's size."""
        for cap, least in (("max_rows", "min_rows"), ("embedding_max_rows", "min_embedding_rows")):
            if getattr(self, cap) < getattr(self, least):
                raise ValueError(
                    f"{cap} ({getattr(self, cap)}) is below {least} ({getattr(self, least)}): every window "
                    f"would be too small; raise {cap} or lower {least}"
                )
        return self

    @model_validator(mode="after")
    def _canary_slot_is_canary_mode(self) -> DriftSettings:
        """A drift report of slot canary is the canary-against-production verdict (promotion's drift gate
        and the canary alerts read it so); a version-mode run must not be recorded as one."""
        if self.slot == "canary" and not self.canary:
            raise ValueError(
                "slot 'canary' outside canary mode would record the version against its reference as the "
                "canary's verdict (slot canary: promotion's drift gate); use --canary to compare the canary "
                "with production, or --version V to check that version against its reference (slot production)"
            )
        return self
