"""A benchmark bundle built in about a minute: MiniLM + ONNX variants + a head fitted on the catalogue.

The head is a ridge least-squares fit on the catalogue texts' section and severity labels (enough to
produce realistic outputs; training/ builds the real one). The fp32 ONNX export is verified against
torch and the int8 variant is kept only when it passes its gate (figures in ``bundle.json``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from bench.mixes import build_catalogue, make_mix
from motlens.labels import SEVERITIES

GOLDEN_SIZE = 64
HELDOUT_SIZE = 400


def _fit(x: np.ndarray, labels: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    x1 = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)
    y = np.eye(k, dtype=np.float32)[labels] * 8.0 - 4.0
    w = np.linalg.solve(x1.T @ x1 + 0.1 * np.eye(x1.shape[1]), x1.T @ y)
    return w[:-1].T.astype(np.float32), w[-1].astype(np.float32)


def build_bench_bundle(out: Path, rebuild: bool = False, onnx: bool = True):  # noqa: ANN201 - Bundle
    """Build (or reuse, when it verifies) the benchmark bundle at ``out`` (``onnx``: with ONNX variants)."""
    from motlens.bundle import Bundle, BundleError, assemble, make_golden
    from motlens.embedder import TorchEmbedder, default_model_dir
    from motlens.head import DefectHead, FeatureSpec
    from motlens.onnx_export import FP32_FILE, ONNX_DIR, export_variants, is_packed_graph

    out = Path(out)
    if not rebuild and (out / "bundle.json").is_file():
        try:
            bundle = Bundle.open(out)
        except BundleError:
            pass
        else:
            graph = bundle.embedder_dir / ONNX_DIR / FP32_FILE
            if not onnx or (graph.is_file() and is_packed_graph(graph)):
                return bundle
    catalogue = build_catalogue()
    texts = [c.text for c in catalogue]
    embedder = TorchEmbedder(default_model_dir(), device="cpu")
    spec = FeatureSpec()
    x = DefectHead(weights={}, features=spec).featurize(embedder.encode(texts))
    sw, sb = _fit(x, [c.section for c in catalogue], 9)
    vw, vb = _fit(x, [SEVERITIES.index(c.severity) for c in catalogue], 4)
    head = DefectHead(
        weights={"section.weight": sw, "section.bias": sb, "severity.weight": vw, "severity.bias": vb},
        features=spec,
    )
    rng = np.random.default_rng(1)
    golden_texts = [texts[i] for i in rng.choice(len(texts), size=GOLDEN_SIZE // 2, replace=False)]
    golden_texts += make_mix("novel", seed=101).take(GOLDEN_SIZE - len(golden_texts))
    heldout = make_mix("novel", seed=202).take(HELDOUT_SIZE)
    with tempfile.TemporaryDirectory(prefix="motlens-bench-") as tmp:
        staged = Path(tmp) / "embedder"
        shutil.copytree(default_model_dir(), staged, ignore=shutil.ignore_patterns(".gitattributes", "README.md"))
        figures = export_variants(staged, head, golden_texts, heldout, reference=embedder) if onnx else None
        golden = make_golden(embedder, head, golden_texts)
        return assemble(out, staged, head, golden, version="bench", run_id="bench", onnx=figures)
