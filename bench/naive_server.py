"""The naive baseline: FastAPI + sentence-transformers ``encode`` per request, same v2 endpoint shape.

No batching across requests, no cache: each request runs ``SentenceTransformer.encode`` on its own
texts in FastAPI's thread pool, then the same defect head as motlens.

    python -m bench.naive_server --model <bundle dir> --port 8090
"""

from __future__ import annotations

import argparse
import os


def build_app(bundle_dir: str):  # noqa: ANN201 - FastAPI app
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from fastapi import Body, FastAPI, HTTPException
    from sentence_transformers import SentenceTransformer

    from motlens.bundle import Bundle

    bundle = Bundle.open(bundle_dir)
    head = bundle.head()
    model = SentenceTransformer(str(bundle.embedder_dir), device="cpu", local_files_only=True)
    app = FastAPI(title="naive baseline")

    @app.get("/v2/models/mot-defects/ready")
    def ready() -> dict:
        return {"name": "mot-defects", "ready": True}

    @app.post("/v2/models/mot-defects/infer")
    def infer(req: dict = Body(...)) -> dict:  # noqa: B008 - FastAPI idiom
        try:
            (text,) = [i for i in req["inputs"] if i["name"] == "text"]
            texts = [str(t) for t in text["data"]]
        except (KeyError, TypeError, ValueError) as e:
            raise HTTPException(400, f"input 'text' missing or malformed: {e}") from e
        if not texts:
            raise HTTPException(400, "input 'text' is empty")
        emb = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        out = head.predict(emb)
        n = len(texts)
        return {
            "model_name": "mot-defects",
            "model_version": bundle.version,
            "outputs": [
                {"name": "section", "datatype": "BYTES", "shape": [n], "data": out.section},
                {"name": "section_score", "datatype": "FP32", "shape": [n], "data": out.section_score.tolist()},
                {"name": "severity", "datatype": "BYTES", "shape": [n], "data": out.severity},
                {"name": "severity_scores", "datatype": "FP32", "shape": [n, 4],
                 "data": out.severity_scores.ravel().tolist()},
                {"name": "fail_probability", "datatype": "FP32", "shape": [n],
                 "data": out.fail_probability.tolist()},
            ],
        }  # fmt: skip

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="motlens bundle directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    a = p.parse_args(argv)
    uvicorn.run(build_app(a.model), host=a.host, port=a.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
