"""ONNX export correctness: the ONNX Runtime backend reproduces torch on packed and padded batches."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from motlens.embedder import cosine_rows
from motlens.onnx_embedder import OnnxEmbedder
from motlens.onnx_export import (
    EXPORT_MIN_COSINE,
    FP32_FILE,
    INT8_FILE,
    ONNX_DIR,
    OnnxExportError,
    export_cache_dir,
    is_packed_graph,
    quantize_int8,
    verify_onnx,
)
from motlens.packing import plan

pytestmark = pytest.mark.slow  # one export (~20 s) shared by the session

# Not the texts the exporter verifies itself with: lengths from 1 to ~120 tokens.
_WORDS = (
    "nearside offside front rear brake pipe hose corroded worn pitted scored tyre tread depth below legal "
    "limit steering rack gaiter split headlamp aim too high windscreen damage zone exhaust leak emits smoke "
    "suspension arm pin bush excessive play seat belt buckle not working (1.1.14 (a)) (5.2.3 (e))"
).split()


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=int(rng.integers(1, 90)))) for _ in range(n)]


@pytest.fixture(scope="module")
def onnx_embedder(onnx_model_dir) -> OnnxEmbedder:
    return OnnxEmbedder(onnx_model_dir, threads=1)


@pytest.mark.parametrize("width", [None, 96, 256, 600], ids=["auto", "w96", "w256", "w600"])
def test_export_matches_torch_on_packed_batches(onnx_embedder, embedder, width):
    """Each text's embedding is the one it gets alone, however many texts share its row."""
    texts = _texts(40, seed=7)
    rows_with_several = 0
    for size in (2, 7, 15, 16):
        for start in range(0, len(texts), size):
            chunk = texts[start : start + size]
            got = onnx_embedder.encode_unsorted(chunk, width=width)  # one call, original order
            want = embedder.encode(chunk, batch_size=len(chunk))
            assert got.shape == (len(chunk), 384) and got.dtype == np.float32
            cos = cosine_rows(got, want)
            assert cos.min() >= EXPORT_MIN_COSINE, (size, start, float(cos.min()))
            lengths = [len(x) for x in onnx_embedder.tokenize(chunk)]
            rows_with_several += sum(len(r) > 1 for r in plan(lengths, None if width is None else (width,)).rows)
    if width is not None and width >= 256:
        assert rows_with_several > 10  # the wide rows really held several texts each


def test_encode_sorts_by_length_but_keeps_order(onnx_embedder, embedder):
    texts = _texts(33, seed=11)
    got = onnx_embedder.encode(texts, batch_size=8)
    assert cosine_rows(got, embedder.encode(texts)).min() >= EXPORT_MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert onnx_embedder.encode([]).shape == (0, 384)


def test_tokens_match_sentence_transformers(onnx_embedder, embedder):
    texts = ["Horn", "Brake pipe corroded (1.1.11 (c))", "very long text " * 200]
    ids = onnx_embedder.tokenize(texts)
    assert ids == embedder.tokenize(texts)
    assert len(ids[-1]) == 256  # truncated at the sentence-transformers limit, not tokenizer.json's 128


def test_encode_tokens_is_one_packed_call_in_the_given_order(onnx_embedder):
    texts = _texts(9, seed=5)
    ids = onnx_embedder.tokenize(texts)
    got = onnx_embedder.encode_tokens(ids)
    np.testing.assert_allclose(got, onnx_embedder.encode_unsorted(texts), atol=1e-6)
    np.testing.assert_allclose(got, onnx_embedder.encode(texts, batch_size=4), atol=2e-5)
    assert onnx_embedder.encode_tokens([]).shape == (0, 384)


def test_embedder_protocol_attributes(onnx_embedder):
    assert (onnx_embedder.backend, onnx_embedder.device, onnx_embedder.dim) == ("onnx", "cpu", 384)
    assert onnx_embedder.onnx_path.name == FP32_FILE


def test_verifier_refuses_a_graph_that_differs_from_torch(onnx_model_dir, embedder, tmp_path):
    # The int8 graph is a real, slightly different model: the export verifier must refuse it.
    int8 = quantize_int8(onnx_model_dir / ONNX_DIR)
    try:
        with pytest.raises(OnnxExportError, match="does not match torch"):
            verify_onnx(int8, onnx_model_dir, embedder)
    finally:
        int8.unlink()


def test_bad_input_and_missing_variants_name_the_problem(onnx_model_dir, onnx_embedder):
    with pytest.raises(TypeError, match="item 1 is int"):
        onnx_embedder.encode(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="unknown ONNX variant"):
        OnnxEmbedder(onnx_model_dir, variant="fp16")
    assert not (onnx_model_dir / ONNX_DIR / INT8_FILE).exists()
    with pytest.raises(OnnxExportError, match="int8"):
        OnnxEmbedder(onnx_model_dir, variant="int8")


def test_model_dir_without_onnx_uses_the_verified_cache(onnx_model_dir, embedder, tmp_path, monkeypatch):
    bare = tmp_path / "bare"
    shutil.copytree(onnx_model_dir, bare, ignore=shutil.ignore_patterns(ONNX_DIR))
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path / "home"))
    cached = export_cache_dir(bare, tmp_path / "home" / "onnx-cache") / FP32_FILE
    cached.parent.mkdir(parents=True)
    shutil.copy(onnx_model_dir / ONNX_DIR / FP32_FILE, cached)  # as an earlier export would have left it
    emb = OnnxEmbedder(bare, threads=1)
    assert emb.onnx_path == cached.resolve() and not (bare / ONNX_DIR).exists()
    texts = ["Brake pipe corroded", "Nearside Front Tyre worn close to legal limit (5.2.3 (e))"]
    assert cosine_rows(emb.encode(texts), embedder.encode(texts)).min() >= EXPORT_MIN_COSINE


