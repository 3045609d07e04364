"""motlens: MOT defect-text embeddings and defect predictions, served on KServe."""

from __future__ import annotations

__version__ = "0.1.0"

MODEL_NAME = "mot-defects"
EMBEDDING_DIM = 384
