"""The model bundle: what MLflow stores and what the predictor loads (docs/architecture.md "Model bundle").

Layout::

    bundle.json                 manifest: name, version, run id, created-at, labels, dim, sha256 of every file
    embedder/                   sentence-transformers model directory (+ optional onnx/ variants)
    head/weights.safetensors    defect head weights (no pickle)
    head/config.json            label lists and feature spec
    golden/golden.json          ~64 texts with context and reference predictions
    golden/embeddings.npy       their reference embeddings (float32, loaded with allow_pickle=False)
    reference/sample.parquet    drift reference sample (context, predictions, embeddings)

Every file's sha256 is verified before use; a mismatch, a missing or an unlisted file refuses to load.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from motlens import EMBEDDING_DIM, MODEL_NAME
from motlens.embedder import Embedder, cosine_rows
from motlens.head import DefectHead
from motlens.labels import SECTIONS, SEVERITIES

MANIFEST = "bundle.json"
EMBEDDER_DIR = "embedder"
HEAD_DIR = "head"
GOLDEN_JSON = "golden/golden.json"
GOLDEN_EMB = "golden/embeddings.npy"
REFERENCE = "reference/sample.parquet"
GOLDEN_MIN_COSINE = 0.999
#: The layout this code writes and the newest it reads; a manifest without ``format`` is format 1
#: (bundles written before the field existed). A newer format is refused rather than half-read.
BUNDLE_FORMAT = 1


class BundleError(Exception):
    """A bundle that is missing, malformed or fails verification."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Serialisations that run code when loaded: a bundle never carries them (weights are safetensors,
# arrays .npy read without pickle), whatever its manifest says.
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt", ".joblib", ".h5"})


def _files(root: Path) -> list[str]:
    """Every file under ``root`` but the manifest; :class:`BundleError` for a symlink anywhere (a
    link could point the loader at bytes that were never hashed, or hide files from the listing)
    or a file of a code-executing format."""
    out = []
    for p in root.rglob("*"):
        if p.is_symlink():
            raise BundleError(f"{root}: {p.relative_to(root).as_posix()} is a symbolic link; bundles hold plain files")
        if p.is_file() and p.name != MANIFEST:
            if p.suffix.lower() in PICKLE_SUFFIXES:
                raise BundleError(
                    f"{root}: {p.relative_to(root).as_posix()} is a {p.suffix} file (pickle-based formats can run "
                    "code when loaded); bundles hold safetensors, JSON, text and .npy only"
                )
            out.append(p.relative_to(root).as_posix())
    return sorted(out)


def write_manifest(root: Path, **fields: Any) -> dict[str, Any]:
    """Hash every file under ``root`` and write ``bundle.json``; returns the manifest."""
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "name": MODEL_NAME,
        "version": None,
        "run_id": None,
        "created_at": datetime.now(UTC).isoformat(),
        "embedding_dim": EMBEDDING_DIM,
        "labels": {"section": list(SECTIONS), "severity": list(SEVERITIES)},
        **fields,
        "files": {rel: sha256_file(root / rel) for rel in _files(root)},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def set_manifest_fields(root: Path, **fields: Any) -> dict[str, Any]:
    """Update descriptive fields (e.g. the registered ``version``) without touching file hashes."""
    manifest = json.loads((root / MANIFEST).read_text())
    if "files" in fields or "format" in fields:
        raise ValueError("file hashes and the bundle format are not editable")
    manifest.update(fields)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def verify(root: Path) -> dict[str, Any]:
    """Check every file against ``bundle.json``; raise :class:`BundleError` naming the first problem."""
    root = Path(root)
    mf = root / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{root}: no {MANIFEST}; not a motlens bundle")
    try:
        manifest = json.loads(mf.read_text())
        if not isinstance(manifest, dict):
            raise ValueError(f"a JSON object was expected, not {type(manifest).__name__}")
        fmt = manifest.get("format", 1)
        if type(fmt) is not int or fmt < 1:
            raise ValueError(f"'format' must be a positive integer, not {fmt!r}")
    except ValueError as e:
        raise BundleError(f"{mf}: malformed manifest ({e})") from e
    if fmt > BUNDLE_FORMAT:  # before anything else is read: a newer format may lay out the rest differently
        raise BundleError(
            f"{root}: bundle format {fmt} was written by a newer motlens; this one reads formats up to "
            f"{BUNDLE_FORMAT}: upgrade motlens to load it"
        )
    try:
        expected: dict[str, str] = manifest["files"]
        if not isinstance(expected, dict) or not all(isinstance(v, str) for v in expected.values()):
            raise ValueError("'files' must map paths to sha256 digests")
    except (ValueError, KeyError) as e:
        raise BundleError(f"{mf}: malformed manifest ({e})") from e
    if mf.is_symlink() or root.is_symlink():
        raise BundleError(f"{root}: the bundle or its {MANIFEST} is a symbolic link; bundles hold plain files")
    present = set(_files(root))
    missing = sorted(set(expected) - present)
    if missing:
        raise BundleError(f"{root}: file listed in {MANIFEST} is missing: {missing[0]}")
    extra = sorted(present - set(expected))
    if extra:
        raise BundleError(f"{root}: file not listed in {MANIFEST}: {extra[0]}")
    for rel, digest in expected.items():
        actual = sha256_file(root / rel)
        if actual != digest:
            raise BundleError(f"{root}: sha256 mismatch for {rel} (expected {digest[:12]}…, got {actual[:12]}…)")
    if manifest.get("embedding_dim") != EMBEDDING_DIM:
        raise BundleError(f"{root}: embedding_dim {manifest.get('embedding_dim')} != {EMBEDDING_DIM}")
    return manifest


