"""The int8 quality gate: real int8 vs fp32 figures, refused below the thresholds, accepted above."""

from __future__ import annotations

import json
import shutil

import pytest

from motlens.embedder import cosine_rows
from motlens.onnx_embedder import OnnxEmbedder
from motlens.onnx_export import (
    INT8_FILE,
    ONNX_DIR,
    REPORT_FILE,
    batch_invariance,
    export_variants,
    int8_gate,
    quantize_int8,
)

pytestmark = pytest.mark.slow

_LOCATIONS = ("Nearside Front", "Offside Rear", "Nearside Rear", "Offside Front", "")
_DEFECTS = (
    "Brake disc worn, pitted or scored (1.1.14 (a))",
    "Tyre tread depth below requirements of 1.6mm (5.2.3 (e))",
    "Headlamp not working (4.1.1 (a))",
    "Coil spring fractured or seriously weakened (5.3.1 (b))",
    "Steering rack gaiter split (2.2.1 (c))",
    "Exhaust system leaking (8.2.1.2 (a))",
    "Windscreen wiper does not clear the windscreen effectively (3.4 (b))",
    "Seat belt anchorage insecure (7.1.1 (a))",
    "Registration plate deteriorated (0.1 (a))",
)


def _heldout() -> list[str]:
    return [f"{loc} {d}".strip() for loc in _LOCATIONS for d in _DEFECTS]


@pytest.fixture(scope="module")
def variants(onnx_model_dir, tmp_path_factory):
    """fp32 and int8 ONNX embedders over one model directory (int8 removed afterwards)."""
    quantize_int8(onnx_model_dir / ONNX_DIR)
    fp32 = OnnxEmbedder(onnx_model_dir, threads=1)
    int8 = OnnxEmbedder(onnx_model_dir, threads=1, variant="int8")
    yield fp32, int8
    (onnx_model_dir / ONNX_DIR / INT8_FILE).unlink(missing_ok=True)


def test_gate_figures_are_computed_and_thresholds_applied(variants, tiny_bundle):
    fp32, int8 = variants
    head, golden = tiny_bundle.head(), tiny_bundle.golden()
    gate = int8_gate(fp32, int8, head, golden.texts, _heldout())
    assert 0.5 < gate.golden_min_cosine < 1.0  # int8 really differs from fp32
    assert gate.golden_rows == len(golden.texts) and gate.heldout_rows == len(_heldout())
    doc = json.loads(json.dumps(gate.to_json()))
    assert doc["golden_min_cosine"] == gate.golden_min_cosine and "int8 gate" in doc["detail"]


def test_gate_refuses_just_below_and_accepts_just_above_measured_quality(variants, tiny_bundle):
    fp32, int8 = variants
    head, golden = tiny_bundle.head(), tiny_bundle.golden()
    free = {"min_cosine": 0.0, "min_agreement": 0.0, "min_batch_cosine": 0.0}
    measured = int8_gate(fp32, int8, head, golden.texts, _heldout(), **free)
    cos, agree, inv = measured.golden_min_cosine, measured.label_agreement, measured.batch_min_cosine
    strict_cos = int8_gate(fp32, int8, head, golden.texts, _heldout(), **free | {"min_cosine": cos + 1e-4})
    assert not strict_cos.passed and "REFUSED" in strict_cos.detail
    if agree < 1.0:
        strict_agree = int8_gate(fp32, int8, head, golden.texts, _heldout(), **free | {"min_agreement": agree + 1e-6})
        assert not strict_agree.passed
    strict_inv = int8_gate(fp32, int8, head, golden.texts, _heldout(), **free | {"min_batch_cosine": inv + 1e-6})
    assert not strict_inv.passed
    lenient = int8_gate(
        fp32, int8, head, golden.texts, _heldout(), min_cosine=cos - 1e-4, min_agreement=agree, min_batch_cosine=inv
    )
    assert lenient.passed


def test_dynamic_int8_is_refused_because_a_vector_moves_with_its_batch_mates(variants, tiny_bundle):
    """Dynamic quantisation scales activations per call: a served text's vector would depend on the
    other requests batched with it, and cached and uncached answers would differ."""
    fp32, int8 = variants
    golden = list(tiny_bundle.golden().texts)
    alone, together = batch_invariance(int8, golden, _heldout())
    assert float(cosine_rows(alone, together).min()) < 0.9999
    a32, t32 = batch_invariance(fp32, golden, _heldout())
    assert float(cosine_rows(a32, t32).min()) > 0.99999  # fp32 is batch-invariant
    gate = int8_gate(fp32, int8, tiny_bundle.head(), golden, _heldout(), min_cosine=0.0, min_agreement=0.0)
    assert not gate.passed and gate.batch_min_cosine < gate.min_batch_cosine_required == 0.9999
    assert "alone vs batched" in gate.detail


def test_fp32_passes_the_gate_against_torch(variants, embedder, tiny_bundle):
    fp32, _ = variants
    gate = int8_gate(embedder, fp32, tiny_bundle.head(), tiny_bundle.golden().texts, _heldout())
    assert gate.passed and gate.golden_min_cosine > 0.9999 and gate.label_agreement == 1.0
    assert gate.batch_min_cosine > 0.9999


def test_export_variants_keeps_int8_only_when_it_passes(onnx_model_dir, embedder, tiny_bundle, tmp_path):
    staged = tmp_path / "embedder"
    shutil.copytree(onnx_model_dir, staged)
    shutil.rmtree(staged / ONNX_DIR)
    result = export_variants(
        staged, tiny_bundle.head(), tiny_bundle.golden().texts, _heldout(), reference=embedder, threads=1
    )
    assert result["fp32"]["min_cosine"] >= 0.9999 and (staged / ONNX_DIR / "model.onnx").is_file()
    assert json.loads((staged / ONNX_DIR / REPORT_FILE).read_text()) == result
    assert (staged / ONNX_DIR / INT8_FILE).is_file() is result["int8"]["passed"]
