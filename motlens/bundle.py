"""The model bundle: what MLflow stores and what the predictor loads (docs/architecture.md "Model bundle").

Layout::

    bundle.json                 manifest: name, version, run id, created-at, labels, dim, sha256 of every file
    embedder/                   sentence-transformers model directory (+ optional onnx/ variants)
    head/weights.safetensors    defect head weights (no pickle)
    head/config.json            label lists and feature spec
    golden/golden.json          ~64 texts with context, reference labels and probabilities
    golden/embeddings.npy       their reference embeddings (float32, loaded with allow_pickle=False)
    reference/sample.parquet    drift reference sample (context, predictions, embeddings)

Every file's sha256 is verified before use; a mismatch, a missing or an unlisted file refuses to load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from motlens import EMBEDDING_DIM, MODEL_NAME
from motlens.embedder import Embedder, cosine_rows
from motlens.head import CONFIG_FILE, WEIGHTS_FILE, DefectHead, HeadOutput
from motlens.labels import SECTIONS, SEVERITIES

MANIFEST = "bundle.json"
EMBEDDER_DIR = "embedder"
HEAD_DIR = "head"
GOLDEN_JSON = "golden/golden.json"
GOLDEN_EMB = "golden/embeddings.npy"
REFERENCE = "reference/sample.parquet"
#: files every bundle's manifest lists: the head the loader reads first (a manifest listing nothing
#: once verified, was registered and took an alias, and failed only when loaded)
REQUIRED_FILES = (f"{HEAD_DIR}/{WEIGHTS_FILE}", f"{HEAD_DIR}/{CONFIG_FILE}")
#: :func:`assemble` builds a bundle in a directory of this prefix beside it, then renames it into place
STAGING_PREFIX = ".{name}.tmp-"
GOLDEN_MIN_COSINE = 0.999
#: the most a golden probability (section scores, severity scores, fail_probability) may move against
#: the stored one when recomputed end to end on this backend: torch bf16 on CPU moves them by up to
#: 0.037 (cosine 0.99992), fp32 ONNX by < 1e-5; a +1.5 bias on the failing severities moves them by
#: 0.31 and an age normalisation 10 years off by 0.14 (docs/training.md "Golden set")
GOLDEN_MAX_SCORE_DELTA = 0.1
#: the most they may move when the head is run on the stored reference embeddings: only float
#: rounding differs there, so any change of the head, its feature normalisation or featurisation shows
GOLDEN_MAX_HEAD_DELTA = 1e-3
#: The layout this code writes and the newest it reads; a manifest without ``format`` is format 1
#: (bundles written before the field existed). A newer format is refused rather than half-read.
BUNDLE_FORMAT = 1
#: a sha256 as the manifest, the registry tag and the serve pin spell it
SHA256_PATTERN = r"^[0-9a-f]{64}$"


log = logging.getLogger(__name__)


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


def _refuse_pickle(root: Path, rel: str) -> None:
    suffix = Path(rel).suffix
    if suffix.lower() in PICKLE_SUFFIXES:
        raise BundleError(
            f"{root}: {rel} is a {suffix} file (pickle-based formats can run code when loaded); bundles hold "
            "safetensors, JSON, text and .npy only"
        )


def _files(root: Path) -> list[str]:
    """Every file under ``root`` but the top-level manifest; :class:`BundleError` for a symlink anywhere (a
    link could point the loader at bytes that were never hashed, or hide files from the listing),
    anything else that is not a regular file or directory, or a file of a code-executing format."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            raise BundleError(f"{root}: {rel} is a symbolic link; bundles hold plain files")
        if not p.is_file() and not p.is_dir():  # a FIFO (a reader hangs on it), socket or device: never hashed
            raise BundleError(f"{root}: {rel} is not a regular file; bundles hold plain files")
        if p.is_file() and rel != MANIFEST:
            _refuse_pickle(root, rel)
            out.append(rel)
    return sorted(out)