@dataclass
class GoldenSet:
    texts: list[str]
    context: dict[str, list[Any]]
    embeddings: np.ndarray
    section: list[str]
    severity: list[str]

    @classmethod
    def load(cls, root: Path) -> GoldenSet:
        d = json.loads((root / GOLDEN_JSON).read_text())
        return cls(
            texts=d["texts"],
            context=d.get("context", {}),
            embeddings=np.load(root / GOLDEN_EMB, allow_pickle=False),
            section=d["section"],
            severity=d["severity"],
        )

    def save(self, root: Path) -> None:
        (root / GOLDEN_JSON).parent.mkdir(parents=True, exist_ok=True)
        doc = {"texts": self.texts, "context": self.context, "section": self.section, "severity": self.severity}
        (root / GOLDEN_JSON).write_text(json.dumps(doc, indent=1))
        np.save(root / GOLDEN_EMB, self.embeddings.astype(np.float32), allow_pickle=False)


@dataclass
class GoldenResult:
    passed: bool
    min_cosine: float
    label_agreement: float
    detail: str


def make_golden(
    embedder: Embedder, head: DefectHead, texts: Sequence[str], context: dict[str, list[Any]] | None = None
) -> GoldenSet:
    emb = embedder.encode(list(texts))
    out = head.predict(emb, context)
    return GoldenSet(list(texts), dict(context or {}), emb, out.section, out.severity)


def check_golden(
    golden: GoldenSet, embeddings: np.ndarray, section: Sequence[str], severity: Sequence[str],
    min_cosine: float = GOLDEN_MIN_COSINE,
) -> GoldenResult:
    """Compare freshly computed outputs with the golden references."""
    cos = cosine_rows(golden.embeddings, embeddings)
    same = np.mean([a == b and c == d for a, b, c, d in zip(golden.section, section, golden.severity, severity,
                                                                strict=True)])
    min_cos = float(cos.min()) if len(cos) else 1.0
    passed = min_cos >= min_cosine and same == 1.0
    detail = f"min cosine {min_cos:.5f} (need ≥ {min_cosine}), label agreement {same:.3f} (need 1.0)"
    return GoldenResult(passed, min_cos, float(same), detail)


@dataclass
class Bundle:
    """A verified bundle on local disk."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: Path | str) -> Bundle:
        root = Path(root)
        return cls(root, verify(root))

    @property
    def version(self) -> str:
        return str(self.manifest.get("version") or self.manifest.get("run_id") or "unregistered")

    @property
    def run_id(self) -> str | None:
        return self.manifest.get("run_id")

    @property
    def embedder_dir(self) -> Path:
        return self.root / EMBEDDER_DIR

    def head(self) -> DefectHead:
        return DefectHead.load(self.root / HEAD_DIR)

    def golden(self) -> GoldenSet:
        return GoldenSet.load(self.root)

    @property
    def reference_path(self) -> Path:
        return self.root / REFERENCE


def assemble(
    out: Path,
    embedder_src: Path,
    head: DefectHead,
    golden: GoldenSet,
    reference: Any | None = None,
    **manifest_fields: Any,
) -> Bundle:
    """Write a complete bundle directory (``reference`` is a pandas DataFrame) and its manifest."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(embedder_src, out / EMBEDDER_DIR, ignore=shutil.ignore_patterns(".gitattributes", "README.md"))
    head.save(out / HEAD_DIR)
    golden.save(out)
    if reference is not None:
        (out / REFERENCE).parent.mkdir(parents=True, exist_ok=True)
        reference.to_parquet(out / REFERENCE, index=False)
    write_manifest(out, **manifest_fields)
    return Bundle.open(out)
