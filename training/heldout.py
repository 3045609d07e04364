"""The held-out set a run keeps for later comparisons (run artifact ``heldout/``).

Training stores (a uniform sample of at most ``max_texts`` of) its held-out texts with their context,
true labels, row counts and fail fractions, and their embeddings (float32 as computed, read back
without pickle), so the promotion gate can score the production head on exactly the texts and
embeddings the candidate was evaluated on (:mod:`training.paired`; unsampled, the candidate's scores
there equal its run metrics). ``heldout.json`` names the embedder files the embeddings came from and
the sha256 of each file; a file that does not match is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from motlens.bundle import EMBEDDER_DIR, sha256_file
from motlens.labels import SEVERITIES
from training.dataset import CONTEXT_COLUMNS, split_key
from training.paired import HeldoutLabels

HELDOUT_DIR = "heldout"
META = "heldout.json"
TEXTS = "texts.parquet"
EMBEDDINGS = "embeddings.npy"
FORMAT = 1


class HeldoutError(Exception):
    """A stored held-out set that is missing, malformed or fails its hashes."""


@dataclass
class Heldout:
    texts: pd.DataFrame  # text, context columns, section (index), severity (label), count, fail_fraction[, split_group]
    embeddings: np.ndarray  # float32 [n, dim]
    meta: dict[str, Any]

    def labels(self) -> HeldoutLabels:
        sev = {s: i for i, s in enumerate(SEVERITIES)}
        return HeldoutLabels(
            section=self.texts["section"].to_numpy(np.int64),
            severity=self.texts["severity"].map(sev).to_numpy(np.int64),
            counts=self.texts["count"].to_numpy(np.float64),
            fail_fraction=self.texts["fail_fraction"].to_numpy(np.float64),
        )

    def context(self) -> dict[str, list[Any]]:
        return {
            c: [None if pd.isna(v) else v for v in self.texts[c].tolist()] for c in CONTEXT_COLUMNS if c in self.texts
        }

    def groups(self) -> np.ndarray:
        """Each text's split group (training.dataset.split_groups): the paired gate resamples groups
        whole. Sets written before groups were stored: the text's split key."""
        if "split_group" in self.texts:
            return self.texts["split_group"].astype(str).to_numpy()
        return self.texts["text"].map(split_key).to_numpy()

    def subset(self, rows: np.ndarray) -> Heldout:
        """The texts at positions ``rows``, with their embeddings."""
        return Heldout(self.texts.iloc[rows].reset_index(drop=True), self.embeddings[rows], self.meta)

    @property
    def embedder_files(self) -> dict[str, str]:
        return dict(self.meta["embedder_files"])


def embedder_files(manifest: dict[str, Any]) -> dict[str, str]:
    """A bundle manifest's embedder files and their sha256 (what makes two embedders the same)."""
    return {k: v for k, v in manifest["files"].items() if k.startswith(EMBEDDER_DIR + "/")}


def write_heldout(
    dst: Path,
    holdout: pd.DataFrame,
    embeddings: np.ndarray,
    rows: np.ndarray,
    *,
    embedder: dict[str, str],
    max_texts: int,
    seed: int,
) -> dict[str, Any]:
    """Write at most ``max_texts`` held-out texts (a seeded uniform sample when there are more) and their
    embeddings (``embeddings[rows]``, row by row of ``holdout``) under ``dst``; returns the metadata
    written to ``heldout.json``."""
    n = len(holdout)
    pick = np.arange(n)
    if n > max_texts:
        pick = np.sort(np.random.default_rng(seed).choice(n, max_texts, replace=False))
    cols = ["text", *[c for c in CONTEXT_COLUMNS if c in holdout], "section", "severity", "count", "fail_fraction",
            *[c for c in ("split_group",) if c in holdout]]  # fmt: skip
    texts = holdout.iloc[pick][cols].reset_index(drop=True)
    dst.mkdir(parents=True, exist_ok=True)
    texts.to_parquet(dst / TEXTS, index=False)
    np.save(dst / EMBEDDINGS, np.asarray(embeddings[rows[pick]], dtype=np.float32), allow_pickle=False)
    meta = {
        "format": FORMAT,
        "n_texts": len(pick),
        "heldout_texts": n,
        "sample_seed": seed if n > max_texts else None,
        "embedding_dtype": "float32",
        "embedder_files": embedder,
        "files": {name: sha256_file(dst / name) for name in (TEXTS, EMBEDDINGS)},
    }
    (dst / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return meta


def read_heldout(src: Path) -> Heldout:
    """Read and verify a held-out set written by :func:`write_heldout`."""
    try:
        meta = json.loads((src / META).read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise HeldoutError(
                f"{src / META}: format {meta.get('format') if isinstance(meta, dict) else '?'!r} is not {FORMAT}"
            )
        for name in (TEXTS, EMBEDDINGS):
            want, got = meta["files"][name], sha256_file(src / name)
            if got != want:
                raise HeldoutError(f"{src / name}: sha256 {got} does not match heldout.json ({want})")
        texts = pd.read_parquet(src / TEXTS)
        emb = np.load(src / EMBEDDINGS, allow_pickle=False)
        missing = {"text", "section", "severity", "count", "fail_fraction"} - set(texts.columns)
        if missing:
            raise HeldoutError(f"{src / TEXTS}: no column(s) {sorted(missing)}")
        if emb.ndim != 2 or len(emb) != len(texts) or len(texts) != meta["n_texts"]:
            raise HeldoutError(f"{src}: {len(texts)} texts, embeddings {emb.shape}, heldout.json {meta['n_texts']}")
        bad = set(texts["severity"]) - set(SEVERITIES)
        if bad or not texts["section"].between(0, 8).all():
            raise HeldoutError(f"{src / TEXTS}: labels outside the label sets ({sorted(map(str, bad))[:3]})")
        return Heldout(texts, emb.astype(np.float32), meta)
    except HeldoutError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HeldoutError(f"{src}: held-out set unreadable: {type(e).__name__}: {e}") from e
