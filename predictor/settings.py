"""Predictor settings (``MOTLENS_SERVE_*`` environment variables or ``motlens serve`` flags)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from motlens.bundle import SHA256_PATTERN
from motlens.credentials import bearer_token
from motlens.embedder import DEVICE_PATTERN, DTYPES
from motlens.envsource import EmptyIsUnsetSettings

DEFAULT_MODEL_REF = "models:/mot-defects@production"


def cgroup_cpu_count() -> int:
    """CPUs this process may use: the cgroup v2 quota when set, else the affinity mask."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            return max(1, int(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


#: what each backend runs (ONNX: the variants ``predictor.backend`` exports)
TORCH_DTYPES = DTYPES
ONNX_DTYPES = ("float32", "fp32", "int8")

#: bounds of waits and timeouts: far below threading.TIMEOUT_MAX (Event.wait and Timer overflow near it)
HOUR_S = 3600
DAY_S = 86_400

#: shortest admin token accepted (e.g. ``openssl rand -hex 16`` gives 32)
MIN_ADMIN_TOKEN_CHARS = 16


class ServeSettings(EmptyIsUnsetSettings):
    """Everything ``motlens serve`` can be told; limits protect the server from hostile input."""

    # no NaN or infinity in any float; an empty variable is unset (EmptyIsUnsetSettings), but MODEL=""
    # is KServe's /mnt/models and MODEL_SHA256="" no pin
    model_config = SettingsConfigDict(
        env_prefix="MOTLENS_SERVE_", extra="ignore", hide_input_in_errors=True, allow_inf_nan=False
    )
    #: empty means something (KServe's /mnt/models, no pin) or is refused (a blank admin token)
    keep_empty = ("model", "model_sha256", "admin_token")

    model: str = Field(DEFAULT_MODEL_REF, description="models:/NAME@ALIAS, models:/NAME/VERSION or a local path")
    model_sha256: str | None = Field(
        None,
        pattern=SHA256_PATTERN,
        description="the sha256 of the bundle.json that `model` must have, or the load is refused; the promotion "
        "CLI sets it beside STORAGE_URI from the version's registry tag (empty = not pinned)",
    )
    follow_alias: str | None = Field(None, description="poll the registry and swap to this alias' version")
    follow_interval_s: float = Field(30.0, gt=0, le=DAY_S)
    lkg_enabled: bool = Field(
        True,
        description="registry unreachable at load: serve the last verified bundle this box served for the "
        "same models:/ reference (re-verified, golden-checked, flagged in motlens_model_fallback)",
    )
    http_port: int = Field(8080, ge=1, le=65535)
    grpc_port: int = Field(8081, ge=1, le=65535)
    enable_grpc: bool = True
    grace_period_s: int = Field(30, ge=0, le=HOUR_S)
    drain_s: float = Field(0.0, ge=0, le=HOUR_S)

    # request limits (4xx beyond them)
    max_items_per_request: int = Field(256, ge=1)
    max_text_chars: int = Field(2000, ge=1)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    body_timeout_s: float = Field(
        30.0, gt=0, le=HOUR_S, description="a request body not fully received this long after it started: 408"
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=HOUR_S,
        description="request headers not complete this long after their first byte: 408 and the connection closed",
    )

    # micro-batcher
    batch_max_items: int = Field(64, ge=1)
    batch_max_tokens: int | None = Field(
        None,
        gt=0,
        description="padded tokens per length bucket (default: 768 on CPU, 4096 on CPU with a packing backend "
        "such as onnx, 65536 on GPU)",
    )
    batch_max_wait_ms: float = Field(2.0, ge=0, le=60_000)
    model_workers: int = Field(
        1, ge=1, le=64, description="batcher workers running the model at once; model threads are split between them"
    )
    queue_capacity: int = Field(1024, ge=1)
    retry_after_s: int = Field(1, ge=0, le=HOUR_S)

    # embedding cache (0 disables it)
    cache_bytes: int = Field(64 * 1024 * 1024, ge=0)

    # backend
    backend: Literal["torch", "onnx"] = "torch"
    device: str | None = Field(None, pattern=DEVICE_PATTERN, description="default: cuda when present")
    dtype: str = "float32"
    threads: int | None = Field(None, ge=1, le=1024)
    single_thread_tokens: int = Field(
        128,
        ge=0,
        description="onnx backend: model calls of at most this many packed tokens (≈ 3 MOT texts) run on one "
        "thread, leaving the other cores to the HTTP side; 0 = every call on all the worker's threads",
    )
    torch_trace: bool = Field(
        True,
        description="torch backend: run the forward pass as a frozen TorchScript graph, checked against the "
        "eager one at load (the GIL released while it runs); false = eager, op by op from Python",
    )
    event_loop_nice: int = Field(
        0,
        ge=0,
        le=19,
        description="nice value of the event-loop thread (Linux); > 0 lets model threads take the CPU first "
        "when the cores are saturated (predictor.priority)",
    )
    gc_freeze: bool = Field(
        True,
        description="before the first model serves, move long-lived objects out of the cyclic GC, once per "
        "process (predictor.heap)",
    )

    # observability
    json_logs: bool = False
    access_log: bool = Field(False, description="uvicorn access lines and KServe's per-request timing lines")
    log_embedding_sample_rate: float = Field(0.01, ge=0.0, le=1.0)
    retired_series_grace_s: float = Field(
        60.0,
        ge=0.0,
        le=HOUR_S,
        description="keep a retired version's request series this long (≈ 2 scrape intervals) so its last "
        "requests are scraped; 0 = remove them at once",
    )

    # deployment slots (local promotion target)
    canary: str | None = Field(None, description="model reference to load into the canary slot at start")
    canary_percent: float = Field(0.0, ge=0.0, le=100.0)
    admin_enabled: bool = Field(False, description="serve /motlens/admin/… (404 otherwise)")
    admin_token: SecretStr | None = Field(
        None, description="if set, the admin API needs 'Bearer <token>'; if not, only loopback clients may use it"
    )

    @field_validator("model_sha256", mode="before")
    @classmethod
    def _empty_is_unpinned(cls, v: object) -> object:
        """``MOTLENS_SERVE_MODEL_SHA256=""`` (the InferenceService's unpinned value) means no pin."""
        return None if v == "" else v

    @field_validator("follow_alias")
    @classmethod
    def _pin_is_one_bundle(cls, v: str | None, info: ValidationInfo) -> str | None:
        """Named by the alias setting (a model validator's problem names no flag or variable)."""
        if v is not None and info.data.get("model_sha256"):
            raise ValueError(
                "model_sha256 (--model-sha256, MOTLENS_SERVE_MODEL_SHA256) pins one bundle, so the server cannot "
                "also follow an alias"
            )
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype_of_the_backend(cls, v: str, info: ValidationInfo) -> str:
        """A dtype the chosen backend runs (whether the device runs it natively: `motlens serve`, at start)."""
        if "backend" not in info.data:  # the backend itself was refused: nothing to check against
            return v
        backend = info.data["backend"]
        allowed = ONNX_DTYPES if backend == "onnx" else TORCH_DTYPES
        if v not in allowed:
            raise ValueError(f"the {backend} backend runs {', '.join(allowed)}, not {v[:40]!r}")
        return v

    @field_validator("admin_token")
    @classmethod
    def _strong_admin_token(cls, v: SecretStr | None) -> SecretStr | None:
        """An empty token (a Secret key that exists but is blank) would admit 'Bearer ' from anywhere;
        one with a trailing newline (a Secret made from a file) could never be matched."""
        v = bearer_token(v, "the admin token")
        if v is not None and len(v.get_secret_value()) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(
                f"admin_token must be at least {MIN_ADMIN_TOKEN_CHARS} characters; "
                "leave it unset to allow loopback clients only"
            )
        return v

    def resolved_batch_max_tokens(self, device: str, packs: bool = False) -> int:
        """Bucket bound: small on CPU (per-text cost falls with less padding, not with batch size), large on GPU.

        A packing backend (several texts per row) pays little for padding, so on CPU its buckets can be
        larger: fewer calls, and the packer gets more texts to fill its rows with.
        """
        if self.batch_max_tokens:
            return self.batch_max_tokens
        if device.startswith("cuda"):
            return 65536
        return 4096 if packs else 768

    def resolved_threads(self) -> int:
        """Model threads per batcher worker: ``threads`` (default: the cgroup CPUs) split between the workers."""
        return max(1, (self.threads or cgroup_cpu_count()) // self.model_workers)
