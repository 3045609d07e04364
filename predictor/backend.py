"""The model backend: a verified bundle, its embedder and head, warmed up and golden-checked.

Knows nothing of KServe. ``load_backend`` resolves a model reference (local path, the KServe
storage-initializer mount ``/mnt/models``, or ``models:/mot-defects@alias`` through the MLflow
registry), verifies every hash, builds the embedder chosen by name, warms it up and reproduces
the golden set on this device; a backend that fails the golden set is never served.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from motlens.bundle import EMBEDDER_DIR, MANIFEST, Bundle, BundleError, GoldenResult, check_golden
from motlens.embedder import Embedder, TorchEmbedder
from motlens.head import DefectHead, HeadOutput
from predictor.heap import collect_unfrozen, freeze_long_lived, freezes, heap_frozen

log = logging.getLogger(__name__)

KSERVE_MOUNT = Path("/mnt/models")

EmbedderFactory = Callable[..., Embedder]

#: ``Backend.fallback`` (and the ``motlens_model_fallback`` reason) when the registry could not be
#: reached and the last-known-good bundle of the reference is served instead.
REGISTRY_UNREACHABLE = "registry_unreachable"


def _torch_factory(
    model_dir: Path,
    device: str | None,
    dtype: str,
    threads: int | None,
    single_thread_tokens: int = 0,
    trace: bool = True,
) -> Embedder:
    """torch: one intra-op thread count per process, so ``single_thread_tokens`` does not apply."""
    return TorchEmbedder(model_dir, device=device, dtype=dtype, threads=threads, trace=trace)


_ONNX_VARIANTS = {"float32": "fp32", "fp32": "fp32", "int8": "int8"}


def _onnx_factory(
    model_dir: Path,
    device: str | None,
    dtype: str,
    threads: int | None,
    single_thread_tokens: int = 0,
    trace: bool = True,
) -> Embedder:
    """ONNX Runtime on CPU; ``dtype`` picks the variant (``float32``, or ``int8`` where it passed its gate).

    ``trace`` is torch's: an ONNX model is a graph already.
    """
    from motlens.onnx_embedder import OnnxEmbedder

    if dtype not in _ONNX_VARIANTS:
        raise ValueError(f"the onnx backend runs float32 or int8, not {dtype}")
    if device not in (None, "cpu"):
        raise ValueError(f"the onnx backend runs on cpu, not {device}")
    return OnnxEmbedder(
        model_dir, threads=threads, variant=_ONNX_VARIANTS[dtype], single_thread_tokens=single_thread_tokens
    )


#: Embedder backends by name (``MOTLENS_SERVE_BACKEND``); each takes (model_dir, device, dtype, threads,
#: single_thread_tokens, trace).
EMBEDDER_FACTORIES: dict[str, EmbedderFactory] = {"torch": _torch_factory, "onnx": _onnx_factory}


#: Embedders still held by a loaded backend, by what built them and their files' verified sha256s: a
#: version that ships the same embedder (every version MiniLM serves) shares the loaded one. A swap then
#: neither loads MiniLM twice nor traces it again: torch keeps every frozen TorchScript graph, its
#: weights inlined, for the life of the process (≈ 60 MiB more RSS per swap on CPU, docs/predictor.md).
_EMBEDDERS: weakref.WeakValueDictionary[tuple[Any, ...], Embedder] = weakref.WeakValueDictionary()
_EMBEDDERS_LOCK = threading.Lock()


def _embedder_key(bundle: Bundle, *settings: Any) -> tuple[Any, ...]:
    prefix = f"{EMBEDDER_DIR}/"
    files = sorted((rel, sha) for rel, sha in bundle.manifest["files"].items() if rel.startswith(prefix))
    return (*settings, tuple(files))


def _shared_embedder(bundle: Bundle, factory: EmbedderFactory, *settings: Any) -> Embedder:
    """The loaded embedder built by ``factory`` from the same files with the same ``settings``, else a new one."""
    key = _embedder_key(bundle, factory, *settings)
    with _EMBEDDERS_LOCK:
        found = _EMBEDDERS.get(key)
    if found is not None:
        log.info("sharing the loaded %s embedder (same files and settings as a version still loaded)", found.backend)
        return found
    embedder = factory(bundle.embedder_dir, *settings)
    with _EMBEDDERS_LOCK:
        return _EMBEDDERS.setdefault(key, embedder)  # two concurrent first loads: both share the first


class ModelLoadError(RuntimeError):
    """The model could not be resolved, verified, loaded or golden-checked; the message says why."""

    def __init__(self, reason: str, golden: GoldenResult | None = None, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.golden = golden
        self.transient = transient  # the registry could not be reached: worth another try later


def find_bundle_root(path: Path) -> Path:
    """The directory holding ``bundle.json``: ``path`` itself or the one bundle below it (≤ 3 levels)."""
    if (path / MANIFEST).is_file():
        return path
    found = sorted(p.parent for depth in ("*/", "*/*/", "*/*/*/") for p in path.glob(f"{depth}{MANIFEST}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelLoadError(f"{path}: no {MANIFEST} found (not a motlens bundle)")
    raise ModelLoadError(f"{path}: several bundles found: {', '.join(map(str, found))}")


@dataclass
class ResolvedModel:
    """A bundle directory, and why it is the last-known-good stand-in when it is one."""

    root: Path
    fallback: str | None = None
    #: the registry's bundle: while it lives, its cached version is leased (no cache prune removes it)
    fetched: Bundle | None = None


def resolve_model(ref: str | None, *, lkg: bool = False) -> ResolvedModel:
    """Local bundle directory for a model reference.

    ``models:/…`` goes through the MLflow registry (downloaded, cached); an empty reference means the
    KServe mount (``/mnt/models``, where the storage initializer put ``STORAGE_URI``); anything else is
    a local path. With ``lkg``, a registry that cannot be reached (not one that answers "no such
    alias/version") is replaced by the last-known-good bundle of ``ref``, re-verified.
    """
    if not ref:
        if not KSERVE_MOUNT.is_dir():
            raise ModelLoadError(
                f"no model given and {KSERVE_MOUNT} does not exist "
                f"(STORAGE_URI={os.environ.get('STORAGE_URI', 'unset')})"
            )
        return ResolvedModel(find_bundle_root(KSERVE_MOUNT))
    if ref.startswith("models:/"):
        try:
            from training.registry import Registry, RegistryError, RegistryUnreachable, UnknownModelRef
        except ImportError as e:
            raise ModelLoadError(f"cannot resolve {ref}: the MLflow registry helpers are unavailable ({e})") from e
        try:
            registry = Registry()
            fetched = registry.fetch(ref)
        except RegistryUnreachable as e:
            if not lkg:
                raise ModelLoadError(f"cannot fetch {ref} from the registry: {e}", transient=True) from e
            try:
                bundle, record = registry.lkg_bundle(ref)
            except (RegistryError, BundleError, OSError) as lkg_error:
                raise ModelLoadError(
                    f"cannot fetch {ref} from the registry: {e}; last-known-good bundle not used: {lkg_error}",
                    transient=True,
                ) from e
            log.warning(
                "%s; falling back to the last-known-good bundle of %s: version %s (recorded %s)",
                e,
                ref,
                record["version"],
                record.get("recorded_at"),
            )
            return ResolvedModel(bundle.root, REGISTRY_UNREACHABLE)
        except Exception as e:  # noqa: BLE001 - any registry failure is a load failure with its reason
            # a refused bundle or an unknown alias/version stays refused; anything else (a reset
            # download, a failing artifact store) may work on another try
            transient = not isinstance(e, BundleError | UnknownModelRef)
            raise ModelLoadError(f"cannot fetch {ref} from the registry: {e}", transient=transient) from e
        return ResolvedModel(find_bundle_root(fetched.root), fetched=fetched)
    path = Path(ref).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    return ResolvedModel(find_bundle_root(path))


def record_lkg(ref: str, bundle: Bundle) -> None:
    """Remember a served registry bundle as the last-known-good of ``ref`` (a failure is only logged)."""
    try:
        from training.registry import Registry

        Registry().record_lkg(ref, bundle)
    except Exception as e:  # noqa: BLE001 - a read-only cache must not stop serving
        log.warning("cannot record the last-known-good bundle of %s: %s", ref, e)


@dataclass
class Backend:
    """A loaded bundle: embed, predict, and prove consistency with the golden set."""

    bundle: Bundle
    embedder: Embedder
    head: DefectHead
    ref: str
    load_seconds: float = 0.0
    golden: GoldenResult | None = None
    info: dict[str, Any] = field(default_factory=dict)
    fallback: str | None = None
    #: loaded before the heap was frozen, so in the permanent generation (set by predictor.slots)
    in_frozen_heap: bool = False
    #: :func:`predictor.heap.freezes` when loaded: a later freeze (a GPU model's close re-freezes the whole
    #: heap) put this one in the permanent generation too
    freeze_epoch: int = field(default_factory=freezes)
    #: the registry's bundle it was loaded from: its cached version stays leased while this backend lives
    fetched: Bundle | None = None
    #: the embedder's backend and device, kept past :meth:`close`: a request still in flight when a
    #: drain timed out logs its rows with them (read through the freed embedder, they were lost)
    backend_name: str = field(init=False, default="")
    device: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.backend_name, self.device = self.embedder.backend, self.embedder.device

    @property
    def name(self) -> str:
        return str(self.bundle.manifest.get("name", "mot-defects"))

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def run_id(self) -> str:
        return self.bundle.run_id or ""

    @property
    def packs(self) -> bool:
        return self.embedder.packs

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return self.embedder.encode(texts, batch_size=batch_size)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.embedder.tokenize(texts)

    def encode_tokens(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        return self.embedder.encode_tokens(ids)

    def predict(self, embeddings: np.ndarray, context: Mapping[str, Sequence[Any] | None] | None) -> HeadOutput:
        return self.head.predict(embeddings, context)

    def warm_up(self) -> None:
        """Run a few batch shapes through the serving path once, so no request pays lazy initialisation."""
        for n in (1, 8, 32):  # 1 text: the ONNX small-call session; 32: any multi-threaded one
            self.encode_tokens(self.tokenize(["Nearside Front Brake pipe corroded (1.1.11 (c))"] * n))

    def check_golden(self) -> GoldenResult:
        golden = self.bundle.golden()
        emb = self.encode(golden.texts)
        self.golden = check_golden(golden, emb, self.head)
        return self.golden

    def close(self) -> None:
        """Drop the model and return accelerator memory.

        The model's reference cycles are freed only by a collection that sees them. A model loaded
        after the heap was frozen (predictor.heap) is in the collected generations: a plain collection
        frees it without walking the frozen heap. One that was frozen with it (``in_frozen_heap``, the
        process's first model) is left there on CPU (its cycles, not its weights); on a GPU the heap is
        unfrozen for one full collection and frozen again, else the weights would still be allocated
        when the CUDA cache is emptied."""
        self.embedder = None  # type: ignore[assignment]
        cuda = self.info.get("device", "").startswith("cuda")
        if cuda and heap_frozen() and (self.in_frozen_heap or freezes() > self.freeze_epoch):
            freeze_long_lived()
        else:
            collect_unfrozen()
        if cuda:
            import torch

            torch.cuda.empty_cache()


def load_backend(
    ref: str | None,
    *,
    backend: str = "torch",
    device: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    single_thread_tokens: int = 0,
    torch_trace: bool = True,
    embedder: Embedder | None = None,
    lkg: bool = False,
    pinned: Mapping[str, str] | None = None,
) -> Backend:
    """Resolve, verify, load, warm up and golden-check; raise :class:`ModelLoadError` on any failure.

    ``embedder`` reuses an already loaded embedder (tests share one MiniLM per session); without it, a
    loaded backend's embedder of the same files and settings is shared (:func:`_shared_embedder`). With ``lkg``,
    a registry bundle that passes is recorded as the reference's last-known-good, and an unreachable
    registry is replaced by that bundle (``Backend.fallback`` says so). ``pinned`` maps references to the
    sha256 the ``bundle.json`` they resolve to must have (a last-known-good stand-in included).
    """
    t0 = time.perf_counter()
    try:
        resolved = resolve_model(ref, lkg=lkg)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a path the OS refuses: a not-ready reason, not a dead loader
        raise ModelLoadError(f"cannot resolve {ref}: {type(e).__name__}: {e}") from e
    root = resolved.root
    try:
        bundle = Bundle.open(root, (pinned or {}).get(str(ref)))
        head = bundle.head()
    except BundleError as e:
        raise ModelLoadError(f"bundle refused: {e}") from e
    except Exception as e:  # noqa: BLE001 - any damage (a re-signed config missing a key …) is a refusal
        raise ModelLoadError(f"bundle refused: {type(e).__name__}: {e}") from e
    if embedder is None:
        factory = EMBEDDER_FACTORIES.get(backend)
        if factory is None:
            raise ModelLoadError(f"unknown backend {backend!r}; choose one of {sorted(EMBEDDER_FACTORIES)}")
        try:
            embedder = _shared_embedder(bundle, factory, device, dtype, threads, single_thread_tokens, torch_trace)
        except Exception as e:  # noqa: BLE001 - surface any backend failure as the not-ready reason
            raise ModelLoadError(f"backend {backend} failed to load {bundle.embedder_dir}: {e}") from e
    be = Backend(bundle, embedder, head, ref=str(ref or root), fallback=resolved.fallback, fetched=resolved.fetched)
    be.info = {"backend": embedder.backend, "device": embedder.device}
    try:
        be.warm_up()
        result = be.check_golden()
    except Exception as e:  # noqa: BLE001 - OSError, CUDA OOM …: a not-ready reason, never a dead loader
        reason = f"warm-up/golden check failed on {embedder.backend}/{embedder.device}: {e}"
        # the traceback's frames hold the model (and a failed call's activations): release them before
        # freeing, so a retry does not meet the failed attempt's GPU memory
        traceback.clear_frames(e.__traceback__)
        embedder = None
        be.close()
        raise ModelLoadError(reason) from e
    be.load_seconds = time.perf_counter() - t0
    if not result.passed:
        reason = f"golden set not reproduced on {embedder.backend}/{embedder.device}: {result.detail}"
        embedder = None
        be.close()
        raise ModelLoadError(reason, golden=result)
    if lkg and resolved.fallback is None and ref and ref.startswith("models:/"):
        record_lkg(ref, bundle)
    log.info(
        "loaded %s version %s (%s/%s) in %.1fs; golden: %s",
        be.name,
        be.version,
        be.backend_name,
        be.device,
        be.load_seconds,
        result.detail,
    )
    return be