def test_the_export_cache_is_keyed_by_every_model_file_not_the_weights_alone(onnx_model_dir, tmp_path):
    """Keyed by the weights' sha256 alone, a bundle with MiniLM's weights and an edited config.json
    (2 layers) left its export for every later bundle of those weights: cosine 0.16-0.35 to torch."""
    import json

    genuine, edited = tmp_path / "genuine", tmp_path / "edited"
    for d in (genuine, edited):
        shutil.copytree(onnx_model_dir, d, ignore=shutil.ignore_patterns(ONNX_DIR))
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    cache = tmp_path / "onnx-cache"
    assert export_cache_dir(edited, cache) != export_cache_dir(genuine, cache)
    # what the export does not read stays out of the key: a bundle's own onnx/ folder
    assert export_cache_dir(onnx_model_dir, cache) == export_cache_dir(genuine, cache)


def _unpacked_graph(path):
    """A tiny graph in the earlier (input_ids, attention_mask) -> sentence_embedding format."""
    import onnx
    from onnx import TensorProto, helper

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])
    out = helper.make_tensor_value_info("sentence_embedding", TensorProto.INT64, ["b", "s"])
    graph = helper.make_graph([helper.make_node("Add", ["input_ids", "attention_mask"], ["sentence_embedding"])],
                              "old", [ids, mask], [out])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_bundled_graph_of_the_earlier_format_is_replaced_by_a_verified_export(
    onnx_model_dir, tmp_path, monkeypatch, caplog
):
    old = tmp_path / "old"
    shutil.copytree(onnx_model_dir, old)
    _unpacked_graph(old / ONNX_DIR / FP32_FILE)
    assert not is_packed_graph(old / ONNX_DIR / FP32_FILE)
    assert is_packed_graph(onnx_model_dir / ONNX_DIR / FP32_FILE)
    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path / "home"))
    cached = export_cache_dir(old, tmp_path / "home" / "onnx-cache") / FP32_FILE
    cached.parent.mkdir(parents=True)
    shutil.copy(onnx_model_dir / ONNX_DIR / FP32_FILE, cached)
    with caplog.at_level("WARNING"):
        emb = OnnxEmbedder(old, threads=1)
    assert emb.onnx_path == cached.resolve() and "predates the packed ONNX format" in caplog.text
    # an explicit file, or a variant other than fp32, in the earlier format is refused with the reason
    with pytest.raises(OnnxExportError, match="not a packed-format graph"):
        OnnxEmbedder(old, threads=1, onnx_path=old / ONNX_DIR / FP32_FILE)
    _unpacked_graph(old / ONNX_DIR / INT8_FILE)
    with pytest.raises(OnnxExportError, match="re-export"):
        OnnxEmbedder(old, threads=1, variant="int8")


class _CountingSession:
    """The real ONNX Runtime session, counting the calls it serves."""

    def __init__(self, session) -> None:
        self.session, self.calls = session, 0

    def run(self, *args, **kwargs):
        self.calls += 1
        return self.session.run(*args, **kwargs)


def test_small_calls_run_on_a_single_threaded_session_with_the_same_embeddings(onnx_model_dir):
    both = OnnxEmbedder(onnx_model_dir, threads=2, single_thread_tokens=128)
    plain = OnnxEmbedder(onnx_model_dir, threads=2)
    assert both.session_for(128) is both._single and both.session_for(129) is both._session
    assert plain.single_thread_tokens == 0 and plain.session_for(1) is plain._session
    assert OnnxEmbedder(onnx_model_dir, threads=1, single_thread_tokens=128).single_thread_tokens == 0

    small, main = _CountingSession(both._single), _CountingSession(both._session)
    both._single, both._session = small, main
    few = both.tokenize(["Offside Front Tyre worn close to legal limit (5.2.3 (e))", "Horn not working (7.5 (a))"])
    many = both.tokenize(_texts(24, seed=11))
    packed = [(lambda p: len(p.rows) * p.width)(plan([len(x) for x in ids])) for ids in (few, many)]
    assert packed[0] <= 128 < packed[1]
    got_few = both.encode_tokens(few)
    assert (small.calls, main.calls) == (1, 0)
    got_many = both.encode_tokens(many)
    assert (small.calls, main.calls) == (1, 1)
    np.testing.assert_allclose(got_few, plain.encode_tokens(few), atol=2e-6)
    np.testing.assert_allclose(got_many, plain.encode_tokens(many), atol=2e-6)


def test_a_single_threaded_session_that_differs_is_not_used(onnx_model_dir, monkeypatch, caplog):
    """The small-call session serves only after it reproduces the main one (here: the int8 graph, a real
    and slightly different model, stands in for a session that went wrong)."""
    import motlens.onnx_embedder as mod

    int8 = quantize_int8(onnx_model_dir / ONNX_DIR)
    real = mod._session
    try:
        with monkeypatch.context() as m, caplog.at_level("WARNING", logger="motlens.onnx_embedder"):
            m.setattr(mod, "_session", lambda path, threads, spin: real(int8 if threads == 1 else path, threads, spin))
            emb = OnnxEmbedder(onnx_model_dir, threads=2, single_thread_tokens=128)
    finally:
        int8.unlink()
    assert emb.single_thread_tokens == 0 and emb.session_for(1) is emb._session
    assert "differs from the main one" in caplog.text
    ok = OnnxEmbedder(onnx_model_dir, threads=2, single_thread_tokens=128)
    assert ok._max_difference(ok._single) <= mod.SINGLE_THREAD_TOLERANCE
