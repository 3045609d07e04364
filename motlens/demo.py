"""``motlens demo``: the main job end to end on embedded defaults.

Synthetic DVSA bulk files → tidy table → train (MLflow run on sqlite) → register → alias
``production`` → serve with the real KServe server → answer a sample request and print it.

What would make serving fail (another process owning the prediction log, a port in use) is checked
before any work (exit 2). A version below the quality floors is registered without an alias and never
made ``production`` (exit 3, as ``motlens train``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from training.data_cli import count, positive

SAMPLE = {
    "inputs": [
        {
            "name": "text",
            "datatype": "BYTES",
            "shape": [3],
            "data": [
                "Nearside Front Brake pipe excessively corroded (1.1.11 (c))",
                "Offside Rear Tyre tread depth below requirements of 1.6mm (5.2.3 (e))",
                "Windscreen wiper does not clear the windscreen effectively (3.4 (b))",
            ],
        },
        {"name": "vehicle_age_years", "datatype": "FP32", "shape": [3], "data": [12.5, 7.0, 3.2]},
        {"name": "fuel_type", "datatype": "BYTES", "shape": [3], "data": ["PE", "DI", "EL"]},
    ]
}


def port(text: str) -> int:
    """argparse type: a TCP port, 1-65535."""
    n = positive(text)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"must be 65535 or less, got {n}")
    return n


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthetic data → train → register → production → serve → sample request")
    p.add_argument("--rows", type=positive, default=30_000, help="synthetic defect rows (default 30000)")
    p.add_argument("--seed", type=count, default=7)
    p.add_argument("--http-port", type=port, default=8080)
    p.add_argument("--grpc-port", type=port, default=8081)
    p.add_argument("--serve", action="store_true", help="keep serving after the sample request (Ctrl-C stops)")
    p.set_defaults(func=run)


#: the closing line's advice when the trained version failed its quality floors
FLOORS_HINT = (
    "'production' not moved, nothing served; a larger --rows (default 30000) trains a better model, "
    'MOTLENS_TRAIN_FLOOR_MARGIN / MOTLENS_TRAIN_FLOOR_AUC_MARGIN set the floors (docs/training.md "Quality floors")'
)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from motlens.cli import require

    require("kserve", "serve")  # before minutes of work, not after
    require("sklearn", "train")
    require("matplotlib", "train")
    from pydantic import ValidationError

    from motlens.credentials import redact
    from motlens.errors import validation_problems
    from motlens.state import StateSettings
    from predictor.cli import unrunnable_device
    from predlog.spool import SpoolBusy
    from promotion.audit import record_alias_set
    from promotion.settings import default_actor
    from training.dataset import DataError
    from training.registry import Registry, RegistryError
    from training.synth import generate
    from training.train import TrainSettings, train
    from training.train_cli import say_audit_gaps, say_withheld

    # every setting first: a bad MOTLENS_SERVE_* value once stopped the demo after it had registered;
    # each problem of both, by the flag or variable that set it
    problems: list[str] = []
    try:
        train_settings = TrainSettings(seed=args.seed, alias="candidate")
    except ValidationError as e:
        problems += validation_problems(e, {"seed": "--seed"})
    try:
        serve_settings = _serve_settings(args)
    except ValidationError as e:
        problems += validation_problems(e, {"http_port": "--http-port", "grpc_port": "--grpc-port"})
    if problems:
        for line in problems:
            print(f"motlens demo: bad setting: {line}", file=sys.stderr)
        return 2
    if (problem := unrunnable_device(serve_settings)) is not None:  # its load would be retried for ever
        print(f"motlens demo: bad setting: {problem}", file=sys.stderr)
        return 2
    problem = preflight(args)  # before anything is trained, registered or aliased
    if problem is not None:
        print(f"motlens demo: {problem}", file=sys.stderr)
        return 2
    try:  # a registry no client can open (a home its sqlite URI cannot carry, a bad MLFLOW_TRACKING_URI)
        registry = Registry()
        registry.check_uri()
    except RegistryError as e:
        print(f"motlens demo: {e}", file=sys.stderr)
        return 2
    console = Console()
    state = StateSettings().ensure()
    bulk = state.home / "demo" / "bulk"
    console.rule(f"1/4 synthetic MOT bulk files → {bulk}")
    console.print(generate(bulk, rows=args.rows, seed=args.seed))

    console.rule("2/4 train + register (MLflow on sqlite)")
    try:
        result = train(bulk, train_settings, registry=registry)
        version = result.version.version
        gaps = result.audit_gaps
        if not result.alias_withheld:  # below the quality floors: registered, but never production
            previous = registry.alias_version("production")
            registry.set_alias("production", version)
            gaps = gaps + record_alias_set(
                registry, alias="production", version=version, previous=previous, actor=default_actor(),
                reason="motlens demo", run_id=result.version.run_id or "",
            )  # fmt: skip
        say_audit_gaps(version, gaps, "motlens demo")
        aliases = registry.resolve(version).aliases  # what the registry holds, read back
    except (DataError, RegistryError) as e:  # e.g. too few rows to split; the registry unreachable
        print(f"motlens demo: {e}", file=sys.stderr)
        return 2
    console.print({k: round(v, 4) for k, v in result.metrics.items() if "macro_f1" in k})
    console.print(
        f"mot-defects version {version}: aliases {', '.join(aliases) or 'none'} ({redact(registry.tracking_uri)})"
    )
    if result.alias_withheld:
        return say_withheld(result, "motlens demo", FLOORS_HINT)  # exit 3, as `motlens train`

    console.rule("3/4 serve models:/mot-defects@production")
    try:
        response = _serve_and_ask(args, serve_settings, console)
    except SpoolBusy as e:  # a `motlens serve` started on this MOTLENS_HOME while the demo trained
        print(f"motlens demo: {e}", file=sys.stderr)
        return 2
    console.rule("4/4 sample request → POST /v2/models/mot-defects/infer")
    console.print_json(json.dumps(response))
    return 0


def preflight(args: argparse.Namespace) -> str | None:
    """Why serving would fail after the demo trained, registered and moved ``production``, if it
    would: another process owns the prediction log (a ``motlens serve`` on this MOTLENS_HOME), or a
    port is taken. Checked as the writer and the servers will (the spool's lock taken and released;
    a bind); holds nothing."""
    from predlog import PredlogSettings
    from predlog.spool import SpoolBusy, check_free

    settings = PredlogSettings()
    try:
        check_free(settings.spool_dir)
    except SpoolBusy:
        var = "MOTLENS_PREDLOG_DIR" if settings.dir else "MOTLENS_HOME"
        return (
            f"another motlens process (a running `motlens serve`?) owns the prediction log at {settings.root}; "
            f"stop it or set {var} to another directory"
        )
    for flag, port in (("--http-port", args.http_port), ("--grpc-port", args.grpc_port)):
        if (why := _cannot_listen(port)) is not None:
            return f"port {port} is {why}; stop what listens there (a running `motlens serve`?) or pick another {flag}"
    if args.http_port == args.grpc_port:
        return f"--http-port and --grpc-port are both {args.http_port}"
    return None


def _cannot_listen(port: int) -> str | None:
    """Why a server cannot listen on ``port`` (all interfaces), if it cannot."""
    import errno
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            return "in use" if e.errno == errno.EADDRINUSE else f"not available ({e.strerror})"
    return None


def _serve_settings(args: argparse.Namespace) -> Any:
    from predictor.settings import ServeSettings

    return ServeSettings(model="models:/mot-defects@production", http_port=args.http_port, grpc_port=args.grpc_port)


def _serve_and_ask(args: argparse.Namespace, settings: Any, console: Any) -> dict[str, Any]:
    import sys
    import time

    import predlog

    writer = predlog.open_writer()  # SpoolBusy before any server starts
    argv, sys.argv = sys.argv, sys.argv[:1]  # kserve parses sys.argv on import
    try:
        from predictor.server import PredictorServer, ServerThread
    finally:
        sys.argv = argv
    thread = ServerThread(PredictorServer(settings, writer=writer)).start().wait_ready()
    try:
        response = _post_json(f"http://127.0.0.1:{args.http_port}/v2/models/mot-defects/infer", SAMPLE)
        if args.serve:
            console.print_json(json.dumps(response))
            console.print(f"serving on :{args.http_port} (REST) and :{args.grpc_port} (gRPC); Ctrl-C stops")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        thread.stop()
    return response


def _post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST ``body`` as JSON; the JSON answer (an HTTP error status raises ``HTTPError``)."""
    from urllib.request import Request, urlopen

    request = Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urlopen(request, timeout=60) as response:
        return json.load(response)