def check_embedder_source(src: Path) -> None:
    """:class:`BundleError` naming a file under ``src`` (followed through links, as :func:`assemble`
    copies it) of a format a bundle refuses: a training checks its model directory before, not after."""
    for top, _dirs, names in os.walk(src, followlinks=True):
        for name in sorted(names):
            _refuse_pickle(src, (Path(top) / name).relative_to(src).as_posix())


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


def verify(root: Path, manifest_sha256: str | None = None) -> dict[str, Any]:
    """Check every file against ``bundle.json`` (and ``bundle.json`` itself against ``manifest_sha256``
    when given: the digest pinned by the registry or the deployment); raise :class:`BundleError`
    naming the first problem."""
    root = Path(root)
    mf = root / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{root}: no {MANIFEST}; not a motlens bundle")
    raw = mf.read_bytes()
    if manifest_sha256 is not None and (actual := hashlib.sha256(raw).hexdigest()) != manifest_sha256:
        raise BundleError(f"{root}: {MANIFEST} has sha256 {actual}, not the pinned {manifest_sha256}")
    try:
        try:
            manifest = json.loads(raw)
        except RecursionError as e:  # nesting deeper than the parser follows: malformed, not a transient failure
            raise ValueError("nested too deeply") from e
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
    unlisted = [rel for rel in REQUIRED_FILES if rel not in expected]
    if unlisted:
        raise BundleError(f"{root}: {MANIFEST} lists no {unlisted[0]}; a bundle holds {', '.join(REQUIRED_FILES)}")
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
    """Golden texts with context, reference embeddings, labels and — in bundles written since scores
    were added — the head's probabilities (``None`` in older bundles: labels are then all that is checked)."""

    texts: list[str]
    context: dict[str, list[Any]]
    embeddings: np.ndarray
    section: list[str]
    severity: list[str]
    section_scores: np.ndarray | None = None  # [N, 9]
    severity_scores: np.ndarray | None = None  # [N, 4]
    fail_probability: np.ndarray | None = None  # [N]

    @property
    def has_scores(self) -> bool:
        scores = (self.section_scores, self.severity_scores, self.fail_probability)
        return all(v is not None for v in scores)

    @classmethod
    def load(cls, root: Path) -> GoldenSet:
        d = json.loads((root / GOLDEN_JSON).read_text())

        def scores(key: str) -> np.ndarray | None:
            return np.asarray(d[key], dtype=np.float32) if key in d else None

        return cls(
            texts=d["texts"],
            context=d.get("context", {}),
            embeddings=np.load(root / GOLDEN_EMB, allow_pickle=False),
            section=d["section"],
            severity=d["severity"],
            section_scores=scores("section_scores"),
            severity_scores=scores("severity_scores"),
            fail_probability=scores("fail_probability"),
        )

    def save(self, root: Path) -> None:
        (root / GOLDEN_JSON).parent.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {
            "texts": self.texts, "context": self.context, "section": self.section, "severity": self.severity,
        }  # fmt: skip
        for key in ("section_scores", "severity_scores", "fail_probability"):
            value = getattr(self, key)
            if value is not None:
                doc[key] = np.asarray(value, dtype=np.float32).tolist()
        (root / GOLDEN_JSON).write_text(json.dumps(doc, indent=1))
        np.save(root / GOLDEN_EMB, self.embeddings.astype(np.float32), allow_pickle=False)


@dataclass
class GoldenResult:
    passed: bool
    min_cosine: float
    label_agreement: float
    detail: str
    max_score_delta: float | None = None  # None: the golden set stores no scores (an older bundle)
    head_delta: float | None = None  # the same on the stored reference embeddings


def make_golden(
    embedder: Embedder, head: DefectHead, texts: Sequence[str], context: dict[str, list[Any]] | None = None
) -> GoldenSet:
    emb = embedder.encode(list(texts))
    out = head.predict(emb, context)
    return GoldenSet(
        list(texts), dict(context or {}), emb, out.section, out.severity,
        out.section_scores, out.severity_scores, out.fail_probability,
    )  # fmt: skip


