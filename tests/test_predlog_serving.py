"""Fault test while the real predictor serves: the ClickHouse sink fails mid-traffic, then comes back;
the server stops (its SIGTERM path closes the writer). Zero request errors, every row stored once."""

from __future__ import annotations

import socket
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import migrated_reader

MODEL = "mot-defects"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sink_outage_while_serving_loses_nothing_and_fails_no_request(tiny_bundle, embedder, tmp_path):
    import predlog
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings
    from predlog.settings import PredlogSettings

    log_settings = PredlogSettings(
        clickhouse_url="chdb://memory",
        database=f"serve_{uuid.uuid4().hex[:10]}",
        dir=tmp_path / "predlog",
        batch_rows=16,
        flush_interval_s=0.05,
        retry_initial_s=0.05,
        retry_max_s=0.2,
    )
    reader = migrated_reader(log_settings)  # creates the tables and keeps the in-process engine open
    db = log_settings.database
    writer = predlog.open_writer(log_settings)
    settings = ServeSettings(model=str(tiny_bundle.root), http_port=_port(), grpc_port=_port(), grace_period_s=20)
    server = PredictorServer(settings, embedder=embedder, writer=writer, host="127.0.0.1")
    thread = ServerThread(server).start().wait_ready()
    base = f"http://127.0.0.1:{settings.http_port}"
    counter = iter(range(10**6))

    def predict(_: int) -> int:
        texts = [f"Offside Rear Tyre worn close to legal limit, case {next(counter)} (5.2.3 (e))" for _ in range(4)]
        return httpx.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": texts}, timeout=60).status_code

    try:
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(predict, range(10)))
            assert writer.flush(30)
            reader.client.command(f"RENAME TABLE {db}.predictions TO {db}.predictions_away")  # the sink fails
            codes += list(pool.map(predict, range(30)))
            assert writer.flush(30)
            down = writer.stats()
            reader.client.command(f"RENAME TABLE {db}.predictions_away TO {db}.predictions")  # and is back
            codes += list(pool.map(predict, range(10)))
    finally:
        thread.stop()  # the server's shutdown (SIGTERM) path closes the writer
    assert codes == [200] * 50
    assert not down["sink_ok"] and down["spilled"] > 0
    final = writer.stats()
    assert final["dropped"] == 0 and final["spool_rows"] == 0 and final["replayed"] > 0
    n, distinct = reader.client.query(
        f"SELECT count(), uniqExact(request_id, item_index) FROM {db}.predictions"
    ).result_rows[0]
    reader.client.command(f"DROP DATABASE {db}")
    reader.close()
    assert n == distinct == 200
