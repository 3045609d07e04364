"""``motlens demo``: the main job end to end on embedded defaults.

Synthetic DVSA bulk files → tidy table → train (MLflow run on sqlite) → register → alias
``production`` → serve with the real KServe server → answer a sample request and print it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from training.data_cli import positive

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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthetic data → train → register → production → serve → sample request")
    p.add_argument("--rows", type=positive, default=30_000, help="synthetic defect rows (default 30000)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--grpc-port", type=int, default=8081)
    p.add_argument("--serve", action="store_true", help="keep serving after the sample request (Ctrl-C stops)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from motlens.cli import require

    require("kserve", "serve")  # before minutes of work, not after
    require("sklearn", "train")
    require("matplotlib", "train")
    from motlens.credentials import redact
    from motlens.state import StateSettings
    from training.dataset import DataError
    from training.registry import Registry, RegistryError
    from training.synth import generate
    from training.train import TrainSettings, train

    console = Console()
    state = StateSettings().ensure()
    bulk = state.home / "demo" / "bulk"
    console.rule(f"1/4 synthetic MOT bulk files → {bulk}")
    console.print(generate(bulk, rows=args.rows, seed=args.seed))

    console.rule("2/4 train + register (MLflow on sqlite)")
    registry = Registry()
    try:
        result = train(bulk, TrainSettings(seed=args.seed, alias="candidate"), registry=registry)
        version = result.version.version
        registry.set_alias("production", version)
    except (DataError, RegistryError) as e:  # e.g. too few rows to split; the registry unreachable
        print(f"motlens demo: {e}", file=sys.stderr)
        return 2
    console.print({k: round(v, 4) for k, v in result.metrics.items() if "macro_f1" in k})
    console.print(f"mot-defects version {version}: aliases candidate, production ({redact(registry.tracking_uri)})")

    console.rule("3/4 serve models:/mot-defects@production")
    response = _serve_and_ask(args, console)
    console.rule("4/4 sample request → POST /v2/models/mot-defects/infer")
    console.print_json(json.dumps(response))
    return 0


def _serve_and_ask(args: argparse.Namespace, console: Any) -> dict[str, Any]:
    import sys
    import time

    import predlog
    from predictor.settings import ServeSettings

    argv, sys.argv = sys.argv, sys.argv[:1]  # kserve parses sys.argv on import
    try:
        from predictor.server import PredictorServer, ServerThread
    finally:
        sys.argv = argv
    settings = ServeSettings(model="models:/mot-defects@production", http_port=args.http_port,
                             grpc_port=args.grpc_port)  # fmt: skip
    thread = ServerThread(PredictorServer(settings, writer=predlog.open_writer())).start().wait_ready()
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
