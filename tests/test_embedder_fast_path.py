"""TorchEmbedder's own encode path (tokenizers + the model's modules) equals sentence-transformers ``encode``."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from motlens.embedder import cosine_rows

torch = pytest.importorskip("torch")

LONG = "Offside Rear Brake disc worn, pitted or scored (1.1.14 (a)) " * 34  # ≈ 2,000 characters
TEXTS = [
    "Nearside Front Brake pipe corroded (1.1.11 (c))",
    "",
    LONG[:2000],
    "Horn not working (7.5 (a))",
    "  Windscreen   damage\tin zone A (3.2 (a))  ",
    "Ünïcödé 测试 🚗 tyre",
    "VIN not legible (0.2 (b))",
    "Exhaust system corroded, body sill corrosion and a very long note about where and how (6.1.1 (c))",
    "x",
]


def _reference(embedder, texts: list[str], batch_size: int) -> np.ndarray:
    return embedder._model.encode(
        texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
    )


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_encode_equals_sentence_transformers_on_padded_mixed_batches(embedder, batch_size):
    got = embedder.encode(TEXTS, batch_size=batch_size)
    ref = _reference(embedder, TEXTS, batch_size)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), embedder.dim)
    assert cosine_rows(got, ref).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_rows_keep_input_order_and_do_not_depend_on_batch_company(embedder):
    alone = np.stack([embedder.encode([t])[0] for t in TEXTS])
    together = embedder.encode(TEXTS, batch_size=len(TEXTS))
    assert cosine_rows(alone, together).min() >= 0.9999
    # distinct texts get distinct rows: a misplaced row would pair a text with another's embedding
    assert cosine_rows(together, together[::-1])[0] < 0.99


def test_prefetched_batches_equal_sequential_ones(embedder, monkeypatch):
    """The worker-thread pipeline used on CUDA (here on CPU, unpinned) gives the same rows in order."""
    sequential = embedder.encode(TEXTS, batch_size=2)
    with ThreadPoolExecutor(1) as pool:
        monkeypatch.setattr(embedder, "_prefetch", pool)
        prefetched = embedder.encode(TEXTS, batch_size=2)
    np.testing.assert_array_equal(prefetched, sequential)


def test_tokens_equal_the_transformers_tokenizer_with_truncation(embedder):
    hf = embedder._model.tokenizer(TEXTS, truncation=True, max_length=embedder.max_seq_length)
    ids = embedder.tokenize(TEXTS)
    assert ids == hf["input_ids"]
    assert len(ids[1]) == 2 and len(ids[2]) == embedder.max_seq_length


def test_encode_tokens_is_encode_of_the_same_texts(embedder):
    """One padded call over given ids (any order) gives each text the row ``encode`` gives it."""
    texts = [TEXTS[2], TEXTS[0], TEXTS[3]]
    got = embedder.encode_tokens(embedder.tokenize(texts))
    assert got.shape == (3, embedder.dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, embedder.encode(texts), atol=2e-5)


def test_empty_input(embedder):
    assert embedder.encode([]).shape == (0, embedder.dim)
    assert embedder.tokenize([]) == []
    assert embedder.encode_tokens([]).shape == (0, embedder.dim)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_cuda_path_equals_sentence_transformers_on_cuda():
    from motlens.embedder import TorchEmbedder

    emb = TorchEmbedder(device="cuda", dtype="float16")
    texts = TEXTS * 300
    got = emb.encode(texts, batch_size=512)
    ref = _reference(emb, texts, 512)
    assert cosine_rows(got, ref).min() >= 0.999


def test_cpu_forward_is_traced_and_equals_the_eager_one(embedder, monkeypatch):
    """On CPU the forward runs as a frozen TorchScript graph (GIL released), same outputs as eager."""
    assert embedder.device == "cpu" and embedder._traced is not None
    traced = embedder.encode(TEXTS, batch_size=4)
    monkeypatch.setattr(embedder, "_traced", None)
    eager = embedder.encode(TEXTS, batch_size=4)
    assert cosine_rows(traced, eager).min() >= 0.9999


def test_a_trace_that_does_not_reproduce_eager_is_not_used(embedder, monkeypatch, caplog):
    import motlens.embedder

    monkeypatch.setattr(motlens.embedder, "TRACE_MIN_COSINE", 1.01)  # no graph can reach it
    with caplog.at_level("WARNING", logger="motlens.embedder"):
        assert embedder._trace() is None
    assert "running eager" in caplog.text


def test_a_forward_the_tracer_cannot_trace_runs_eager(embedder, monkeypatch, caplog):
    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("unsupported op (injected)")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    with caplog.at_level("WARNING", logger="motlens.embedder"):
        assert embedder._trace() is None
    assert "could not be traced (RuntimeError: unsupported op (injected)); running eager" in caplog.text


def test_a_traced_graph_that_fails_to_run_is_not_used(embedder, monkeypatch, caplog):
    """Traced and frozen, but failing when run (as a JIT fuser without its compiler backend does): the
    load failed with that error instead of serving the eager forward."""

    def failing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        def run(*a):  # noqa: ANN002, ANN202
            raise RuntimeError("LLVM Backend not found (injected)")

        return run

    monkeypatch.setattr(torch.jit, "freeze", failing)
    with caplog.at_level("WARNING", logger="motlens.embedder"):
        assert embedder._trace() is None
    assert "failed on a probe batch (RuntimeError: LLVM Backend not found (injected)); running eager" in caplog.text


def test_on_cuda_the_traced_graph_runs_without_the_executors_optimisations(embedder, monkeypatch):
    """CUDA: no profiling executor (which compiles fused kernels per new input shape, stalling the batch);
    CPU keeps it. The flag is thread-local and restored after each call."""
    seen: list[bool] = []

    def graph(input_ids, attention_mask):  # noqa: ANN001, ANN202
        seen.append(torch._C._get_graph_executor_optimize())
        return input_ids + attention_mask

    assert embedder._run_traced(graph, 1, 2) == 3
    monkeypatch.setattr(embedder, "device", "cuda:0")
    assert embedder._run_traced(graph, 1, 2) == 3
    assert seen == [True, False] and torch._C._get_graph_executor_optimize()


def test_trace_false_runs_eager_with_the_same_rows(embedder):
    from motlens.embedder import TorchEmbedder

    eager = TorchEmbedder(device="cpu", trace=False)
    assert eager._traced is None and embedder._traced is not None
    assert cosine_rows(eager.encode(TEXTS, batch_size=4), embedder.encode(TEXTS, batch_size=4)).min() >= 0.9999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_is_traced_and_equals_the_eager_one(monkeypatch):
    from motlens.embedder import TorchEmbedder

    emb = TorchEmbedder(device="cuda", dtype="float16")
    assert emb._traced is not None
    texts = TEXTS * 40
    traced = emb.encode(texts, batch_size=64)
    monkeypatch.setattr(emb, "_traced", None)
    assert cosine_rows(traced, emb.encode(texts, batch_size=64)).min() >= 0.9999


def test_dtypes_are_honoured_or_refused_never_silently_replaced():
    from motlens.embedder import check_dtype

    assert check_dtype("cpu", "float32") == "float32"
    assert check_dtype("cuda:0", "float16") == "float16"
    with pytest.raises(ValueError, match="float16 is not native on this CPU"):
        check_dtype("cpu", "float16")
    with pytest.raises(ValueError, match="unknown dtype"):
        check_dtype("cpu", "int4")
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert check_dtype("cpu", "bfloat16") == "bfloat16"
    else:
        with pytest.raises(ValueError, match="AVX512-BF16 or AMX"):
            check_dtype("cpu", "bfloat16")


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no native bfloat16 (AVX512-BF16/AMX)"
)
def test_cpu_bfloat16_stays_within_the_golden_tolerance_of_float32(embedder):
    from motlens.bundle import GOLDEN_MIN_COSINE
    from motlens.embedder import TorchEmbedder

    bf16 = TorchEmbedder(device="cpu", dtype="bfloat16")
    assert bf16._traced is not None
    got = bf16.encode(TEXTS, batch_size=4)
    assert got.dtype == np.float32
    assert cosine_rows(got, embedder.encode(TEXTS, batch_size=4)).min() >= GOLDEN_MIN_COSINE


def test_loading_prints_no_library_deprecation_notices(capfd):
    """Tracing reads every attribute of the modules; the deprecation notices that set off (the jit's own,
    transformers' and sentence-transformers') are not printed at each load."""
    from motlens.embedder import TorchEmbedder

    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TorchEmbedder(device="cpu")
    messages = [str(w.message) for w in caught]
    err = capfd.readouterr().err
    for notice in ("_target_device", "is_gradient_checkpointing", "torch.jit", "loss_type"):
        assert not any(notice in m for m in messages), (notice, messages)
        assert notice not in err, (notice, err)
