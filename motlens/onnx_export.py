"""Export MiniLM to ONNX (verified against torch) and gate the dynamic-int8 variant on quality.

Layout inside a sentence-transformers model directory (the bundle's ``embedder/``)::

    onnx/model.onnx        fp32 graph: (input_ids, position_ids, segment_ids) -> token_embeddings
                           [rows, width, 384]; rows may hold several texts back to back (segment
                           ids 1, 2, … per text, 0 for padding; positions restart per text), and
                           attention stays inside each text (see :mod:`motlens.packing`). Mean
                           pooling and L2 normalisation run in :class:`~motlens.onnx_embedder.OnnxEmbedder`.
    onnx/model_int8.onnx   dynamic int8 variant, written only when it passes the quality gate
    onnx/export.json       export verification and gate figures (what training records)

The export pitfall this module guards against: ``torch.onnx.export`` switches the module tree to
eval for tracing and afterwards restores the *exported module's* own training flag recursively. A
freshly built wrapper (``nn.Module`` defaults to ``training=True``) therefore flips the wrapped
BertModel into training mode, dropout (p=0.1) switches on, and any torch reference computed after
the export is noise (max abs diff ≈ 1.7–1.9 on hidden states). The ONNX graph itself is fine. We
put everything back in eval after exporting and always verify the file on packed and padded
batches of varying lengths before keeping it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from motlens.embedder import Embedder, cosine_rows
from motlens.head import DefectHead

ONNX_DIR = "onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
REPORT_FILE = "export.json"
OPSET = 17
#: graph inputs and output of the packed format; graphs without them (earlier exports) are not used
GRAPH_INPUTS = ("input_ids", "position_ids", "segment_ids")
GRAPH_OUTPUT = "token_embeddings"
#: names the packed format in the export cache, so an earlier format's cached export is never reused
GRAPH_FORMAT = "packed1"
#: per-row cosine an fp32 export must reach against torch on packed and padded batches
EXPORT_MIN_COSINE = 0.9999
#: the int8 quality gate (issue 4): golden-set cosine to fp32 and held-out label agreement
INT8_MIN_COSINE = 0.99
INT8_MIN_AGREEMENT = 0.99
#: a served text shares its model call with other requests' texts: its vector must not depend on them
#: (the cache keeps the first one, and cached and uncached answers must agree)
INT8_MIN_BATCH_COSINE = EXPORT_MIN_COSINE
#: texts that share the batch-invariance call with each golden text (a served CPU batch holds ≤ 64)
_BATCH_MATES = 48

# Texts of very different lengths, so every verification batch is padded or packed.
VERIFY_TEXTS: tuple[str, ...] = (
    "Horn",
    "Brake pipe corroded",
    "Nearside Front Tyre worn close to legal limit (5.2.3 (e))",
    "Offside Rear Brake disc worn, pitted or scored (1.1.14 (a))",
    "Steering rack gaiter split",
    "Exhaust emits excessive smoke, engine oil leaking onto the exhaust manifold, tester advised owner to "
    "have the vehicle inspected by a qualified mechanic before driving any further (8.2.1.2 (a))",
    "VIN not legible",
    "Windscreen damage in zone A",
    "Nearside Headlamp aim too high (4.1.2 (a)) and offside headlamp lens cracked, moisture inside unit",
    "Parking brake efficiency below requirements",
    "Seat belt",
    "Registration plate missing (0.1 (a))",
    "Offside Front Coil spring fractured (5.3.1 (b)) " * 12,
)


class OnnxExportError(RuntimeError):
    """The export could not be produced or did not match torch; nothing was kept."""


@dataclass
class ExportReport:
    path: str
    opset: int
    min_cosine: float
    max_abs_diff: float
    batches: int
    rows: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QualityGate:
    """Result of the int8 quality gate; ``to_json`` is what training and bundles record."""

    passed: bool
    golden_min_cosine: float
    golden_rows: int
    label_agreement: float
    heldout_rows: int
    batch_min_cosine: float
    min_cosine_required: float = INT8_MIN_COSINE
    min_agreement_required: float = INT8_MIN_AGREEMENT
    min_batch_cosine_required: float = INT8_MIN_BATCH_COSINE

    @property
    def detail(self) -> str:
        verdict = "passed" if self.passed else "REFUSED"
        return (
            f"int8 gate {verdict}: golden min cosine {self.golden_min_cosine:.4f} "
            f"(need ≥ {self.min_cosine_required}, {self.golden_rows} texts), held-out label agreement "
            f"{self.label_agreement:.4f} (need ≥ {self.min_agreement_required}, {self.heldout_rows} texts), "
            f"alone vs batched min cosine {self.batch_min_cosine:.6f} (need ≥ {self.min_batch_cosine_required})"
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "detail": self.detail}


def _load_torch_graph(model_dir: Path):  # noqa: ANN202 - returns (nn.Module, tokenizer)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    class PackedEncoderGraph(torch.nn.Module):
        """BertModel's token states for packed rows: block-diagonal attention, per-text positions."""

        def __init__(self, bert: Any) -> None:  # transformers' BertModel
            super().__init__()
            self.bert = bert

        def forward(
            self, input_ids: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor
        ) -> torch.Tensor:
            hidden = self.bert.embeddings(
                input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids), position_ids=position_ids
            )
            same_text = (segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)) & (segment_ids.unsqueeze(1) > 0)
            additive = (~same_text).to(hidden.dtype).unsqueeze(1) * torch.finfo(hidden.dtype).min
            return self.bert.encoder(hidden, attention_mask=additive).last_hidden_state

    bert = AutoModel.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return PackedEncoderGraph(bert).eval(), tokenizer


