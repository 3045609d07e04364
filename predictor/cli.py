"""``motlens serve``: the KServe predictor (v1 + v2 REST on --http-port, v2 gRPC on --grpc-port)."""

from __future__ import annotations

import argparse
from collections.abc import Collection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from predictor.server import PredictorServer
    from predictor.settings import ServeSettings

_FLAGS: tuple[tuple[str, type, str], ...] = (
    (
        "--model",
        str,
        "models:/mot-defects@<alias>, models:/mot-defects/<version> or a bundle path "
        "(default models:/mot-defects@production; empty = KServe's /mnt/models)",
    ),
    ("--model-sha256", str, "refuse a --model whose bundle.json has another sha256 (its motlens.bundle_sha256 tag)"),
    ("--http-port", int, "REST port (default 8080)"),
    ("--grpc-port", int, "gRPC port (default 8081)"),
    (
        "--follow-alias",
        str,
        "watch this registry alias and switch production to its version without downtime",
    ),
    ("--follow-interval-s", float, "seconds between alias checks (default 30)"),
    ("--canary", str, "model reference to load into the canary slot"),
    ("--canary-percent", float, "share of traffic for the canary slot, 0-100"),
    ("--backend", str, "embedder backend: torch or onnx"),
    ("--device", str, "cpu, cuda, cuda:1 … (default: cuda when present)"),
    ("--dtype", str, "float32; bfloat16 (GPU, or CPU with AVX512-BF16/AMX); float16 (GPU); golden-checked"),
    ("--threads", int, "CPU threads for the model (default: cgroup CPUs), split between the model workers"),
    ("--model-workers", int, "batcher workers running the model at once (default 1)"),
    ("--single-thread-tokens", int, "onnx: calls of at most this many packed tokens run on one thread (128; 0 = off)"),
    ("--event-loop-nice", int, "nice value of the event-loop thread, 0-19 (Linux; model threads keep theirs)"),
    ("--max-items-per-request", int, "items per request limit"),
    ("--max-text-chars", int, "characters per text limit"),
    ("--max-body-bytes", int, "request body limit (413 beyond)"),
    ("--batch-max-items", int, "micro-batch size limit"),
    ("--batch-max-tokens", int, "padded tokens per length bucket (default 768 on CPU, 4096 onnx, 65536 on GPU)"),
    ("--batch-max-wait-ms", float, "longest wait for a micro-batch to fill"),
    ("--queue-capacity", int, "queued texts before 429"),
    ("--cache-bytes", int, "embedding cache budget in bytes (0 disables it)"),
    ("--log-embedding-sample-rate", float, "share of logged predictions that carry their embedding"),
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve mot-defects over KServe v1/v2 REST and v2 gRPC",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, kind, text in _FLAGS:
        p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument("--json-logs", action="store_true", default=None, help="one JSON object per log line")
    p.add_argument("--access-log", action="store_true", default=None, help="log every request (costly)")
    p.add_argument("--no-grpc", dest="enable_grpc", action="store_false", default=None, help="REST only")
    p.add_argument("--admin", dest="admin_enabled", action="store_true", default=None, help="serve the admin API")
    p.add_argument("--no-predlog", action="store_true", help="do not log predictions")
    p.add_argument(
        "--torch-eager", dest="torch_trace", action="store_false", default=None,
        help="torch: run the model eagerly from Python instead of as a checked TorchScript graph",
    )  # fmt: skip
    p.set_defaults(func=_serve, warns_env_itself=True)


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import sys

    from motlens.cli import require
    from motlens.envcheck import warn_unknown_env

    # unknown MOTLENS_* variables are named once: through the JSON log when serving starts, in plain
    # lines before a refusal at start (where a misspelt setting is most likely the reason)
    try:
        require("kserve", "serve")
        overrides = {
            k: v for k, v in vars(args).items()
            if v is not None and k not in ("func", "command", "verbose", "no_predlog", "warns_env_itself")
        }  # fmt: skip
        from pydantic import ValidationError

        from motlens.errors import flag_names, report_settings
        from predictor.settings import ServeSettings

        try:
            settings = ServeSettings(**overrides)
        except ValidationError as e:  # a line per problem, by the flag or variable that set it
            warn_unknown_env()
            flags = {flag for flag, _, _ in _FLAGS}
            return report_settings("motlens serve", e, {k: f for k, f in flag_names(overrides).items() if f in flags})
        problem = _unloadable_ref(settings, set(overrides)) or unrunnable_device(settings, set(overrides))
    except BaseException:
        warn_unknown_env()
        raise
    if problem is not None:
        warn_unknown_env()
        print(f"motlens serve: bad setting: {problem}", file=sys.stderr)
        return 2
    if settings.json_logs:
        from predictor.logs import use_json_logs

        use_json_logs(logging.DEBUG if args.verbose else logging.INFO)
    warn_unknown_env()
    from predlog.spool import SpoolBusy

    try:
        writer = None if args.no_predlog else _open_predlog()
    except SpoolBusy as e:  # another `motlens serve` (or a demo) on the same prediction log
        print(f"motlens serve: {e}", file=sys.stderr)
        return 2
    argv, sys.argv = sys.argv, sys.argv[:1]  # kserve parses sys.argv when imported; keep ours away from it
    try:
        from predictor.server import PredictorServer, ServerFailed
    finally:
        sys.argv = argv
    server = PredictorServer(settings, writer=writer)
    logging.getLogger(__name__).info(
        "serving %s on http :%d, grpc :%s",
        settings.model,
        settings.http_port,
        settings.grpc_port if settings.enable_grpc else "off",
    )
    try:
        asyncio.run(server.serve(handle_signals=True))
    except ServerFailed:  # serve() logged which server and why
        return _exit_past_running_calls(server, 1)
    return _exit_past_running_calls(server, 0)


def _exit_past_running_calls(server: PredictorServer, code: int) -> int:
    """``code``, or exit at once with it when a model load or registry lookup is still running: the server
    has stopped and flushed its log, and such a call (a registry that never answers, a load that crawls)
    cannot be interrupted, yet its thread would hold the process until its end — past a pod's grace
    period, until SIGKILL."""
    import logging
    import os
    import sys

    if not (running := server.slots.calls_running):
        return code
    logging.getLogger(__name__).warning(
        "exiting without waiting for %d model load(s) or registry lookup(s) still running (not needed now)", running
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _named(field: str, from_flags: Collection[str]) -> str:
    """How a bad setting is named: its flag when the command line set it, else its variable when one is
    set, else the setting."""
    from motlens.errors import env_name, flag_names
    from predictor.settings import ServeSettings

    return flag_names([field])[field] if field in from_flags else env_name(ServeSettings, field) or field


def unrunnable_device(settings: ServeSettings, from_flags: Collection[str] = ()) -> str | None:
    """Why the backend cannot run the configured device and dtype on this machine, if so: every load
    would fail the same way and be retried for ever (live, never ready)."""
    if settings.backend != "torch":
        if settings.device not in (None, "cpu"):
            return f"{_named('device', from_flags)}: the {settings.backend} backend runs on cpu, not {settings.device}"
        return None
    import torch

    from motlens.embedder import check_dtype

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = settings.device or ("cuda" if count else "cpu")
    if device.startswith("cuda") and int(device.partition(":")[2] or 0) >= count:
        return f"{_named('device', from_flags)}: {device} asked for, but torch sees {count} CUDA device(s)"
    try:
        check_dtype(device, settings.dtype)
    except ValueError as e:
        return f"{_named('dtype', from_flags)}: {e}"
    return None


def _unloadable_ref(settings: ServeSettings, from_flags: Collection[str] = ()) -> str | None:
    """Why a configured model reference can never load (unreadable, another model, a missing path), if so,
    by the flag or variable that set it (``from_flags``: the fields the command line set).

    Only the CLI refuses these at start; the server retries every load failure (an unreachable
    registry comes back, an unset alias may be set by a promotion) and its admin API answers a
    missing path with 422.
    """
    from motlens import MODEL_NAME
    from training.registry import Registry, RegistryError

    refs = {"model": settings.model, "canary": settings.canary}
    if settings.follow_alias is not None:
        refs["follow_alias"] = f"models:/{MODEL_NAME}@{settings.follow_alias}"
    for field, ref in refs.items():
        if ref is None or (not ref and field != "model"):
            continue  # no canary; an empty model is KServe's /mnt/models
        name = _named(field, from_flags)
        if ref.startswith("models:/"):
            try:
                registry = Registry()
            except RegistryError as e:  # the local registry's URI: named by its own variable
                return str(e).removeprefix("bad setting: ")
            try:
                registry.canonical_ref(ref)
                registry.check_uri()
            except RegistryError as e:
                return f"{name}: {e}"
            continue
        pin = settings.model_sha256 if field == "model" else None
        if (problem := _unusable_path(ref, settings, pin)) is not None:
            return f"{name}: {problem}"
    return None


def _unusable_path(ref: str, settings: ServeSettings, pin: str | None) -> str | None:
    """Why a local path (empty: KServe's mount) can never load, if so: missing, not one verified bundle
    (or not the ``pin``\ned one), or without the ONNX variant asked for.

    KServe's storage initializer is an init container: it fills /mnt/models before this container
    starts, so a mount missing or incomplete now stays so. Only a modelcar (``STORAGE_URI=oci://…``)
    links /mnt/models from a sidecar that may start after this container; that load is retried.
    """
    import os
    from pathlib import Path

    from motlens.bundle import EMBEDDER_DIR, Bundle, BundleError
    from motlens.credentials import redact
    from motlens.onnx_export import INT8_FILE, ONNX_DIR
    from predictor.backend import KSERVE_MOUNT, ModelLoadError, find_bundle_root

    path = Path(ref).expanduser() if ref else KSERVE_MOUNT
    storage_uri = os.environ.get("STORAGE_URI", "")
    if storage_uri.startswith("oci://") and path.absolute().is_relative_to(KSERVE_MOUNT):
        return None
    if path.exists():
        try:
            bundle = Bundle.open(find_bundle_root(path), pin)
        except (ModelLoadError, BundleError) as e:
            return str(e)
        int8 = bundle.root / EMBEDDER_DIR / ONNX_DIR / INT8_FILE
        if settings.backend == "onnx" and settings.dtype == "int8" and not int8.is_file():
            return f"{bundle.root}: no int8 ONNX model (exported only where it passed its quality gate)"
        return None
    if ref:
        return f"model path {ref} does not exist"
    given = f"STORAGE_URI={redact(storage_uri)}" if storage_uri else "STORAGE_URI is unset"
    return (
        f"no model given and {KSERVE_MOUNT} does not exist ({given}; KServe's storage initializer fills it "
        "before this container starts)"
    )


def _open_predlog():  # noqa: ANN202 - predlog's writer type
    """The prediction-log writer on its embedded/ClickHouse defaults (``MOTLENS_PREDLOG_*``)."""
    import predlog
    from predlog.settings import PredlogSettings

    return predlog.open_writer(PredlogSettings())