def check_golden(
    golden: GoldenSet,
    embeddings: np.ndarray,
    head: DefectHead,
    min_cosine: float = GOLDEN_MIN_COSINE,
    max_score_delta: float = GOLDEN_MAX_SCORE_DELTA,
    max_head_delta: float = GOLDEN_MAX_HEAD_DELTA,
) -> GoldenResult:
    """Compare this backend's ``embeddings`` of the golden texts, and ``head``'s outputs on them, with
    the golden references: cosine ≥ ``min_cosine``, identical labels and, where the golden set stores
    them, every probability within ``max_score_delta`` end to end and within ``max_head_delta`` when
    the head runs on the stored reference embeddings (which isolates the head and its featurisation
    from the backend's float precision)."""
    out = head.predict(embeddings, golden.context)
    cos = cosine_rows(golden.embeddings, embeddings)
    same = np.mean([a == b and c == d for a, b, c, d in zip(golden.section, out.section, golden.severity,
                                                                out.severity, strict=True)])
    min_cos = float(cos.min()) if len(cos) else 1.0
    passed = min_cos >= min_cosine and same == 1.0
    detail = f"min cosine {min_cos:.5f} (need ≥ {min_cosine}), label agreement {same:.3f} (need 1.0)"
    delta = head_delta = None
    if golden.has_scores:
        delta = _max_delta(golden, out)
        head_delta = _max_delta(golden, head.predict(golden.embeddings, golden.context))
        passed = passed and delta <= max_score_delta and head_delta <= max_head_delta
        detail += (
            f", max |Δ probability| {delta:.4f} (need ≤ {max_score_delta}), "
            f"{head_delta:.5f} on the reference embeddings (need ≤ {max_head_delta})"
        )
    else:
        log.info("golden set has no stored scores (a bundle written before they were stored): labels only")
        detail += ", scores not stored (older bundle): labels only"
    return GoldenResult(passed, min_cos, float(same), detail, delta, head_delta)


def _max_delta(golden: GoldenSet, out: HeadOutput) -> float:
    """The largest |Δ| over section scores, severity scores and fail_probability (NaN counts as infinite)."""
    pairs = (
        (golden.section_scores, out.section_scores),
        (golden.severity_scores, out.severity_scores),
        (golden.fail_probability, out.fail_probability),
    )
    worst = 0.0
    for ref, got in pairs:
        ref_a, got_a = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
        if ref_a.size == 0 and got_a.size == 0:
            continue
        if ref_a.shape != got_a.shape:
            return float("inf")
        if ref_a.size:
            d = np.abs(ref_a - got_a)
            worst = max(worst, float("inf") if np.isnan(d).any() else float(d.max()))
    return worst


@dataclass
class Bundle:
    """A verified bundle on local disk."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: Path | str, manifest_sha256: str | None = None) -> Bundle:
        root = Path(root)
        return cls(root, verify(root, manifest_sha256))

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
    """Write a complete bundle directory (``reference`` is a pandas DataFrame) and its manifest: built in
    a staging directory beside ``out`` and renamed into place once complete, so a failure or an
    interrupt part-way leaves ``out`` as it was (a staging directory a killed run left is removed)."""
    prefix = STAGING_PREFIX.format(name=out.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f"{prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    try:
        shutil.copytree(
            embedder_src, staging / EMBEDDER_DIR, ignore=shutil.ignore_patterns(".gitattributes", "README.md")
        )
        head.save(staging / HEAD_DIR)
        golden.save(staging)
        if reference is not None:
            (staging / REFERENCE).parent.mkdir(parents=True, exist_ok=True)
            reference.to_parquet(staging / REFERENCE, index=False)
        write_manifest(staging, **manifest_fields)
        if out.exists():
            out.rename(staging.with_name(f"{staging.name}.old"))  # still matches the prefix until removed
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staging.with_name(f"{staging.name}.old"), ignore_errors=True)
    return Bundle.open(out)