def max_seq_length(model_dir: Path) -> int:
    """The sentence-transformers truncation length (``sentence_bert_config.json``, default 256)."""
    cfg = Path(model_dir) / "sentence_bert_config.json"
    if cfg.is_file():
        return int(json.loads(cfg.read_text()).get("max_seq_length", 256))
    return 256


def export_fp32(
    model_dir: Path | str,
    out_dir: Path | str | None = None,
    reference: Embedder | None = None,
    min_cosine: float = EXPORT_MIN_COSINE,
) -> ExportReport:
    """Export ``model_dir`` to ``out_dir/model.onnx`` (default ``model_dir/onnx``), verified or refused.

    ``reference`` (a torch :class:`~motlens.embedder.Embedder` on the same files) is the truth the
    export must match per row on packed and padded batches; without it one is loaded.
    """
    import torch

    model_dir = Path(model_dir)
    out_dir = Path(out_dir) if out_dir else model_dir / ONNX_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    from motlens.packing import pack_ids, plan

    graph, tokenizer = _load_torch_graph(model_dir)
    ids = tokenizer(list(VERIFY_TEXTS[:3]))["input_ids"]
    example = {k: torch.from_numpy(v) for k, v in pack_ids(ids, plan([len(x) for x in ids])).items()}
    tmp = out_dir / (FP32_FILE + ".partial")
    try:
        with torch.no_grad():
            torch.onnx.export(
                graph,
                tuple(example[k] for k in GRAPH_INPUTS),
                str(tmp),
                dynamo=False,
                opset_version=OPSET,
                input_names=list(GRAPH_INPUTS),
                output_names=[GRAPH_OUTPUT],
                dynamic_axes={k: {0: "rows", 1: "width"} for k in (*GRAPH_INPUTS, GRAPH_OUTPUT)},
            )
    except Exception as e:  # noqa: BLE001 - any exporter failure is reported as one error
        tmp.unlink(missing_ok=True)
        raise OnnxExportError(f"torch.onnx.export failed: {e}") from e
    graph.eval()  # export restored the wrapper's training flag recursively; see the module docstring
    if reference is None:
        from motlens.embedder import TorchEmbedder

        reference = TorchEmbedder(model_dir, device="cpu")
    try:
        report = verify_onnx(tmp, model_dir, reference, min_cosine)
    except OnnxExportError:
        tmp.unlink(missing_ok=True)
        raise
    final = out_dir / FP32_FILE
    os.replace(tmp, final)
    report.path = str(final)
    return report


