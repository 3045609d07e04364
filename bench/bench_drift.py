"""Runtime of the drift job on a 100k-row window (embedded prediction log, real writer and reader).

    .venv/bin/python bench/bench_drift.py [--rows 100000] [--embedding-share 0.05] [--out bench/results]

Writes ``rows`` generated predictions for the current window and as many for a reference window
the day before (MiniLM embeddings of the catalogue texts on ``embedding-share`` of the rows, as
the predictor's sampled logging does), then times ``DriftJob`` stage by stage with HTML on and
off, and the peak RSS. Prints a JSON record and writes it under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--embedding-share", type=float, default=0.05)
    ap.add_argument("--embedding-max-rows", type=int, default=2_000)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()

    import numpy as np

    import predlog
    from drift.job import DriftJob
    from drift.settings import DriftSettings
    from drift.simulate import records, texts, traffic, with_embeddings
    from motlens.embedder import TorchEmbedder
    from predlog import PredlogSettings

    now = datetime.now(UTC)
    all_texts = texts() + texts(paraphrased=True)
    vectors = dict(zip(all_texts, TorchEmbedder(device="cpu").encode(all_texts), strict=True))

    def encode(ts: list[str]) -> np.ndarray:
        return np.stack([vectors[t] for t in ts])

    result: dict = {"rows": args.rows, "embedding_share": args.embedding_share, "cpus": _cpus(),
                    "machine": platform.processor() or platform.machine()}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        settings = PredlogSettings(dir=Path(tmp) / "predlog", batch_rows=20_000, queue_rows=400_000)
        t0 = time.perf_counter()
        writer = predlog.open_writer(settings)
        for seed, end in ((1, now), (2, now - timedelta(days=1))):
            df = with_embeddings(traffic(args.rows, seed, end=end, span=timedelta(hours=20)), encode,
                                 share=args.embedding_share, seed=seed)  # fmt: skip
            for i in range(0, len(df), 10_000):
                writer.submit(records(df.iloc[i : i + 10_000]))
        assert writer.flush(600), "prediction log did not flush"
        writer.close(60)
        result["write_s"] = round(time.perf_counter() - t0, 1)
        reader = predlog.open_reader(settings)
        for html in (False, True):
            s = DriftSettings(version="1", window="24h", reference="24h", output=Path(tmp) / f"out-{html}",
                              max_rows=args.rows, embedding_max_rows=args.embedding_max_rows, html=html,
                              progress=True, log_artifact=False)  # fmt: skip
            job = DriftJob(s, reader=reader, registry=_NoRegistry(), now=now + timedelta(seconds=1))
            t0 = time.perf_counter()
            res = job.run()
            key = "html" if html else "scores_only"
            details = res.summary["details"]
            result[key] = {"seconds": round(time.perf_counter() - t0, 1), "exit_code": res.exit_code,
                           "status": details["status"], "rows": details.get("rows"),
                           "stages_s": details.get("timings_s")}  # fmt: skip
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift.json").write_text(json.dumps(result, indent=2))


class _NoRegistry:
    """The benchmark compares two log windows; no MLflow run to log to."""

    def resolve(self, ref: str):
        raise LookupError(f"benchmark: no registry ({ref})")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
