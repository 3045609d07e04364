"""ONNX Runtime CPU backend for MiniLM (fp32, or the int8 variant that passed its quality gate).

Implements :class:`motlens.embedder.Embedder`. Each batch is one ``session.run`` over packed rows
(:mod:`motlens.packing`: several texts per row, no padding between them) of the graph exported by
:mod:`motlens.onnx_export`; mean pooling and L2 normalisation follow in numpy, which makes it the
sentence-transformers pipeline. Tokenisation uses the model directory's ``tokenizer.json`` with
the sentence-transformers truncation length.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from motlens import EMBEDDING_DIM
from motlens.onnx_export import (
    FP32_FILE,
    GRAPH_INPUTS,
    INT8_FILE,
    ONNX_DIR,
    OnnxExportError,
    cached_export,
    max_seq_length,
)
from motlens.packing import mean_pool, pack_ids, plan

log = logging.getLogger(__name__)

VARIANT_FILES = {"fp32": FP32_FILE, "int8": INT8_FILE}


def onnx_cache_root() -> Path:
    """Where exports for model directories that ship none are kept (``$MOTLENS_HOME/onnx-cache``)."""
    from motlens.state import StateSettings

    return (StateSettings().home / "onnx-cache").resolve()


#: MOT texts of different lengths, one call: a single-threaded session must reproduce the main one on
#: them before it serves (a thread count only reorders float sums; also warms the session up).
SINGLE_THREAD_PROBES = ("Horn not working (7.5 (a))", "Nearside Front Brake pipe corroded (1.1.11 (c))")
SINGLE_THREAD_TOLERANCE = 1e-4


def _session(path: Path, threads: int | None, spin: bool) -> Any:
    """A CPU session of ``path`` on ``threads`` intra-op threads (ONNX Runtime's default when None)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    # Memory patterns are planned and kept per input shape: with varied batch shapes they grow RSS
    # (+60 MiB over 6,000 novel texts, vs +24 MiB without) for no measured throughput gain.
    opts.enable_mem_pattern = False
    if threads:
        opts.intra_op_num_threads = int(threads)
    # Busy-waiting worker threads would steal the cores the server's event loop needs between batches.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxEmbedder:
    """MiniLM on ONNX Runtime's CPU execution provider (``spin``: let idle worker threads busy-wait)."""

    backend = "onnx"
    device = "cpu"
    packs = True

    def __init__(
        self,
        model_dir: Path | str,
        threads: int | None = None,
        variant: str = "fp32",
        onnx_path: Path | None = None,
        spin: bool = False,
        single_thread_tokens: int = 0,
    ) -> None:
        from tokenizers import Tokenizer

        if variant not in VARIANT_FILES:
            raise ValueError(f"unknown ONNX variant {variant!r}; expected one of {sorted(VARIANT_FILES)}")
        model_dir = Path(model_dir)
        self.variant = variant
        path = onnx_path or model_dir / ONNX_DIR / VARIANT_FILES[variant]
        if not path.is_file():
            if variant != "fp32":
                raise OnnxExportError(
                    f"{path}: no {variant} ONNX model (the int8 variant exists only where it passed its gate)"
                )
            path = cached_export(model_dir, onnx_cache_root())
        self.max_seq_length = max_seq_length(model_dir)
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.max_seq_length)
        session = _session(path, threads, spin)
        if tuple(i.name for i in session.get_inputs()) != GRAPH_INPUTS:
            if variant != "fp32" or onnx_path is not None:
                raise OnnxExportError(f"{path}: not a packed-format graph (inputs {GRAPH_INPUTS}); re-export it")
            log.warning("%s predates the packed ONNX format; using a verified export of the same weights", path)
            path = cached_export(model_dir, onnx_cache_root())
            session = _session(path, threads, spin)
        self.onnx_path = path
        self._session = session
        # Small calls on one thread: on 2 threads a call of 1-4 MOT texts leaves 20-35 % of the second
        # core idle at operator barriers (1 text: 5.8 ms on 1 thread, 4.5 ms on 2), and on a busy server
        # that core is the one the event loop needs (docs/benchmarks.md, "Small calls on one thread").
        self.single_thread_tokens = single_thread_tokens if threads != 1 else 0
        self._single = _session(path, 1, spin) if self.single_thread_tokens > 0 else None
        if self._single is not None:
            diff = self._max_difference(self._single)
            if diff > SINGLE_THREAD_TOLERANCE:
                log.warning("single-threaded ONNX session differs from the main one (max |Δ| %.2g); not using it",
                            diff)  # fmt: skip
                self._single, self.single_thread_tokens = None, 0
            else:
                log.info("ONNX Runtime: calls of ≤ %d packed tokens on 1 thread, larger ones on %s",
                         self.single_thread_tokens, threads or "the default number of threads")  # fmt: skip
        last = session.get_outputs()[0].shape[-1]
        self.dim = last if isinstance(last, int) else EMBEDDING_DIM

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must be str; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def _run(self, ids: Sequence[Sequence[int]], width: int | None = None) -> np.ndarray:
        lengths = [len(x) for x in ids]
        packing = plan(lengths, None if width is None else (width,))
        feed = pack_ids(ids, packing)
        (hidden,) = self.session_for(len(packing.rows) * packing.width).run(None, feed)
        out = mean_pool(hidden, feed["segment_ids"], packing, lengths)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def _max_difference(self, other: Any) -> float:
        """Largest |difference| between the main session's token states and ``other``'s on the probes."""
        ids = self.tokenize(list(SINGLE_THREAD_PROBES))
        feed = pack_ids(ids, plan([len(x) for x in ids]))
        (want,) = self._session.run(None, feed)
        (got,) = other.run(None, feed)
        return float(np.abs(np.asarray(got) - np.asarray(want)).max())

    def session_for(self, packed_tokens: int) -> Any:
        """The single-threaded session for calls of ≤ ``single_thread_tokens`` packed tokens, else the main one."""
        if self._single is not None and packed_tokens <= self.single_thread_tokens:
            return self._single
        return self._session

    def encode_unsorted(self, texts: Sequence[str], width: int | None = None) -> np.ndarray:
        """One encoder call for exactly these texts (rows ``width`` wide when given; verifies exports)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._run(self.tokenize(texts), width)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalised float32 embeddings [N, dim]; batches of similar length, each packed."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids = self.tokenize(texts)
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        step = max(1, int(batch_size))
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            out[idx] = self._run([ids[i] for i in idx])
        return out

    def encode_tokens(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._run(ids)