def verify_onnx(
    onnx_path: Path | str, model_dir: Path | str, reference: Embedder, min_cosine: float = EXPORT_MIN_COSINE
) -> ExportReport:
    """Compare an ONNX graph with ``reference`` on batches of 1, 3, 5 and all verify texts.

    Each batch runs twice: packed as the embedder would pack it, and in rows as wide as the longest
    text allows (``max_seq_length``), so padding and several texts per row are both checked.
    """
    from motlens.onnx_embedder import OnnxEmbedder

    onnx_emb = OnnxEmbedder(model_dir, onnx_path=Path(onnx_path), threads=1)
    texts = list(VERIFY_TEXTS)
    cos_all: list[np.ndarray] = []
    max_abs = 0.0
    batches = 0
    for size in (1, 3, 5, len(texts)):
        for start in range(0, len(texts), size):
            chunk = texts[start : start + size]
            want = reference.encode(chunk, batch_size=len(chunk))
            for width in (None, onnx_emb.max_seq_length):
                got = onnx_emb.encode_unsorted(chunk, width=width)
                cos_all.append(cosine_rows(got, want))
                max_abs = max(max_abs, float(np.abs(got - want).max()))
                batches += 1
    cos = np.concatenate(cos_all)
    report = ExportReport(str(onnx_path), OPSET, float(cos.min()), max_abs, batches, int(cos.size))
    if report.min_cosine < min_cosine:
        raise OnnxExportError(
            f"ONNX export does not match torch: min per-row cosine {report.min_cosine:.6f} < {min_cosine} "
            f"(max abs diff {max_abs:.4g}) over {batches} packed batches"
        )
    return report


def quantize_int8(onnx_dir: Path | str) -> Path:
    """Write ``model_int8.onnx`` beside ``model.onnx``: dynamic int8, per-channel, feed-forward MatMuls only.

    Of the variants swept on the benchmark bundle (``bench/int8_sweep.py``: per tensor, per channel on
    all ops, all MatMuls, FFN MatMuls, reduced range) the FFN-only one stayed closest to fp32 at
    about the same speed; attention projections stay fp32. See docs/benchmarks.md.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_dir = Path(onnx_dir)
    src = onnx_dir / FP32_FILE
    if not src.is_file():
        raise OnnxExportError(f"{src}: no fp32 ONNX model to quantize")
    matmuls = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node if n.op_type == "MatMul"]
    ffn = [n for n in matmuls if "/intermediate/" in n or ("/output/dense/" in n and "/attention/" not in n)]
    dst = onnx_dir / INT8_FILE
    quantize_dynamic(
        str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
        nodes_to_quantize=ffn or None,
    )  # fmt: skip
    return dst


def batch_invariance(emb: Embedder, texts: Sequence[str], mates: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of ``texts`` each in a call of its own and all in one call with ``mates`` (rows of ``texts``)."""
    ids = emb.tokenize([*texts, *mates])
    alone = np.vstack([emb.encode_tokens([i]) for i in ids[: len(texts)]])
    together = emb.encode_tokens(ids)[: len(texts)]
    return alone, together


def int8_gate(
    fp32: Embedder,
    int8: Embedder,
    head: DefectHead,
    golden_texts: Sequence[str],
    heldout_texts: Sequence[str],
    heldout_context: Mapping[str, Sequence[Any]] | None = None,
    min_cosine: float = INT8_MIN_COSINE,
    min_agreement: float = INT8_MIN_AGREEMENT,
    min_batch_cosine: float = INT8_MIN_BATCH_COSINE,
) -> QualityGate:
    """Golden-set cosine int8 vs fp32, held-out label agreement (section and severity both equal) and
    batch invariance: each golden text embedded alone and inside one call with held-out texts, as
    the server mixes requests. Dynamic quantisation scales activations per call, so its vectors move
    with their batch-mates; the golden cosine is the lowest over both arrangements.
    """
    if not golden_texts or not heldout_texts:
        raise ValueError("the int8 gate needs non-empty golden and held-out texts")
    golden, mates = list(golden_texts), list(heldout_texts)[:_BATCH_MATES]
    alone, together = batch_invariance(int8, golden, mates)
    ref = fp32.encode(golden)
    cos = np.minimum(cosine_rows(alone, ref), cosine_rows(together, ref))
    batch_cos = float(cosine_rows(alone, together).min())
    a = head.predict(fp32.encode(list(heldout_texts)), heldout_context)
    b = head.predict(int8.encode(list(heldout_texts)), heldout_context)
    same = (a.section_index == b.section_index) & (a.severity_scores.argmax(axis=1) == b.severity_scores.argmax(axis=1))
    agreement = float(same.mean())
    min_cos = float(cos.min())
    return QualityGate(
        passed=min_cos >= min_cosine and agreement >= min_agreement and batch_cos >= min_batch_cosine,
        golden_min_cosine=min_cos,
        golden_rows=int(cos.size),
        label_agreement=agreement,
        heldout_rows=len(heldout_texts),
        batch_min_cosine=batch_cos,
        min_cosine_required=min_cosine,
        min_agreement_required=min_agreement,
        min_batch_cosine_required=min_batch_cosine,
    )


def export_variants(
    model_dir: Path | str,
    head: DefectHead | None = None,
    golden_texts: Sequence[str] = (),
    heldout_texts: Sequence[str] = (),
    heldout_context: Mapping[str, Sequence[Any]] | None = None,
    reference: Embedder | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Export fp32 into ``model_dir/onnx`` and, given a head and texts, the gated int8 variant.

    Call it on the staged embedder directory before :func:`motlens.bundle.assemble` so the files are
    hashed into the manifest. The int8 file is deleted when the gate refuses it. Returns (and writes
    to ``onnx/export.json``) the figures to record.
    """
    from motlens.onnx_embedder import OnnxEmbedder

    model_dir = Path(model_dir)
    onnx_dir = model_dir / ONNX_DIR
    fp32_report = export_fp32(model_dir, onnx_dir, reference=reference)
    result: dict[str, Any] = {"fp32": fp32_report.to_json() | {"path": f"{ONNX_DIR}/{FP32_FILE}"}, "int8": None}
    if head is not None and golden_texts and heldout_texts:
        quantize_int8(onnx_dir)
        fp32 = OnnxEmbedder(model_dir, threads=threads)
        int8 = OnnxEmbedder(model_dir, threads=threads, variant="int8")
        gate = int8_gate(fp32, int8, head, golden_texts, heldout_texts, heldout_context)
        if not gate.passed:
            (onnx_dir / INT8_FILE).unlink()
        result["int8"] = gate.to_json() | {"path": f"{ONNX_DIR}/{INT8_FILE}" if gate.passed else None}
    (onnx_dir / REPORT_FILE).write_text(json.dumps(result, indent=2))
    return result


def is_packed_graph(onnx_path: Path | str) -> bool:
    """Whether ``onnx_path`` holds a graph in the current (packed) format."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return tuple(i.name for i in graph.input) == GRAPH_INPUTS


def model_digest(model_dir: Path) -> str:
    """Short sha256 over every file of ``model_dir`` (names and contents) but its ``onnx/``: the key of
    an export cached outside a bundle. The weights alone were the key, so a bundle with the same
    weights and another ``config.json`` left an export every later bundle of those weights ran."""
    from motlens.bundle import sha256_file

    if not any((model_dir / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise OnnxExportError(f"{model_dir}: no model weights found")
    h = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(model_dir).as_posix()
        if rel.split("/", 1)[0] != ONNX_DIR:
            h.update(f"{rel}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()[:16]


def export_cache_dir(model_dir: Path, cache_root: Path) -> Path:
    """Where :func:`cached_export` keeps the export of this model directory in the current graph format."""
    return cache_root / f"{model_digest(model_dir)}-{GRAPH_FORMAT}"


def cached_export(model_dir: Path, cache_root: Path) -> Path:
    """A verified fp32 export for a model directory that ships none (kept under ``cache_root``)."""
    target = export_cache_dir(model_dir, cache_root)
    if not (target / FP32_FILE).is_file():
        staging = target.with_name(f"{target.name}.staging-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        export_fp32(model_dir, staging)
        if (target / FP32_FILE).is_file():  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
        else:
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    return target / FP32_FILE
